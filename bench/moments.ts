/**
 * The Taylor moment reduction (DESIGN.md §5.1 Pass 1, lib/ops/moments.ts) on the GPU beside the causal
 * attention forward of the same shape, in the same run (§6 bar: moments ≤ 1.5× attention), then the
 * throughput of collecting statistics (collectTaylorStats, all layers) over a Llama-3.2-1B-shaped teacher
 * with random bf16 weights, with the moment op's share of it.
 *
 * Usage (GPU host):  node dist/bench/moments.js [--tag NAME] [--no-collect]  → table on stdout, JSON under
 *                    bench/results/ (moments-<date>[-NAME].json)
 *           (here):  node dist/bench/moments.js --smoke  (or TCAL_BENCH_SMOKE=1): CPU, tiny shapes, no JSON
 * The moment rows hand the op the context and lse of the attention forward of the same q, k, v (what
 * collectTaylorStats passes); one row leaves lse out (the online-softmax pass). The statistics pass alone is
 * timed from the op's own phase events (TCAL_MOMENTS_PROFILE) in a child process: median of 5 calls.
 *
 * Floors (B=8, T=4096, H=32, HKV=8, D=128; causal, so T²/2 visible (query, key) pairs per sequence and head):
 *   attention:   QKᵀ 2D + PV 2D flops per pair                → 4D · B·H·T²/2           = 1.10 TFLOP
 *   moments (the tensor-core pass, the teacher's context given, so A·V is not formed again):
 *                QKᵀ 2D + P·[cos θ_jσ | sin θ_jσ] 2D (φ: D/2 pairs × 2 columns) → 4D per pair on the tensor
 *                cores, the same as attention; plus per pair on CUDA cores ~6 flops (Σp, Σp·x, Σp·c, Σp·c²
 *                or the exact Δ forms near the diagonal) and one exp, as attention has. So the T² floor is
 *                attention's; the extra is issue slots for the per-pair FMAs.
 *   plus O(N) terms, N = B·T tokens:
 *                γ₀ scan: y ← γy + v, rms, Σŷ² per (token, KV head, decay, channel), Σŷ∘o per query head:
 *                ~2·N·K0·D·(HKV·4 + H) flops in fp32 (chunk-parallel, f64 chunk carries)        = 32 GFLOP
 *                Σ k̄k̄ᵀ, Σ vvᵀ per KV head as bf16 hi/lo GEMMs (3 for k̄, 1 for bf16 v): 8·N·HKV·D² = 34 GFLOP
 *                (with x: Σ xxᵀ, 2·N·Dx² as one bf16 GEMM; Dx = 4096 → 1.10 TFLOP at the bf16 rate)
 *   bytes (algorithmic minimum): q, k, v and the context read once in bf16: 2·N·D·(2H + 2·HKV) = 671 MB; the
 *                scan re-reads the context once per decay (from L2 mostly).
 *   Rates: 790 TFLOP/s bf16 dense and 4.3 TB/s measured on the host (DESIGN §6); fp32 CUDA cores 67 TFLOP/s
 *   (datasheet). The floor shown is the largest of: tensor-core flops at the bf16 rate, the O(N) fp32 flops
 *   at the fp32 rate, bytes at the bandwidth (they can overlap).
 */
import { Tensor, attentionForward, initBackend, cudaDevices, randomFill, synchronize } from '../lib';
import { parseTeacherConfig, type TeacherConfig } from '../lib/io/hf-config';
import { Teacher } from '../lib/model/teacher';
import {
  createMomentAccumulators,
  disposeMomentAccumulators,
  scanDecays,
  taylorMoments,
  taylorMomentsOnDevice,
  type MomentAccumulators,
} from '../lib/ops/moments';
import { collectTaylorStats, taylorStatsMeta, type CalibrationBatch } from '../lib/calibrate/statistics';
import { spawnSync } from 'node:child_process';
import { timeDevice, printTable, writeResults } from './common';

const SMOKE = process.argv.includes('--smoke') || process.env.TCAL_BENCH_SMOKE === '1';
const PROFILE_CHILD = process.argv.includes('--profile-child');
const argValue = (name: string): string | undefined => {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
};

interface Shape {
  B: number;
  T: number;
  H: number;
  HKV: number;
  D: number;
  /** Width of the layer input x for the Σxxᵀ row (0: none). */
  Dx: number;
}
const SHAPE: Shape = SMOKE ? { B: 2, T: 128, H: 4, HKV: 2, D: 32, Dx: 64 } : { B: 8, T: 4096, H: 32, HKV: 8, D: 128, Dx: 4096 };
const K0 = 48;

const PEAK_BF16 = 790e12;
const PEAK_F32 = 67e12;
const PEAK_BYTES = 4.3e12;

const pairs = (s: Shape): number => (s.B * s.H * s.T * s.T) / 2;
const attentionFlops = (s: Shape): number => 4 * s.D * pairs(s);
/** Tensor-core flops of the moment pass (QKᵀ and P·F) plus the bf16 GEMMs of the outer products. */
const momentFlopsT2 = (s: Shape): number => 4 * s.D * pairs(s);
const outerFlops = (s: Shape, withX: boolean): number => {
  const N = s.B * s.T;
  return 8 * N * s.HKV * s.D * s.D + (withX ? 2 * N * s.Dx * s.Dx : 0);
};
/** fp32 CUDA-core flops of the O(N) terms (the γ₀ scan). */
const momentFlopsLinear = (s: Shape, k0 = K0): number => 2 * s.B * s.T * k0 * s.D * (4 * s.HKV + s.H);
const inputBytes = (s: Shape, bytesPerElement: number): number => bytesPerElement * s.B * s.T * s.D * (s.H + 2 * s.HKV);

function floorMs(tcFlops: number, f32Flops: number, bytes: number): number {
  return Math.max(tcFlops / PEAK_BF16, f32Flops / PEAK_F32, bytes / PEAK_BYTES) * 1e3;
}

/** Llama-3.2-1B's shape (as bench/teacher.ts), or a tiny one for --smoke. */
const LLAMA_1B = {
  architectures: ['LlamaForCausalLM'], model_type: 'llama', vocab_size: 128256, hidden_size: 2048,
  intermediate_size: 8192, num_hidden_layers: 16, num_attention_heads: 32, num_key_value_heads: 8, head_dim: 64,
  rms_norm_eps: 1e-5, rope_theta: 500000, max_position_embeddings: 131072, tie_word_embeddings: true,
  hidden_act: 'silu',
};
const TINY = {
  ...LLAMA_1B, vocab_size: 512, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4,
  num_key_value_heads: 2, head_dim: 16, max_position_embeddings: 4096,
};

/** The benchmark's random bf16 q, k, v, x (fixed seeds) and the op's other inputs on `device`. */
async function kernelInputs(device: string) {
  const s = SHAPE;
  const opts = { device };
  const normal = { kind: 'normal' as const, mean: 0, std: 1 };
  const q = await randomFill(Tensor.empty([s.B, s.T, s.H, s.D], { ...opts, dtype: 'bf16' }), normal, 1);
  const k = await randomFill(Tensor.empty([s.B, s.T, s.HKV, s.D], { ...opts, dtype: 'bf16' }), normal, 2);
  const v = await randomFill(Tensor.empty([s.B, s.T, s.HKV, s.D], { ...opts, dtype: 'bf16' }), normal, 3);
  const x = await randomFill(Tensor.empty([s.B, s.T, s.Dx], { ...opts, dtype: 'bf16' }), normal, 4);
  const o = Tensor.empty([s.B, s.T, s.H, s.D], { ...opts, dtype: 'bf16' });
  const lse = Tensor.empty([s.B, s.H, s.T], opts);
  const config = parseTeacherConfig({ ...LLAMA_1B, head_dim: s.D, num_attention_heads: s.H, num_key_value_heads: s.HKV });
  const meta = taylorStatsMeta(config, scanDecays(K0));
  // θ and the decays on the host, as collectTaylorStats passes them (the op reads them there).
  const host = { device: 'cpu' };
  const invFreq = await Tensor.fromArray(Float64Array.from(meta.invFreq), [meta.invFreq.length], host);
  const decays = await Tensor.fromArray(Float64Array.from(meta.decays), [K0], host);
  return { q, k, v, x, o, lse, invFreq, decays, meta };
}

/**
 * --profile-child: the op's phase times (TCAL_MOMENTS_PROFILE lines on stderr) over `calls` calls with and
 * without lse, for the parent to take medians of.
 */
async function profileChild(device: string): Promise<void> {
  const s = SHAPE;
  const { q, k, v, o, lse, invFreq, decays } = await kernelInputs(device);
  const acc = await createMomentAccumulators({ heads: s.H, kvHeads: s.HKV, headDim: s.D, decays: K0 }, device);
  await attentionForward(q, k, v, { out: { o, lse } });
  for (const mode of ['lse', 'online'] as const) {
    const opts = mode === 'lse' ? { context: o, lse } : { context: o };
    await taylorMoments(q, k, v, invFreq, decays, acc, opts);
    await synchronize(device);
    process.env.TCAL_MOMENTS_PROFILE = '1';
    console.error(`mode ${mode}`);
    for (let i = 0; i < 5; i++) {
      await taylorMoments(q, k, v, invFreq, decays, acc, opts);
      await synchronize(device);
    }
    delete process.env.TCAL_MOMENTS_PROFILE;
  }
}

/** Median phase times (ms) per mode from the profile child's stderr. */
function profilePhases(): Record<string, Record<string, number>> {
  const r = spawnSync(process.execPath, [__filename, '--profile-child'], { encoding: 'utf8', maxBuffer: 16 << 20, env: process.env });
  const out: Record<string, Record<string, number[]>> = {};
  let mode = '';
  for (const line of (r.stderr ?? '').split('\n')) {
    const m = /^mode (\w+)/.exec(line);
    if (m) mode = m[1];
    const p = /^taylorMoments profile \(ms\):(.*)$/.exec(line);
    if (!p || !mode) continue;
    const parts = p[1].trim().split(/\s+/);
    for (let i = 0; i + 1 < parts.length; i += 2) ((out[mode] ??= {})[parts[i]] ??= []).push(Number(parts[i + 1]));
  }
  if (r.status !== 0) console.error(`profile child failed (${r.status}): ${(r.stderr ?? '').slice(-2000)}`);
  const med: Record<string, Record<string, number>> = {};
  for (const [mode, phases] of Object.entries(out))
    for (const [name, xs] of Object.entries(phases)) {
      xs.sort((a, b) => a - b);
      (med[mode] ??= {})[name] = xs[Math.floor(xs.length / 2)];
    }
  return med;
}

async function kernelRows(device: string, notes: string[]): Promise<Record<string, string | number>[]> {
  const s = SHAPE;
  const N = s.B * s.T;
  const onDevice = taylorMomentsOnDevice(device);
  if (!onDevice) notes.push(`taylorMoments does not run on ${device} in this build: inputs are copied to the CPU`);
  const opts = { device };
  const { q, k, v, x, o, lse, invFreq, decays, meta } = await kernelInputs(device);
  const oVar = Tensor.empty([1, N, s.H, s.D], { ...opts, dtype: 'bf16' });
  const lseVar = Tensor.empty([1, s.H, N], opts);
  const packed = Int32Array.from({ length: s.B + 1 }, (_, i) => i * s.T);
  const cu = await Tensor.fromArray(packed, [s.B + 1], opts);
  const cuHost = await Tensor.fromArray(packed, [s.B + 1], { device: 'cpu' });
  const acc: MomentAccumulators = await createMomentAccumulators({ heads: s.H, kvHeads: s.HKV, headDim: s.D, decays: K0, inputDim: s.Dx }, device);
  const accNoX: MomentAccumulators = await createMomentAccumulators({ heads: s.H, kvHeads: s.HKV, headDim: s.D, decays: K0 }, device);
  const acc1: MomentAccumulators = await createMomentAccumulators({ heads: s.H, kvHeads: s.HKV, headDim: s.D, decays: 1 }, device);
  const decay1 = await Tensor.fromArray(Float64Array.from([meta.decays[0]]), [1], { device: 'cpu' });
  const view = (t: Tensor, shape: number[]): Tensor => t.view(shape);
  const slow = SMOKE ? { warmup: 1, batches: 3, perBatch: 1 } : { warmup: 2, batches: 5, perBatch: 3 };
  const rows: Record<string, string | number>[] = [];
  try {
    const attnMs = await timeDevice(() => attentionForward(q, k, v, { out: o }), device, SMOKE ? slow : undefined);
    const attnLseMs = await timeDevice(() => attentionForward(q, k, v, { out: { o, lse } }), device, SMOKE ? slow : undefined);
    const attnFloor = floorMs(attentionFlops(s), 0, inputBytes(s, 2) + 2 * N * s.H * s.D);
    rows.push({ op: 'attention fwd', inputs: 'bf16', 'GFLOP': attentionFlops(s) / 1e9, 'floor ms': attnFloor, ms: attnMs, 'TFLOP/s': attentionFlops(s) / attnMs / 1e9, '× attention': 1 });
    rows.push({ op: 'attention fwd + lse', inputs: 'bf16', 'GFLOP': attentionFlops(s) / 1e9, 'floor ms': attnFloor, ms: attnLseMs, 'TFLOP/s': attentionFlops(s) / attnLseMs / 1e9, '× attention': attnLseMs / attnMs });

    const momentRow = async (
      name: string,
      run: () => Promise<void>,
      o: { withX?: boolean; k0?: number; timing?: { warmup: number; batches: number; perBatch: number } } = {},
    ): Promise<void> => {
      const ms = await timeDevice(run, device, o.timing ?? slow);
      const tc = momentFlopsT2(s) + outerFlops(s, o.withX === true);
      const lin = momentFlopsLinear(s, o.k0);
      const bytes = inputBytes(s, 2) + 2 * N * s.H * s.D + (o.withX ? 2 * N * s.Dx : 0);
      rows.push({
        op: name,
        inputs: 'bf16',
        'GFLOP': (tc + lin) / 1e9,
        'floor ms': floorMs(tc, lin, bytes),
        ms,
        'TFLOP/s': (tc + lin) / ms / 1e9,
        '× attention': ms / attnMs,
      });
    };
    // The teacher's context and lse (the attention forward above, same q, k, v) are handed over, as
    // collectTaylorStats does; o and lse hold that forward's output (the last timed call wrote them).
    await momentRow('moments [B,T] + context + lse (tensor cores)', () => taylorMoments(q, k, v, invFreq, decays, accNoX, { context: o, lse }));
    await momentRow('moments [B,T] + context, no lse (online softmax)', () => taylorMoments(q, k, v, invFreq, decays, accNoX, { context: o }));
    await attentionForward(view(q, [1, N, s.H, s.D]), view(k, [1, N, s.HKV, s.D]), view(v, [1, N, s.HKV, s.D]), {
      cuSeqlens: cu,
      out: { o: oVar, lse: lseVar },
    });
    await momentRow('moments varlen + context + lse (B=1, cuSeqlens)', () =>
      taylorMoments(view(q, [1, N, s.H, s.D]), view(k, [1, N, s.HKV, s.D]), view(v, [1, N, s.HKV, s.D]), invFreq, decays, accNoX, {
        cuSeqlens: cuHost,
        context: oVar,
        lse: lseVar,
      }),
    );
    await momentRow('moments [B,T] + context + lse, K0 = 1 (scan share)', () => taylorMoments(q, k, v, invFreq, decay1, acc1, { context: o, lse }), { k0: 1 });
    await momentRow(`moments + context + lse + Σxxᵀ (Dx=${s.Dx})`, () => taylorMoments(q, k, v, invFreq, decays, acc, { x, context: o, lse }), { withX: true });
    // The statistics pass alone (the op's phase events, in a child process).
    if (!SMOKE) {
      const phases = profilePhases();
      for (const [mode, ph] of Object.entries(phases)) {
        const ms = ph.statsTensorCores;
        console.log(`phases (${mode}, median of 5 calls, ms): ${Object.entries(ph).map(([n, t]) => `${n} ${t.toFixed(3)}`).join(', ')}`);
        if (ms !== undefined) {
          rows.push({ op: `statistics pass (${mode === 'lse' ? 'with lse' : 'online softmax'})`, inputs: 'bf16', 'GFLOP': momentFlopsT2(s) / 1e9, 'floor ms': floorMs(momentFlopsT2(s), 0, inputBytes(s, 2)), ms, 'TFLOP/s': momentFlopsT2(s) / ms / 1e9, '× attention': ms / attnMs });
        }
      }
    }
    // Without the context the CUDA-core pass forms A·V itself (~1 s per call here): timed once.
    await momentRow('moments [B,T], no context (CUDA-core pass)', () => taylorMoments(q, k, v, invFreq, decays, accNoX, {}), {
      timing: SMOKE ? slow : { warmup: 0, batches: 1, perBatch: 1 },
    });
  } finally {
    disposeMomentAccumulators(acc);
    disposeMomentAccumulators(accNoX);
    disposeMomentAccumulators(acc1);
    for (const t of [q, k, v, x, o, lse, oVar, lseVar, invFreq, decays, decay1, cu, cuHost]) t.dispose();
  }
  return rows;
}

/** Batches of `rows` sequences of `seqLen` random ids, each row its own sequence. */
function randomBatches(config: TeacherConfig, count: number, rows: number, seqLen: number, seed: number): CalibrationBatch[] {
  let state = seed >>> 0;
  const next = (): number => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state;
  };
  return Array.from({ length: count }, () => ({
    inputIds: Int32Array.from({ length: rows * seqLen }, () => next() % config.vocabSize),
    rows,
    seqLen,
  }));
}

async function collectRows(device: string): Promise<{ rows: Record<string, string | number>[]; info: Record<string, unknown> }> {
  const config = parseTeacherConfig(SMOKE ? TINY : LLAMA_1B);
  const teacher = await Teacher.random(config, { device, dtype: 'bf16', seed: 1 });
  // --collect-batches N: more batches show the per-token cost apart from the per-call fixed cost (accumulators
  // set up and read back once per collectTaylorStats call).
  const arg = process.argv.indexOf('--collect-batches');
  const [count, rows, seqLen] = SMOKE ? [2, 1, 64] : [arg >= 0 ? Number(process.argv[arg + 1]) : 2, 2, 2048];
  const tokens = count * rows * seqLen;
  const batches = randomBatches(config, count, rows, seqLen, 7);
  const warm = randomBatches(config, 1, rows, seqLen, 9);
  const last = config.numLayers - 1;
  const time = async (fn: () => Promise<void>): Promise<number> => {
    await synchronize(device);
    const t0 = process.hrtime.bigint();
    await fn();
    await synchronize(device);
    return Number(process.hrtime.bigint() - t0) / 1e6;
  };
  try {
    const forward = async (bs: CalibrationBatch[]): Promise<void> => {
      for (const b of bs) (await teacher.hidden(b.inputIds, [b.rows, b.seqLen], { stopAfterLayer: last })).dispose();
    };
    await forward(warm);
    // The warm-up collection prints the op's phase times per layer (TCAL_MOMENTS_PROFILE) for bench/NOTES.
    if (!SMOKE) process.env.TCAL_MOMENTS_PROFILE = '1';
    try {
      await collectTaylorStats(teacher, warm);
    } finally {
      delete process.env.TCAL_MOMENTS_PROFILE;
    }
    const forwardMs = await time(() => forward(batches));
    const collectMs = await time(async () => void (await collectTaylorStats(teacher, batches)));
    const momentsMs = Math.max(0, collectMs - forwardMs);
    const out = [
      { step: 'teacher forward (all layers, no LM head)', tokens, ms: forwardMs, 'tokens/s': tokens / (forwardMs / 1e3), share: forwardMs / collectMs },
      { step: `moments (${config.numLayers} layers, incl. Σxxᵀ Dx=${config.hiddenSize})`, tokens, ms: momentsMs, 'tokens/s': tokens / (momentsMs / 1e3), share: momentsMs / collectMs },
      { step: 'collectTaylorStats total', tokens, ms: collectMs, 'tokens/s': tokens / (collectMs / 1e3), share: 1 },
    ];
    return {
      rows: out,
      info: { model: SMOKE ? 'tiny' : 'Llama-3.2-1B shape, random bf16 weights', batches: count, rows, seqLen, layers: config.numLayers, decays: K0 },
    };
  } finally {
    teacher.dispose();
  }
}

async function main(): Promise<void> {
  const backend = initBackend({ backend: SMOKE ? 'cpu' : 'cuda' });
  const device = backend.device;
  if (PROFILE_CHILD) return profileChild(device);
  const s = SHAPE;
  const notes: string[] = [];
  if (SMOKE) notes.push('smoke run: CPU, tiny shapes; timings mean nothing');
  console.log(
    `shape B${s.B} T${s.T} H${s.H}/${s.HKV} D${s.D}, K0=${K0}: attention ${(attentionFlops(s) / 1e9).toFixed(1)} GFLOP; ` +
      `moments tensor-core T² part ${(momentFlopsT2(s) / 1e9).toFixed(1)} GFLOP (${(momentFlopsT2(s) / attentionFlops(s)).toFixed(3)}× attention), ` +
      `k/v outer GEMMs ${(outerFlops(s, false) / 1e9).toFixed(1)} GFLOP, scan ${(momentFlopsLinear(s) / 1e9).toFixed(1)} GFLOP fp32 ` +
      `(+${((2 * s.B * s.T * s.Dx * s.Dx) / 1e9).toFixed(1)} with Σxxᵀ, Dx=${s.Dx}); ` +
      `q,k,v bf16 ${(inputBytes(s, 2) / 1e6).toFixed(0)} MB`,
  );
  console.log(`floors at ${PEAK_BF16 / 1e12} TFLOP/s bf16, ${PEAK_F32 / 1e12} TFLOP/s fp32 (CUDA cores), ${PEAK_BYTES / 1e12} TB/s`);
  const kernels = await kernelRows(device, notes);
  printTable(kernels);
  const moments = kernels.find((r) => r.op === 'moments [B,T] + context + lse (tensor cores)');
  if (moments) console.log(`moments / attention = ${(moments['× attention'] as number).toFixed(2)} (DESIGN §6 bar: ≤ 1.5)`);
  const stats = kernels.find((r) => r.op === 'statistics pass (with lse)');
  if (stats) console.log(`statistics pass / attention = ${(stats['× attention'] as number).toFixed(2)} (issue 5 goal: ≤ 1.2)`);
  const collect = process.argv.includes('--no-collect') ? { rows: [], info: { skipped: true } } : await collectRows(device);
  console.log(`\ncollecting statistics: ${JSON.stringify(collect.info)}`);
  printTable(collect.rows);
  console.log('moments time = collectTaylorStats − forward over the same batches (includes accumulator set-up and read-back)');
  for (const n of notes) console.log(`note: ${n}`);
  if (SMOKE) {
    console.log('smoke: results not written');
    return;
  }
  const tag = argValue('--tag');
  const file = writeResults(tag ? `moments-${tag}` : 'moments', {
    device: cudaDevices()[0],
    date: new Date().toISOString(),
    shape: { ...s, K0 },
    floors: { peakBf16Tflops: PEAK_BF16 / 1e12, peakF32Tflops: PEAK_F32 / 1e12, peakTBs: PEAK_BYTES / 1e12 },
    flops: { attention: attentionFlops(s), momentsTensorCore: momentFlopsT2(s), outerKV: outerFlops(s, false), scan: momentFlopsLinear(s), inputOuterX: 2 * s.B * s.T * s.Dx * s.Dx },
    kernels,
    collect,
    notes,
  });
  console.log(`wrote ${file}`);
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});

/**
 * The Taylor moment reduction (DESIGN.md §5.1 Pass 1, lib/ops/moments.ts) on the GPU beside the causal
 * attention forward of the same shape, in the same run (§6 bar: moments ≤ 1.5× attention), then the
 * throughput of collecting statistics (collectTaylorStats, all layers) over a Llama-3.2-1B-shaped teacher
 * with random bf16 weights, with the moment op's share of it.
 *
 * Usage (GPU host):  node dist/bench/moments.js          → table on stdout, JSON under bench/results/
 *           (here):  node dist/bench/moments.js --smoke  (or TCAL_BENCH_SMOKE=1): CPU, tiny shapes, no JSON
 *
 * Floors (B=8, T=4096, H=32, HKV=8, D=128; causal, so T²/2 visible (query, key) pairs per sequence and head):
 *   attention:   QKᵀ 2D + PV 2D flops per pair                → 4D · B·H·T²/2           = 1.10 TFLOP
 *   moments:     QKᵀ 2D + P·V 2D (the context o) + P·[cos θ_jσ, sin θ_jσ] 2D (φ, D/2 pairs × 2)
 *                + ~7 masked row sums of P (20 distance bins are one add each, sink, local, l, entropy,
 *                Σ A s, Σ A s²: count 2·7)                      → (6D + 14) · B·H·T²/2    = 1.68 TFLOP
 *                So the T² work alone is 1.53× attention's: the §6 bar of 1.5× is the floor ratio, reachable
 *                only if the moment kernel runs its GEMMs as efficiently as attention does.
 *   plus O(N) terms, N = B·T tokens, in f64 as the kernel accumulates them:
 *                γ₀ scan: y ← γy + v, Σŷ², Σŷ∘o per (token, head, decay, channel), ~6 flops  → 6·N·H·K0·D = 38.7 GFLOP
 *                Σ k̄k̄ᵀ, Σ vvᵀ per KV head: 2 · 2·N·HKV·D²                                   = 17.2 GFLOP
 *                (with x: Σ xxᵀ, 2·N·Dx²; Dx = 4096 → 1.10 TFLOP in f64 — as much as the attention itself)
 *   bytes (algorithmic minimum): q, k, v read once in bf16: 2·N·D·(H + 2·HKV) = 403 MB; the accumulators
 *                are < 10 MB. This kernel also writes and reads back the f32 context (N·H·D·4 = 537 MB each way).
 *   Rates: 790 TFLOP/s bf16 dense and 4.3 TB/s measured on the host (DESIGN §6); f64: 34 TFLOP/s vector,
 *   67 TFLOP/s tensor core (H200 datasheet, not measured). The floor shown is the largest of: T² flops at the
 *   bf16 rate, O(N) f64 flops at the f64 vector rate, bytes at the bandwidth (they can overlap).
 */
import { Tensor, attentionForward, initBackend, cudaDevices, randomFill, cast, synchronize } from '../lib';
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
import { timeDevice, printTable, writeResults } from './common';

const SMOKE = process.argv.includes('--smoke') || process.env.TCAL_BENCH_SMOKE === '1';

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
const PEAK_F64 = 34e12;
const PEAK_BYTES = 4.3e12;

const pairs = (s: Shape): number => (s.B * s.H * s.T * s.T) / 2;
const attentionFlops = (s: Shape): number => 4 * s.D * pairs(s);
const momentFlopsT2 = (s: Shape): number => (6 * s.D + 14) * pairs(s);
const momentFlopsLinear = (s: Shape, withX: boolean): number => {
  const N = s.B * s.T;
  return 6 * N * s.H * K0 * s.D + 4 * N * s.HKV * s.D * s.D + (withX ? 2 * N * s.Dx * s.Dx : 0);
};
const inputBytes = (s: Shape, bytesPerElement: number): number => bytesPerElement * s.B * s.T * s.D * (s.H + 2 * s.HKV);

function floorMs(t2Flops: number, f64Flops: number, bytes: number): number {
  return Math.max(t2Flops / PEAK_BF16, f64Flops / PEAK_F64, bytes / PEAK_BYTES) * 1e3;
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

async function kernelRows(device: string, notes: string[]): Promise<Record<string, string | number>[]> {
  const s = SHAPE;
  const N = s.B * s.T;
  const onDevice = taylorMomentsOnDevice(device);
  if (!onDevice) notes.push(`taylorMoments does not run on ${device} in this build: inputs are copied to the CPU`);
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
  const invFreq = await Tensor.fromArray(Float64Array.from(meta.invFreq), [meta.invFreq.length], opts);
  const decays = await Tensor.fromArray(Float64Array.from(meta.decays), [K0], opts);
  const packed = Int32Array.from({ length: s.B + 1 }, (_, i) => i * s.T);
  const cu = await Tensor.fromArray(packed, [s.B + 1], opts);
  const acc: MomentAccumulators = await createMomentAccumulators({ heads: s.H, kvHeads: s.HKV, headDim: s.D, decays: K0, inputDim: s.Dx }, device);
  const accNoX: MomentAccumulators = await createMomentAccumulators({ heads: s.H, kvHeads: s.HKV, headDim: s.D, decays: K0 }, device);
  const view = (t: Tensor, shape: number[]): Tensor => t.view(shape);
  const slow = SMOKE ? { warmup: 1, batches: 3, perBatch: 1 } : { warmup: 2, batches: 5, perBatch: 3 };
  const rows: Record<string, string | number>[] = [];
  try {
    const attnMs = await timeDevice(() => attentionForward(q, k, v, { out: o }), device, SMOKE ? slow : undefined);
    const attnLseMs = await timeDevice(() => attentionForward(q, k, v, { out: { o, lse } }), device, SMOKE ? slow : undefined);
    const attnFloor = floorMs(attentionFlops(s), 0, inputBytes(s, 2) + 2 * N * s.H * s.D);
    rows.push({ op: 'attention fwd', inputs: 'bf16', 'GFLOP': attentionFlops(s) / 1e9, 'floor ms': attnFloor, ms: attnMs, 'TFLOP/s': attentionFlops(s) / attnMs / 1e9, '× attention': 1 });
    rows.push({ op: 'attention fwd + lse', inputs: 'bf16', 'GFLOP': attentionFlops(s) / 1e9, 'floor ms': attnFloor, ms: attnLseMs, 'TFLOP/s': attentionFlops(s) / attnLseMs / 1e9, '× attention': attnLseMs / attnMs });

    const momentRow = async (name: string, inputs: string, run: () => Promise<void>, withX: boolean): Promise<void> => {
      const ms = await timeDevice(run, device, slow);
      const flops = momentFlopsT2(s) + momentFlopsLinear(s, withX);
      const bytes = inputBytes(s, inputs === 'f32' ? 4 : 2) + (withX ? (inputs === 'f32' ? 4 : 2) * N * s.Dx : 0);
      rows.push({
        op: name,
        inputs,
        'GFLOP': flops / 1e9,
        'floor ms': floorMs(momentFlopsT2(s), momentFlopsLinear(s, withX), bytes),
        ms,
        'TFLOP/s': flops / ms / 1e9,
        '× attention': ms / attnMs,
      });
    };
    await momentRow('moments [B,T]', 'bf16', () => taylorMoments(q, k, v, invFreq, decays, accNoX, {}), false);
    await momentRow(
      'moments varlen (B=1, cuSeqlens)',
      'bf16',
      () => taylorMoments(view(q, [1, N, s.H, s.D]), view(k, [1, N, s.HKV, s.D]), view(v, [1, N, s.HKV, s.D]), invFreq, decays, accNoX, { cuSeqlens: cu }),
      false,
    );
    await momentRow(`moments + Σxxᵀ (Dx=${s.Dx})`, 'bf16', () => taylorMoments(q, k, v, invFreq, decays, acc, { x }), true);
    // f32 inputs, as a check that the dtype does not matter much (the kernel computes in f32 either way).
    const [q32, k32, v32] = [await cast(q, 'f32'), await cast(k, 'f32'), await cast(v, 'f32')];
    try {
      await momentRow('moments [B,T]', 'f32', () => taylorMoments(q32, k32, v32, invFreq, decays, accNoX, {}), false);
    } finally {
      for (const t of [q32, k32, v32]) t.dispose();
    }
  } finally {
    disposeMomentAccumulators(acc);
    disposeMomentAccumulators(accNoX);
    for (const t of [q, k, v, x, o, lse, invFreq, decays, cu]) t.dispose();
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
  const [count, rows, seqLen] = SMOKE ? [2, 1, 64] : [2, 2, 2048];
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
    await collectTaylorStats(teacher, warm);
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
  const s = SHAPE;
  const notes: string[] = [];
  if (SMOKE) notes.push('smoke run: CPU, tiny shapes; timings mean nothing');
  console.log(
    `shape B${s.B} T${s.T} H${s.H}/${s.HKV} D${s.D}, K0=${K0}: attention ${(attentionFlops(s) / 1e9).toFixed(1)} GFLOP; ` +
      `moments T² part ${(momentFlopsT2(s) / 1e9).toFixed(1)} GFLOP (${(momentFlopsT2(s) / attentionFlops(s)).toFixed(3)}× attention), ` +
      `O(N) f64 part ${(momentFlopsLinear(s, false) / 1e9).toFixed(1)} GFLOP (+${((2 * s.B * s.T * s.Dx * s.Dx) / 1e9).toFixed(1)} with Σxxᵀ, Dx=${s.Dx}); ` +
      `q,k,v bf16 ${(inputBytes(s, 2) / 1e6).toFixed(0)} MB`,
  );
  console.log(`floors at ${PEAK_BF16 / 1e12} TFLOP/s bf16, ${PEAK_F64 / 1e12} TFLOP/s f64 (vector), ${PEAK_BYTES / 1e12} TB/s`);
  const kernels = await kernelRows(device, notes);
  printTable(kernels);
  const moments = kernels.find((r) => r.op === 'moments [B,T]' && r.inputs === 'bf16');
  if (moments) console.log(`moments / attention = ${(moments['× attention'] as number).toFixed(2)} (DESIGN §6 bar: ≤ 1.5)`);
  const collect = await collectRows(device);
  console.log(`\ncollecting statistics: ${JSON.stringify(collect.info)}`);
  printTable(collect.rows);
  console.log('moments time = collectTaylorStats − forward over the same batches (includes accumulator set-up and read-back)');
  for (const n of notes) console.log(`note: ${n}`);
  if (SMOKE) {
    console.log('smoke: results not written');
    return;
  }
  const file = writeResults('moments', {
    device: cudaDevices()[0],
    date: new Date().toISOString(),
    shape: { ...s, K0 },
    floors: { peakBf16Tflops: PEAK_BF16 / 1e12, peakF64Tflops: PEAK_F64 / 1e12, peakTBs: PEAK_BYTES / 1e12 },
    flops: { attention: attentionFlops(s), momentsT2: momentFlopsT2(s), momentsLinear: momentFlopsLinear(s, false), inputOuterX: 2 * s.B * s.T * s.Dx * s.Dx },
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

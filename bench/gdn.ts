/**
 * Gated DeltaNet kernels on the GPU beside fla's Triton chunk_gated_delta_rule, same inputs, same run.
 * Usage (GPU host, fla's `fla/` package on PYTHONPATH): node dist/bench/gdn.js [--no-peer] [--once | --once-bwd
 * [--full]] [--no-variants | --no-fwd-variants] [--skip-variants REGEX]
 * [--shapes REGEX]
 * (--once: two forward calls at the reference shape only, as a target for ncu; --once-bwd: a training forward
 * and one backward with its saved states, --full: with the full hand-over; --no-variants: skip the forward and
 * backward versions timed side by side; --no-fwd-variants: only the backward's; --skip-variants: leave out the
 * versions whose label matches, e.g. an opt-in kernel whose tests failed in the same call; --shapes REGEX: only the
 * shapes whose name matches)
 * Forward + backward three ways: the backward recomputing the chunk-start states, a training forward
 * (saveForBackward) handing them over, and one handing over the backward prep's outputs too
 * (saveForBackward 'full': the backward skips its prep); the saved memory per shape.
 * Shapes: B8·T4096·H16·K=V=128 (reference), B2·T16384·H16·D128, B8·T4096·H32·D64; bf16 q/k/v, f32 g/β,
 * in-kernel q/k L2 norm (as fla's use_qk_l2norm_in_kernel). Floors first (bytes / bandwidth, FLOPs / rate),
 * then ours and fla's medians, our forward output against fla's, tokens/s. JSON under bench/results/.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { Tensor, initBackend, cudaDevices, randomFill, gdnForward, gdnBackward } from '../lib';
import type { GdnSaved } from '../lib/ops/gdn';
import { timeDevice, hostDispatch, runPythonPeer, printTable, writeResults } from './common';

interface Shape {
  name: string;
  B: number;
  T: number;
  H: number;
  HV: number;
  K: number;
  V: number;
}

const SHAPES: Shape[] = [
  { name: 'B8 T4096 H16 D128 (ref)', B: 8, T: 4096, H: 16, HV: 16, K: 128, V: 128 },
  { name: 'B2 T16384 H16 D128', B: 2, T: 16384, H: 16, HV: 16, K: 128, V: 128 },
  { name: 'B8 T4096 H32 D64', B: 8, T: 4096, H: 32, HV: 32, K: 64, V: 64 },
];

/** Ceilings measured on the H200 host (DESIGN.md §6). */
const BANDWIDTH = 4.3e12; // bytes/s
const BF16_RATE = 790e12; // FLOP/s dense

/** Minimum bytes and FLOPs of the chunked algorithm (C = 64), forward and backward. */
function floors(s: Shape): Record<string, number> {
  const tok = s.B * s.T;
  const C = 64;
  const qk = 2 * tok * s.H * s.K * 2; // q, k bf16
  const vv = tok * s.HV * s.V * 2;
  const gates = 2 * tok * s.HV * 4;
  const fwdBytes = qk + vv + gates + vv; // read q, k, v, g, β; write o
  const bwdBytes = qk + 2 * vv + gates + qk + vv + gates; // read q, k, v, dO, g, β; write dq, dk, dv, dg, dβ
  // per token and value head: KKᵀ, QKᵀ, W = A·βK (3·C·K), U = A·βV, (QKᵀ)ν (2·C·V), W·S, Q·S, state update (3·K·V)
  const perTok = 2 * (3 * C * s.K + 2 * C * s.V + 3 * s.K * s.V);
  const fwdFlops = tok * s.HV * perTok;
  const bwdFlops = 2 * fwdFlops; // the backward's products are about twice the forward's (recompute excluded)
  const f = (bytes: number, flops: number) => Math.max(bytes / BANDWIDTH, flops / BF16_RATE) * 1e3;
  return {
    fwdGB: fwdBytes / 1e9,
    bwdGB: bwdBytes / 1e9,
    fwdGFLOP: fwdFlops / 1e9,
    bwdGFLOP: bwdFlops / 1e9,
    fwdFloorMs: f(fwdBytes, fwdFlops),
    bwdFloorMs: f(bwdBytes, bwdFlops),
    fwdBwdFloorMs: f(fwdBytes, fwdFlops) + f(bwdBytes, bwdFlops),
  };
}

async function hostBytes(t: Tensor): Promise<Buffer> {
  const a = await t.toArray();
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}

/**
 * Every row: 20 calls per timed batch. A batch starts from an idle GPU (timeDevice synchronises around it), so the
 * first call's host dispatch is in the batch's time: with 3–5 calls per batch (sessions 1–8) that bubble was a few
 * % of a row (run 6 against run 8 of session 8), while fla's do_bench times each call by CUDA events behind its L2
 * flush, where no dispatch gap shows. 20 calls make the bubble ≈ 1 % of a forward row.
 */
const TIMING = { warmup: 3, batches: 5, perBatch: 20 };

/** Forward versions timed side by side: label → environment (see native/cuda/gdn_fwd_tc.cu, gdn_fwd_v3.cu). */
const FORWARD_VARIANTS: [string, Record<string, string>][] = [
  ['v5 (default)', {}],
  ['ws wide (CG=4)', { TCAL_GDN_WS: 'wide' }],
  ['ws small (CG=2, K split)', { TCAL_GDN_WS: 'small' }],
  ['ring (v7, loads by cp.async)', { TCAL_GDN_WS: 'ring' }],
  ['ringbulk (ring on mma.sync, loads by tensor / bulk copies on mbarriers; the default where V % 128 = 0 and its blocks fill the SMs, sm_90, until session 11)', { TCAL_GDN_WS: 'ringbulk' }],
  ['ringwg (ring on wgmma, sm_90a, K = 128; session 11)', { TCAL_GDN_WS: 'ringwg' }],
  ['prep kernel alone', { TCAL_GDN_V3_SKIP: 'state' }],
  ['state pass launched plainly, not as a programmatic dependent of the prep (TCAL_GDN_PDL=0; before session 10)', { TCAL_GDN_PDL: '0' }],
  ['index tables uploaded at every call (TCAL_GDN_TABLES=upload; before session 10)', { TCAL_GDN_TABLES: 'upload' }],
  ['v5 (default) again, at the end of the switch list (session 10 run 2: 0.490 first, 0.514 in the main table)', {}],
  ['state kernel alone', { TCAL_GDN_V3_SKIP: 'prep' }],
  ['state kernel alone, ring', { TCAL_GDN_V3_SKIP: 'prep', TCAL_GDN_WS: 'ring' }],
  ['state kernel alone, ringbulk', { TCAL_GDN_V3_SKIP: 'prep', TCAL_GDN_WS: 'ringbulk' }],
  ['state kernel alone, ringwg', { TCAL_GDN_V3_SKIP: 'prep', TCAL_GDN_WS: 'ringwg' }],
];
/** Backward versions (saved states) timed side by side: label → environment (native/cuda/gdn_bwd_tc.cu). */
const BACKWARD_VARIANTS: [string, Record<string, string>][] = [
  ['v5 (default)', {}],
  ['f32 states', { TCAL_GDN_STATES: 'f32' }],
  ['kernel 3 serial band (phase-2 blocks on warps 0–3, before session 9)', { TCAL_GDN_BWD_K3: 'serial' }],
];
/** Every variable a variant may set; each is cleared between variants. */
const VARIANT_KEYS = [
  'TCAL_GDN_FORWARD',
  'TCAL_GDN_WS',
  'TCAL_GDN_V3_SKIP',
  'TCAL_GDN_STATES',
  'TCAL_GDN_BWD_K3',
  'TCAL_GDN_PDL',
  'TCAL_GDN_TABLES',
];

/** Runs fn with the environment `env` (every VARIANT_KEYS variable cleared first), restoring it afterwards. */
async function withEnv<T>(env: Record<string, string>, fn: () => Promise<T>): Promise<T> {
  const saved = Object.fromEntries(VARIANT_KEYS.map((k) => [k, process.env[k]]));
  for (const k of VARIANT_KEYS) delete process.env[k];
  Object.assign(process.env, env);
  try {
    return await fn();
  } finally {
    for (const k of VARIANT_KEYS) {
      if (saved[k] === undefined) delete process.env[k];
      else process.env[k] = saved[k];
    }
  }
}

/** ‖ours − fla‖ / ‖fla‖ with fla's o given as raw bf16 words. */
function agreementWith(a: Float32Array, raw: Buffer): number {
  const words = new Uint16Array(raw.buffer, raw.byteOffset, raw.byteLength / 2);
  let num = 0;
  let den = 0;
  const u = new Uint32Array(1);
  const f = new Float32Array(u.buffer);
  for (let j = 0; j < a.length; j++) {
    u[0] = words[j] << 16;
    num += (a[j] - f[0]) ** 2;
    den += f[0] ** 2;
  }
  return Math.sqrt(num / den);
}

async function main(): Promise<void> {
  const noPeer = process.argv.includes('--no-peer');
  const noVariants = process.argv.includes('--no-variants');
  const noFwdVariants = noVariants || process.argv.includes('--no-fwd-variants');
  const skipAt = process.argv.indexOf('--skip-variants');
  const skip = skipAt > 0 && process.argv[skipAt + 1] ? new RegExp(process.argv[skipAt + 1]) : undefined;
  const kept = (variants: [string, Record<string, string>][]) => variants.filter(([label]) => !skip?.test(label));
  const shapesAt = process.argv.indexOf('--shapes');
  const only = shapesAt > 0 && process.argv[shapesAt + 1] ? new RegExp(process.argv[shapesAt + 1]) : undefined;
  const shapes = SHAPES.filter((s) => !only || only.test(s.name));
  const backend = initBackend({ backend: 'cuda' });
  const device = backend.device;
  const onceBwd = process.argv.includes('--once-bwd');
  if (process.argv.includes('--once') || onceBwd) {
    // Two forward calls (--once-bwd: a training forward and a backward with its saved states) at the reference
    // shape and nothing else: a target for a profiler (ncu).
    const s = SHAPES[0];
    const mk = (shape: number[], dtype?: 'bf16') => Tensor.empty(shape, { device, dtype });
    const ins = {
      q: await randomFill(mk([s.B, s.T, s.H, s.K], 'bf16'), { kind: 'normal' }, 1),
      k: await randomFill(mk([s.B, s.T, s.H, s.K], 'bf16'), { kind: 'normal' }, 2),
      v: await randomFill(mk([s.B, s.T, s.HV, s.V], 'bf16'), { kind: 'normal' }, 3),
      g: await randomFill(mk([s.B, s.T, s.HV]), { kind: 'uniform', low: -0.2, high: -0.005 }, 4),
      beta: await randomFill(mk([s.B, s.T, s.HV]), { kind: 'uniform', low: 0.05, high: 0.95 }, 5),
    };
    if (onceBwd) {
      const f = await gdnForward(ins, { l2norm: true, saveForBackward: process.argv.includes('--full') ? 'full' : true });
      const dO = await randomFill(mk([s.B, s.T, s.HV, s.V], 'bf16'), { kind: 'normal' }, 6);
      await gdnBackward(ins, dO, { l2norm: true, saved: f.saved });
      return;
    }
    for (let i = 0; i < 2; i++) (await gdnForward(ins, { l2norm: true })).o.dispose();
    return;
  }
  const gpu = cudaDevices()[0];
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tcal-gdn-'));
  const floorRows = shapes.map((s) => ({ shape: s.name, ...floors(s) }));
  console.log('floors (ms) at 4.3 TB/s and 790 TFLOP/s bf16:');
  printTable(floorRows);

  type Inputs = { q: Tensor; k: Tensor; v: Tensor; g: Tensor; beta: Tensor; dO: Tensor };
  const inputs: Inputs[] = [];
  const peerShapes = [];
  for (const [i, s] of shapes.entries()) {
    const dir = path.join(tmp, `s${i}`);
    fs.mkdirSync(dir);
    const seed = 100 * (i + 1);
    const x: Inputs = {
      q: await randomFill(Tensor.empty([s.B, s.T, s.H, s.K], { device, dtype: 'bf16' }), { kind: 'normal' }, seed),
      k: await randomFill(Tensor.empty([s.B, s.T, s.H, s.K], { device, dtype: 'bf16' }), { kind: 'normal' }, seed + 1),
      v: await randomFill(Tensor.empty([s.B, s.T, s.HV, s.V], { device, dtype: 'bf16' }), { kind: 'normal' }, seed + 2),
      // log decays in [−0.2, −0.005], β in [0.05, 0.95]
      g: await randomFill(Tensor.empty([s.B, s.T, s.HV], { device }), { kind: 'uniform', low: -0.2, high: -0.005 }, seed + 3),
      beta: await randomFill(Tensor.empty([s.B, s.T, s.HV], { device }), { kind: 'uniform', low: 0.05, high: 0.95 }, seed + 4),
      dO: await randomFill(Tensor.empty([s.B, s.T, s.HV, s.V], { device, dtype: 'bf16' }), { kind: 'normal' }, seed + 5),
    };
    inputs.push(x);
    if (!noPeer) {
      for (const name of ['q', 'k', 'v', 'g', 'beta'] as const) fs.writeFileSync(path.join(dir, `${name}.bin`), await hostBytes(x[name]));
      peerShapes.push({ ...s, dir });
    }
  }
  const peerT0 = Date.now();
  const peer = noPeer
    ? { rows: [] as { name: string; fwd_ms: number; fwdbwd_ms: number }[], error: 'skipped (--no-peer)' }
    : runPythonPeer<{ name: string; fwd_ms: number; fwdbwd_ms: number }>(
        path.resolve(__dirname, '..', '..', 'bench', 'peers', 'fla_gdn.py'),
        peerShapes,
      );

  console.log(`fla peer: ${peer.rows.map((r) => `${r.name} fwd ${r.fwd_ms.toFixed(3)} f+b ${r.fwdbwd_ms.toFixed(3)}`).join('; ')} (${((Date.now() - peerT0) / 1e3).toFixed(0)} s)`);
  const rows: Record<string, string | number>[] = [];
  const variantRows: Record<string, string | number>[] = [];
  const bwdVariantRows: Record<string, string | number>[] = [];
  for (const [i, s] of shapes.entries()) {
    const x = inputs[i];
    const ins = { q: x.q, k: x.k, v: x.v, g: x.g, beta: x.beta };
    const opts = { l2norm: true };
    let agreement = NaN;
    const oFile = path.join(tmp, `s${i}`, 'o.bin');
    if (fs.existsSync(oFile)) {
      const ours = await gdnForward(ins, opts);
      agreement = agreementWith(await ours.o.toFloat32(), fs.readFileSync(oFile));
      ours.o.dispose();
    }
    // A discarded warm-up: the first timed row after fla's Python run read 0.912 ms for the 0.643 ms kernel (session 8 run 2).
    await timeDevice(async () => (await gdnForward(ins, opts)).o.dispose(), device, { warmup: 5, batches: 3, perBatch: 5 });
    // Forward versions side by side (environment switches, see FORWARD_VARIANTS).
    for (const [label, env] of noFwdVariants ? [] : kept(FORWARD_VARIANTS)) {
      const skip = env.TCAL_GDN_V3_SKIP !== undefined;
      try {
        await withEnv(env, async () => {
          let agree = NaN;
          if (fs.existsSync(oFile) && !skip) {
            const ours = await gdnForward(ins, opts);
            agree = agreementWith(await ours.o.toFloat32(), fs.readFileSync(oFile));
            ours.o.dispose();
          }
          const ms = await timeDevice(async () => (await gdnForward(ins, opts)).o.dispose(), device, TIMING);
          variantRows.push({ shape: s.name, version: label, 'fwd ms': ms, 'o vs fla': agree });
          console.log(`  ${s.name} ${label}: fwd ${ms.toFixed(3)} ms, o vs fla ${agree.toExponential(2)}`);
        });
      } catch (e) {
        variantRows.push({ shape: s.name, version: label, 'fwd ms': NaN, 'o vs fla': NaN, error: String(e).slice(0, 120) });
      }
    }
    const fwdMs = await timeDevice(async () => (await gdnForward(ins, opts)).o.dispose(), device, TIMING);
    const dispatch = await hostDispatch(async () => (await gdnForward(ins, opts)).o.dispose(), device);
    console.log(`  ${s.name} forward: host ${dispatch.hostMs.toFixed(3)} ms per call to dispatch, ${dispatch.wallMs.toFixed(3)} ms per call until done`);
    const disposeGrads = (g: Awaited<ReturnType<typeof gdnBackward>>) => {
      for (const t of Object.values(g)) (t as Tensor | undefined)?.dispose();
    };
    const bwdMs = await timeDevice(async () => disposeGrads(await gdnBackward(ins, x.dO, opts)), device, TIMING);
    const fbMs = await timeDevice(
      async () => {
        (await gdnForward(ins, opts)).o.dispose();
        disposeGrads(await gdnBackward(ins, x.dO, opts));
      },
      device,
      TIMING,
    );
    // A training forward hands its chunk-start states to the backward (saveForBackward / saved).
    const trainFwd = async () => {
      const r = await gdnForward(ins, { ...opts, saveForBackward: true });
      r.o.dispose();
      return r.saved!;
    };
    const probe = await trainFwd();
    const savedMB = probe.chunkStates.numel * (probe.chunkStates.dtype === 'f32' ? 4 : 2) / 1e6;
    const savedDtype = probe.chunkStates.dtype;
    const fwdSaveMs = await timeDevice(async () => (await trainFwd()).chunkStates.dispose(), device, TIMING);
    const timeBwdSaved = (saved: typeof probe) =>
      timeDevice(async () => disposeGrads(await gdnBackward(ins, x.dO, { ...opts, saved })), device, TIMING);
    const timeFbSaved = () =>
      timeDevice(
        async () => {
          const saved = await trainFwd();
          disposeGrads(await gdnBackward(ins, x.dO, { ...opts, saved }));
          saved.chunkStates.dispose();
        },
        device,
        TIMING,
      );
    const bwdSavedMs = await timeBwdSaved(probe);
    const fbSavedMs = await timeFbSaved();
    // The full hand-over (saveForBackward 'full'): the forward's prep also writes A, QKG, the gate vectors and norm
    // factors (145 MB at the reference shape; 413 with the normalised q, k rows until session 9); the backward's prep
    // does not run.
    const disposeSaved = (sv: GdnSaved) => {
      for (const t of Object.values(sv)) (t as Tensor | undefined)?.dispose();
    };
    const trainFwdFull = async () => {
      const r = await gdnForward(ins, { ...opts, saveForBackward: 'full' });
      r.o.dispose();
      return r.saved!;
    };
    const probeFull = await trainFwdFull();
    let handMB = 0;
    for (const [name, t] of Object.entries(probeFull))
      if (name !== 'chunkStates' && t) handMB += (t as Tensor).numel * ((t as Tensor).dtype === 'f32' ? 4 : 2) / 1e6;
    const fwdFullMs = await timeDevice(async () => disposeSaved(await trainFwdFull()), device, TIMING);
    const bwdHandMs = await timeBwdSaved(probeFull);
    const fbHandMs = await timeDevice(
      async () => {
        const saved = await trainFwdFull();
        disposeGrads(await gdnBackward(ins, x.dO, { ...opts, saved }));
        disposeSaved(saved);
      },
      device,
      TIMING,
    );
    // Backward versions with saved states (the training forward under the same switches), and per-kernel times
    // (TCAL_GDN_BWD_TIMING prints them on stderr).
    for (const [label, env] of noVariants ? [] : kept(BACKWARD_VARIANTS)) {
      try {
        const [bwd, fb] = await withEnv(env, async () => {
          const sv = await trainFwd();
          const r = [await timeBwdSaved(sv), await timeFbSaved()];
          sv.chunkStates.dispose();
          return r;
        });
        bwdVariantRows.push({ shape: s.name, version: label, 'bwd ms (saved)': bwd, 'f+b ms (saved)': fb });
        console.log(`  ${s.name} backward ${label}: bwd ${bwd.toFixed(3)} ms, f+b ${fb.toFixed(3)} ms (saved states)`);
      } catch (e) {
        bwdVariantRows.push({ shape: s.name, version: label, 'bwd ms (saved)': NaN, 'f+b ms (saved)': NaN, error: String(e).slice(0, 120) });
      }
    }
    process.env.TCAL_GDN_BWD_TIMING = '1';
    console.error(`  ${s.name} per-kernel, recomputed, saved, handed over:`);
    disposeGrads(await gdnBackward(ins, x.dO, opts));
    disposeGrads(await gdnBackward(ins, x.dO, { ...opts, saved: probe }));
    disposeGrads(await gdnBackward(ins, x.dO, { ...opts, saved: probeFull }));
    delete process.env.TCAL_GDN_BWD_TIMING;
    probe.chunkStates.dispose();
    disposeSaved(probeFull);
    const fl = floors(s);
    const p = peer.rows.find((r) => r.name === s.name);
    const tokens = s.B * s.T;
    rows.push({
      shape: s.name,
      'fwd floor': fl.fwdFloorMs,
      'fwd ms': fwdMs,
      'fla fwd': p?.fwd_ms ?? NaN,
      'fwd ×fla': p ? p.fwd_ms / fwdMs : NaN,
      'fwd host ms': dispatch.hostMs,
      'bwd floor': fl.bwdFloorMs,
      'bwd ms': bwdMs,
      'f+b ms': fbMs,
      'fwd ms (saving)': fwdSaveMs,
      'bwd ms (saved)': bwdSavedMs,
      'f+b ms (saved)': fbSavedMs,
      'saved MB': savedMB,
      'saved dtype': savedDtype,
      'fwd ms (full)': fwdFullMs,
      'bwd ms (handed over)': bwdHandMs,
      'f+b ms (handed over)': fbHandMs,
      'hand-over MB': handMB,
      'fla f+b': p?.fwdbwd_ms ?? NaN,
      'f+b ×fla': p ? p.fwdbwd_ms / fbMs : NaN,
      'f+b ×fla (saved)': p ? p.fwdbwd_ms / fbSavedMs : NaN,
      'f+b ×fla (handed over)': p ? p.fwdbwd_ms / fbHandMs : NaN,
      'fwd Mtok/s': tokens / fwdMs / 1e3,
      'bwd Mtok/s': tokens / bwdMs / 1e3,
      'f+b Mtok/s': tokens / fbMs / 1e3,
      'o vs fla': agreement,
    });
  }
  console.log('forward versions:');
  printTable(variantRows);
  console.log('backward versions (saved states):');
  printTable(bwdVariantRows);
  printTable(rows);
  if (peer.error) console.log(`fla peer: ${peer.error}`);
  const file = writeResults('gdn', {
    device: gpu,
    date: new Date().toISOString(),
    ceilings: { bandwidth: BANDWIDTH, bf16Rate: BF16_RATE },
    timing: TIMING,
    floors: floorRows,
    rows,
    forwardVersions: variantRows,
    backwardVersions: bwdVariantRows,
    peer: peer.rows,
    peerError: peer.error,
  });
  console.log(`results: ${file}`);
  fs.rmSync(tmp, { recursive: true, force: true });
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});

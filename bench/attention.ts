/**
 * Causal GQA attention forward and backward (bf16) through our flash-style kernels beside PyTorch SDPA
 * (FlashAttention backend) on the same GPU in the same run, plus output and gradient comparisons with SDPA on
 * identical inputs. Backward FLOPs are counted as 2.5× the forward's (FA2's convention: 5 of the forward's 2
 * products); ours recomputes S and dP for dQ (7 products), so its TFLOP/s are the convention's, not its own.
 * Usage (GPU host): node dist/bench/attention.js   → table on stdout, JSON under bench/results/.
 * FLOPs counted for causal: 2·2·B·H·T²·D / 2. Floors: FLOPs / 790 TFLOP/s (bf16 dense, measured on the host),
 * bytes (q, k, v read once, o written once) / 4.3 TB/s.
 * ATTN_BENCH_VARIANTS=v1,v3,default times earlier kernel versions too (D = 128; see native/cuda/attention.cu).
 * ATTN_BENCH_BWD_VARIANTS (default "default,kv-w8,q-m1,kv-only,dq-only") times backward variants: kv-w8 = the
 * first 8-warp dK/dV kernel (TCAL_ATTN_BWD_KV=w8), q-m1 = the first one-m-tile dQ kernel (TCAL_ATTN_BWD_Q=m1);
 * kv-only / dq-only run one of the two kernels alone (TCAL_ATTN_BWD_SKIP; rowDot runs in both).
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { Tensor, attentionForward, attentionBackward, initBackend, cudaDevices, randomFill } from '../lib';
import { timeDevice, runPythonPeer, printTable, writeResults } from './common';

interface Shape {
  name: string;
  B: number;
  T: number;
  H: number;
  HKV: number;
  D: number;
}

const SHAPES: Shape[] = [
  { name: 'B8 T4096 H32/8 D128', B: 8, T: 4096, H: 32, HKV: 8, D: 128 },
  { name: 'B1 T32768 H32/8 D128', B: 1, T: 32768, H: 32, HKV: 8, D: 128 },
];
const CHECK: Shape = { name: 'check', B: 2, T: 1024, H: 32, HKV: 8, D: 128 };
const PEAK_FLOPS = 790e12;
/** Kernel variants to time (TCAL_ATTN_KERNEL values; 'default' = the shipped one), e.g. ATTN_BENCH_VARIANTS=v1,default. */
const VARIANTS = (process.env.ATTN_BENCH_VARIANTS ?? 'default').split(',');
const PEAK_BYTES = 4.3e12;
const BWD_VARIANTS = (process.env.ATTN_BENCH_BWD_VARIANTS ?? 'default,kv-w8,q-m1,kv-only,dq-only').split(',');
const BWD_ENV: Record<string, [string, string] | undefined> = {
  'kv-w8': ['TCAL_ATTN_BWD_KV', 'w8'],
  'q-m1': ['TCAL_ATTN_BWD_Q', 'm1'],
  'kv-only': ['TCAL_ATTN_BWD_SKIP', 'dq'],
  'dq-only': ['TCAL_ATTN_BWD_SKIP', 'kv'],
};

const flopsOf = (s: Shape): number => (4 * s.B * s.H * s.T * s.T * s.D) / 2;
const bytesOf = (s: Shape): number => 2 * s.B * s.T * s.D * (2 * s.H + 2 * s.HKV);

function relError(a: Float32Array, b: Float32Array): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    if (!Number.isFinite(a[i])) return Infinity;
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / den);
}

async function main(): Promise<void> {
  const backend = initBackend({ backend: 'cuda' });
  const device = backend.device;
  const gpu = cudaDevices()[0];
  const dump = fs.mkdtempSync(path.join(os.tmpdir(), 'tcal-sdpa-'));
  const peer = runPythonPeer<{
    name: string; ms: number; tflops: number; gqa: string; why?: string | null; torch?: string;
    bwd_ms?: number; bwd_tflops?: number; bwd_gqa?: string;
  }>(
    path.resolve(__dirname, '..', '..', 'bench', 'peers', 'torch_sdpa.py'),
    { shapes: SHAPES, check: CHECK, dump },
  );
  const torchInfo = peer.rows.find((r) => r.torch !== undefined);
  const rows: Record<string, string | number>[] = [];
  const bwdRows: Record<string, string | number>[] = [];
  for (const s of SHAPES) {
    const q = await randomFill(Tensor.empty([s.B, s.T, s.H, s.D], { device, dtype: 'bf16' }), { kind: 'normal', mean: 0, std: 1 }, 1);
    const k = await randomFill(Tensor.empty([s.B, s.T, s.HKV, s.D], { device, dtype: 'bf16' }), { kind: 'normal', mean: 0, std: 1 }, 2);
    const v = await randomFill(Tensor.empty([s.B, s.T, s.HKV, s.D], { device, dtype: 'bf16' }), { kind: 'normal', mean: 0, std: 1 }, 3);
    const o = Tensor.empty([s.B, s.T, s.H, s.D], { device, dtype: 'bf16' });
    const lse = Tensor.empty([s.B, s.H, s.T], { device });
    const dO = await randomFill(Tensor.empty([s.B, s.T, s.H, s.D], { device, dtype: 'bf16' }), { kind: 'normal', mean: 0, std: 1 }, 4);
    const grads = {
      dq: Tensor.empty([s.B, s.T, s.H, s.D], { device, dtype: 'bf16' }),
      dk: Tensor.empty([s.B, s.T, s.HKV, s.D], { device, dtype: 'bf16' }),
      dv: Tensor.empty([s.B, s.T, s.HKV, s.D], { device, dtype: 'bf16' }),
    };
    await attentionForward(q, k, v, { out: { o, lse } });
    const p = peer.rows.find((r) => r.name === s.name);
    const bwd: Record<string, number> = {};
    for (const bv of BWD_VARIANTS) {
      const env = BWD_ENV[bv];
      if (env) process.env[env[0]] = env[1];
      bwd[bv] = await timeDevice(() => attentionBackward(q, k, v, o, lse, dO, { out: grads }), device, { warmup: 2, batches: 5, perBatch: 4 });
      if (env) delete process.env[env[0]];
      bwdRows.push({
        shape: s.name,
        variant: bv,
        'ms': bwd[bv],
        'TFLOP/s (2.5× fwd)': (2.5 * flopsOf(s)) / bwd[bv] / 1e9,
        'sdpa bwd ms': p?.bwd_ms ?? NaN,
        'sdpa/ours': p?.bwd_ms ? p.bwd_ms / bwd[bv] : NaN,
      });
    }
    const msBwd = bwd.default ?? NaN;
    const floorMath = (flopsOf(s) / PEAK_FLOPS) * 1e3;
    const floorBytes = (bytesOf(s) / PEAK_BYTES) * 1e3;
    for (const variant of VARIANTS) {
      if (variant === 'default') delete process.env.TCAL_ATTN_KERNEL;
      else process.env.TCAL_ATTN_KERNEL = variant;
      const ms = await timeDevice(() => attentionForward(q, k, v, { out: o }), device);
      const msLse = await timeDevice(() => attentionForward(q, k, v, { out: { o, lse } }), device);
      rows.push({
        shape: s.name,
        kernel: variant,
        'floor ms': Math.max(floorMath, floorBytes),
        'ours ms': ms,
        'ours+lse ms': msLse,
        'ours TFLOP/s': flopsOf(s) / ms / 1e9,
        'sdpa ms': p?.ms ?? NaN,
        'sdpa TFLOP/s': p?.tflops ?? NaN,
        'sdpa/ours': p ? p.ms / ms : NaN,
        'sdpa gqa': p?.gqa ?? 'n/a',
        'bwd floor ms': 2.5 * floorMath,
        'ours bwd ms': msBwd,
        'ours bwd TFLOP/s': (2.5 * flopsOf(s)) / msBwd / 1e9,
        'sdpa bwd ms': p?.bwd_ms ?? NaN,
        'sdpa bwd TFLOP/s': p?.bwd_tflops ?? NaN,
        'sdpa/ours bwd': p?.bwd_ms ? p.bwd_ms / msBwd : NaN,
        'sdpa bwd gqa': p?.bwd_gqa ?? 'n/a',
      });
    }
    delete process.env.TCAL_ATTN_KERNEL;
    for (const t of [q, k, v, o, lse, dO, grads.dq, grads.dk, grads.dv]) t.dispose();
  }
  // Identical inputs: SDPA's q/k/v and output from the peer.
  let check: Record<string, number | string> = { status: 'not run' };
  const c = CHECK;
  if (fs.existsSync(path.join(dump, 'o.bin'))) {
    const read = (n: string): Uint16Array => {
      const b = fs.readFileSync(path.join(dump, `${n}.bin`));
      return new Uint16Array(b.buffer, b.byteOffset, b.byteLength / 2);
    };
    const q = await Tensor.fromArray(read('q'), [c.B, c.T, c.H, c.D], { device, dtype: 'bf16' });
    const k = await Tensor.fromArray(read('k'), [c.B, c.T, c.HKV, c.D], { device, dtype: 'bf16' });
    const v = await Tensor.fromArray(read('v'), [c.B, c.T, c.HKV, c.D], { device, dtype: 'bf16' });
    const ref = await Tensor.fromArray(read('o'), [c.B, c.T, c.H, c.D], { device, dtype: 'bf16' });
    const ours = await attentionForward(q, k, v);
    const [a, b] = [await ours.toFloat32(), await ref.toFloat32()];
    // Our fp32 CUDA path on the same (bf16-valued) inputs as a third opinion.
    const f = async (t: Tensor): Promise<Tensor> => Tensor.fromArray(await t.toFloat32(), t.shape, { device });
    const o32 = await (await attentionForward(await f(q), await f(k), await f(v))).toFloat32();
    check = {
      shape: `B${c.B} T${c.T} H${c.H}/${c.HKV} D${c.D}`,
      'rel(ours bf16, sdpa)': relError(a, b),
      'rel(ours bf16, ours f32)': relError(a, o32),
      'rel(sdpa, ours f32)': relError(b, o32),
    };
    // Gradients for SDPA's dO: ours in bf16 (from our forward's o, lse) and in f32 against SDPA's.
    const dO = await Tensor.fromArray(read('do'), [c.B, c.T, c.H, c.D], { device, dtype: 'bf16' });
    const fw = await attentionForward(q, k, v, { returnLse: true });
    const gb = await attentionBackward(q, k, v, fw.o, fw.lse, dO);
    const [q32, k32, v32, d32] = [await f(q), await f(k), await f(v), await f(dO)];
    const fw32 = await attentionForward(q32, k32, v32, { returnLse: true });
    const g32 = await attentionBackward(q32, k32, v32, fw32.o, fw32.lse, d32);
    for (const [n, shape] of [['dq', [c.B, c.T, c.H, c.D]], ['dk', [c.B, c.T, c.HKV, c.D]], ['dv', [c.B, c.T, c.HKV, c.D]]] as const) {
      const sd = await (await Tensor.fromArray(read(n), [...shape], { device, dtype: 'bf16' })).toFloat32();
      const ours = await gb[n].toFloat32();
      const ours32 = await g32[n].toFloat32();
      check[`rel(ours bf16 ${n}, sdpa)`] = relError(ours, sd);
      check[`rel(ours bf16 ${n}, ours f32)`] = relError(ours, ours32);
      check[`rel(sdpa ${n}, ours f32)`] = relError(sd, ours32);
    }
  }
  fs.rmSync(dump, { recursive: true, force: true });
  printTable(rows);
  printTable(bwdRows);
  console.log('identical inputs:', JSON.stringify(check));
  if (peer.error) console.log(`sdpa peer failed: ${peer.error}`);
  for (const r of peer.rows) if (r.why) console.log(`sdpa ${r.name}: flash refused enable_gqa (${r.why}); K/V repeated`);
  const file = writeResults('attention', {
    device: gpu,
    torch: torchInfo?.torch,
    date: new Date().toISOString(),
    floors: { peakTflops: PEAK_FLOPS / 1e12, peakTBs: PEAK_BYTES / 1e12 },
    rows,
    backwardVariants: bwdRows,
    check,
    peerError: peer.error,
  });
  console.log(`wrote ${file}`);
}

void main();

/**
 * Causal GQA attention forward (bf16) through our flash-style kernel beside PyTorch SDPA (FlashAttention
 * backend) on the same GPU in the same run, plus an output comparison with SDPA on identical inputs.
 * Usage (GPU host): node dist/bench/attention.js   → table on stdout, JSON under bench/results/.
 * FLOPs counted for causal: 2·2·B·H·T²·D / 2. Floors: FLOPs / 790 TFLOP/s (bf16 dense, measured on the host),
 * bytes (q, k, v read once, o written once) / 4.3 TB/s.
 * ATTN_BENCH_VARIANTS=v1,v3,default times earlier kernel versions too (D = 128; see native/cuda/attention.cu).
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { Tensor, attentionForward, initBackend, cudaDevices, randomFill } from '../lib';
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
  const peer = runPythonPeer<{ name: string; ms: number; tflops: number; gqa: string; why?: string | null; torch?: string }>(
    path.resolve(__dirname, '..', '..', 'bench', 'peers', 'torch_sdpa.py'),
    { shapes: SHAPES, check: CHECK, dump },
  );
  const torchInfo = peer.rows.find((r) => r.torch !== undefined);
  const rows: Record<string, string | number>[] = [];
  for (const s of SHAPES) {
    const q = await randomFill(Tensor.empty([s.B, s.T, s.H, s.D], { device, dtype: 'bf16' }), { kind: 'normal', mean: 0, std: 1 }, 1);
    const k = await randomFill(Tensor.empty([s.B, s.T, s.HKV, s.D], { device, dtype: 'bf16' }), { kind: 'normal', mean: 0, std: 1 }, 2);
    const v = await randomFill(Tensor.empty([s.B, s.T, s.HKV, s.D], { device, dtype: 'bf16' }), { kind: 'normal', mean: 0, std: 1 }, 3);
    const o = Tensor.empty([s.B, s.T, s.H, s.D], { device, dtype: 'bf16' });
    const lse = Tensor.empty([s.B, s.H, s.T], { device });
    const p = peer.rows.find((r) => r.name === s.name);
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
      });
    }
    delete process.env.TCAL_ATTN_KERNEL;
    for (const t of [q, k, v, o, lse]) t.dispose();
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
  }
  fs.rmSync(dump, { recursive: true, force: true });
  printTable(rows);
  console.log('identical inputs:', JSON.stringify(check));
  if (peer.error) console.log(`sdpa peer failed: ${peer.error}`);
  for (const r of peer.rows) if (r.why) console.log(`sdpa ${r.name}: flash refused enable_gqa (${r.why}); K/V repeated`);
  const file = writeResults('attention', {
    device: gpu,
    torch: torchInfo?.torch,
    date: new Date().toISOString(),
    floors: { peakTflops: PEAK_FLOPS / 1e12, peakTBs: PEAK_BYTES / 1e12 },
    rows,
    check,
    peerError: peer.error,
  });
  console.log(`wrote ${file}`);
}

void main();

/**
 * bf16 GEMM throughput through our matmul (cuBLAS) beside torch.matmul on the same GPU in the same run.
 * Usage (GPU host): node dist/bench/matmul.js   → table on stdout, JSON under bench/results/.
 * Shapes: 4096³, 8192³ and the projections of an 8B Llama-style model (hidden 4096, 32 heads, 8 KV heads,
 * MLP 14336, vocab 128256) over 8192 tokens, weights stored [out, in] as in checkpoints (transB).
 */
import * as path from 'path';
import { Tensor, matmul, initBackend, cudaDevices, randomFill } from '../lib';
import { timeDevice, runPythonPeer, printTable, writeResults } from './common';

interface Shape {
  name: string;
  m: number;
  n: number;
  k: number;
  transB: boolean;
}

const TOKENS = 8192;
const SHAPES: Shape[] = [
  { name: 'square 4096', m: 4096, n: 4096, k: 4096, transB: false },
  { name: 'square 8192', m: 8192, n: 8192, k: 8192, transB: false },
  { name: '8B qkv_proj', m: TOKENS, n: 4096 + 2 * 1024, k: 4096, transB: true },
  { name: '8B o_proj', m: TOKENS, n: 4096, k: 4096, transB: true },
  { name: '8B gate+up', m: TOKENS, n: 2 * 14336, k: 4096, transB: true },
  { name: '8B down_proj', m: TOKENS, n: 4096, k: 14336, transB: true },
  { name: '8B lm_head', m: TOKENS, n: 128256, k: 4096, transB: true },
];

async function main(): Promise<void> {
  const backend = initBackend({ backend: 'cuda' });
  const device = backend.device;
  const gpu = cudaDevices()[0];
  const peer = runPythonPeer<{ name: string; ms: number; tflops: number }>(
    path.resolve(__dirname, '..', '..', 'bench', 'peers', 'torch_matmul.py'),
    SHAPES,
  );
  const rows: Record<string, string | number>[] = [];
  for (const s of SHAPES) {
    // Uniform(−1, 1) data, never zeros (zeros run faster than real data on tensor cores).
    const a = await randomFill(Tensor.empty([s.m, s.k], { device, dtype: 'bf16' }), { kind: 'uniform', low: -1, high: 1 }, 1);
    const b = await randomFill(Tensor.empty(s.transB ? [s.n, s.k] : [s.k, s.n], { device, dtype: 'bf16' }), { kind: 'uniform', low: -1, high: 1 }, 2);
    const c = Tensor.empty([s.m, s.n], { device, dtype: 'bf16' });
    const ms = await timeDevice(() => matmul(a, b, { transB: s.transB, c }), device);
    const tflops = (2 * s.m * s.n * s.k) / ms / 1e9;
    const p = peer.rows.find((r) => r.name === s.name);
    rows.push({
      shape: s.name,
      'm×n×k': `${s.m}×${s.n}×${s.k}`,
      'ours ms': ms,
      'ours TFLOP/s': tflops,
      'torch ms': p?.ms ?? NaN,
      'torch TFLOP/s': p?.tflops ?? NaN,
      'ours/torch': p ? p.ms / ms : NaN,
    });
    for (const t of [a, b, c]) t.dispose();
  }
  printTable(rows);
  if (peer.error) console.log(`torch peer failed: ${peer.error}`);
  const file = writeResults('matmul', { device: gpu, date: new Date().toISOString(), rows, peerError: peer.error });
  console.log(`wrote ${file}`);
}

void main();

/**
 * Training throughput of a ~110M-parameter Llama (d=768, 12 layers, 12 heads of 64, MLP 2048, vocab 32000, tied)
 * on one GPU: our DecoderTrainer step (bf16 compute, f32 masters, fused AdamW, clip 1.0) beside transformers'
 * LlamaForCausalLM (bench/peers/torch_llama_train.py: eager mixed precision, eager bf16, torch.compile) on the
 * same shapes in the same run. Usage (GPU host): node dist/bench/pretrain.js [--no-peer] [--B 16 --T 1024]
 * → table on stdout, JSON in bench/results/pretrain-<date>.json.
 */
import * as path from 'path';
import { initBackend, cudaDevices, memoryStats, synchronize } from '../lib';
import { parseTeacherConfig } from '../lib/io/hf-config';
import { DecoderTrainer } from '../lib/train/decoder-trainer';
import { printTable, runPythonPeer, writeResults } from './common';

const MODEL = {
  vocab_size: 32000, hidden_size: 768, intermediate_size: 2048, num_hidden_layers: 12, num_attention_heads: 12,
  num_key_value_heads: 12, head_dim: 64, rms_norm_eps: 1e-6, rope_theta: 10000, tie_word_embeddings: true,
};

function arg(name: string, dflt: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : dflt;
}

async function main(): Promise<void> {
  const { device } = initBackend({ backend: 'cuda' });
  const B = arg('B', 16);
  const T = arg('T', 1024);
  const steps = arg('steps', 10);
  const config = parseTeacherConfig({ architectures: ['LlamaForCausalLM'], ...MODEL, max_position_embeddings: T });
  const rows: Record<string, string | number>[] = [];
  const results: Record<string, unknown>[] = [];

  for (const recompute of [false, true]) {
    const trainer = await DecoderTrainer.create(config, {
      device, dtype: 'bf16', seed: 0, lr: 3e-4, weightDecay: 0.1, schedule: { kind: 'constant' },
    });
    const N = B * T;
    const ids = Int32Array.from({ length: N }, (_, i) => (i * 7919 + 13) % config.vocabSize);
    const targets = Int32Array.from({ length: N }, (_, i) => ((i + 1) % T === 0 ? -1 : ids[i + 1]));
    const batch = { ids, targets, cuSeqlens: Int32Array.from({ length: B + 1 }, (_, i) => i * T), B: 1, T: N };
    const losses: number[] = [];
    for (let i = 0; i < 3; i++) losses.push((await trainer.step([batch], { maxGradNorm: 1, recompute })).loss);
    await synchronize(device);
    const t0 = process.hrtime.bigint();
    let last = 0;
    for (let i = 0; i < steps; i++) last = (await trainer.step([batch], { maxGradNorm: 1, recompute })).loss;
    await synchronize(device);
    const ms = Number(process.hrtime.bigint() - t0) / 1e6 / steps;
    const mem = memoryStats(device);
    const setup = recompute ? 'ours (recompute)' : 'ours';
    rows.push({ setup, 'B×T': `${B}×${T}`, 'ms/step': ms, 'tokens/s': N / (ms / 1000), loss0: losses[0], 'loss last': last });
    results.push({ setup, ms, tokensPerSecond: N / (ms / 1000), loss0: losses[0], lossLast: last, parameters: trainer.parameterCount, memory: mem });
    trainer.dispose();
  }

  if (!process.argv.includes('--no-peer')) {
    const peer = runPythonPeer<{ setup: string; ms?: number; tokens_per_s?: number; loss0?: number; loss_last?: number; peak_gb?: number; error?: string }>(
      path.resolve(__dirname, '..', '..', 'bench', 'peers', 'torch_llama_train.py'),
      { model: { ...MODEL, max_position_embeddings: T }, B, T, steps, warmup: 3 },
    );
    if (peer.error) console.error(`torch peer failed: ${peer.error}`);
    for (const r of peer.rows) {
      results.push({ peer: 'torch', ...r });
      if (r.error) rows.push({ setup: `torch ${r.setup}`, 'B×T': `${B}×${T}`, 'ms/step': NaN, 'tokens/s': NaN, loss0: r.error, 'loss last': '' });
      else rows.push({ setup: `torch ${r.setup}`, 'B×T': `${B}×${T}`, 'ms/step': r.ms!, 'tokens/s': r.tokens_per_s!, loss0: r.loss0!, 'loss last': r.loss_last! });
    }
    const ours = results.find((r) => r.setup === 'ours') as { tokensPerSecond: number } | undefined;
    for (const r of peer.rows)
      if (ours && r.tokens_per_s) console.log(`ours / torch ${r.setup}: ${(ours.tokensPerSecond / r.tokens_per_s).toFixed(3)}×`);
  }
  printTable(rows);
  console.log(`wrote ${writeResults('pretrain', { device: cudaDevices()[0], model: MODEL, B, T, steps, results })}`);
}

void main();

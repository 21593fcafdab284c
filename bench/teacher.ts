/**
 * Teacher forward throughput (tokens/s) for 1B- and 8B-shaped Llama-style models with random bf16 weights on
 * the GPU: the full forward to the final hidden state plus the LM head over all tokens.
 * Usage (GPU host): node dist/bench/teacher.js → table on stdout, JSON under bench/results/.
 */
import { initBackend, cudaDevices, synchronize } from '../lib';
import { parseTeacherConfig } from '../lib/io/hf-config';
import { Teacher } from '../lib/model/teacher';
import { printTable, writeResults } from './common';

const LLAMA_1B = {
  architectures: ['LlamaForCausalLM'], model_type: 'llama', vocab_size: 128256, hidden_size: 2048,
  intermediate_size: 8192, num_hidden_layers: 16, num_attention_heads: 32, num_key_value_heads: 8, head_dim: 64,
  rms_norm_eps: 1e-5, rope_theta: 500000, max_position_embeddings: 131072, tie_word_embeddings: true,
  hidden_act: 'silu',
};
const LLAMA_8B = {
  ...LLAMA_1B, hidden_size: 4096, intermediate_size: 14336, num_hidden_layers: 32, head_dim: 128,
  tie_word_embeddings: false,
};

async function main(): Promise<void> {
  const { device } = initBackend({ backend: 'cuda' });
  const rows: Record<string, string | number>[] = [];
  for (const [name, json] of [['1B', LLAMA_1B], ['8B', LLAMA_8B]] as const) {
    const config = parseTeacherConfig(json);
    const teacher = await Teacher.random(config, { device, dtype: 'bf16', seed: 1 });
    for (const [B, T] of [[4, 2048], [1, 8192]] as const) {
      const ids = Int32Array.from({ length: B * T }, (_, i) => (i * 7919) % config.vocabSize);
      const run = async () => (await teacher.logits(ids, [B, T])).dispose();
      await run();
      await synchronize(device);
      const reps = 5;
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < reps; i++) await run();
      await synchronize(device);
      const ms = Number(process.hrtime.bigint() - t0) / 1e6 / reps;
      rows.push({ model: name, 'B×T': `${B}×${T}`, ms, 'tokens/s': (B * T) / (ms / 1000) });
    }
    teacher.dispose();
  }
  printTable(rows);
  console.log(`wrote ${writeResults('teacher-forward', { device: cudaDevices()[0], rows })}`);
}

void main();

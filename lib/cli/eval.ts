/** `tcal eval --model DIR --data FILE`: perplexity with progress bars. */
import { Command } from 'commander';
import { evaluatePerplexity } from '../eval';
import { initBackend, type BackendChoice } from '../backend';
import { withCliProgress } from './progress';

export function evalCommand(): Command {
  return new Command('eval')
    .description('perplexity of a model directory on a dataset (text file, directory or jsonl)')
    .requiredOption('--model <dir>', 'Hugging Face-layout model directory (config.json, safetensors, tokenizer.json)')
    .requiredOption('--data <path>', 'text file, directory of text files, or jsonl with a "text" field')
    .option('--seq-len <n>', 'tokens per row', (v) => parseInt(v, 10), 512)
    .option('--batch <n>', 'rows per batch', (v) => parseInt(v, 10), 8)
    .option('--max-tokens <n>', 'stop after this many scored tokens', (v) => parseInt(v, 10))
    .option('--backend <choice>', 'auto | cuda | cpu', process.env.TCAL_BACKEND ?? 'auto')
    .option('--dtype <dtype>', 'f32 | bf16 (default: bf16 on CUDA, f32 on CPU)')
    .option('--json', 'print JSON')
    .action(async (opts: { model: string; data: string; seqLen: number; batch: number; maxTokens?: number; backend: BackendChoice; dtype?: 'f32' | 'bf16'; json?: boolean }) => {
      const backend = initBackend({ backend: opts.backend });
      await withCliProgress(async ({ signal, onProgress, stopBars }) => {
        const r = await evaluatePerplexity({
          model: opts.model,
          data: opts.data,
          seqLen: opts.seqLen,
          batchSize: opts.batch,
          maxTokens: opts.maxTokens,
          device: backend.device,
          dtype: opts.dtype,
          signal,
          onProgress,
        });
        stopBars();
        const out = { model: opts.model, data: opts.data, backend: backend.backend, ...r };
        process.stdout.write(
          opts.json
            ? JSON.stringify(out, null, 2) + '\n'
            : `perplexity ${r.perplexity.toFixed(3)} (mean loss ${r.meanLoss.toFixed(4)} nats over ${r.tokens} tokens, ${r.documents} documents, seq ${r.seqLen}, ${backend.backend})\n`,
        );
      });
    });
}

/**
 * `tcal stats --teacher DIR --data FILE`: Taylor statistics of a teacher over a dataset, with progress bars.
 * Saves them (saveTaylorStats) into --out (default <teacher>/taylor-stats), writes taylor-stats.svg there
 * (distance profiles per layer and head, entropy and mean-distance heatmaps) and prints the per-head table.
 */
import * as path from 'node:path';
import { Command } from 'commander';
import { initBackend, type BackendChoice } from '../backend';
import { collectTaylorStatsFromDataset, parseLayerList } from '../calibrate/collect';
import { saveTaylorStats, TAYLOR_STATS_JSON, TAYLOR_STATS_TENSORS } from '../calibrate/statistics';
import { writeStatsPlot } from '../report/stats-plot';
import { formatHeadTable } from '../report/stats-table';
import { withCliProgress } from './progress';

export const STATS_PLOT_FILE = 'taylor-stats.svg';

interface StatsCliOptions {
  teacher: string;
  data: string;
  out?: string;
  seqLen: number;
  batch: number;
  maxTokens?: number;
  layers?: string;
  backend: BackendChoice;
  dtype?: 'f32' | 'bf16';
  cacheDir?: string;
  json?: boolean;
}

export function statsCommand(): Command {
  return new Command('stats')
    .description('Taylor statistics of a teacher over a dataset: saved sums, a per-head table and an SVG plot')
    .requiredOption('--teacher <dir>', 'Hugging Face-layout teacher directory (config.json, safetensors, tokenizer.json)')
    .requiredOption('--data <path>', 'text file, directory of text files, or jsonl with a "text" field')
    .option('--out <dir>', 'output directory (default: <teacher>/taylor-stats)')
    .option('--seq-len <n>', 'tokens per row', (v) => parseInt(v, 10), 512)
    .option('--batch <n>', 'rows per batch', (v) => parseInt(v, 10), 8)
    .option('--max-tokens <n>', 'stop at the first row boundary past this many tokens', (v) => parseInt(v, 10))
    .option('--layers <list>', 'teacher layers to collect, e.g. 0,3,5 or 0-7 (default all)')
    .option('--backend <choice>', 'auto | cuda | cpu', process.env.TCAL_BACKEND ?? 'auto')
    .option('--dtype <dtype>', 'f32 | bf16 (default: bf16 on CUDA, f32 on CPU)')
    .option('--cache-dir <dir>', 'token cache directory (default: <tmp>/tcal-token-cache)')
    .option('--json', 'print JSON instead of the table')
    .action(async (opts: StatsCliOptions) => {
      const layers = opts.layers !== undefined ? parseLayerList(opts.layers) : undefined;
      const backend = initBackend({ backend: opts.backend });
      const out = path.resolve(opts.out ?? path.join(opts.teacher, 'taylor-stats'));
      await withCliProgress(async ({ signal, onProgress, stopBars }) => {
        const r = await collectTaylorStatsFromDataset({
          teacher: opts.teacher,
          data: opts.data,
          seqLen: opts.seqLen,
          batchSize: opts.batch,
          maxTokens: opts.maxTokens,
          layers,
          device: backend.device,
          dtype: opts.dtype,
          cacheDir: opts.cacheDir,
          signal,
          onProgress,
        });
        stopBars();
        await saveTaylorStats(out, r.stats);
        const plot = path.join(out, STATS_PLOT_FILE);
        await writeStatsPlot(plot, r.stats, {
          summary: r.summary,
          title: `Taylor statistics of ${path.basename(path.resolve(opts.teacher))}: ${r.stats.tokens} tokens, ${r.stats.sequences} sequences`,
          signal,
        });
        const files = { stats: path.join(out, TAYLOR_STATS_JSON), tensors: path.join(out, TAYLOR_STATS_TENSORS), plot };
        if (opts.json) {
          const result = {
            teacher: opts.teacher,
            data: opts.data,
            backend: backend.backend,
            out,
            files,
            tokens: r.stats.tokens,
            sequences: r.stats.sequences,
            batches: r.batches,
            seqLen: r.seqLen,
            layers: r.stats.layers.map((l) => l.layer),
            heads: r.summary,
          };
          process.stdout.write(JSON.stringify(result, null, 2) + '\n');
        } else {
          process.stdout.write(formatHeadTable(r.summary));
          process.stdout.write(
            `${r.stats.tokens} tokens, ${r.stats.sequences} sequences, ${r.batches} batches of ${r.batchSize}×${r.seqLen} (${backend.backend})\n` +
              `wrote ${files.stats}, ${files.tensors}, ${files.plot}\n`,
          );
        }
      });
    });
}

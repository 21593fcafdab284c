/**
 * `tcal pretrain --data PATH --tokenizer DIR --out DIR [--preset NAME] [overrides]`: trains a teacher from scratch
 * (lib/train/pretrain.ts) with progress bars, Ctrl-C to stop (the last checkpoint stays; `--resume` continues).
 */
import * as path from 'node:path';
import { Command, InvalidArgumentError as CommanderArgumentError } from 'commander';
import { initBackend, type BackendChoice } from '../backend';
import { parseTokenCount, stepsForTokens } from '../train/schedule';
import { pretrain, type TeacherSpec } from '../train/pretrain';
import { PRETRAIN_PRESETS, pretrainPreset } from '../train/presets';
import { withCliProgress } from './progress';

function int(v: string): number {
  const n = Number(v);
  if (!Number.isSafeInteger(n)) throw new CommanderArgumentError(`not an integer: ${v}`);
  return n;
}

function num(v: string): number {
  const n = Number(v);
  if (!Number.isFinite(n)) throw new CommanderArgumentError(`not a number: ${v}`);
  return n;
}

interface PretrainCliOptions {
  data: string;
  tokenizer: string;
  out: string;
  preset: string;
  family?: 'llama' | 'qwen3';
  hidden?: number;
  layers?: number;
  heads?: number;
  kvHeads?: number;
  headDim?: number;
  intermediate?: number;
  tie?: boolean;
  seqLen?: number;
  batch?: number;
  accum: number;
  tokens?: string;
  steps?: number;
  lr?: number;
  warmup?: number;
  schedule: 'cosine' | 'constant';
  minLrFraction: number;
  weightDecay: number;
  clip: number;
  seed: number;
  validFraction: number;
  evalEvery?: number;
  evalTokens: number;
  saveEvery?: number;
  keep: number;
  resume?: boolean;
  recompute?: boolean;
  extensions?: string;
  textSplit: 'file' | 'paragraph' | 'line';
  backend: BackendChoice;
  dtype?: 'f32' | 'bf16';
  exportDtype: 'BF16' | 'F32';
  cacheDir?: string;
  json?: boolean;
}

export function pretrainCommand(): Command {
  return new Command('pretrain')
    .description(`train a Llama- or Qwen3-style teacher from scratch (presets: ${Object.keys(PRETRAIN_PRESETS).join(', ')})`)
    .requiredOption('--data <path>', 'text file, directory of text files, or jsonl with a "text" field')
    .requiredOption('--tokenizer <dir>', 'directory with tokenizer.json (and tokenizer_config.json)')
    .requiredOption('--out <dir>', 'run directory: checkpoints/, log.jsonl, loss.svg, model/')
    .option('--preset <name>', 'architecture and hyperparameters to start from', 'tiny')
    .option('--family <name>', 'llama | qwen3')
    .option('--hidden <n>', 'hidden size', int)
    .option('--layers <n>', 'decoder layers', int)
    .option('--heads <n>', 'query heads', int)
    .option('--kv-heads <n>', 'key/value heads (GQA)', int)
    .option('--head-dim <n>', 'head dimension (default hidden / heads)', int)
    .option('--intermediate <n>', 'MLP width', int)
    .option('--tie', 'tie the embedding and the LM head')
    .option('--seq-len <n>', 'tokens per row', int)
    .option('--batch <n>', 'rows per micro-batch', int)
    .option('--accum <n>', 'micro-batches per optimizer step', int, 1)
    .option('--tokens <count>', 'token budget, e.g. 20M')
    .option('--steps <n>', 'optimizer steps (instead of --tokens)', int)
    .option('--lr <x>', 'peak learning rate', num)
    .option('--warmup <n>', 'warmup steps', int)
    .option('--schedule <kind>', 'cosine | constant', 'cosine')
    .option('--min-lr-fraction <x>', 'cosine floor as a fraction of the peak', num, 0.1)
    .option('--weight-decay <x>', 'AdamW weight decay of matrices', num, 0.1)
    .option('--clip <x>', 'global gradient-norm clip', num, 1.0)
    .option('--seed <n>', 'seed of the initialisation and data order', int, 0)
    .option('--valid-fraction <x>', 'documents held out for validation', num, 0.02)
    .option('--eval-every <n>', 'steps between validations', int)
    .option('--eval-tokens <n>', 'validation tokens per evaluation', int, 65536)
    .option('--save-every <n>', 'steps between checkpoints', int)
    .option('--keep <n>', 'checkpoints to keep', int, 3)
    .option('--resume', 'continue from the latest checkpoint in --out')
    .option('--recompute', 'recompute activations in the backward (less memory)')
    .option('--extensions <list>', 'in directories, only these extensions, e.g. .py,.txt')
    .option('--text-split <how>', 'file | paragraph | line', 'paragraph')
    .option('--backend <choice>', 'auto | cuda | cpu', process.env.TCAL_BACKEND ?? 'auto')
    .option('--dtype <dtype>', 'compute dtype f32 | bf16 (default: bf16 on CUDA, f32 on CPU)')
    .option('--export-dtype <dtype>', 'BF16 | F32 weights in the exported model', 'BF16')
    .option('--cache-dir <dir>', 'token cache directory')
    .option('--json', 'print the summary as JSON')
    .action(async (opts: PretrainCliOptions) => {
      const preset = pretrainPreset(opts.preset);
      const model: TeacherSpec = {
        ...preset.model,
        ...(opts.family !== undefined && { family: opts.family }),
        ...(opts.hidden !== undefined && { hiddenSize: opts.hidden }),
        ...(opts.layers !== undefined && { numLayers: opts.layers }),
        ...(opts.heads !== undefined && { numHeads: opts.heads }),
        ...(opts.kvHeads !== undefined && { numKvHeads: opts.kvHeads }),
        ...(opts.headDim !== undefined && { headDim: opts.headDim }),
        ...(opts.intermediate !== undefined && { intermediateSize: opts.intermediate }),
        ...(opts.tie && { tieWordEmbeddings: true }),
      };
      const seqLen = opts.seqLen ?? preset.seqLen;
      const batchSize = opts.batch ?? preset.batchSize;
      const tokens = opts.steps === undefined ? (opts.tokens !== undefined ? parseTokenCount(opts.tokens) : preset.tokens) : undefined;
      const steps = opts.steps ?? stepsForTokens(tokens!, { seqLen, batchSize, accumulation: opts.accum });
      // A preset's warmup never takes more than a tenth of a shortened run; an explicit --warmup is taken as given.
      const warmupSteps = opts.warmup ?? Math.min(preset.warmupSteps, Math.floor(steps / 10));
      const backend = initBackend({ backend: opts.backend });
      await withCliProgress(async ({ signal, onProgress, stopBars }) => {
        const r = await pretrain({
          data: opts.data,
          tokenizer: opts.tokenizer,
          out: opts.out,
          model,
          seqLen,
          batchSize,
          accumulation: opts.accum,
          tokens,
          steps: opts.steps,
          lr: opts.lr ?? preset.lr,
          warmupSteps,
          schedule: opts.schedule,
          minLrFraction: opts.minLrFraction,
          weightDecay: opts.weightDecay,
          maxGradNorm: opts.clip,
          seed: opts.seed,
          validFraction: opts.validFraction,
          evalEvery: opts.evalEvery,
          evalTokens: opts.evalTokens,
          saveEvery: opts.saveEvery,
          keep: opts.keep,
          resume: opts.resume,
          recompute: opts.recompute,
          extensions: opts.extensions?.split(',').map((e) => e.trim()).filter(Boolean),
          textSplit: opts.textSplit,
          device: backend.device,
          dtype: opts.dtype,
          exportDtype: opts.exportDtype,
          cacheDir: opts.cacheDir,
          signal,
          onProgress,
        });
        stopBars();
        const out = { out: path.resolve(opts.out), preset: opts.preset, backend: backend.backend, ...r };
        process.stdout.write(
          opts.json
            ? JSON.stringify(out, null, 2) + '\n'
            : `${r.steps} steps, ${r.tokens} tokens in ${r.seconds.toFixed(1)} s (${Math.round(r.tokensPerSecond)} tokens/s, ${backend.backend}); ` +
                `validation ppl ${r.validPerplexity.toFixed(2)} (unigram ${r.unigramPerplexity.toFixed(1)}); ${(r.parameters / 1e6).toFixed(2)}M parameters` +
                (r.modelDir ? `; model in ${r.modelDir}` : '') + '\n',
        );
      });
    });
}

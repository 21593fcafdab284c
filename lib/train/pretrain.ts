/**
 * `pretrain`: trains a Llama- or Qwen3-style teacher from scratch with next-token cross-entropy (DESIGN.md §7).
 * A step, top to bottom: zero the f32 gradient buffers → for each micro-batch, forward and backward of the whole
 * decoder (lib/model/decoder.ts) with the loss scaled by 1 / (scored tokens of the step) → AdamW with global-norm
 * clipping and the lr schedule → log. Every `evalEvery` steps: validation loss / perplexity and the loss plot;
 * every `saveEvery` steps: an atomic checkpoint (model masters, AdamW moments, schedule, data position) that
 * `resume` continues from bit-exactly. At the end the teacher is exported in the Hugging Face layout.
 *
 * Output directory:
 *   checkpoints/step-N/   resumable training state (keep-N most recent)
 *   log.jsonl             one JSON object per step ({kind: 'train'}) and per validation ({kind: 'valid'})
 *   loss.svg              training and validation loss against tokens (vega-lite)
 *   model/                the exported teacher (config.json, model.safetensors, tokenizer files)
 *   summary.json          final figures
 */
import * as os from 'node:os';
import * as path from 'node:path';
import { promises as fsp } from 'node:fs';
import { AbortError, InvalidArgumentError } from '../errors';
import type { TeacherConfig } from '../io/hf-config';
import { loadTokenizer } from '../io/tokenizer';
import { iteratePackedBatches, nextTokenTargets, splitDocuments, tokenizeDataset, type PackedBatch, type TextSplit, type TokenizedDataset } from '../io/dataset';
import { writeFileAtomically, writeAll } from '../io/file-io';
import { Rng } from '../io/rng';
import { defaultDevice } from '../backend';
import { scoredTokens, type TokenBatch } from '../model/decoder';
import { DecoderTrainer } from './decoder-trainer';
import { exportTeacher } from '../export/hf-teacher';
import { writeLossPlot, type LossLogEntry } from '../report/loss-plot';
import { latestCheckpoint, loadCheckpoint, saveCheckpoint, type JsonValue } from './checkpoint';
import { checkSchedule, stepsForTokens, tokensPerStep, type LrSchedule } from './schedule';

/** The architecture to train. */
export interface TeacherSpec {
  family: 'llama' | 'qwen3';
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  /** Default numHeads (MHA). */
  numKvHeads?: number;
  /** Default hiddenSize / numHeads. */
  headDim?: number;
  intermediateSize: number;
  /** Default 10000. */
  ropeTheta?: number;
  /** Share the embedding and the LM head (default false). */
  tieWordEmbeddings?: boolean;
}

export interface PretrainOptions {
  /** Text file, directory of text files or jsonl. */
  data: string;
  /** Directory with tokenizer.json (+ tokenizer_config.json). */
  tokenizer: string;
  out: string;
  model: TeacherSpec;
  seqLen: number;
  batchSize: number;
  accumulation?: number;
  /** Token budget; or `steps`. */
  tokens?: number;
  steps?: number;
  lr: number;
  schedule?: 'cosine' | 'constant';
  warmupSteps?: number;
  minLrFraction?: number;
  weightDecay?: number;
  beta1?: number;
  beta2?: number;
  maxGradNorm?: number;
  seed?: number;
  validFraction?: number;
  evalEvery?: number;
  /** Scored validation tokens per evaluation (default 65536). */
  evalTokens?: number;
  saveEvery?: number;
  keep?: number;
  /** Continue from the latest checkpoint in out/checkpoints (a fresh start when there is none). */
  resume?: boolean;
  device?: string;
  /** Compute dtype (masters are f32): default bf16 on CUDA, f32 on the CPU. */
  dtype?: 'f32' | 'bf16';
  recompute?: boolean;
  exportDtype?: 'BF16' | 'F32';
  cacheDir?: string;
  /** How text files become documents (default 'paragraph': blank-line-separated blocks). */
  textSplit?: TextSplit;
  /** In directories, only files with these extensions (e.g. ['.py']). */
  extensions?: readonly string[];
  /** Stop after this step (for tests and staged runs); the schedule still spans the full run. */
  stopAfterStep?: number;
  signal?: AbortSignal;
  onProgress?: (p: { stage: string; done: number; total: number }) => void;
  onLog?: (entry: LossLogEntry) => void;
}

export interface PretrainResult {
  steps: number;
  tokens: number;
  seconds: number;
  tokensPerSecond: number;
  finalTrainLoss: number;
  validLoss: number;
  validPerplexity: number;
  /** Perplexity of the training set's unigram distribution on the same validation tokens. */
  unigramPerplexity: number;
  parameters: number;
  modelDir: string | null;
}

const LOG_FILE = 'log.jsonl';

/** The TeacherConfig `spec` describes for a tokenizer of `vocabSize` ids. */
export function teacherConfigFor(spec: TeacherSpec, vocabSize: number, seqLen: number, special: { bosId: number | null; eosId: number | null }): TeacherConfig {
  const numKvHeads = spec.numKvHeads ?? spec.numHeads;
  for (const [k, v] of Object.entries({ hiddenSize: spec.hiddenSize, numLayers: spec.numLayers, numHeads: spec.numHeads, numKvHeads, intermediateSize: spec.intermediateSize }))
    if (!Number.isSafeInteger(v) || v < 1) throw new InvalidArgumentError(`model.${k}`, `must be a positive integer, got ${v}`);
  if (spec.numHeads % numKvHeads !== 0) throw new InvalidArgumentError('model.numKvHeads', `numHeads (${spec.numHeads}) must be a multiple of it`);
  const headDim = spec.headDim ?? spec.hiddenSize / spec.numHeads;
  if (!Number.isSafeInteger(headDim) || headDim % 2 !== 0) throw new InvalidArgumentError('model.headDim', `must be an even integer, got ${headDim}`);
  const qwen = spec.family === 'qwen3';
  return {
    architecture: qwen ? 'Qwen3ForCausalLM' : 'LlamaForCausalLM',
    family: spec.family,
    vocabSize,
    hiddenSize: spec.hiddenSize,
    intermediateSize: spec.intermediateSize,
    numLayers: spec.numLayers,
    numHeads: spec.numHeads,
    numKvHeads,
    headDim,
    rmsNormEps: 1e-6,
    ropeTheta: spec.ropeTheta ?? 10000,
    rope: { type: 'default' },
    maxPositionEmbeddings: seqLen,
    tieWordEmbeddings: spec.tieWordEmbeddings ?? false,
    attentionBias: false,
    qkvBias: false,
    mlpBias: false,
    qkNorm: qwen,
    hiddenAct: 'silu',
    slidingWindow: null,
    layerTypes: Array.from({ length: spec.numLayers }, () => 'full_attention' as const),
    bosTokenId: special.bosId,
    eosTokenId: special.eosId,
    torchDtype: null,
  };
}

/** Documents of the training split, reshuffled every epoch (seeded), packed into rows: a resumable stream. */
class BatchStream {
  epoch = 0;
  batch = 0;
  private iter: Iterator<PackedBatch> | undefined;

  constructor(
    private readonly data: TokenizedDataset,
    private readonly docs: Uint32Array,
    private readonly pack: { seqLen: number; batchSize: number; specialTokens: { bosId: number | null; eosId: number | null; addBos: boolean; addEos: boolean } },
    private readonly seed: number,
  ) {}

  /** Positions the stream at `batch` batches into `epoch`. */
  seek(epoch: number, batch: number): void {
    this.epoch = epoch;
    this.batch = 0;
    this.iter = this.epochIterator();
    for (let i = 0; i < batch; i++) this.next();
  }

  private epochIterator(): Iterator<PackedBatch> {
    const order = new Rng(this.seed * 1009 + this.epoch).shuffle(Uint32Array.from(this.docs));
    return iteratePackedBatches(this.data, { ...this.pack, mode: 'concat', keepBoundaries: true, dropRemainder: true, docs: order })[Symbol.iterator]();
  }

  next(): PackedBatch {
    this.iter ??= this.epochIterator();
    for (let attempt = 0; attempt < 2; attempt++) {
      const r = this.iter.next();
      if (!r.done && r.value.rows === this.pack.batchSize) {
        this.batch++;
        return r.value;
      }
      this.epoch++;
      this.batch = 0;
      this.iter = this.epochIterator();
    }
    throw new InvalidArgumentError('data', `the training split has fewer than ${this.pack.batchSize} rows of ${this.pack.seqLen} tokens`);
  }
}

function toTokenBatch(b: PackedBatch): TokenBatch {
  return { ids: b.inputIds, targets: nextTokenTargets(b), cuSeqlens: b.cuSeqlens, B: 1, T: b.rows * b.seqLen };
}

/** Unigram perplexity: the training tokens' frequencies (add-one smoothed) scored on the validation targets. */
function unigramPerplexity(data: TokenizedDataset, trainDocs: Uint32Array, valid: TokenBatch[], vocabSize: number): number {
  const counts = new Float64Array(vocabSize).fill(1);
  let total = vocabSize;
  for (const d of trainDocs)
    for (let i = data.docOffsets[d]; i < data.docOffsets[d + 1]; i++) {
      counts[data.tokens[i]]++;
      total++;
    }
  let nll = 0;
  let n = 0;
  for (const b of valid)
    for (const t of b.targets)
      if (t >= 0) {
        nll -= Math.log(counts[t] / total);
        n++;
      }
  return Math.exp(nll / Math.max(n, 1));
}

async function appendLog(file: string, entry: LossLogEntry): Promise<void> {
  await fsp.appendFile(file, JSON.stringify(entry) + '\n');
}

/** The log's entries; a last line cut short by a kill is dropped (resume rewrites the log from the checkpoint). */
async function readLog(file: string): Promise<LossLogEntry[]> {
  const text = await fsp.readFile(file, 'utf8').catch(() => '');
  const entries: LossLogEntry[] = [];
  for (const line of text.split('\n')) {
    if (line.trim() === '') continue;
    try {
      entries.push(JSON.parse(line) as LossLogEntry);
    } catch {
      break;
    }
  }
  return entries;
}

async function writeJsonAtomically(file: string, value: unknown): Promise<void> {
  const bytes = Buffer.from(JSON.stringify(value, null, 2) + '\n', 'utf8');
  await writeFileAtomically(file, (fh) => writeAll(fh, bytes, null));
}

/** The hyperparameters a resumed run must share with the run that wrote the checkpoint. */
function runSignature(o: PretrainOptions, config: TeacherConfig, totalSteps: number): JsonValue {
  return {
    model: config as unknown as JsonValue,
    seqLen: o.seqLen,
    batchSize: o.batchSize,
    accumulation: o.accumulation ?? 1,
    totalSteps,
    lr: o.lr,
    weightDecay: o.weightDecay ?? 0.1,
    seed: o.seed ?? 0,
    validFraction: o.validFraction ?? 0.02,
  };
}

export async function pretrain(o: PretrainOptions): Promise<PretrainResult> {
  const device = o.device ?? defaultDevice();
  const dtype = o.dtype ?? (device === 'cpu' ? 'f32' : 'bf16');
  const seed = o.seed ?? 0;
  const accumulation = o.accumulation ?? 1;
  const shape = { batchSize: o.batchSize, seqLen: o.seqLen, accumulation };
  const perStep = tokensPerStep(shape);
  if (o.tokens === undefined && o.steps === undefined) throw new InvalidArgumentError('tokens', 'give a token budget or a step count');
  const totalSteps = o.steps ?? stepsForTokens(o.tokens!, shape);
  if (!Number.isSafeInteger(totalSteps) || totalSteps < 1) throw new InvalidArgumentError('steps', `must be a positive integer, got ${totalSteps}`);
  if (!(o.lr > 0)) throw new InvalidArgumentError('lr', `must be positive, got ${o.lr}`);
  const evalEvery = o.evalEvery ?? Math.max(1, Math.floor(totalSteps / 10));
  const saveEvery = o.saveEvery ?? Math.max(1, Math.floor(totalSteps / 5));
  const ckptDir = path.join(o.out, 'checkpoints');
  const logFile = path.join(o.out, LOG_FILE);
  await fsp.mkdir(o.out, { recursive: true });

  // Data: tokenise (cached), split documents, validation rows fixed once.
  const tokenizer = await loadTokenizer(o.tokenizer);
  const data = await tokenizeDataset(o.data, tokenizer, {
    cacheDir: o.cacheDir ?? path.join(os.tmpdir(), 'tcal-token-cache'),
    textSplit: o.textSplit ?? 'paragraph',
    extensions: o.extensions,
    signal: o.signal,
    onProgress: (p) => o.onProgress?.({ stage: 'tokenize', done: p.done, total: p.total }),
  });
  const split = splitDocuments(data.numDocs, { validFraction: o.validFraction ?? 0.02, seed });
  const pack = { seqLen: o.seqLen, batchSize: o.batchSize, specialTokens: tokenizer };
  const valid: TokenBatch[] = [];
  let validScored = 0;
  for (const b of iteratePackedBatches(data, { ...pack, mode: 'concat', keepBoundaries: true, docs: split.valid })) {
    if (validScored >= (o.evalTokens ?? 65536)) break;
    const t = toTokenBatch(b);
    valid.push(t);
    validScored += scoredTokens(t);
  }
  if (valid.length === 0) throw new InvalidArgumentError('validFraction', 'the validation split is empty');
  const stream = new BatchStream(data, split.train, pack, seed);
  const config = teacherConfigFor(o.model, tokenizer.vocabSize, o.seqLen, tokenizer);
  const unigram = unigramPerplexity(data, split.train, valid, config.vocabSize);
  const signature = runSignature(o, config, totalSteps);

  const schedule: LrSchedule = checkSchedule(
    (o.schedule ?? 'cosine') === 'cosine'
      ? { kind: 'cosine', warmupSteps: o.warmupSteps ?? 0, totalSteps, minLrFraction: o.minLrFraction ?? 0.1 }
      : { kind: 'constant', warmupSteps: o.warmupSteps ?? 0 },
  );
  const trainer = await DecoderTrainer.create(config, {
    device,
    dtype,
    seed,
    lr: o.lr,
    weightDecay: o.weightDecay ?? 0.1,
    beta1: o.beta1,
    beta2: o.beta2,
    schedule,
  });
  const opt = trainer.optimizer!;
  try {
    // Resume: masters, moments, step and data position from the latest checkpoint; the log is cut back to it.
    let tokensSeen = 0;
    const latest = o.resume ? await latestCheckpoint(ckptDir) : null;
    if (latest) {
      const ck = await loadCheckpoint(latest);
      const extra = ck.extra as { signature?: JsonValue; tokens?: number } | null;
      if (JSON.stringify(extra?.signature) !== JSON.stringify(signature))
        throw new InvalidArgumentError('resume', `${latest} was written by a run with other settings; use another --out or the same options`);
      await trainer.loadMasters(ck.model, latest);
      await opt.loadCheckpointState(ck.step, ck.optimizer);
      const pos = ck.data as { epoch: number; batch: number };
      stream.seek(pos.epoch, pos.batch);
      tokensSeen = extra?.tokens ?? ck.step * perStep;
      const kept = (await readLog(logFile)).filter((e) => e.step <= ck.step);
      await writeFileAtomically(logFile, (fh) => writeAll(fh, Buffer.from(kept.map((e) => JSON.stringify(e) + '\n').join(''), 'utf8'), null));
    } else {
      await fsp.rm(logFile, { force: true });
    }

    const evaluate = async (): Promise<{ loss: number; ppl: number }> => {
      const r = await trainer.loss(valid, o.signal);
      const loss = r.sum / Math.max(r.count, 1);
      return { loss, ppl: Math.exp(loss) };
    };
    const save = async (): Promise<void> => {
      const model = await trainer.masters();
      await saveCheckpoint(
        ckptDir,
        {
          step: opt.step,
          model,
          optimizer: await opt.stateForCheckpoint(),
          schedule: schedule as unknown as JsonValue,
          data: { epoch: stream.epoch, batch: stream.batch },
          rng: { seed },
          extra: { signature, tokens: tokensSeen },
        },
        { keep: o.keep ?? 3 },
      );
    };

    const start = Date.now();
    const startTokens = tokensSeen;
    let lastTrain = NaN;
    let lastValid = { loss: NaN, ppl: NaN };
    const stopAt = Math.min(totalSteps, o.stopAfterStep ?? totalSteps);
    o.onProgress?.({ stage: 'train', done: opt.step, total: totalSteps });
    while (opt.step < stopAt) {
      if (o.signal?.aborted) throw new AbortError('pretraining was aborted', { cause: o.signal.reason });
      const t0 = Date.now();
      const micro = Array.from({ length: accumulation }, () => toTokenBatch(stream.next()));
      const r = await trainer.step(micro, { maxGradNorm: o.maxGradNorm ?? 1.0, recompute: o.recompute, signal: o.signal });
      tokensSeen += perStep;
      lastTrain = r.loss;
      const entry: LossLogEntry = {
        kind: 'train',
        step: r.applied ? r.step : opt.step + 1,
        tokens: tokensSeen,
        loss: lastTrain,
        lr: r.lrs[0],
        gradNorm: r.gradNorm,
        skipped: !r.applied,
        ms: Date.now() - t0,
      };
      if (!r.applied) throw new InvalidArgumentError('lr', `a non-finite gradient at step ${entry.step} (loss ${lastTrain}): lower the lr`);
      await appendLog(logFile, entry);
      o.onLog?.(entry);
      o.onProgress?.({ stage: 'train', done: opt.step, total: totalSteps });
      const last = opt.step === totalSteps;
      if (opt.step % evalEvery === 0 || last) {
        lastValid = await evaluate();
        const v: LossLogEntry = { kind: 'valid', step: opt.step, tokens: tokensSeen, loss: lastValid.loss, ppl: lastValid.ppl };
        await appendLog(logFile, v);
        o.onLog?.(v);
        await writeLossPlot(path.join(o.out, 'loss.svg'), await readLog(logFile), { unigramLoss: Math.log(unigram), signal: o.signal });
      }
      if (opt.step % saveEvery === 0 || last || opt.step === stopAt) await save();
    }
    const seconds = (Date.now() - start) / 1000;
    let modelDir: string | null = null;
    if (opt.step === totalSteps) {
      modelDir = path.join(o.out, 'model');
      await exportTeacher(modelDir, config, trainer.masterWeights(), { dtype: o.exportDtype ?? 'BF16', tokenizerDir: o.tokenizer });
    }
    if (Number.isNaN(lastValid.loss)) lastValid = await evaluate();
    const result: PretrainResult = {
      steps: opt.step,
      tokens: tokensSeen,
      seconds,
      tokensPerSecond: (tokensSeen - startTokens) / Math.max(seconds, 1e-9),
      finalTrainLoss: lastTrain,
      validLoss: lastValid.loss,
      validPerplexity: lastValid.ppl,
      unigramPerplexity: unigram,
      parameters: trainer.parameterCount,
      modelDir,
    };
    await writeJsonAtomically(path.join(o.out, 'summary.json'), { ...result, options: signature });
    return result;
  } finally {
    trainer.dispose();
  }
}

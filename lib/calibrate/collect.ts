/**
 * Taylor statistics over a dataset (DESIGN.md §5.1 Pass 1 from files): tokenise the data (cached), load the
 * teacher, pack the tokens into fixed-length rows with document boundaries kept, and stream the batches
 * through collectTaylorStats. `tcal stats` and `tcal convert` both come through here.
 */
import * as os from 'node:os';
import * as path from 'node:path';
import { DataError, InvalidArgumentError } from '../errors';
import { loadTeacherConfig, checkSequenceLength, type TeacherConfig } from '../io/hf-config';
import { loadTokenizer, type Tokenizer, type SpecialTokens } from '../io/tokenizer';
import { tokenizeDataset, iteratePackedBatches, type PackedBatch, type TokenizedDataset } from '../io/dataset';
import { Teacher } from '../model/teacher';
import { collectTaylorStats, summarizeHeads, type HeadSummary, type TaylorStats } from './statistics';

export type CollectStage = 'tokenize' | 'load' | 'collect';

export interface CollectStatsProgress {
  stage: CollectStage;
  /** tokenize: source bytes; load: tensors; collect: tokens. */
  done: number;
  total: number;
}

export interface CollectFromDatasetOptions {
  /** A Hugging Face-layout teacher directory, or a loaded Teacher (then `tokenizer` is needed). */
  teacher: string | Teacher;
  /** Text file, directory of text files, or jsonl with a "text" field. */
  data: string;
  /** Directory of tokenizer.json (default: the teacher directory), or a loaded tokenizer. */
  tokenizer?: string | Tokenizer;
  /** Tokens per packed row (default 512, at most the teacher's max_position_embeddings). */
  seqLen?: number;
  /** Rows per batch (default 8). */
  batchSize?: number;
  /** Stop at the first row boundary at or past this many real tokens (default: the whole data set). */
  maxTokens?: number;
  /** Teacher layers to collect (default all). */
  layers?: number[];
  /** Where the teacher runs when loaded from a directory (default: the backend's default device). */
  device?: string;
  dtype?: 'f32' | 'bf16';
  /** γ₀-scan decays (default scanDecays()). */
  decays?: ArrayLike<number>;
  reductionDevice?: 'auto' | 'cpu';
  /** Token cache directory (default <tmp>/tcal-token-cache). */
  cacheDir?: string;
  signal?: AbortSignal;
  onProgress?: (p: CollectStatsProgress) => void;
}

export interface CollectFromDatasetResult {
  stats: TaylorStats;
  /** summarizeHeads(stats): one row per (layer, head). */
  summary: HeadSummary[];
  seqLen: number;
  batchSize: number;
  batches: number;
  documents: number;
  /** Whether the token cache was read back. */
  fromCache: boolean;
}

export interface CalibrationBatchOptions {
  seqLen: number;
  batchSize: number;
  maxTokens?: number;
  specialTokens?: SpecialTokens;
}

/** The first `rows` rows of a packed batch (every row start is a segment start, so segments stay whole). */
function firstRows(b: PackedBatch, rows: number): PackedBatch {
  const used = rows * b.seqLen;
  const cu: number[] = [];
  for (const c of b.cuSeqlens) if (c < used) cu.push(c);
  cu.push(used);
  const mask = b.attentionMask.subarray(0, used);
  return {
    rows,
    seqLen: b.seqLen,
    inputIds: b.inputIds.subarray(0, used),
    attentionMask: mask,
    cuSeqlens: Int32Array.from(cu),
    numTokens: mask.reduce((s, m) => s + m, 0),
  };
}

/**
 * The calibration batches of a tokenised data set: documents back to back (BOS / EOS as the tokenizer adds
 * them), cut into rows of seqLen with document boundaries kept as segments, batchSize rows per batch; with
 * maxTokens, rows stop at the first row boundary at or past that many real tokens.
 */
export function* calibrationBatches(data: Pick<TokenizedDataset, 'tokens' | 'docOffsets'>, o: CalibrationBatchOptions): Generator<PackedBatch> {
  const budget = o.maxTokens ?? Infinity;
  if (!(budget > 0)) throw new InvalidArgumentError('maxTokens', `must be a positive number, got ${o.maxTokens}`);
  let seen = 0;
  for (const batch of iteratePackedBatches(data, { seqLen: o.seqLen, mode: 'concat', keepBoundaries: true, batchSize: o.batchSize, specialTokens: o.specialTokens })) {
    if (seen + batch.numTokens < budget) {
      seen += batch.numTokens;
      yield batch;
      continue;
    }
    // This batch reaches the budget: keep rows up to the one that crosses it.
    let rows = 0;
    for (; rows < batch.rows; ) {
      const row = batch.attentionMask.subarray(rows * batch.seqLen, (rows + 1) * batch.seqLen);
      seen += row.reduce((s, m) => s + m, 0);
      rows++;
      if (seen >= budget) break;
    }
    yield rows === batch.rows ? batch : firstRows(batch, rows);
    return;
  }
}

/** Parses a layer list such as "0,3,5" or "0-3,7" against a teacher's layer count (InvalidArgumentError). */
export function parseLayerList(text: string, numLayers?: number): number[] {
  const out = new Set<number>();
  for (const part of text.split(',').map((s) => s.trim())) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part);
    if (!m) throw new InvalidArgumentError('layers', `"${text}" is not a list of layer indices like 0,3,5 or 0-3`);
    const a = Number(m[1]);
    const b = m[2] === undefined ? a : Number(m[2]);
    if (b < a) throw new InvalidArgumentError('layers', `range ${part} is empty`);
    for (let l = a; l <= b; l++) out.add(l);
  }
  const layers = [...out].sort((x, y) => x - y);
  if (numLayers !== undefined) checkLayers(layers, numLayers);
  return layers;
}

function checkLayers(layers: readonly number[], numLayers: number): void {
  if (layers.length === 0) throw new InvalidArgumentError('layers', 'select at least one layer');
  for (const l of layers) {
    if (!Number.isInteger(l) || l < 0 || l >= numLayers) {
      throw new InvalidArgumentError('layers', `layer ${l} is not in [0, ${numLayers}) (the teacher has ${numLayers} layers)`);
    }
  }
}

function positiveInt(name: string, v: number | undefined, fallback: number): number {
  const x = v ?? fallback;
  if (!Number.isSafeInteger(x) || x <= 0) throw new InvalidArgumentError(name, `must be a positive integer, got ${v}`);
  return x;
}

/**
 * Collects TaylorStats of `teacher` over the data set `data` (see the file comment). Arguments are checked
 * against the teacher's config before anything is tokenised or loaded.
 */
export async function collectTaylorStatsFromDataset(o: CollectFromDatasetOptions): Promise<CollectFromDatasetResult> {
  const teacherDir = typeof o.teacher === 'string' ? o.teacher : null;
  const config: TeacherConfig = teacherDir !== null ? await loadTeacherConfig(teacherDir) : (o.teacher as Teacher).config;
  if (o.layers) checkLayers(o.layers, config.numLayers);
  const seqLen = Math.min(positiveInt('seqLen', o.seqLen, 512), config.maxPositionEmbeddings);
  checkSequenceLength(config, seqLen);
  const batchSize = positiveInt('batchSize', o.batchSize, 8);
  if (o.maxTokens !== undefined && !(o.maxTokens > 0)) throw new InvalidArgumentError('maxTokens', `must be a positive number, got ${o.maxTokens}`);
  const tokenizerSource = o.tokenizer ?? teacherDir;
  if (tokenizerSource === null) throw new InvalidArgumentError('tokenizer', 'a loaded Teacher needs a tokenizer (directory or Tokenizer)');

  const tokenizer = typeof tokenizerSource === 'string' ? await loadTokenizer(tokenizerSource) : tokenizerSource;
  const data = await tokenizeDataset(o.data, tokenizer, {
    cacheDir: o.cacheDir ?? path.join(os.tmpdir(), 'tcal-token-cache'),
    signal: o.signal,
    onProgress: (p) => o.onProgress?.({ stage: 'tokenize', done: p.done, total: p.total }),
  });
  const specials = (tokenizer.addBos && tokenizer.bosId !== null ? 1 : 0) + (tokenizer.addEos && tokenizer.eosId !== null ? 1 : 0);
  const available = data.numTokens + specials * data.numDocs;
  if (available === 0) throw new DataError('the data set holds no tokens', { file: path.resolve(o.data) });
  for (let i = 0; i < data.numTokens; i++) {
    if (data.tokens[i] >= config.vocabSize) {
      throw new DataError(`token id ${data.tokens[i]} is outside the teacher's vocabulary (${config.vocabSize}); is the tokenizer the teacher's?`, {
        file: path.resolve(o.data),
      });
    }
  }

  let teacher: Teacher;
  if (teacherDir !== null) {
    teacher = await Teacher.load(teacherDir, {
      device: o.device,
      dtype: o.dtype,
      signal: o.signal,
      onProgress: (p) => o.onProgress?.({ stage: 'load', done: p.loaded, total: p.total }),
    });
  } else {
    teacher = o.teacher as Teacher;
  }
  try {
    const total = Math.min(available, o.maxTokens ?? Infinity);
    let batches = 0;
    o.onProgress?.({ stage: 'collect', done: 0, total });
    const stats = await collectTaylorStats(teacher, calibrationBatches(data, { seqLen, batchSize, maxTokens: o.maxTokens, specialTokens: tokenizer }), {
      layers: o.layers,
      decays: o.decays,
      reductionDevice: o.reductionDevice,
      signal: o.signal,
      onProgress: (p) => {
        batches = p.batches;
        o.onProgress?.({ stage: 'collect', done: Math.min(p.tokens, total), total });
      },
    });
    return { stats, summary: summarizeHeads(stats), seqLen, batchSize, batches, documents: data.numDocs, fromCache: data.fromCache };
  } finally {
    if (teacherDir !== null) teacher.dispose();
  }
}

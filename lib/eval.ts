/**
 * Perplexity of a model on a dataset: tokenise (cached), pack into fixed-length rows with document boundaries
 * kept, score every next token inside its document. (KL to a teacher joins when students exist.)
 */
import * as os from 'os';
import * as path from 'path';
import { Teacher } from './model/teacher';
import { loadTokenizer } from './io/tokenizer';
import { tokenizeDataset, iteratePackedBatches, nextTokenTargets } from './io/dataset';
import { throwIfAborted } from './errors';

export interface EvaluateOptions {
  model: string;
  data: string;
  seqLen?: number;
  batchSize?: number;
  /** Stop after this many scored tokens. */
  maxTokens?: number;
  device?: string;
  dtype?: 'f32' | 'bf16';
  cacheDir?: string;
  signal?: AbortSignal;
  onProgress?: (p: { stage: 'load' | 'tokenize' | 'score'; done: number; total: number }) => void;
}

export interface EvaluateResult {
  perplexity: number;
  meanLoss: number;
  tokens: number;
  documents: number;
  seqLen: number;
}

export async function evaluatePerplexity(o: EvaluateOptions): Promise<EvaluateResult> {
  const tokenizer = await loadTokenizer(o.model);
  const data = await tokenizeDataset(o.data, tokenizer, {
    cacheDir: o.cacheDir ?? path.join(os.tmpdir(), 'tcal-token-cache'),
    signal: o.signal,
    onProgress: (p) => o.onProgress?.({ stage: 'tokenize', done: p.done, total: p.total }),
  });
  const teacher = await Teacher.load(o.model, {
    device: o.device,
    dtype: o.dtype,
    signal: o.signal,
    onProgress: (p) => o.onProgress?.({ stage: 'load', done: p.loaded, total: p.total }),
  });
  try {
    const seqLen = Math.min(o.seqLen ?? 512, teacher.config.maxPositionEmbeddings);
    const batchSize = o.batchSize ?? 8;
    const budget = o.maxTokens ?? Infinity;
    const total = Math.min(data.numTokens, budget);
    let sum = 0;
    let count = 0;
    for (const batch of iteratePackedBatches(data, { seqLen, mode: 'concat', keepBoundaries: true, batchSize, specialTokens: tokenizer })) {
      throwIfAborted(o.signal);
      const n = batch.rows * batch.seqLen;
      const r = await teacher.loss(batch.inputIds, nextTokenTargets(batch), [1, n], { cuSeqlens: batch.cuSeqlens, signal: o.signal });
      sum += r.sum;
      count += r.count;
      o.onProgress?.({ stage: 'score', done: Math.min(count, total), total });
      if (count >= budget) break;
    }
    const meanLoss = sum / Math.max(count, 1);
    return { perplexity: Math.exp(meanLoss), meanLoss, tokens: count, documents: data.numDocs, seqLen };
  } finally {
    teacher.dispose();
  }
}

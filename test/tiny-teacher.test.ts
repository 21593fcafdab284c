/**
 * The tiny teacher shipped in data/teachers/tiny (trained by `tcal pretrain --preset tiny` on the H200, see
 * README): it loads with its tokenizer, has the preset's shape, and predicts Python source far better than a
 * unigram model (perplexity ≈ 600 on this corpus) on the CPU.
 */
import * as path from 'node:path';
import { evaluatePerplexity } from '../lib/eval';
import { Teacher } from '../lib/model/teacher';
import { PRETRAIN_PRESETS } from '../lib/train/presets';

const TINY = path.resolve(__dirname, '../data/teachers/tiny');

test('the tiny teacher loads and predicts the corpus (CPU)', async () => {
  const teacher = await Teacher.load(TINY, { device: 'cpu' });
  const spec = PRETRAIN_PRESETS.tiny.model;
  expect(teacher.config).toMatchObject({
    family: 'llama', hiddenSize: spec.hiddenSize, numLayers: spec.numLayers, numHeads: spec.numHeads,
    numKvHeads: spec.numKvHeads, headDim: 64, tieWordEmbeddings: true, vocabSize: 4096,
  });
  teacher.dispose();
  const r = await evaluatePerplexity({
    model: TINY, data: path.resolve(__dirname, '../data/corpus/python-stdlib-sample.txt'), seqLen: 256, batchSize: 4,
    maxTokens: 2048, device: 'cpu',
  });
  expect(r.tokens).toBeGreaterThanOrEqual(2048);
  expect(r.perplexity).toBeGreaterThan(1);
  expect(r.perplexity).toBeLessThan(40);
});

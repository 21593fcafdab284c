/**
 * Our readers against checkpoints written by transformers itself (test/fixtures/make_hf_fixtures.py,
 * run on the GPU host). Skipped until those fixtures are committed.
 */

import { existsSync } from 'node:fs';
import * as path from 'node:path';
import { toFloat32 } from '../lib/io/dtype';
import { TeacherConfig, checkTeacherCheckpoint, loadTeacherConfig } from '../lib/io/hf-config';
import { INDEX_FILE_NAME, openCheckpoint, openSafetensors } from '../lib/io/safetensors';

const FIXTURES = path.join(__dirname, 'fixtures', 'hf');

const expectations: Record<string, Partial<TeacherConfig> & { sharded: boolean }> = {
  'llama-gqa-llama3-sharded': { family: 'llama', numHeads: 4, numKvHeads: 2, headDim: 16, tieWordEmbeddings: false, sharded: true },
  'qwen2-tied-qkv-bias': { family: 'qwen2', qkvBias: true, attentionBias: false, tieWordEmbeddings: true, sharded: false },
  'qwen3-head-dim-qk-norm': { family: 'qwen3', headDim: 32, qkNorm: true, tieWordEmbeddings: false, sharded: false },
  'mistral-swa-linear-rope': { family: 'mistral', slidingWindow: 4096, numKvHeads: 4, sharded: false },
};

const present = Object.keys(expectations).filter((name) => existsSync(path.join(FIXTURES, name, 'config.json')));
const ropeTypes: Record<string, string> = {
  'llama-gqa-llama3-sharded': 'llama3',
  'qwen2-tied-qkv-bias': 'default',
  'qwen3-head-dim-qk-norm': 'default',
  'mistral-swa-linear-rope': 'linear',
};

(present.length > 0 ? describe : describe.skip)('transformers-written fixtures', () => {
  test.each(present.length > 0 ? present : ['none'])('%s: config, checkpoint and reference activations read back', async (name) => {
    const dir = path.join(FIXTURES, name);
    const { sharded, ...expected } = expectations[name];
    const config = await loadTeacherConfig(dir);
    expect(config).toMatchObject({ hiddenSize: 64, numLayers: 2, ...expected });
    expect(config.rope.type).toBe(ropeTypes[name]);

    await using checkpoint = await openCheckpoint(dir);
    expect(path.basename(checkpoint.file)).toBe(sharded ? INDEX_FILE_NAME : 'model.safetensors');
    checkTeacherCheckpoint(config, checkpoint);
    expect(checkpoint.info('model.embed_tokens.weight').dtype).toBe('F32');

    await using ref = await openSafetensors(path.join(dir, 'ref_logits.safetensors'));
    const ids = ref.info('input_ids');
    expect(ids).toMatchObject({ dtype: 'I64', shape: [2, 24] });
    expect(ref.info('logits')).toMatchObject({ dtype: 'F32', shape: [2, 24, config.vocabSize] });
    for (let layer = 0; layer < config.numLayers; layer++) expect(ref.info(`layer_outputs.${layer}`).shape).toEqual([2, 24, 64]);
    const idValues = new BigInt64Array(new Uint8Array(await ref.readTensor('input_ids')).slice().buffer);
    expect(idValues.every((id) => id >= 0n && id < BigInt(config.vocabSize))).toBe(true);
    const logits = toFloat32('F32', await ref.readTensor('logits'));
    expect(logits.every(Number.isFinite)).toBe(true);
  });
});

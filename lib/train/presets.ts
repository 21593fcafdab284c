/**
 * Named teacher recipes for `tcal pretrain --preset`: the tiny teacher shipped in the repository and the four
 * testbed teachers (DESIGN.md §7; issue 6). Every field can be overridden on the command line.
 */
import { InvalidArgumentError } from '../errors';
import type { TeacherSpec } from './pretrain';

export interface PretrainPreset {
  description: string;
  model: TeacherSpec;
  seqLen: number;
  batchSize: number;
  lr: number;
  warmupSteps: number;
  /** Token budget. */
  tokens: number;
}

export const PRETRAIN_PRESETS: Readonly<Record<string, PretrainPreset>> = {
  tiny: {
    description: 'tiny Llama GQA 3:1, 4 layers, d=192, 3 heads of 64, tied (≈ 2.4M parameters): the README demo and CPU tests',
    model: { family: 'llama', hiddenSize: 192, numLayers: 4, numHeads: 3, numKvHeads: 1, intermediateSize: 512, tieWordEmbeddings: true },
    seqLen: 256,
    batchSize: 32,
    lr: 3e-3,
    warmupSteps: 100,
    tokens: 8_000_000,
  },
  'llama-mha': {
    description: '(a) Llama-style MHA, 8 layers, d=512, 8 heads of 64 (≈ 29M parameters)',
    model: { family: 'llama', hiddenSize: 512, numLayers: 8, numHeads: 8, intermediateSize: 1376 },
    seqLen: 512,
    batchSize: 64,
    lr: 2e-3,
    warmupSteps: 200,
    tokens: 40_000_000,
  },
  'llama-gqa': {
    description: '(b) Llama-style GQA 4:1, 8 layers, d=512, 8 query / 2 KV heads of 64 (≈ 27M parameters)',
    model: { family: 'llama', hiddenSize: 512, numLayers: 8, numHeads: 8, numKvHeads: 2, intermediateSize: 1376 },
    seqLen: 512,
    batchSize: 64,
    lr: 2e-3,
    warmupSteps: 200,
    tokens: 40_000_000,
  },
  'qwen3-qknorm': {
    description: '(c) Qwen3-style with q/k norm, 8 layers, d=512, 8 query / 4 KV heads of 64 (≈ 28M parameters)',
    model: { family: 'qwen3', hiddenSize: 512, numLayers: 8, numHeads: 8, numKvHeads: 4, intermediateSize: 1376 },
    seqLen: 512,
    batchSize: 64,
    lr: 2e-3,
    warmupSteps: 200,
    tokens: 40_000_000,
  },
  large: {
    description: '(d) the largest that trains well in under 10 minutes on one H200: Llama GQA 4:1, 12 layers, d=768, 12 heads of 64 (≈ 90M parameters)',
    model: { family: 'llama', hiddenSize: 768, numLayers: 12, numHeads: 12, numKvHeads: 3, intermediateSize: 2048 },
    seqLen: 1024,
    batchSize: 32,
    lr: 1.5e-3,
    warmupSteps: 300,
    tokens: 30_000_000,
  },
};

export function pretrainPreset(name: string): PretrainPreset {
  const p = PRETRAIN_PRESETS[name];
  if (!p) throw new InvalidArgumentError('preset', `unknown preset ${JSON.stringify(name)}; known: ${Object.keys(PRETRAIN_PRESETS).join(', ')}`);
  return p;
}

/**
 * Writes a teacher in the Hugging Face layout transformers loads with `from_pretrained`: config.json (the inverse
 * of lib/io/hf-config.ts's parser), model.safetensors and the tokenizer files copied beside them. Every file
 * goes through a temporary name and a rename; the directory is complete only when config.json appears last.
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { InvalidArgumentError } from '../errors';
import type { TeacherConfig } from '../io/hf-config';
import { writeFileAtomically, writeAll } from '../io/file-io';
import type { Dtype } from '../io/dtype';
import { writeCheckpoint } from '../io/safetensors';
import type { Tensor } from '../tensor';
import { cast } from '../ops/elementwise';

const MODEL_TYPES: Record<TeacherConfig['family'], string> = { llama: 'llama', qwen2: 'qwen2', qwen3: 'qwen3', mistral: 'mistral' };
const TORCH_DTYPES: Partial<Record<Dtype, string>> = { F32: 'float32', BF16: 'bfloat16', F16: 'float16' };

/** config.json for `c` (transformers 4 and 5 both read it). Only plain causal attention (no sliding window). */
export function teacherConfigJson(c: TeacherConfig, dtype: Dtype = 'BF16'): Record<string, unknown> {
  if (c.slidingWindow !== null) throw new InvalidArgumentError('config', 'exporting sliding-window teachers is not supported');
  if (c.family === 'qwen2' && c.headDim * c.numHeads !== c.hiddenSize)
    throw new InvalidArgumentError('config', 'Qwen2 needs headDim · numHeads = hiddenSize');
  const rope: Record<string, unknown> | null =
    c.rope.type === 'default'
      ? null
      : c.rope.type === 'linear'
        ? { rope_type: 'linear', factor: c.rope.factor }
        : {
            rope_type: 'llama3',
            factor: c.rope.factor,
            low_freq_factor: c.rope.lowFreqFactor,
            high_freq_factor: c.rope.highFreqFactor,
            original_max_position_embeddings: c.rope.originalMaxPositionEmbeddings,
          };
  const json: Record<string, unknown> = {
    architectures: [c.architecture],
    model_type: MODEL_TYPES[c.family],
    vocab_size: c.vocabSize,
    hidden_size: c.hiddenSize,
    intermediate_size: c.intermediateSize,
    num_hidden_layers: c.numLayers,
    num_attention_heads: c.numHeads,
    num_key_value_heads: c.numKvHeads,
    head_dim: c.headDim,
    hidden_act: 'silu',
    rms_norm_eps: c.rmsNormEps,
    rope_theta: c.ropeTheta,
    rope_scaling: rope,
    max_position_embeddings: c.maxPositionEmbeddings,
    tie_word_embeddings: c.tieWordEmbeddings,
    initializer_range: 0.02,
    use_cache: true,
    bos_token_id: c.bosTokenId,
    eos_token_id: c.eosTokenId,
    torch_dtype: TORCH_DTYPES[dtype] ?? 'float32',
  };
  if (c.family === 'llama' || c.family === 'qwen3') json.attention_bias = c.attentionBias;
  if (c.family === 'llama') json.mlp_bias = c.mlpBias;
  if (c.family === 'qwen2' || c.family === 'qwen3') Object.assign(json, { use_sliding_window: false, sliding_window: null, max_window_layers: c.numLayers });
  if (c.family === 'mistral') json.sliding_window = null;
  return json;
}

export interface ExportTeacherOptions {
  /** Storage dtype of the weights (default BF16). */
  dtype?: 'BF16' | 'F32';
  /** Directory holding tokenizer.json (and tokenizer_config.json, special_tokens_map.json) to copy. */
  tokenizerDir?: string;
}

const TOKENIZER_FILES = ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'];

/** Writes config.json, model.safetensors and the tokenizer files of a teacher with weights `weights` into `dir`. */
export async function exportTeacher(
  dir: string,
  c: TeacherConfig,
  weights: ReadonlyMap<string, Tensor>,
  options: ExportTeacherOptions = {},
): Promise<void> {
  const dtype = options.dtype ?? 'BF16';
  await fsp.mkdir(dir, { recursive: true });
  const tensors: Array<{ name: string; dtype: Dtype; shape: number[]; data: ArrayBufferView }> = [];
  for (const [name, t] of weights) {
    const want = dtype === 'BF16' ? 'bf16' : 'f32';
    const data = t.dtype === want ? await t.toArray() : await (async () => {
      const x = await cast(t, want);
      try {
        return await x.toArray();
      } finally {
        x.dispose();
      }
    })();
    tensors.push({ name, dtype, shape: t.shape, data });
  }
  tensors.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  await writeCheckpoint(dir, tensors);
  if (options.tokenizerDir) {
    for (const f of TOKENIZER_FILES) {
      const src = path.join(options.tokenizerDir, f);
      const bytes = await fsp.readFile(src).catch((e: NodeJS.ErrnoException) => {
        if (e.code === 'ENOENT' && f !== 'tokenizer.json') return null;
        throw e;
      });
      if (bytes) await writeFileAtomically(path.join(dir, f), (fh) => writeAll(fh, bytes, null));
    }
  }
  const config = Buffer.from(JSON.stringify(teacherConfigJson(c, dtype), null, 2) + '\n', 'utf8');
  await writeFileAtomically(path.join(dir, 'config.json'), (fh) => writeAll(fh, config, null));
}

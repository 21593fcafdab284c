/**
 * Hugging Face config.json → a normalised, validated TeacherConfig for the teacher families we run
 * (DESIGN.md §4): LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM.
 *
 * Both config shapes are accepted: transformers 4.x (top-level rope_theta + rope_scaling, torch_dtype) and
 * transformers 5.x (rope_parameters holding rope_type and rope_theta, dtype). Anything we cannot run
 * exactly is refused with a ConfigError that names the key and its value, rather than approximated.
 */

import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { CheckpointFormatError, ConfigError } from '../errors';
import { FloatDtype } from './dtype';
import { JsonObject as Json, isPlainObject } from './json-values';
import { TensorReader, TensorSpec, verifyTensors } from './safetensors';

export type TeacherFamily = 'llama' | 'qwen2' | 'qwen3' | 'mistral';

export type RopeScaling =
  | { type: 'default' }
  | { type: 'linear'; factor: number }
  | { type: 'llama3'; factor: number; lowFreqFactor: number; highFreqFactor: number; originalMaxPositionEmbeddings: number };

export type LayerType = 'full_attention' | 'sliding_attention';

export interface TeacherConfig {
  architecture: string;
  family: TeacherFamily;
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  rmsNormEps: number;
  ropeTheta: number;
  rope: RopeScaling;
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
  /** q, k, v and o projections all carry a bias (Llama / Qwen3 `attention_bias`). */
  attentionBias: boolean;
  /** q, k and v projections carry a bias (Qwen2 always; anyone with attentionBias). */
  qkvBias: boolean;
  /** gate, up and down projections carry a bias (Llama `mlp_bias`). */
  mlpBias: boolean;
  /** Per-head RMSNorm of q and k before RoPE (Qwen3 q_norm / k_norm, weight [headDim]). */
  qkNorm: boolean;
  hiddenAct: 'silu';
  /**
   * Sliding-window attention size (a query at position i sees keys j with i − j < slidingWindow) when
   * any layer uses it and it is smaller than maxPositionEmbeddings; null when every layer is plain causal.
   * Our attention is full causal: it matches only for sequences no longer than this (see
   * checkSequenceLength).
   */
  slidingWindow: number | null;
  /** Per layer; 'sliding_attention' only where slidingWindow is not null. */
  layerTypes: LayerType[];
  bosTokenId: number | null;
  eosTokenId: number | number[] | null;
  /** The dtype the checkpoint was saved in, as config.json says ("bfloat16", ...), or null. */
  torchDtype: string | null;
}

const ARCHITECTURE_FAMILIES: Readonly<Record<string, TeacherFamily>> = {
  LlamaForCausalLM: 'llama',
  Qwen2ForCausalLM: 'qwen2',
  Qwen3ForCausalLM: 'qwen3',
  MistralForCausalLM: 'mistral',
};

const MODEL_TYPE_ARCHITECTURES: Readonly<Record<string, string>> = {
  llama: 'LlamaForCausalLM',
  qwen2: 'Qwen2ForCausalLM',
  qwen3: 'Qwen3ForCausalLM',
  mistral: 'MistralForCausalLM',
};

/** Reads typed keys out of a config object, throwing ConfigError naming the key and value. */
class ConfigReader {
  constructor(
    private readonly json: Json,
    private readonly file: string | undefined,
    private readonly prefix = '',
  ) {}

  error(key: string, value: unknown, message: string): ConfigError {
    return new ConfigError(`${this.prefix}${key} = ${JSON.stringify(value)}: ${message}`, { key: this.prefix + key, value, file: this.file });
  }

  raw(key: string): unknown {
    return this.json[key];
  }

  /** Absent and null both count as missing (transformers writes null for "use the default"). */
  has(key: string): boolean {
    return this.json[key] !== undefined && this.json[key] !== null;
  }

  positiveInt(key: string, fallback?: number): number {
    const value = this.json[key];
    if (value === undefined || value === null) {
      if (fallback !== undefined) return fallback;
      throw this.error(key, value, 'required key is missing');
    }
    if (typeof value !== 'number' || !Number.isSafeInteger(value) || value <= 0) throw this.error(key, value, 'must be a positive integer');
    return value;
  }

  positiveNumber(key: string, fallback?: number): number {
    const value = this.json[key];
    if (value === undefined || value === null) {
      if (fallback !== undefined) return fallback;
      throw this.error(key, value, 'required key is missing');
    }
    if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) throw this.error(key, value, 'must be a positive number');
    return value;
  }

  boolean(key: string, fallback: boolean): boolean {
    const value = this.json[key];
    if (value === undefined || value === null) return fallback;
    if (typeof value !== 'boolean') throw this.error(key, value, 'must be true or false');
    return value;
  }

  tokenId(key: string): number | null {
    const value = this.json[key];
    if (value === undefined || value === null) return null;
    if (!isTokenId(value)) throw this.error(key, value, 'must be a non-negative integer token id');
    return value;
  }
}

function isTokenId(value: unknown): value is number {
  return typeof value === 'number' && Number.isSafeInteger(value) && value >= 0;
}

/** Normalises a parsed config.json. `file` only labels errors. */
export function parseTeacherConfig(json: unknown, file?: string): TeacherConfig {
  if (!isPlainObject(json)) throw new ConfigError('config must be a JSON object', { file, value: json });
  const config = new ConfigReader(json, file);

  const architecture = resolveArchitecture(config);
  const family = ARCHITECTURE_FAMILIES[architecture];

  const hiddenAct = json.hidden_act ?? 'silu';
  if (hiddenAct !== 'silu') throw config.error('hidden_act', hiddenAct, 'only silu (SwiGLU MLP) is supported');

  const vocabSize = config.positiveInt('vocab_size');
  const hiddenSize = config.positiveInt('hidden_size');
  const intermediateSize = config.positiveInt('intermediate_size');
  const numLayers = config.positiveInt('num_hidden_layers');
  const numHeads = config.positiveInt('num_attention_heads');
  const numKvHeads = config.positiveInt('num_key_value_heads', numHeads);
  if (numHeads % numKvHeads !== 0) {
    throw config.error('num_key_value_heads', numKvHeads, `num_attention_heads (${numHeads}) must be a multiple of it`);
  }
  if (!config.has('head_dim') && hiddenSize % numHeads !== 0) {
    throw config.error('num_attention_heads', numHeads, `hidden_size (${hiddenSize}) is not a multiple of it and no head_dim is given`);
  }
  const headDim = config.positiveInt('head_dim', hiddenSize / numHeads);
  if (headDim % 2 !== 0) throw config.error('head_dim', headDim, 'RoPE needs an even head dimension');
  const rmsNormEps = config.positiveNumber('rms_norm_eps');
  const maxPositionEmbeddings = config.positiveInt('max_position_embeddings');
  const { ropeTheta, rope } = parseRope(config, json, file);

  // Which projections carry biases is fixed per family in transformers, whatever else the config says.
  const attentionBias = family === 'llama' || family === 'qwen3' ? config.boolean('attention_bias', false) : false;
  const qkvBias = family === 'qwen2' || attentionBias;
  const mlpBias = family === 'llama' ? config.boolean('mlp_bias', false) : false;

  const { slidingWindow, layerTypes } = parseSlidingWindow(config, json, family, numLayers, maxPositionEmbeddings);

  const eos = json.eos_token_id;
  let eosTokenId: number | number[] | null;
  if (eos === undefined || eos === null) eosTokenId = null;
  else if (isTokenId(eos)) eosTokenId = eos;
  else if (Array.isArray(eos) && eos.length > 0 && eos.every(isTokenId)) eosTokenId = [...eos];
  else throw config.error('eos_token_id', eos, 'must be a token id or a non-empty list of token ids');

  const dtypeValue = json.dtype ?? json.torch_dtype ?? null; // transformers 5 renamed torch_dtype to dtype
  if (dtypeValue !== null && typeof dtypeValue !== 'string') throw config.error(json.dtype !== undefined ? 'dtype' : 'torch_dtype', dtypeValue, 'must be a string');

  return {
    architecture,
    family,
    vocabSize,
    hiddenSize,
    intermediateSize,
    numLayers,
    numHeads,
    numKvHeads,
    headDim,
    rmsNormEps,
    ropeTheta,
    rope,
    maxPositionEmbeddings,
    tieWordEmbeddings: config.boolean('tie_word_embeddings', false),
    attentionBias,
    qkvBias,
    mlpBias,
    qkNorm: family === 'qwen3',
    hiddenAct: 'silu',
    slidingWindow,
    layerTypes,
    bosTokenId: config.tokenId('bos_token_id'),
    eosTokenId,
    torchDtype: dtypeValue,
  };
}

function resolveArchitecture(config: ConfigReader): string {
  const architectures = config.raw('architectures');
  if (architectures !== undefined && architectures !== null) {
    if (!Array.isArray(architectures) || architectures.length === 0 || !architectures.every((a) => typeof a === 'string')) {
      throw config.error('architectures', architectures, 'must be a non-empty list of class names');
    }
    const supported = architectures.find((a: string) => a in ARCHITECTURE_FAMILIES);
    if (!supported) throw config.error('architectures', architectures, `unsupported; supported: ${Object.keys(ARCHITECTURE_FAMILIES).join(', ')}`);
    return supported;
  }
  const modelType = config.raw('model_type');
  if (typeof modelType === 'string' && modelType in MODEL_TYPE_ARCHITECTURES) return MODEL_TYPE_ARCHITECTURES[modelType];
  throw config.error('model_type', modelType, `no architectures given and the model type is not one of ${Object.keys(MODEL_TYPE_ARCHITECTURES).join(', ')}`);
}

/**
 * RoPE base and scaling. transformers 4 writes rope_theta at the top level and scaling in rope_scaling
 * ({rope_type | type, factor, ...} or null); transformers 5 writes rope_parameters {rope_type, rope_theta,
 * factor, ...}. rope_parameters wins where both are present, as in transformers 5.
 */
function parseRope(config: ConfigReader, json: Json, file: string | undefined): { ropeTheta: number; rope: RopeScaling } {
  const key = config.has('rope_parameters') ? 'rope_parameters' : 'rope_scaling';
  const params = json[key] ?? null;
  if (params !== null && !isPlainObject(params)) throw config.error(key, params, 'must be an object or null');
  const scaling = new ConfigReader(params ?? {}, file, `${key}.`);

  let ropeTheta: number;
  if (scaling.has('rope_theta')) ropeTheta = scaling.positiveNumber('rope_theta');
  else ropeTheta = config.positiveNumber('rope_theta');

  const partial = params?.partial_rotary_factor ?? json.partial_rotary_factor;
  if (partial !== undefined && partial !== null && partial !== 1) {
    throw config.error('partial_rotary_factor', partial, 'partial rotary embeddings are not supported');
  }

  const typeKey = scaling.has('rope_type') ? 'rope_type' : 'type';
  const type = params?.[typeKey] ?? 'default';
  switch (type) {
    case 'default':
      return { ropeTheta, rope: { type: 'default' } };
    case 'linear':
      return { ropeTheta, rope: { type: 'linear', factor: scaling.positiveNumber('factor') } };
    case 'llama3': {
      const lowFreqFactor = scaling.positiveNumber('low_freq_factor');
      const highFreqFactor = scaling.positiveNumber('high_freq_factor');
      if (highFreqFactor <= lowFreqFactor) {
        throw scaling.error('high_freq_factor', highFreqFactor, `must be larger than low_freq_factor (${lowFreqFactor})`);
      }
      return {
        ropeTheta,
        rope: {
          type: 'llama3',
          factor: scaling.positiveNumber('factor'),
          lowFreqFactor,
          highFreqFactor,
          originalMaxPositionEmbeddings: scaling.positiveInt('original_max_position_embeddings'),
        },
      };
    }
    default:
      throw scaling.error(typeKey, type, 'unsupported RoPE type; supported: default, linear, llama3');
  }
}

/**
 * Which layers use sliding-window attention, as transformers decides it: an explicit layer_types list
 * when given; else Mistral slides every layer when sliding_window is set; Qwen2/Qwen3 only with
 * use_sliding_window, and only from layer max_window_layers on; Llama never.
 */
function parseSlidingWindow(
  config: ConfigReader,
  json: Json,
  family: TeacherFamily,
  numLayers: number,
  maxPositionEmbeddings: number,
): { slidingWindow: number | null; layerTypes: LayerType[] } {
  const window = family === 'llama' ? null : config.has('sliding_window') ? config.positiveInt('sliding_window') : null;
  let layerTypes: LayerType[];
  const given = json.layer_types;
  if (given !== undefined && given !== null) {
    if (!Array.isArray(given) || given.length !== numLayers || !given.every((t) => t === 'full_attention' || t === 'sliding_attention')) {
      throw config.error('layer_types', given, `must list 'full_attention' or 'sliding_attention' for each of the ${numLayers} layers`);
    }
    layerTypes = [...given] as LayerType[];
  } else {
    let slides: (layer: number) => boolean = () => false;
    if (family === 'mistral') slides = () => window !== null;
    else if (family === 'qwen2' || family === 'qwen3') {
      const useSliding = config.boolean('use_sliding_window', false);
      const firstSliding = config.positiveInt('max_window_layers', 28); // transformers' default
      slides = (layer) => useSliding && window !== null && layer >= firstSliding;
    }
    layerTypes = Array.from({ length: numLayers }, (_, layer) => (slides(layer) ? 'sliding_attention' : 'full_attention'));
  }
  if (layerTypes.includes('sliding_attention') && window === null) {
    throw config.error('sliding_window', json.sliding_window ?? null, 'layer_types asks for sliding attention but no sliding_window is set');
  }
  // A window at least as long as any position the model was trained on is plain causal attention.
  if (window === null || window >= maxPositionEmbeddings || !layerTypes.includes('sliding_attention')) {
    return { slidingWindow: null, layerTypes: layerTypes.map(() => 'full_attention') };
  }
  return { slidingWindow: window, layerTypes };
}

/** Reads and parses `<dir>/config.json` (or the file itself when given a .json path). */
export async function loadTeacherConfig(dirOrFile: string): Promise<TeacherConfig> {
  const file = dirOrFile.endsWith('.json') ? dirOrFile : path.join(dirOrFile, 'config.json');
  let text: string;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (cause) {
    throw new ConfigError(`cannot read (${(cause as Error).message})`, { file, cause });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (cause) {
    throw new ConfigError(`not valid JSON (${(cause as Error).message})`, { file, cause });
  }
  return parseTeacherConfig(json, file);
}

/**
 * Our attention is full causal softmax. A sliding-window teacher gives the same result only when no
 * query is further than the window from a key it would see, i.e. for sequences no longer than the window;
 * longer ones are refused instead of silently computing something else.
 */
export function checkSequenceLength(config: TeacherConfig, seqLen: number): void {
  if (config.slidingWindow !== null && seqLen > config.slidingWindow) {
    throw new ConfigError(
      `sliding-window attention (window ${config.slidingWindow}) is not supported for sequences of ${seqLen} tokens; use at most ${config.slidingWindow}`,
      { key: 'sliding_window', value: config.slidingWindow },
    );
  }
}

/**
 * RoPE inverse frequencies, one per rotated pair, exactly as transformers' rope init functions compute
 * them for default, linear and llama3 RoPE.
 *
 * Pairing convention (transformers' rotate_half): within a head of size d, dimension j is rotated together
 * with dimension j + d/2 (not with j + 1), by the angle position · invFreq[j], for j < d/2;
 * invFreq[j] = theta^(−2j/d), then scaled.
 *
 * transformers computes these in float32; with precision 'float32' (the default) every step is rounded
 * to float32 as torch does, so the values equal transformers' to within an ulp of its pow; 'float64'
 * evaluates the same formulas in double precision.
 */
export function ropeInvFreq(config: Pick<TeacherConfig, 'headDim' | 'ropeTheta' | 'rope'>, options: { precision?: 'float32' | 'float64' } = {}): Float64Array {
  const round = (options.precision ?? 'float32') === 'float32' ? Math.fround : (x: number) => x;
  const dim = config.headDim;
  const base = round(config.ropeTheta);
  const invFreq = new Float64Array(dim / 2);
  for (let j = 0; j < dim / 2; j++) invFreq[j] = round(1 / round(Math.pow(base, round((2 * j) / dim))));

  // torch turns Python scalars into float32 before combining them with a float32 tensor.
  const rope = config.rope;
  if (rope.type === 'linear') {
    const factor = round(rope.factor);
    for (let j = 0; j < invFreq.length; j++) invFreq[j] = round(invFreq[j] / factor);
  } else if (rope.type === 'llama3') {
    // Wavelengths longer than the original context / lowFreqFactor are divided by factor, shorter than
    // context / highFreqFactor kept, and the band between interpolated smoothly.
    const context = rope.originalMaxPositionEmbeddings;
    const factor = round(rope.factor);
    const lowFreqWavelen = round(context / rope.lowFreqFactor);
    const highFreqWavelen = round(context / rope.highFreqFactor);
    const twoPi = round(2 * Math.PI);
    const lowFreqFactor = round(rope.lowFreqFactor);
    const band = round(rope.highFreqFactor - rope.lowFreqFactor);
    for (let j = 0; j < invFreq.length; j++) {
      const freq = invFreq[j];
      const wavelen = round(twoPi / freq);
      const scaled = wavelen > lowFreqWavelen ? round(freq / factor) : freq;
      if (wavelen < highFreqWavelen || wavelen > lowFreqWavelen) {
        invFreq[j] = scaled;
      } else {
        const smooth = round(round(round(context / wavelen) - lowFreqFactor) / band);
        invFreq[j] = round(round(round(round(1 - smooth) * scaled) / factor) + round(smooth * scaled));
      }
    }
  }
  return invFreq;
}

/**
 * Every parameter a transformers checkpoint of this teacher holds, with its shape ([out, in] for
 * projections, as nn.Linear stores them). lm_head.weight only when embeddings are not tied.
 */
export function teacherTensorNames(config: TeacherConfig): TensorSpec[] {
  const { hiddenSize: hidden, intermediateSize: inter, headDim, numHeads, numKvHeads } = config;
  const specs: TensorSpec[] = [{ name: 'model.embed_tokens.weight', shape: [config.vocabSize, hidden] }];
  for (let layer = 0; layer < config.numLayers; layer++) {
    const p = `model.layers.${layer}`;
    const projections: Array<[string, number, number, boolean]> = [
      ['q_proj', numHeads * headDim, hidden, config.qkvBias],
      ['k_proj', numKvHeads * headDim, hidden, config.qkvBias],
      ['v_proj', numKvHeads * headDim, hidden, config.qkvBias],
      ['o_proj', hidden, numHeads * headDim, config.attentionBias],
    ];
    for (const [proj, out, inp, bias] of projections) {
      specs.push({ name: `${p}.self_attn.${proj}.weight`, shape: [out, inp] });
      if (bias) specs.push({ name: `${p}.self_attn.${proj}.bias`, shape: [out] });
    }
    if (config.qkNorm) {
      specs.push({ name: `${p}.self_attn.q_norm.weight`, shape: [headDim] });
      specs.push({ name: `${p}.self_attn.k_norm.weight`, shape: [headDim] });
    }
    specs.push({ name: `${p}.input_layernorm.weight`, shape: [hidden] });
    specs.push({ name: `${p}.post_attention_layernorm.weight`, shape: [hidden] });
    const mlp: Array<[string, number, number]> = [
      ['gate_proj', inter, hidden],
      ['up_proj', inter, hidden],
      ['down_proj', hidden, inter],
    ];
    for (const [proj, out, inp] of mlp) {
      specs.push({ name: `${p}.mlp.${proj}.weight`, shape: [out, inp] });
      if (config.mlpBias) specs.push({ name: `${p}.mlp.${proj}.bias`, shape: [out] });
    }
  }
  specs.push({ name: 'model.norm.weight', shape: [hidden] });
  if (!config.tieWordEmbeddings) specs.push({ name: 'lm_head.weight', shape: [config.vocabSize, hidden] });
  return specs;
}

const TEACHER_FLOAT_DTYPES: readonly FloatDtype[] = ['F32', 'F16', 'BF16'];

/**
 * Checks a checkpoint against the config before anything is loaded: every parameter present with its
 * shape and a float dtype (CheckpointFormatError naming the first that is not). Returns the extra tensors
 * that are ignored: a tied lm_head.weight some exporters still write, and old rotary_emb.inv_freq buffers.
 * Any other extra tensor means the checkpoint is not what the config says, and is refused.
 */
export function checkTeacherCheckpoint(config: TeacherConfig, reader: TensorReader & { readonly file?: string }): { ignored: string[] } {
  const expected = teacherTensorNames(config).map((spec) => ({ ...spec, dtypes: TEACHER_FLOAT_DTYPES }));
  const { unexpected } = verifyTensors(reader, expected);
  const ignorable = (name: string) => name.endsWith('.rotary_emb.inv_freq') || (config.tieWordEmbeddings && name === 'lm_head.weight');
  const foreign = unexpected.find((name) => !ignorable(name));
  if (foreign !== undefined) {
    throw new CheckpointFormatError(`unexpected tensor for a ${config.architecture} with this config`, { file: reader.file ?? '(checkpoint)', tensor: foreign });
  }
  return { ignored: unexpected };
}

import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { CheckpointFormatError, ConfigError } from '../lib/errors';
import { Dtype } from '../lib/io/dtype';
import { TeacherConfig, checkSequenceLength, checkTeacherCheckpoint, loadTeacherConfig, parseTeacherConfig, ropeInvFreq, teacherTensorNames } from '../lib/io/hf-config';
import { openCheckpoint, writeCheckpoint } from '../lib/io/safetensors';

// Modelled on the published config.json files of these models (values as released).
const llama32_1b = {
  architectures: ['LlamaForCausalLM'],
  attention_bias: false,
  attention_dropout: 0.0,
  bos_token_id: 128000,
  eos_token_id: 128001,
  head_dim: 64,
  hidden_act: 'silu',
  hidden_size: 2048,
  initializer_range: 0.02,
  intermediate_size: 8192,
  max_position_embeddings: 131072,
  mlp_bias: false,
  model_type: 'llama',
  num_attention_heads: 32,
  num_hidden_layers: 16,
  num_key_value_heads: 8,
  pretraining_tp: 1,
  rms_norm_eps: 1e-5,
  rope_scaling: { factor: 32.0, high_freq_factor: 4.0, low_freq_factor: 1.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
  rope_theta: 500000.0,
  tie_word_embeddings: true,
  torch_dtype: 'bfloat16',
  transformers_version: '4.45.0.dev0',
  use_cache: true,
  vocab_size: 128256,
};

const qwen25_05b = {
  architectures: ['Qwen2ForCausalLM'],
  attention_dropout: 0.0,
  bos_token_id: 151643,
  eos_token_id: 151643,
  hidden_act: 'silu',
  hidden_size: 896,
  initializer_range: 0.02,
  intermediate_size: 4864,
  max_position_embeddings: 32768,
  max_window_layers: 24,
  model_type: 'qwen2',
  num_attention_heads: 14,
  num_hidden_layers: 24,
  num_key_value_heads: 2,
  rms_norm_eps: 1e-6,
  rope_theta: 1000000.0,
  sliding_window: 32768,
  tie_word_embeddings: true,
  torch_dtype: 'bfloat16',
  transformers_version: '4.40.1',
  use_cache: true,
  use_sliding_window: false,
  vocab_size: 151936,
};

const qwen3_06b = {
  architectures: ['Qwen3ForCausalLM'],
  attention_bias: false,
  attention_dropout: 0.0,
  bos_token_id: 151643,
  eos_token_id: 151645,
  head_dim: 128,
  hidden_act: 'silu',
  hidden_size: 1024,
  initializer_range: 0.02,
  intermediate_size: 3072,
  max_position_embeddings: 40960,
  max_window_layers: 28,
  model_type: 'qwen3',
  num_attention_heads: 16,
  num_hidden_layers: 28,
  num_key_value_heads: 8,
  rms_norm_eps: 1e-6,
  rope_scaling: null,
  rope_theta: 1000000,
  sliding_window: null,
  tie_word_embeddings: true,
  torch_dtype: 'bfloat16',
  transformers_version: '4.51.0',
  use_cache: true,
  use_sliding_window: false,
  vocab_size: 151936,
};

const mistral7b = {
  architectures: ['MistralForCausalLM'],
  bos_token_id: 1,
  eos_token_id: 2,
  hidden_act: 'silu',
  hidden_size: 4096,
  initializer_range: 0.02,
  intermediate_size: 14336,
  max_position_embeddings: 32768,
  model_type: 'mistral',
  num_attention_heads: 32,
  num_hidden_layers: 32,
  num_key_value_heads: 8,
  rms_norm_eps: 1e-5,
  rope_theta: 10000.0,
  sliding_window: 4096,
  tie_word_embeddings: false,
  torch_dtype: 'bfloat16',
  transformers_version: '4.34.0.dev0',
  use_cache: true,
  vocab_size: 32000,
};

function configError(json: unknown): ConfigError {
  try {
    parseTeacherConfig(json, 'config.json');
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    expect((error as ConfigError).file).toBe('config.json');
    return error as ConfigError;
  }
  throw new Error('expected a ConfigError');
}

describe('parseTeacherConfig on published configs', () => {
  test('Llama-3.2-1B: GQA, llama3 RoPE, tied embeddings', () => {
    const config = parseTeacherConfig(llama32_1b);
    expect(config).toEqual<TeacherConfig>({
      architecture: 'LlamaForCausalLM',
      family: 'llama',
      vocabSize: 128256,
      hiddenSize: 2048,
      intermediateSize: 8192,
      numLayers: 16,
      numHeads: 32,
      numKvHeads: 8,
      headDim: 64,
      rmsNormEps: 1e-5,
      ropeTheta: 500000,
      rope: { type: 'llama3', factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 },
      maxPositionEmbeddings: 131072,
      tieWordEmbeddings: true,
      attentionBias: false,
      qkvBias: false,
      mlpBias: false,
      qkNorm: false,
      hiddenAct: 'silu',
      slidingWindow: null,
      layerTypes: new Array(16).fill('full_attention'),
      bosTokenId: 128000,
      eosTokenId: 128001,
      torchDtype: 'bfloat16',
    });
  });

  test('Qwen2.5-0.5B: qkv bias without o bias, tied embeddings, an unused sliding window', () => {
    const config = parseTeacherConfig(qwen25_05b);
    expect(config).toMatchObject({ family: 'qwen2', headDim: 64, numKvHeads: 2, qkvBias: true, attentionBias: false, tieWordEmbeddings: true, qkNorm: false, slidingWindow: null });
    expect(config.rope).toEqual({ type: 'default' });
    expect(config.ropeTheta).toBe(1e6);
  });

  test('Qwen3-0.6B: head_dim 128 ≠ hidden / heads, q/k norm, rope_scaling null', () => {
    const config = parseTeacherConfig(qwen3_06b);
    expect(config).toMatchObject({ family: 'qwen3', hiddenSize: 1024, numHeads: 16, headDim: 128, qkNorm: true, qkvBias: false, attentionBias: false, eosTokenId: 151645, slidingWindow: null });
    const attentionBias = parseTeacherConfig({ ...qwen3_06b, attention_bias: true });
    expect(attentionBias).toMatchObject({ attentionBias: true, qkvBias: true });
  });

  test('Mistral-7B-v0.1: a 4096-token sliding window on every layer is represented', () => {
    const config = parseTeacherConfig(mistral7b);
    expect(config).toMatchObject({ family: 'mistral', slidingWindow: 4096, headDim: 128, tieWordEmbeddings: false, qkvBias: false });
    expect(config.layerTypes).toEqual(new Array(32).fill('sliding_attention'));
    expect(() => checkSequenceLength(config, 4096)).not.toThrow();
    const error = (() => {
      try {
        checkSequenceLength(config, 4097);
      } catch (e) {
        return e as ConfigError;
      }
    })();
    expect(error).toBeInstanceOf(ConfigError);
    expect(error).toMatchObject({ key: 'sliding_window', value: 4096 });
  });

  test('Mistral with sliding_window null or absent, or no smaller than the context, is plain causal', () => {
    for (const json of [{ ...mistral7b, sliding_window: null }, { ...mistral7b, sliding_window: undefined }, { ...mistral7b, sliding_window: 32768 }]) {
      const config = parseTeacherConfig(json);
      expect(config.slidingWindow).toBeNull();
      expect(config.layerTypes.every((t) => t === 'full_attention')).toBe(true);
      expect(() => checkSequenceLength(config, 100000)).not.toThrow();
    }
  });

  test('Qwen2 with use_sliding_window slides only from max_window_layers on', () => {
    const config = parseTeacherConfig({ ...qwen25_05b, use_sliding_window: true, sliding_window: 4096, max_window_layers: 20 });
    expect(config.slidingWindow).toBe(4096);
    expect(config.layerTypes.indexOf('sliding_attention')).toBe(20);
    expect(config.layerTypes.filter((t) => t === 'sliding_attention')).toHaveLength(4);
    const explicit = parseTeacherConfig({ ...qwen3_06b, num_hidden_layers: 2, sliding_window: 1024, layer_types: ['sliding_attention', 'full_attention'] });
    expect(explicit.layerTypes).toEqual(['sliding_attention', 'full_attention']);
  });

  test('transformers 5 rope_parameters (rope_theta inside) equals the transformers 4 form', () => {
    const { rope_scaling, rope_theta, torch_dtype, ...rest } = llama32_1b;
    const v5 = parseTeacherConfig({ ...rest, dtype: torch_dtype, rope_parameters: { ...rope_scaling, rope_theta } });
    expect(v5).toEqual(parseTeacherConfig(llama32_1b));
    const v5default = parseTeacherConfig({ ...qwen3_06b, rope_theta: undefined, rope_scaling: undefined, rope_parameters: { rope_type: 'default', rope_theta: 1000000 } });
    expect(v5default).toEqual(parseTeacherConfig(qwen3_06b));
  });

  test('legacy "type" key and linear scaling', () => {
    const config = parseTeacherConfig({ ...mistral7b, rope_scaling: { type: 'linear', factor: 4 } });
    expect(config.rope).toEqual({ type: 'linear', factor: 4 });
  });

  test('Llama mlp_bias and attention_bias', () => {
    const config = parseTeacherConfig({ ...llama32_1b, attention_bias: true, mlp_bias: true });
    expect(config).toMatchObject({ attentionBias: true, qkvBias: true, mlpBias: true });
  });

  test('eos_token_id as a list, no architectures but a model_type', () => {
    const { architectures: _a, ...noArchitectures } = llama32_1b;
    const config = parseTeacherConfig({ ...noArchitectures, eos_token_id: [128001, 128008, 128009] });
    expect(config.architecture).toBe('LlamaForCausalLM');
    expect(config.eosTokenId).toEqual([128001, 128008, 128009]);
  });

  test('head_dim and num_key_value_heads default as in transformers', () => {
    const { head_dim: _h, num_key_value_heads: _k, ...rest } = llama32_1b;
    const config = parseTeacherConfig(rest);
    expect(config).toMatchObject({ headDim: 64, numKvHeads: 32 });
    expect(parseTeacherConfig({ ...mistral7b, head_dim: null }).headDim).toBe(128);
  });
});

describe('unsupported configs give ConfigError naming key and value', () => {
  test.each<[string, Record<string, unknown>, string, unknown]>([
    ['another architecture', { ...llama32_1b, architectures: ['GPT2LMHeadModel'], model_type: 'gpt2' }, 'architectures', ['GPT2LMHeadModel']],
    ['no architecture and an unknown model_type', { ...llama32_1b, architectures: undefined, model_type: 'phi' }, 'model_type', 'phi'],
    ['hidden_act gelu', { ...llama32_1b, hidden_act: 'gelu' }, 'hidden_act', 'gelu'],
    ['yarn RoPE', { ...qwen3_06b, rope_scaling: { rope_type: 'yarn', factor: 4, original_max_position_embeddings: 32768 } }, 'rope_scaling.rope_type', 'yarn'],
    ['dynamic RoPE (legacy key)', { ...llama32_1b, rope_scaling: { type: 'dynamic', factor: 2 } }, 'rope_scaling.type', 'dynamic'],
    ['longrope in rope_parameters', { ...llama32_1b, rope_scaling: undefined, rope_parameters: { rope_type: 'longrope', rope_theta: 1e4 } }, 'rope_parameters.rope_type', 'longrope'],
    ['llama3 RoPE without its factors', { ...llama32_1b, rope_scaling: { rope_type: 'llama3', factor: 8 } }, 'rope_scaling.low_freq_factor', undefined],
    ['heads not a multiple of kv heads', { ...qwen25_05b, num_key_value_heads: 4 }, 'num_key_value_heads', 4],
    ['hidden not a multiple of heads without head_dim', { ...qwen25_05b, num_attention_heads: 15, num_key_value_heads: 5 }, 'num_attention_heads', 15],
    ['missing vocab_size', { ...mistral7b, vocab_size: undefined }, 'vocab_size', undefined],
    ['missing hidden_size', { ...mistral7b, hidden_size: undefined }, 'hidden_size', undefined],
    ['missing rope_theta', { ...mistral7b, rope_theta: undefined }, 'rope_theta', undefined],
    ['missing rms_norm_eps', { ...mistral7b, rms_norm_eps: undefined }, 'rms_norm_eps', undefined],
    ['non-integer layers', { ...mistral7b, num_hidden_layers: 2.5 }, 'num_hidden_layers', 2.5],
    ['odd head_dim', { ...qwen3_06b, head_dim: 127 }, 'head_dim', 127],
    ['partial rotary embeddings', { ...llama32_1b, partial_rotary_factor: 0.5 }, 'partial_rotary_factor', 0.5],
    ['tie_word_embeddings not a boolean', { ...llama32_1b, tie_word_embeddings: 'yes' }, 'tie_word_embeddings', 'yes'],
    ['bad eos_token_id', { ...llama32_1b, eos_token_id: [] }, 'eos_token_id', []],
    ['layer_types of the wrong length', { ...qwen3_06b, layer_types: ['full_attention'] }, 'layer_types', ['full_attention']],
  ])('%s', (_label, json, key, value) => {
    const error = configError(json);
    expect(error.key).toBe(key);
    expect(error.value).toEqual(value);
    expect(error.message).toContain(key);
  });

  test('a config that is not an object', () => {
    expect(configError([1, 2]).code).toBe('CONFIG');
  });

  test('loadTeacherConfig names the file for unreadable or malformed config.json', async () => {
    const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'tcal-config-'));
    try {
      await expect(loadTeacherConfig(dir)).rejects.toMatchObject({ code: 'CONFIG', file: path.join(dir, 'config.json') });
      await fsp.writeFile(path.join(dir, 'config.json'), '{"vocab_size": ');
      await expect(loadTeacherConfig(dir)).rejects.toMatchObject({ code: 'CONFIG', file: path.join(dir, 'config.json'), message: expect.stringMatching(/JSON/) });
      await fsp.writeFile(path.join(dir, 'config.json'), JSON.stringify(qwen3_06b));
      expect((await loadTeacherConfig(dir)).headDim).toBe(128);
    } finally {
      await fsp.rm(dir, { recursive: true, force: true });
    }
  });
});

describe('ropeInvFreq', () => {
  test('default: theta^(-2j/d) for each rotate_half pair, float32 like torch or float64', () => {
    const config = parseTeacherConfig(qwen3_06b);
    const f64 = ropeInvFreq(config, { precision: 'float64' });
    const f32 = ropeInvFreq(config);
    expect(f64).toHaveLength(64);
    for (let j = 0; j < 64; j++) {
      const exact = Math.pow(1e6, (-2 * j) / 128);
      expect(f64[j]).toBeCloseTo(exact, 15);
      expect(Math.abs(f64[j] - exact) / exact).toBeLessThan(1e-14);
      expect(Math.fround(f32[j])).toBe(f32[j]);
      expect(Math.abs(f32[j] - exact) / exact).toBeLessThan(2e-7);
    }
    expect(f32[0]).toBe(1);
  });

  test('linear divides every frequency by the factor', () => {
    const base = parseTeacherConfig(mistral7b);
    const linear = parseTeacherConfig({ ...mistral7b, rope_scaling: { rope_type: 'linear', factor: 4 } });
    const a = ropeInvFreq(base, { precision: 'float64' });
    const b = ropeInvFreq(linear, { precision: 'float64' });
    for (let j = 0; j < a.length; j++) expect(b[j]).toBeCloseTo(a[j] / 4, 15);
  });

  test('llama3 (Llama-3.2-1B): high frequencies kept, low ones divided by 32, a smooth band between', () => {
    const config = parseTeacherConfig(llama32_1b);
    const scaled = ropeInvFreq(config, { precision: 'float64' });
    const plain = ropeInvFreq({ ...config, rope: { type: 'default' } }, { precision: 'float64' });
    const lowWavelen = 8192 / 1; // wavelengths above this are scaled by 1/32
    const highWavelen = 8192 / 4; // below this, kept
    let kept = 0;
    let divided = 0;
    let smoothed = 0;
    for (let j = 0; j < plain.length; j++) {
      const wavelen = (2 * Math.PI) / plain[j];
      if (wavelen < highWavelen) {
        expect(scaled[j]).toBe(plain[j]);
        kept++;
      } else if (wavelen > lowWavelen) {
        expect(scaled[j]).toBeCloseTo(plain[j] / 32, 18);
        divided++;
      } else {
        // Interpolation weight s = (context / wavelen − low) / (high − low) between f/32 (s = 0) and f (s = 1).
        const s = (8192 / wavelen - 1) / (4 - 1);
        expect(s).toBeGreaterThanOrEqual(0);
        expect(s).toBeLessThanOrEqual(1);
        expect(scaled[j]).toBeCloseTo(((1 - s) * plain[j]) / 32 + s * plain[j], 15);
        expect(scaled[j]).toBeLessThan(plain[j]);
        expect(scaled[j]).toBeGreaterThan(plain[j] / 32);
        smoothed++;
      }
    }
    expect(kept).toBeGreaterThan(0);
    expect(divided).toBeGreaterThan(0);
    expect(smoothed).toBeGreaterThan(0);
    expect(kept + divided + smoothed).toBe(32);
    // float32 mode stays within float32 rounding of the float64 values.
    const f32 = ropeInvFreq(config);
    for (let j = 0; j < 32; j++) expect(Math.abs(f32[j] - scaled[j]) / scaled[j]).toBeLessThan(1e-6);
  });
});

describe('teacherTensorNames', () => {
  const byName = (config: TeacherConfig) => new Map(teacherTensorNames(config).map((s) => [s.name, s.shape]));

  test('Qwen2.5-0.5B: qkv biases, no o bias, tied (no lm_head)', () => {
    const names = byName(parseTeacherConfig(qwen25_05b));
    expect(names.size).toBe(1 + 24 * 12 + 1);
    expect(names.get('model.embed_tokens.weight')).toEqual([151936, 896]);
    expect(names.get('model.layers.0.self_attn.q_proj.weight')).toEqual([896, 896]);
    expect(names.get('model.layers.0.self_attn.k_proj.weight')).toEqual([128, 896]);
    expect(names.get('model.layers.23.self_attn.v_proj.bias')).toEqual([128]);
    expect(names.has('model.layers.0.self_attn.o_proj.bias')).toBe(false);
    expect(names.get('model.layers.5.mlp.down_proj.weight')).toEqual([896, 4864]);
    expect(names.has('lm_head.weight')).toBe(false);
    expect(names.get('model.norm.weight')).toEqual([896]);
  });

  test('Qwen3-0.6B: q_norm / k_norm of head_dim, q/o projections of heads × head_dim', () => {
    const names = byName(parseTeacherConfig(qwen3_06b));
    expect(names.get('model.layers.0.self_attn.q_proj.weight')).toEqual([2048, 1024]);
    expect(names.get('model.layers.0.self_attn.o_proj.weight')).toEqual([1024, 2048]);
    expect(names.get('model.layers.0.self_attn.k_proj.weight')).toEqual([1024, 1024]);
    expect(names.get('model.layers.27.self_attn.q_norm.weight')).toEqual([128]);
    expect(names.get('model.layers.27.self_attn.k_norm.weight')).toEqual([128]);
    expect(names.has('model.layers.0.self_attn.q_proj.bias')).toBe(false);
  });

  test('Mistral-7B: untied lm_head, Llama with biases everywhere', () => {
    expect(byName(parseTeacherConfig(mistral7b)).get('lm_head.weight')).toEqual([32000, 4096]);
    const biased = byName(parseTeacherConfig({ ...llama32_1b, attention_bias: true, mlp_bias: true }));
    for (const p of ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj']) {
      expect(biased.has(`model.layers.3.${p}.bias`)).toBe(true);
    }
    expect(biased.get('model.layers.3.mlp.gate_proj.bias')).toEqual([8192]);
    expect(biased.get('model.layers.3.self_attn.o_proj.bias')).toEqual([2048]);
  });
});

describe('checkTeacherCheckpoint', () => {
  const tiny = parseTeacherConfig({ ...qwen25_05b, vocab_size: 16, hidden_size: 8, intermediate_size: 12, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1 });
  let root: string;
  beforeAll(async () => {
    root = await fsp.mkdtemp(path.join(os.tmpdir(), 'tcal-teacher-'));
  });
  afterAll(async () => {
    await fsp.rm(root, { recursive: true, force: true });
  });

  async function checkpointOf(name: string, edit: (tensors: Map<string, { dtype: Dtype; shape: number[]; data: Uint8Array }>) => void) {
    const tensors = new Map(teacherTensorNames(tiny).map((s) => [s.name, { dtype: 'BF16' as Dtype, shape: s.shape, data: new Uint8Array(2 * s.shape.reduce((a, b) => a * b, 1)) }]));
    edit(tensors);
    const dir = path.join(root, name);
    await writeCheckpoint(dir, tensors, { maxShardBytes: 512 });
    return openCheckpoint(dir);
  }

  test('a complete checkpoint passes; a tied lm_head and rotary buffers are ignored', async () => {
    await using reader = await checkpointOf('complete', (t) => {
      t.set('lm_head.weight', { dtype: 'BF16', shape: [16, 8], data: new Uint8Array(256) });
      t.set('model.layers.0.self_attn.rotary_emb.inv_freq', { dtype: 'F32', shape: [2], data: new Uint8Array(8) });
    });
    expect(checkTeacherCheckpoint(tiny, reader).ignored.sort()).toEqual(['lm_head.weight', 'model.layers.0.self_attn.rotary_emb.inv_freq']);
  });

  test('a missing tensor, a wrong shape, an integer dtype or a foreign tensor is named', async () => {
    const cases: Array<[string, (t: Map<string, { dtype: Dtype; shape: number[]; data: Uint8Array }>) => void, string, RegExp]> = [
      ['missing', (t) => t.delete('model.layers.1.self_attn.k_proj.bias'), 'model.layers.1.self_attn.k_proj.bias', /missing/],
      ['shape', (t) => t.set('model.layers.0.mlp.up_proj.weight', { dtype: 'BF16', shape: [8, 12], data: new Uint8Array(192) }), 'model.layers.0.mlp.up_proj.weight', /shape \[8,12\]/],
      ['dtype', (t) => t.set('model.norm.weight', { dtype: 'I32', shape: [8], data: new Uint8Array(32) }), 'model.norm.weight', /dtype I32/],
      ['foreign', (t) => t.set('model.layers.0.self_attn.o_proj.bias', { dtype: 'BF16', shape: [8], data: new Uint8Array(16) }), 'model.layers.0.self_attn.o_proj.bias', /unexpected/],
    ];
    for (const [name, edit, tensor, message] of cases) {
      await using reader = await checkpointOf(name, edit);
      let error: unknown;
      try {
        checkTeacherCheckpoint(tiny, reader);
      } catch (e) {
        error = e;
      }
      expect(error).toBeInstanceOf(CheckpointFormatError);
      expect(error).toMatchObject({ tensor, message: expect.stringMatching(message) });
    }
  });
});

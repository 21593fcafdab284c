/**
 * The trainable decoder (lib/model/decoder.ts, lib/train/decoder-trainer.ts): the analytic gradient of the whole
 * model against central finite differences in f64 on the CPU (Llama GQA untied, Qwen3 q/k norm tied with
 * activation recomputation, Qwen2 q/k/v biases), and a two-layer model trained on a fixed batch: the loss goes down step by
 * step, and CPU and CUDA give the same curve within tolerance.
 */
import { parseTeacherConfig, type TeacherConfig } from '../lib/io/hf-config';
import { randomFill } from '../lib/ops/elementwise';
import { cast } from '../lib/ops/elementwise';
import { Tensor } from '../lib/tensor';
import type { TokenBatch } from '../lib/model/decoder';
import { DecoderTrainer } from '../lib/train/decoder-trainer';
import { cudaEnabled, relError, rng } from './helpers';

const ARCH = { llama: 'LlamaForCausalLM', qwen2: 'Qwen2ForCausalLM', qwen3: 'Qwen3ForCausalLM' };

function tinyConfig(family: keyof typeof ARCH, over: Record<string, unknown> = {}): TeacherConfig {
  return parseTeacherConfig({
    architectures: [ARCH[family]],
    vocab_size: 24,
    hidden_size: 16,
    intermediate_size: 20,
    num_hidden_layers: 2,
    num_attention_heads: 2,
    num_key_value_heads: 1,
    head_dim: 8,
    rms_norm_eps: 1e-6,
    rope_theta: 10000,
    max_position_embeddings: 64,
    ...over,
  });
}

/** Two documents packed in one row, a few unscored positions. */
function batchFor(c: TeacherConfig, T: number, seed: number, cuts: number[]): TokenBatch {
  const r = rng(seed);
  const ids = Int32Array.from({ length: T }, () => Math.floor(r() * c.vocabSize));
  const targets = Int32Array.from({ length: T }, (_, i) => (i % 5 === 4 ? -1 : Math.floor(r() * c.vocabSize)));
  return { ids, targets, cuSeqlens: Int32Array.from([0, ...cuts, T]), B: 1, T };
}

const schedule = { kind: 'constant' as const };

async function setElement(t: Tensor, i: number, value: number): Promise<void> {
  const a = (await t.toArray()) as Float64Array;
  a[i] = value;
  const src = await Tensor.fromArray(a, t.shape, { device: t.device, dtype: t.dtype });
  await cast(src, t.dtype, t);
  src.dispose();
}

describe('decoder backward: finite differences (CPU, f64)', () => {
  const cases: Array<[string, TeacherConfig, boolean]> = [
    ['llama GQA 2:1, untied', tinyConfig('llama'), false],
    ['qwen3 q/k norm, tied, recompute', tinyConfig('qwen3', { tie_word_embeddings: true }), true],
    ['qwen2 q/k/v biases', tinyConfig('qwen2', { head_dim: undefined, num_attention_heads: 2, hidden_size: 16 }), false],
  ];
  test.each(cases)('%s: every parameter', async (_name, c, recompute) => {
    const trainer = await DecoderTrainer.create(c, { device: 'cpu', dtype: 'f64', seed: 3, lr: 1e-3, weightDecay: 0, schedule });
    try {
      // Larger weights than the training init, so every path carries a visible gradient.
      for (const [i, p] of trainer.params.entries())
        if (p.param.shape.length > 1) await randomFill(p.param, { kind: 'normal', std: 0.35 }, 1000 + i);
        else await randomFill(p.param, { kind: 'uniform', low: 0.6, high: 1.4 }, 2000 + i);
      const batch = batchFor(c, 13, 11, [6]);
      await trainer.zeroGrads();
      await trainer.accumulate(batch, 1, { recompute });
      const lossAt = async () => (await trainer.loss([batch])).sum;
      const analytic: number[] = [];
      const numeric: number[] = [];
      const r = rng(5);
      const h = 1e-5;
      for (const p of trainer.params) {
        const g = (await trainer.grads.get(p.name)!.toArray()) as Float64Array;
        const w = (await p.param.toArray()) as Float64Array;
        for (let k = 0; k < 3; k++) {
          const i = Math.floor(r() * w.length);
          await setElement(p.param, i, w[i] + h);
          const up = await lossAt();
          await setElement(p.param, i, w[i] - h);
          const down = await lossAt();
          await setElement(p.param, i, w[i]);
          analytic.push(g[i]);
          numeric.push((up - down) / (2 * h));
        }
      }
      expect(analytic.some((x) => Math.abs(x) > 1e-3)).toBe(true);
      expect(relError(analytic, numeric)).toBeLessThan(1e-6);
    } finally {
      trainer.dispose();
    }
  });
});

async function trainCurve(device: string, steps: number): Promise<number[]> {
  const c = tinyConfig('llama', { vocab_size: 64, hidden_size: 64, intermediate_size: 96, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16 });
  const trainer = await DecoderTrainer.create(c, { device, dtype: 'f32', seed: 7, lr: 2e-3, weightDecay: 0.1, schedule });
  try {
    const batch = batchFor(c, 96, 21, [30, 31, 70]);
    const losses: number[] = [];
    for (let s = 0; s < steps; s++) losses.push((await trainer.step([batch], { maxGradNorm: 1 })).loss);
    return losses;
  } finally {
    trainer.dispose();
  }
}

describe('a two-layer model on a fixed batch', () => {
  test('the loss goes down step by step (CPU)', async () => {
    const losses = await trainCurve('cpu', 8);
    for (let i = 1; i < losses.length; i++) expect(losses[i]).toBeLessThan(losses[i - 1]);
    expect(losses[7]).toBeLessThan(losses[0] - 0.2);
  });

  (cudaEnabled() ? test : test.skip)('CUDA follows the CPU curve (f32 compute)', async () => {
    const cpu = await trainCurve('cpu', 8);
    const cuda = await trainCurve('cuda:0', 8);
    for (let i = 1; i < cuda.length; i++) expect(cuda[i]).toBeLessThan(cuda[i - 1]);
    expect(relError(cuda, cpu)).toBeLessThan(1e-4);
  });
});

describe('gradient accumulation', () => {
  test('two micro-batches in one step equal one batch holding both (CPU, f32)', async () => {
    const c = tinyConfig('llama', { vocab_size: 48, hidden_size: 32, intermediate_size: 40, num_attention_heads: 2, head_dim: 16 });
    const a = batchFor(c, 40, 31, [17]);
    const b = batchFor(c, 24, 32, [5, 6]);
    const both: TokenBatch = {
      ids: Int32Array.from([...a.ids, ...b.ids]),
      targets: Int32Array.from([...a.targets, ...b.targets]),
      cuSeqlens: Int32Array.from([...a.cuSeqlens, ...Array.from(b.cuSeqlens.slice(1), (x) => x + a.T)]),
      B: 1,
      T: a.T + b.T,
    };
    const run = async (micro: TokenBatch[]) => {
      const t = await DecoderTrainer.create(c, { device: 'cpu', dtype: 'f32', seed: 2, lr: 1e-2, weightDecay: 0.1, schedule });
      try {
        const r = await t.step(micro, { maxGradNorm: 0.5 });
        return { loss: r.loss, norm: r.gradNorm, w: await t.params[3].param.toFloat32() };
      } finally {
        t.dispose();
      }
    };
    const split = await run([a, b]);
    const whole = await run([both]);
    expect(Math.abs(split.loss - whole.loss)).toBeLessThan(1e-5 * whole.loss);
    expect(Math.abs(split.norm - whole.norm)).toBeLessThan(1e-5 * whole.norm);
    expect(relError(split.w, whole.w)).toBeLessThan(1e-5);
  });
});

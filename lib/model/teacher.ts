/**
 * The teacher: a Llama-family decoder (Llama, Qwen2, Qwen3, Mistral) loaded from a Hugging Face directory and
 * run on our kernels. One explicit forward, layer by layer; hooks hand each layer's attention activations to
 * the caller (the calibration statistics consume them).
 */
import { type TeacherConfig, loadTeacherConfig, ropeInvFreq, checkTeacherCheckpoint, teacherTensorNames } from '../io/hf-config';
import { openCheckpoint } from '../io/safetensors';
import { InvalidArgumentError, throwIfAborted } from '../errors';
import { native, type DType } from '../native';
import { Tensor, scope, keep } from '../tensor';
import { defaultDevice } from '../backend';
import { add, cast, fill, randomFill } from '../ops/elementwise';
import { matmul } from '../ops/matmul';
import { rmsNorm, rope, embedding, swiglu, crossEntropy } from '../ops/layers';
import { attentionForward } from '../ops/attention';

/** What a layer hook receives. Tensors live only during the callback unless the hook calls keep(). */
export interface LayerActivations {
  layer: number;
  /** The attention input after input_layernorm, [B, T, hidden]. */
  input: Tensor;
  /** Post-RoPE queries [B, T, H, headDim] (after q_norm for Qwen3). */
  q: Tensor;
  /** Post-RoPE keys [B, T, HKV, headDim]. */
  k: Tensor;
  /** Values [B, T, HKV, headDim]. */
  v: Tensor;
  /** Per-head attention context A·V before o_proj, [B, T, H, headDim]. */
  context: Tensor;
  /** The attention block's output after o_proj (before the residual), [B, T, hidden]. */
  output: Tensor;
}

export interface ForwardOptions {
  /** Document boundaries over the flattened B·T tokens (int32, N+1 entries, last = B·T): attention and RoPE
   * positions restart at each boundary. */
  cuSeqlens?: Int32Array;
  /** Called after each layer's attention block. */
  onLayer?: (acts: LayerActivations) => void | Promise<void>;
  /** Run only layers [0, stopAfterLayer]; forward then returns no logits. */
  stopAfterLayer?: number;
  signal?: AbortSignal;
}

export interface TeacherLoadOptions {
  device?: string;
  /** Compute dtype: 'f32' (parity) or 'bf16' (speed). Default: bf16 on CUDA, f32 on the CPU. */
  dtype?: 'f32' | 'bf16';
  signal?: AbortSignal;
  onProgress?: (p: { loaded: number; total: number; tensor: string }) => void;
}

const STORAGE_DTYPES: Record<string, DType> = { F32: 'f32', BF16: 'bf16', F16: 'f16' };

export class Teacher {
  private constructor(
    readonly config: TeacherConfig,
    readonly device: string,
    readonly dtype: 'f32' | 'bf16',
    private readonly weights: Map<string, Tensor>,
    private readonly invFreq: Tensor,
  ) {}

  /** Loads config.json and the safetensors weights of `dir`, checking every tensor's presence and shape first. */
  static async load(dir: string, options: TeacherLoadOptions = {}): Promise<Teacher> {
    const device = options.device ?? defaultDevice();
    const dtype = options.dtype ?? (device === 'cpu' ? 'f32' : 'bf16');
    const config = await loadTeacherConfig(dir);
    const reader = await openCheckpoint(dir);
    const weights = new Map<string, Tensor>();
    try {
      checkTeacherCheckpoint(config, reader);
      const names = reader.names.filter((n) => !n.endsWith('rotary_emb.inv_freq'));
      let loaded = 0;
      for (const name of names) {
        throwIfAborted(options.signal);
        const info = reader.info(name);
        const stored = STORAGE_DTYPES[info.dtype];
        if (!stored) continue; // integer buffers are not weights
        const bytes = await reader.readTensor(name);
        const raw = new Tensor(await native().upload(bytes, info.shape, stored, device));
        weights.set(name, stored === dtype ? keep(raw) : keep(await castAndFree(raw, dtype)));
        options.onProgress?.({ loaded: ++loaded, total: names.length, tensor: name });
      }
      return await Teacher.assemble(config, device, dtype, weights);
    } catch (e) {
      for (const t of weights.values()) t.dispose();
      throw e;
    } finally {
      await reader.close();
    }
  }

  /**
   * A teacher with random weights (norms 1, everything else Normal(0, 0.02), seeded): for benchmarks of
   * real-sized shapes without a checkpoint.
   */
  static async random(config: TeacherConfig, options: { device?: string; dtype?: 'f32' | 'bf16'; seed?: number } = {}): Promise<Teacher> {
    const device = options.device ?? defaultDevice();
    const dtype = options.dtype ?? (device === 'cpu' ? 'f32' : 'bf16');
    const weights = new Map<string, Tensor>();
    let seed = options.seed ?? 0;
    try {
      for (const spec of teacherTensorNames(config)) {
        const t = keep(Tensor.empty(spec.shape, { device, dtype }));
        weights.set(spec.name, t);
        if (/norm\.weight$/.test(spec.name)) await fill(t, 1);
        else await randomFill(t, { kind: 'normal', std: 0.02 }, seed++);
      }
      return await Teacher.assemble(config, device, dtype, weights);
    } catch (e) {
      for (const t of weights.values()) t.dispose();
      throw e;
    }
  }

  /** The teacher over loaded weights, with its RoPE frequencies on the device. */
  private static async assemble(config: TeacherConfig, device: string, dtype: 'f32' | 'bf16', weights: Map<string, Tensor>): Promise<Teacher> {
    const inv = Float32Array.from(ropeInvFreq(config));
    const invFreq = keep(await Tensor.fromArray(inv, [inv.length], { device }));
    return new Teacher(config, device, dtype, weights, invFreq);
  }

  /** A named weight (Hugging Face name). */
  weight(name: string): Tensor {
    const w = this.weights.get(name);
    if (!w) throw new InvalidArgumentError('name', `no weight named ${name}`);
    return w;
  }

  private optionalWeight(name: string): Tensor | undefined {
    return this.weights.get(name);
  }

  dispose(): void {
    for (const t of this.weights.values()) t.dispose();
    this.invFreq.dispose();
  }

  /** x·Wᵀ (+ b) for a [rows, in] activation and a [out, in] weight. */
  private async linear(x: Tensor, prefix: string): Promise<Tensor> {
    const y = await matmul(x, this.weight(`${prefix}.weight`), { transB: true });
    const b = this.optionalWeight(`${prefix}.bias`);
    return b ? add(y, b, y) : y;
  }

  /**
   * The final normalised hidden states [B, T, hidden] of token ids [B, T] (row-major Int32Array).
   * Hooks see every layer's attention activations.
   */
  async hidden(ids: Int32Array, shape: [number, number], options: ForwardOptions = {}): Promise<Tensor> {
    const c = this.config;
    const [B, T] = shape;
    const N = B * T;
    if (ids.length !== N) throw new InvalidArgumentError('ids', `${ids.length} ids for shape [${B}, ${T}]`);
    for (let i = 0; i < N; i++) {
      if (ids[i] < 0 || ids[i] >= c.vocabSize) {
        throw new InvalidArgumentError('ids', `token id ${ids[i]} at ${i} is outside the vocabulary (${c.vocabSize})`);
      }
    }
    const cu = options.cuSeqlens ?? rowBoundaries(B, T);
    checkBoundaries(cu, N);
    const positions = positionsFrom(cu, N);
    const lastLayer = Math.min(options.stopAfterLayer ?? c.numLayers - 1, c.numLayers - 1);
    const dev = { device: this.device };
    return scope(async () => {
      const idsT = await Tensor.fromArray(ids, [N], dev);
      const posT = await Tensor.fromArray(positions, [1, N], dev);
      const cuT = await Tensor.fromArray(cu, [cu.length], dev);
      let h = await embedding(this.weight('model.embed_tokens.weight'), idsT);
      for (let l = 0; l <= lastLayer; l++) {
        throwIfAborted(options.signal);
        h = await this.layer(l, h, posT, cuT, [B, T], options.onLayer);
      }
      if (options.stopAfterLayer !== undefined) return h.view([B, T, c.hiddenSize]);
      const out = await rmsNorm(h, this.weight('model.norm.weight'), c.rmsNormEps);
      return out.view([B, T, c.hiddenSize]);
    });
  }

  private async layer(
    l: number,
    hIn: Tensor,
    positions: Tensor,
    cuSeqlens: Tensor,
    [B, T]: [number, number],
    onLayer: ForwardOptions['onLayer'],
  ): Promise<Tensor> {
    const c = this.config;
    const p = `model.layers.${l}`;
    const N = B * T;
    const hd = c.headDim;
    return scope(async () => {
      const x = await rmsNorm(hIn, this.weight(`${p}.input_layernorm.weight`), c.rmsNormEps);
      let q = (await this.linear(x, `${p}.self_attn.q_proj`)).view([1, N, c.numHeads, hd]);
      let k = (await this.linear(x, `${p}.self_attn.k_proj`)).view([1, N, c.numKvHeads, hd]);
      const v = (await this.linear(x, `${p}.self_attn.v_proj`)).view([1, N, c.numKvHeads, hd]);
      if (c.qkNorm) {
        await rmsNorm(q, this.weight(`${p}.self_attn.q_norm.weight`), c.rmsNormEps, q);
        await rmsNorm(k, this.weight(`${p}.self_attn.k_norm.weight`), c.rmsNormEps, k);
      }
      q = await rope(q, positions, this.invFreq, q);
      k = await rope(k, positions, this.invFreq, k);
      const context = await attentionForward(q, k, v, { cuSeqlens });
      const o = await this.linear(context.view([N, c.numHeads * hd]), `${p}.self_attn.o_proj`);
      if (onLayer) {
        await onLayer({
          layer: l,
          input: x.view([B, T, c.hiddenSize]),
          q: q.view([B, T, c.numHeads, hd]),
          k: k.view([B, T, c.numKvHeads, hd]),
          v: v.view([B, T, c.numKvHeads, hd]),
          context: context.view([B, T, c.numHeads, hd]),
          output: o.view([B, T, c.hiddenSize]),
        });
      }
      const h = await add(hIn, o);
      const x2 = await rmsNorm(h, this.weight(`${p}.post_attention_layernorm.weight`), c.rmsNormEps);
      const g = await this.linear(x2, `${p}.mlp.gate_proj`);
      const u = await this.linear(x2, `${p}.mlp.up_proj`);
      const d = await this.linear(await swiglu(g, u, g), `${p}.mlp.down_proj`);
      return add(h, d, h);
    });
  }

  private lmHead(): Tensor {
    return this.optionalWeight('lm_head.weight') ?? this.weight('model.embed_tokens.weight');
  }

  /** Logits [B, T, vocab] in f32. For long batches prefer `loss`, which never holds all logits. */
  async logits(ids: Int32Array, shape: [number, number], options: ForwardOptions = {}): Promise<Tensor> {
    return scope(async () => {
      const h = await this.hidden(ids, shape, options);
      const y = await matmul(h.view([shape[0] * shape[1], this.config.hiddenSize]), this.lmHead(), {
        transB: true,
        outDtype: 'f32',
      });
      return y.view([shape[0], shape[1], this.config.vocabSize]);
    });
  }

  /**
   * Summed next-token cross-entropy (nats) and the count of scored tokens. targets[i] is the id that should
   * follow position i (negative = not scored). Logits are made `chunkRows` rows at a time.
   */
  async loss(
    ids: Int32Array,
    targets: Int32Array,
    shape: [number, number],
    options: ForwardOptions & { chunkRows?: number } = {},
  ): Promise<{ sum: number; count: number }> {
    const N = shape[0] * shape[1];
    if (targets.length !== N) throw new InvalidArgumentError('targets', `${targets.length} targets for ${N} tokens`);
    for (let i = 0; i < N; i++) {
      if (targets[i] >= this.config.vocabSize) {
        throw new InvalidArgumentError('targets', `target ${targets[i]} at ${i} is outside the vocabulary`);
      }
    }
    const chunk = options.chunkRows ?? 2048;
    return scope(async () => {
      const h = (await this.hidden(ids, shape, options)).view([N, this.config.hiddenSize]);
      const tgt = await Tensor.fromArray(targets, [N], { device: this.device });
      let sum = 0;
      let count = 0;
      for (let r0 = 0; r0 < N; r0 += chunk) {
        const rows = Math.min(chunk, N - r0);
        await scope(async () => {
          const part = h.rows(r0, r0 + rows);
          const logits = await matmul(part, this.lmHead(), { transB: true, outDtype: 'f32' });
          const t = tgt.rows(r0, r0 + rows);
          const l = await (await crossEntropy(logits, t)).toFloat32();
          for (let i = 0; i < rows; i++) {
            if (targets[r0 + i] >= 0) {
              sum += l[i];
              count++;
            }
          }
        });
      }
      return { sum, count };
    });
  }
}

async function castAndFree(t: Tensor, dtype: DType): Promise<Tensor> {
  try {
    return await cast(t, dtype);
  } finally {
    t.dispose();
  }
}

function rowBoundaries(B: number, T: number): Int32Array {
  return Int32Array.from({ length: B + 1 }, (_, i) => i * T);
}

function checkBoundaries(cu: Int32Array, N: number): void {
  if (cu.length < 2 || cu[0] !== 0 || cu[cu.length - 1] !== N) {
    throw new InvalidArgumentError('cuSeqlens', `must start at 0 and end at ${N}`);
  }
  for (let i = 1; i < cu.length; i++) {
    if (cu[i] < cu[i - 1]) throw new InvalidArgumentError('cuSeqlens', `decreases at entry ${i}`);
  }
}

/** RoPE positions restart at every boundary. */
function positionsFrom(cu: Int32Array, N: number): Int32Array {
  const pos = new Int32Array(N);
  for (let s = 0; s + 1 < cu.length; s++) for (let i = cu[s]; i < cu[s + 1]; i++) pos[i] = i - cu[s];
  return pos;
}

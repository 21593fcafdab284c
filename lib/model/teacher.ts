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
import { cast, fill, randomFill } from '../ops/elementwise';
import { matmul } from '../ops/matmul';
import type { LayerActivations } from './decoder-layer';
import { decoderHidden, lmHeadLoss, lmHeadWeight, tokenLayout } from './decoder';

export type { LayerActivations } from './decoder-layer';

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

  /** Weights by Hugging Face name, as the shared decoder code reads them. */
  private readonly lookup = (name: string): Tensor | undefined => this.weights.get(name);

  /**
   * The final normalised hidden states [B, T, hidden] of token ids [B, T] (row-major Int32Array).
   * Hooks see every layer's attention activations.
   */
  async hidden(ids: Int32Array, shape: [number, number], options: ForwardOptions = {}): Promise<Tensor> {
    const [B, T] = shape;
    return scope(async () => {
      const { layout, idsT } = await tokenLayout(this.config, ids, shape, options.cuSeqlens, this.invFreq, this.device);
      const h = await decoderHidden(this.config, this.lookup, idsT, layout, options);
      return h.view([B, T, this.config.hiddenSize]);
    });
  }

  /** Logits [B, T, vocab] in f32. For long batches prefer `loss`, which never holds all logits. */
  async logits(ids: Int32Array, shape: [number, number], options: ForwardOptions = {}): Promise<Tensor> {
    return scope(async () => {
      const h = await this.hidden(ids, shape, options);
      const y = await matmul(h.view([shape[0] * shape[1], this.config.hiddenSize]), lmHeadWeight(this.config, this.lookup), {
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
    let count = 0;
    for (let i = 0; i < N; i++) {
      if (targets[i] >= this.config.vocabSize) {
        throw new InvalidArgumentError('targets', `target ${targets[i]} at ${i} is outside the vocabulary`);
      }
      if (targets[i] >= 0) count++;
    }
    return scope(async () => {
      const h = (await this.hidden(ids, shape, options)).view([N, this.config.hiddenSize]);
      const tgt = await Tensor.fromArray(targets, [N], { device: this.device });
      const total = await lmHeadLoss(h, lmHeadWeight(this.config, this.lookup), tgt, { chunkRows: options.chunkRows });
      return { sum: (await total.toFloat32())[0], count };
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

/**
 * A decoder being trained: f32 master parameters (seeded init: norms 1, biases 0, matrices N(0, 0.02)), their
 * compute copies (bf16 on CUDA; the masters themselves in f32 / f64), f32 gradient buffers, and AdamW.
 * `step` is one optimizer step over micro-batches: zero the gradients, forward + backward each micro-batch with
 * the loss scaled by 1 / (scored tokens of the whole step), clip, update.
 */
import type { TeacherConfig } from '../io/hf-config';
import { ropeInvFreq, teacherTensorNames } from '../io/hf-config';
import { InvalidArgumentError, throwIfAborted } from '../errors';
import { cast, fill, randomFill } from '../ops/elementwise';
import { Tensor, keep, scope } from '../tensor';
import { decoderForwardBackward, decoderHidden, lmHeadLoss, lmHeadWeight, scoredTokens, tokenLayout, type TokenBatch } from '../model/decoder';
import { AdamW, type OptimizerParam, type OptimizerStepResult } from './adamw';
import type { HostTensor } from './checkpoint';
import type { LrSchedule } from './schedule';

export interface DecoderTrainerOptions {
  device: string;
  /** Compute dtype; masters are f32, except that 'f64' (CPU, for gradient checks) keeps f64 masters. */
  dtype: 'f32' | 'bf16' | 'f64';
  seed: number;
  lr: number;
  weightDecay: number;
  beta1?: number;
  beta2?: number;
  schedule: LrSchedule;
}

export interface TrainStepResult extends OptimizerStepResult {
  /** Mean loss over the step's scored tokens. */
  loss: number;
  scored: number;
}

export class DecoderTrainer {
  private constructor(
    readonly config: TeacherConfig,
    readonly device: string,
    readonly params: OptimizerParam[],
    readonly grads: Map<string, Tensor>,
    readonly optimizer: AdamW | null,
    private readonly invFreq: Tensor,
  ) {}

  /** Weights the forward reads (compute copies), by Hugging Face name. */
  readonly weight = (name: string): Tensor | undefined => {
    const p = this.byName.get(name);
    return p ? (p.compute ?? p.param) : undefined;
  };
  readonly grad = (name: string): Tensor | undefined => this.grads.get(name);
  private get byName(): Map<string, OptimizerParam> {
    return (this._byName ??= new Map(this.params.map((p) => [p.name, p])));
  }
  private _byName?: Map<string, OptimizerParam>;

  static async create(config: TeacherConfig, o: DecoderTrainerOptions): Promise<DecoderTrainer> {
    const masterDtype = o.dtype === 'f64' ? 'f64' : 'f32';
    const params: OptimizerParam[] = [];
    const grads = new Map<string, Tensor>();
    for (const [i, s] of teacherTensorNames(config).entries()) {
      const master = keep(Tensor.empty(s.shape, { device: o.device, dtype: masterDtype }));
      if (/norm\.weight$/.test(s.name)) await fill(master, 1);
      else if (s.shape.length === 1) await fill(master, 0);
      else await randomFill(master, { kind: 'normal', std: 0.02 }, o.seed * 100003 + i);
      const compute = o.dtype === 'bf16' ? keep(await cast(master, 'bf16')) : undefined;
      params.push({ name: s.name, param: master, compute });
      grads.set(s.name, keep(Tensor.empty(s.shape, { device: o.device, dtype: masterDtype })));
    }
    const hyper = { beta1: o.beta1 ?? 0.9, beta2: o.beta2 ?? 0.95, eps: 1e-8 };
    // AdamW keeps f32 masters only; f64 trainers (gradient checks) have no optimizer.
    const optimizer =
      masterDtype === 'f32'
        ? await AdamW.create(
            [
              { ...hyper, lr: o.lr, weightDecay: o.weightDecay, params: params.filter((p) => p.param.shape.length > 1) },
              { ...hyper, lr: o.lr, weightDecay: 0, params: params.filter((p) => p.param.shape.length <= 1) },
            ],
            o.schedule,
          )
        : null;
    const inv = Float32Array.from(ropeInvFreq(config));
    const invFreq = keep(await Tensor.fromArray(inv, [inv.length], { device: o.device }));
    return new DecoderTrainer(config, o.device, params, grads, optimizer, invFreq);
  }

  get parameterCount(): number {
    return this.params.reduce((n, p) => n + p.param.numel, 0);
  }

  async zeroGrads(): Promise<void> {
    for (const g of this.grads.values()) await fill(g, 0);
  }

  /** Adds the gradients of (summed loss · lossScale) of one batch into the buffers; returns the summed loss. */
  async accumulate(batch: TokenBatch, lossScale: number, options: { recompute?: boolean; signal?: AbortSignal } = {}): Promise<number> {
    const r = await decoderForwardBackward(this.config, this.weight, this.grad, this.invFreq, this.device, batch, { lossScale, ...options });
    return r.lossSum;
  }

  /** One optimizer step over `micro` batches (gradient accumulation). */
  async step(micro: readonly TokenBatch[], options: { maxGradNorm?: number; recompute?: boolean; signal?: AbortSignal } = {}): Promise<TrainStepResult> {
    if (!this.optimizer) throw new InvalidArgumentError('dtype', 'an f64 trainer has no optimizer (it is for gradient checks)');
    await this.zeroGrads();
    const scored = micro.reduce((n, b) => n + scoredTokens(b), 0);
    let lossSum = 0;
    for (const b of micro) lossSum += await this.accumulate(b, 1 / Math.max(scored, 1), options);
    const r = await this.optimizer.stepWith(this.grads, { maxGradNorm: options.maxGradNorm });
    return { ...r, loss: lossSum / Math.max(scored, 1), scored };
  }

  /** Summed loss and scored-token count of `batches`, forward only. */
  async loss(batches: readonly TokenBatch[], signal?: AbortSignal): Promise<{ sum: number; count: number }> {
    let sum = 0;
    let count = 0;
    for (const b of batches) {
      throwIfAborted(signal);
      await scope(async () => {
        const { layout, idsT } = await tokenLayout(this.config, b.ids, [b.B, b.T], b.cuSeqlens, this.invFreq, this.device);
        const h = await decoderHidden(this.config, this.weight, idsT, layout);
        const t = await Tensor.fromArray(b.targets, [b.B * b.T], { device: this.device });
        sum += Number((await (await lmHeadLoss(h, lmHeadWeight(this.config, this.weight), t)).toArray())[0]);
        count += scoredTokens(b);
      });
    }
    return { sum, count };
  }

  /** Masters as host tensors (for checkpoints). */
  async masters(): Promise<Map<string, HostTensor>> {
    if (!this.optimizer) throw new InvalidArgumentError('dtype', 'f64 trainers are not checkpointed');
    const out = new Map<string, HostTensor>();
    for (const p of this.params) out.set(p.name, { dtype: 'F32', shape: p.param.shape, data: (await p.param.toArray()) as Float32Array });
    return out;
  }

  /** Overwrites the masters (and compute copies) from host tensors of the same names and shapes. */
  async loadMasters(model: ReadonlyMap<string, HostTensor>, source: string): Promise<void> {
    for (const p of this.params) {
      const h = model.get(p.name);
      if (!h || h.dtype !== 'F32' || h.shape.join(',') !== p.param.shape.join(','))
        throw new InvalidArgumentError('resume', `${source} lacks an F32 tensor ${p.name} [${p.param.shape.join(', ')}]`);
      const bytes = h.data as Uint8Array;
      await scope(async () => {
        const src = await Tensor.fromArray(new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4), p.param.shape, { device: this.device });
        await cast(src, 'f32', p.param);
        if (p.compute) await cast(p.param, p.compute.dtype, p.compute);
      });
    }
  }

  /** Masters by name (for export). */
  masterWeights(): Map<string, Tensor> {
    return new Map(this.params.map((p) => [p.name, p.param]));
  }

  dispose(): void {
    this.optimizer?.dispose();
    for (const p of this.params) {
      p.param.dispose();
      p.compute?.dispose();
    }
    for (const g of this.grads.values()) g.dispose();
    this.invFreq.dispose();
  }
}

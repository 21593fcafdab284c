/**
 * The AdamW optimizer of the trainers: named fp32 master parameters in groups (e.g. GDN parameters and the
 * rest, each with its own peak lr), their moments, the step count, and the lr schedule; one fused native
 * step per call (lib/ops/adamw.ts), with optional global-norm clipping (lib/train/clip.ts). Its state goes
 * into and comes back from a training checkpoint (lib/train/checkpoint.ts) bit-exactly.
 */
import { InvalidArgumentError } from '../errors';
import { adamwStep, type AdamwHyperparameters } from '../ops/adamw';
import { Tensor } from '../tensor';
import type { HostTensor } from './checkpoint';
import { clipGradients } from './clip';
import { lrFactor, type LrSchedule } from './schedule';

export interface OptimizerParam {
  name: string;
  /** fp32 master weights, updated in place. */
  param: Tensor;
  /** Optional bf16 / f16 copy the forward pass reads; rewritten from the master every step. */
  compute?: Tensor;
}

export interface OptimizerGroup extends AdamwHyperparameters {
  /** Peak lr of this group; the schedule multiplies it. */
  lr: number;
  params: readonly OptimizerParam[];
}

export interface OptimizerStepResult {
  step: number;
  gradNorm: number;
  /** false: a gradient was not finite and nothing was updated (the step count did not advance). */
  applied: boolean;
  lrs: number[];
}

export class AdamW {
  /** Steps taken so far. */
  step = 0;
  private readonly m = new Map<string, Tensor>();
  private readonly v = new Map<string, Tensor>();

  private constructor(readonly groups: readonly OptimizerGroup[], readonly schedule: LrSchedule) {}

  /** Zero moments for every parameter, on each parameter's device. */
  static async create(groups: readonly OptimizerGroup[], schedule: LrSchedule): Promise<AdamW> {
    const o = new AdamW(groups, schedule);
    const seen = new Set<string>();
    for (const g of groups)
      for (const p of g.params) {
        if (seen.has(p.name)) throw new InvalidArgumentError('groups', `parameter ${p.name} is listed twice`);
        seen.add(p.name);
        if (p.param.dtype !== 'f32') throw new InvalidArgumentError('groups', `parameter ${p.name} must be an f32 master, got ${p.param.dtype}`);
        o.m.set(p.name, await Tensor.zeros(p.param.shape, { device: p.param.device }));
        o.v.set(p.name, await Tensor.zeros(p.param.shape, { device: p.param.device }));
      }
    return o;
  }

  /**
   * One step with `grads` (by parameter name; f32 / bf16 / f16). `gradScale` is owed to every gradient
   * (e.g. 1 / accumulation steps); `maxGradNorm` clips the global norm of the scaled gradients.
   */
  async stepWith(grads: ReadonlyMap<string, Tensor>, options: { gradScale?: number; maxGradNorm?: number } = {}): Promise<OptimizerStepResult> {
    const list: Tensor[] = [];
    for (const g of this.groups)
      for (const p of g.params) {
        const grad = grads.get(p.name);
        if (!grad) throw new InvalidArgumentError('grads', `no gradient for ${p.name}`);
        list.push(grad);
      }
    const clip = await clipGradients(list, options.maxGradNorm, options.gradScale ?? 1);
    const next = this.step + 1;
    const factor = lrFactor(this.schedule, next);
    const lrs = this.groups.map((g) => g.lr * factor);
    if (!clip.finite) return { step: this.step, gradNorm: clip.norm, applied: false, lrs };
    await adamwStep(
      this.groups.map((g, i) => ({
        ...g,
        lr: lrs[i],
        params: g.params.map((p) => ({ param: p.param, compute: p.compute, grad: grads.get(p.name)!, m: this.m.get(p.name)!, v: this.v.get(p.name)! })),
      })),
      { step: next, gradScale: clip.gradScale },
    );
    this.step = next;
    return { step: next, gradNorm: clip.norm, applied: true, lrs };
  }

  /** The moments as host tensors, for saveCheckpoint's optimizer field. */
  async stateForCheckpoint(): Promise<{ m: Map<string, HostTensor>; v: Map<string, HostTensor> }> {
    const out = { m: new Map<string, HostTensor>(), v: new Map<string, HostTensor>() };
    for (const which of ['m', 'v'] as const)
      for (const [name, t] of this[which]) out[which].set(name, { dtype: 'F32', shape: t.shape, data: (await t.toArray()) as Float32Array });
    return out;
  }

  /** Restores moments and the step count from a loaded checkpoint (shapes must match). */
  async loadCheckpointState(step: number, state: { m: ReadonlyMap<string, HostTensor>; v: ReadonlyMap<string, HostTensor> }): Promise<void> {
    if (!Number.isSafeInteger(step) || step < 0) throw new InvalidArgumentError('step', `must be a non-negative integer, got ${step}`);
    for (const which of ['m', 'v'] as const)
      for (const [name, t] of this[which]) {
        const h = state[which].get(name);
        if (!h || h.dtype !== 'F32' || h.shape.length !== t.shape.length || h.shape.some((d, i) => d !== t.shape[i]))
          throw new InvalidArgumentError('state', `${which}.${name} is missing or does not match [${t.shape.join(',')}] F32`);
        const bytes = new Uint8Array(h.data.buffer, h.data.byteOffset, h.data.byteLength);
        const aligned = h.data.byteOffset % 4 === 0 ? bytes : bytes.slice();
        const f = new Float32Array(aligned.buffer, aligned.byteOffset, aligned.byteLength / 4);
        const src = await Tensor.fromArray(f, t.shape, { device: t.device });
        const old = t;
        this[which].set(name, src);
        old.dispose();
      }
    this.step = step;
  }

  dispose(): void {
    for (const t of [...this.m.values(), ...this.v.values()]) t.dispose();
  }
}

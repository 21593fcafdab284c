/**
 * AdamW as one fused multi-tensor op, and the squared global gradient norm (for clipping: lib/train/clip.ts).
 *
 * Every parameter keeps an fp32 master (`param`) and fp32 moments (`m`, `v`); the gradient may be f32, bf16
 * or f16; an optional lower-precision `compute` copy (what the forward pass reads) is rewritten from the
 * updated master in the same pass. Arithmetic (fp32, the order of torch.optim.AdamW):
 *
 *   g ← gradScale·g;  p ← p·(1 − lr·wd);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
 *   p ← p − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps)
 *
 * where t is the step being taken (1 for the first). CPU and CUDA share this code (native/cpu/adamw.h).
 */
import { InvalidArgumentError } from '../errors';
import { native, type AdamwNativeItem } from '../native';
import { Tensor } from '../tensor';

export interface AdamwHyperparameters {
  lr: number;
  /** Default 0.9. */
  beta1?: number;
  /** Default 0.999. */
  beta2?: number;
  /** Default 1e-8. */
  eps?: number;
  /** Decoupled weight decay (p ← p − lr·wd·p); default 0. */
  weightDecay?: number;
}

/** One parameter's buffers. param, m, v: f32; grad: f32 / bf16 / f16; compute: f32 / bf16 / f16; one shape. */
export interface AdamwBuffers {
  param: Tensor;
  grad: Tensor;
  m: Tensor;
  v: Tensor;
  compute?: Tensor | null;
}

/** Parameters sharing hyperparameters (e.g. GDN parameters and the rest, DESIGN.md §5.5). */
export interface AdamwGroup extends AdamwHyperparameters {
  params: readonly AdamwBuffers[];
}

export interface AdamwStepOptions {
  /** The step being taken, counting from 1 (bias correction uses it). */
  step: number;
  /** Every gradient is multiplied by this first (global-norm clipping, loss-scale undo); default 1. */
  gradScale?: number;
}

/** One AdamW step over every parameter of every group, in one native call (one launch on CUDA). In place. */
export async function adamwStep(groups: readonly AdamwGroup[], options: AdamwStepOptions): Promise<void> {
  const items: AdamwNativeItem[] = [];
  for (const g of groups) {
    for (const p of g.params) {
      items.push({
        param: p.param.native,
        grad: p.grad.native,
        m: p.m.native,
        v: p.v.native,
        compute: p.compute?.native ?? null,
        lr: g.lr,
        beta1: g.beta1,
        beta2: g.beta2,
        eps: g.eps,
        weightDecay: g.weightDecay,
      });
    }
  }
  if (items.length === 0) return;
  await native().adamwStep(items, { step: options.step, gradScale: options.gradScale });
}

/** Σ x² over every element of every tensor, accumulated in double: an f64 scalar (shape []) on their device. */
export async function gradNormSquared(grads: readonly Tensor[], out?: Tensor): Promise<Tensor> {
  if (grads.length === 0) throw new InvalidArgumentError('grads', 'expected at least one tensor');
  const h = await native().gradNormSquared(
    grads.map((g) => g.native),
    out?.native ?? null,
  );
  return out ?? new Tensor(h);
}

/** gradNormSquared brought to the host as a number. */
export async function gradNormSquaredValue(grads: readonly Tensor[]): Promise<number> {
  const t = await gradNormSquared(grads);
  try {
    return (await t.toArray())[0] as number;
  } finally {
    t.dispose();
  }
}

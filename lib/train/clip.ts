/**
 * Global-norm gradient clipping as a scale factor: the norm is one device reduction over every gradient
 * (gradNormSquared), and the factor is handed to adamwStep's gradScale, so clipping never rewrites a gradient.
 */
import { InvalidArgumentError } from '../errors';
import { gradNormSquaredValue } from '../ops/adamw';
import type { Tensor } from '../tensor';

/**
 * The factor torch.nn.utils.clip_grad_norm_ multiplies gradients by: min(1, maxNorm / (norm + 1e-6)).
 * `norm` is the global L2 norm of the gradients as the optimizer will see them (after `preScale`).
 */
export function clipFactor(norm: number, maxNorm: number): number {
  if (!(maxNorm > 0)) throw new InvalidArgumentError('maxNorm', `must be positive, got ${maxNorm}`);
  if (!Number.isFinite(norm)) return 0; // a non-finite gradient: the caller should skip the step
  return Math.min(1, maxNorm / (norm + 1e-6));
}

export interface ClipResult {
  /** Global L2 norm of the (pre-scaled) gradients. */
  norm: number;
  /** What to pass to adamwStep as gradScale: preScale · clip factor (0 when the norm is not finite). */
  gradScale: number;
  /** Whether the norm was finite (a step with a NaN/Inf gradient should be skipped). */
  finite: boolean;
}

/**
 * Global gradient norm and the gradScale that clips it to maxNorm (no clipping when maxNorm is undefined or
 * Infinity). `preScale` is a factor already owed to the gradients (e.g. 1 / accumulation steps); the norm is
 * that of the scaled gradients.
 */
export async function clipGradients(grads: readonly Tensor[], maxNorm?: number, preScale = 1): Promise<ClipResult> {
  const norm = Math.sqrt(await gradNormSquaredValue(grads)) * Math.abs(preScale);
  const finite = Number.isFinite(norm);
  if (!finite) return { norm, gradScale: 0, finite };
  const factor = maxNorm === undefined || maxNorm === Infinity ? 1 : clipFactor(norm, maxNorm);
  return { norm, gradScale: preScale * factor, finite };
}

/** Transformer per-token layers (RMSNorm, RoPE, embedding, SwiGLU) and the cross-entropy of logits rows. */
import { native } from '../native';
import { Tensor } from '../tensor';

/** x / sqrt(mean(x²) + eps) · weight over the last dimension. */
export async function rmsNorm(x: Tensor, weight: Tensor, eps: number, out?: Tensor): Promise<Tensor> {
  const h = await native().rmsNorm(x.native, weight.native, eps, out?.native ?? null);
  return out ?? new Tensor(h);
}

/**
 * Rotary position embedding of x [B, T, H, D] with the rotate-half pairing of transformers (dimension j pairs
 * with j + D/2), angle = positions[b, t] · invFreq[j] (positions int32 [B, T], invFreq f32 [D/2]).
 * `out` may be x itself.
 */
export async function rope(x: Tensor, positions: Tensor, invFreq: Tensor, out?: Tensor): Promise<Tensor> {
  const h = await native().rope(x.native, positions.native, invFreq.native, out?.native ?? null);
  return out ?? new Tensor(h);
}

/** Rows of table [V, D] picked by int32 ids of any shape → [...ids.shape, D]. */
export async function embedding(table: Tensor, ids: Tensor, out?: Tensor): Promise<Tensor> {
  const h = await native().embedding(table.native, ids.native, out?.native ?? null);
  return out ?? new Tensor(h);
}

/** silu(gate) · up. */
export async function swiglu(gate: Tensor, up: Tensor, out?: Tensor): Promise<Tensor> {
  const h = await native().swiglu(gate.native, up.native, out?.native ?? null);
  return out ?? new Tensor(h);
}

/** Per-row logsumexp(logits) − logits[target] in f32; rows with a negative target give 0. */
export async function crossEntropy(logits: Tensor, targets: Tensor, out?: Tensor): Promise<Tensor> {
  const h = await native().crossEntropy(logits.native, targets.native, out?.native ?? null);
  return out ?? new Tensor(h);
}

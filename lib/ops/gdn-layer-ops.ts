/**
 * The pieces of the GDN student layer (lib/model/gdn-layer.ts) that the Transformer ops lack, each with its
 * backward: the short causal depthwise convolution (fla's ShortConvolution, no bias, no activation), the gated
 * RMSNorm (fla's FusedRMSNormGated with SiLU) and SiLU. Parameter gradients are f32 (f64 for f64 inputs),
 * written, or added to the given `out.dw` with `accumulate` (so a layer sums into its gradient buffers).
 * CUDA parameter-gradient sums are deterministic (no float atomics).
 */
import { native } from '../native';
import { Tensor } from '../tensor';

export interface CausalConv1dOptions {
  /** Varlen: i32 [N+1] offsets of N sequences packed into B = 1; the window never crosses a boundary. */
  cuSeqlens?: Tensor;
}

/**
 * y[t, c] = Σ_j w[c, j] · x[t − (W−1) + j, c] for x [B, T, C] and weight [C, W] or fla's [C, 1, W]; positions
 * before a sequence's first token read 0; tokens past the last cu_seqlens offset get 0. CUDA takes W ≤ 8.
 */
export async function causalConv1d(x: Tensor, weight: Tensor, options: CausalConv1dOptions & { out?: Tensor } = {}): Promise<Tensor> {
  const h = await native().causalConv1d(x.native, weight.native, {
    cuSeqlens: options.cuSeqlens?.native ?? null,
    out: options.out?.native ?? null,
  });
  return options.out ?? new Tensor(h);
}

/** Gradients of causalConv1d given dy: dx like x, dw like the weight (f32; f64 for f64 inputs). */
export async function causalConv1dBackward(
  x: Tensor,
  weight: Tensor,
  dy: Tensor,
  options: CausalConv1dOptions & { accumulate?: boolean; out?: { dx?: Tensor; dw?: Tensor } } = {},
): Promise<{ dx: Tensor; dw: Tensor }> {
  const out = options.out ?? {};
  const h = await native().causalConv1dBackward(x.native, weight.native, dy.native, {
    cuSeqlens: options.cuSeqlens?.native ?? null,
    accumulate: options.accumulate ?? false,
    out: { dx: out.dx?.native, dw: out.dw?.native },
  });
  return { dx: out.dx ?? new Tensor(h.dx), dw: out.dw ?? new Tensor(h.dw) };
}

/** y = x / sqrt(mean(x²) + eps) · weight ⊙ silu(gate), rows over the last dimension d = weight.numel. */
export async function gatedRmsNorm(x: Tensor, weight: Tensor, gate: Tensor, eps: number, out?: Tensor): Promise<Tensor> {
  const h = await native().gatedRmsNorm(x.native, weight.native, gate.native, eps, out?.native ?? null);
  return out ?? new Tensor(h);
}

/** Gradients of gatedRmsNorm given dy: dx, dGate like x (may be x, gate or dy themselves), dw [d]. */
export async function gatedRmsNormBackward(
  x: Tensor,
  weight: Tensor,
  gate: Tensor,
  dy: Tensor,
  eps: number,
  options: { accumulate?: boolean; out?: { dx?: Tensor; dw?: Tensor; dGate?: Tensor } } = {},
): Promise<{ dx: Tensor; dw: Tensor; dGate: Tensor }> {
  const out = options.out ?? {};
  const h = await native().gatedRmsNormBackward(x.native, weight.native, gate.native, dy.native, eps, {
    accumulate: options.accumulate ?? false,
    out: { dx: out.dx?.native, dw: out.dw?.native, dGate: out.dGate?.native },
  });
  return { dx: out.dx ?? new Tensor(h.dx), dw: out.dw ?? new Tensor(h.dw), dGate: out.dGate ?? new Tensor(h.dGate) };
}

/** x · sigmoid(x). */
export async function silu(x: Tensor, out?: Tensor): Promise<Tensor> {
  const h = await native().silu(x.native, out?.native ?? null);
  return out ?? new Tensor(h);
}

/** dy · silu'(x); `out` may be dy or x. */
export async function siluBackward(x: Tensor, dy: Tensor, out?: Tensor): Promise<Tensor> {
  const h = await native().siluBackward(x.native, dy.native, out?.native ?? null);
  return out ?? new Tensor(h);
}

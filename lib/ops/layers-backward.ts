/**
 * Backward passes of the Transformer per-token layers (lib/ops/layers.ts): RMSNorm, RoPE, SwiGLU, embedding and
 * cross-entropy. Gradients come in the input's dtype, except the summed parameter gradients (rmsNorm's dw,
 * embedding's dTable), which are f32 (f64 for f64 inputs). CUDA results are deterministic (no float atomics).
 */
import { native } from '../native';
import { Tensor } from '../tensor';

/**
 * Gradients of y = x / sqrt(mean(x²) + eps) · weight (rows over the last dimension) given dy:
 * dx like x, dw [d] summed over every row. `out.dx` may be x or dy itself.
 */
export async function rmsNormBackward(
  x: Tensor, weight: Tensor, dy: Tensor, eps: number, out?: { dx?: Tensor; dw?: Tensor },
): Promise<{ dx: Tensor; dw: Tensor }> {
  const h = await native().rmsNormBackward(x.native, weight.native, dy.native, eps, {
    dx: out?.dx?.native, dw: out?.dw?.native,
  });
  return { dx: out?.dx ?? new Tensor(h.dx), dw: out?.dw ?? new Tensor(h.dw) };
}

/** Gradient of rope (the inverse rotation) for dy [B, T, H, D]; `out` may be dy itself. */
export async function ropeBackward(dy: Tensor, positions: Tensor, invFreq: Tensor, out?: Tensor): Promise<Tensor> {
  const h = await native().ropeBackward(dy.native, positions.native, invFreq.native, out?.native ?? null);
  return out ?? new Tensor(h);
}

/** Gradients of silu(gate) · up given dOut. */
export async function swigluBackward(
  gate: Tensor, up: Tensor, dOut: Tensor, out?: { dGate?: Tensor; dUp?: Tensor },
): Promise<{ dGate: Tensor; dUp: Tensor }> {
  const h = await native().swigluBackward(gate.native, up.native, dOut.native, {
    dGate: out?.dGate?.native, dUp: out?.dUp?.native,
  });
  return { dGate: out?.dGate ?? new Tensor(h.dGate), dUp: out?.dUp ?? new Tensor(h.dUp) };
}

/**
 * Gradient of the embedding table [vocabSize, D] given dOut [...ids.shape, D]: every row written (zero for
 * unused ids). The CPU refuses ids outside [0, vocabSize); CUDA skips them.
 */
export async function embeddingBackward(ids: Tensor, dOut: Tensor, vocabSize: number, out?: Tensor): Promise<Tensor> {
  const h = await native().embeddingBackward(ids.native, dOut.native, vocabSize, out?.native ?? null);
  return out ?? new Tensor(h);
}

/**
 * dLogits = dLoss[row] · (softmax(logits[row]) − onehot(target[row])) for per-row f32 dLoss; rows with a negative
 * target get 0. `out` may be logits itself.
 */
export async function crossEntropyBackward(logits: Tensor, targets: Tensor, dLoss: Tensor, out?: Tensor): Promise<Tensor> {
  const h = await native().crossEntropyBackward(logits.native, targets.native, dLoss.native, out?.native ?? null);
  return out ?? new Tensor(h);
}

/**
 * Cross-entropy and its gradient in one pass over each row: loss (f32, per row, unscaled) and
 * dLogits = scale · (softmax − onehot); negative targets give loss 0 and dLogits 0. Made for chunked LM heads:
 * feed row slices (Tensor.rows) and pass `out.dLogits` = the logits chunk to overwrite it in place.
 */
export async function crossEntropyForwardBackward(
  logits: Tensor, targets: Tensor, scale: number, out?: { loss?: Tensor; dLogits?: Tensor },
): Promise<{ loss: Tensor; dLogits: Tensor }> {
  const h = await native().crossEntropyForwardBackward(logits.native, targets.native, scale, {
    loss: out?.loss?.native, dLogits: out?.dLogits?.native,
  });
  return { loss: out?.loss ?? new Tensor(h.loss), dLogits: out?.dLogits ?? new Tensor(h.dLogits) };
}

/**
 * The distillation loss of a chunk of rows: forward KL(softmax(teacher) ‖ softmax(student)) per row (f32,
 * unscaled) and dStudent = scale · (softmax(student) − softmax(teacher)), in one pass; rows with a negative
 * `rowMask` (e.g. the CE targets) give 0 and 0. Teacher and student logits share dtype and shape;
 * `out.dLogits` may be the student logits (overwritten in place), never the teacher's.
 */
export async function klForwardBackward(
  studentLogits: Tensor, teacherLogits: Tensor, rowMask: Tensor, scale: number, out?: { loss?: Tensor; dLogits?: Tensor },
): Promise<{ loss: Tensor; dLogits: Tensor }> {
  const h = await native().klForwardBackward(studentLogits.native, teacherLogits.native, rowMask.native, scale, {
    loss: out?.loss?.native, dLogits: out?.dLogits?.native,
  });
  return { loss: out?.loss ?? new Tensor(h.loss), dLogits: out?.dLogits ?? new Tensor(h.dLogits) };
}

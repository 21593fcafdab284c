/**
 * The linear map every layer is made of, forward and backward (llm.c style: the forward's input is what the
 * backward needs). Weights follow PyTorch: W [out, in], y = x·Wᵀ (+ b). Parameter gradients accumulate in
 * f32 (`beta = 1` GEMMs), so micro-batches of an accumulated step just call the backward again.
 */
import { add, fill } from '../ops/elementwise';
import { matmul } from '../ops/matmul';
import { Tensor, scope } from '../tensor';

/** y = x·Wᵀ (+ b) for x [rows, in] (or any [..., in]: flattened), W [out, in], b [out]. */
export async function linearForward(x: Tensor, w: Tensor, b?: Tensor): Promise<Tensor> {
  const rows = x.numel / x.shape[x.shape.length - 1];
  const y = await matmul(x.view([rows, x.shape[x.shape.length - 1]]), w, { transB: true });
  return b ? add(y, b, y) : y;
}

export interface LinearGradients {
  /** f32 [out, in]: dW += dyᵀ·x. */
  dw: Tensor;
  /** f32 [out]: db += Σ_rows dy. */
  db?: Tensor;
}

/**
 * Accumulates dW (and db) into `grads` and returns dx = dy·W [rows, in] in dy's dtype — or adds it into
 * `options.dxInto` (and returns that), or nothing with `needDx: false` (e.g. for the first layer's input).
 */
export async function linearBackward(
  x: Tensor,
  w: Tensor,
  dy: Tensor,
  grads: LinearGradients,
  options: { needDx?: boolean; dxInto?: Tensor } = {},
): Promise<Tensor | undefined> {
  const inF = w.shape[1];
  const outF = w.shape[0];
  const rows = x.numel / inF;
  const x2 = x.view([rows, inF]);
  const dy2 = dy.view([rows, outF]);
  await matmul(dy2, x2, { transA: true, c: grads.dw, beta: 1 });
  if (grads.db) {
    const db = grads.db;
    // db += 1ᵀ·dy as a GEMM: f32 accumulation straight into the f32 buffer, whatever dy's dtype.
    await scope(async () => {
      const ones = await fill(Tensor.empty([1, rows], { device: dy.device, dtype: dy.dtype }), 1);
      await matmul(ones, dy2, { c: db.view([1, outF]), beta: 1 });
    });
  }
  if (options.dxInto) return matmul(dy2, w, { c: options.dxInto.view([rows, inF]), beta: 1 }).then(() => options.dxInto);
  if (options.needDx === false) return undefined;
  return matmul(dy2, w);
}

/**
 * C = alpha · op(A) · op(B) + beta · C. A and B are 2-D or 3-D (strided batch); a batch of 1 or a 2-D
 * operand is broadcast over the other's batch. bf16/f16 inputs accumulate in fp32 (cuBLAS on CUDA);
 * f32 is strict fp32 unless allowTf32.
 */
import { native, type DType } from '../native';
import { Tensor } from '../tensor';

export interface MatmulOptions {
  transA?: boolean;
  transB?: boolean;
  alpha?: number;
  /** Needs `c`: C = alpha·AB + beta·C in place. */
  beta?: number;
  /** Output (and input when beta ≠ 0); its dtype may be A's or f32. */
  c?: Tensor;
  /** Output dtype when no `c`: A's dtype (default) or f32. */
  outDtype?: DType;
  allowTf32?: boolean;
}

export async function matmul(a: Tensor, b: Tensor, options: MatmulOptions = {}): Promise<Tensor> {
  const { c, ...rest } = options;
  const h = await native().matmul(a.native, b.native, { ...rest, c: c?.native });
  return c ?? new Tensor(h);
}

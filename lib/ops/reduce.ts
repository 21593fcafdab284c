/** Sum and mean over one axis (or all elements), accumulated in fp32 on CUDA and fp64 on the CPU. */
import { native } from '../native';
import { Tensor } from '../tensor';

export interface ReduceOptions {
  /** Axis to reduce (negative counts from the end); omit to reduce everything. */
  axis?: number;
  keepDims?: boolean;
  out?: Tensor;
}

async function reduce(x: Tensor, mean: boolean, o: ReduceOptions): Promise<Tensor> {
  const h = await native().reduceSum(x.native, o.axis ?? null, mean, o.keepDims ?? false, o.out?.native ?? null);
  return o.out ?? new Tensor(h);
}

export function sum(x: Tensor, options: ReduceOptions = {}): Promise<Tensor> {
  return reduce(x, false, options);
}

export function mean(x: Tensor, options: ReduceOptions = {}): Promise<Tensor> {
  return reduce(x, true, options);
}

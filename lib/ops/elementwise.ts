/** Casts and elementwise arithmetic. Each returns a Promise of the result (or of `out` when given). */
import { native, type DType } from '../native';
import { Tensor } from '../tensor';

function result(out: Tensor | undefined, handle: Awaited<ReturnType<ReturnType<typeof native>['cast']>>): Tensor {
  return out ?? new Tensor(handle);
}

/** x converted to `dtype` (floating dtypes; round to nearest even). */
export async function cast(x: Tensor, dtype: DType, out?: Tensor): Promise<Tensor> {
  return result(out, await native().cast(x.native, dtype, out?.native ?? null));
}

/** a + b, with b of a's shape or a suffix of it (broadcast over leading dimensions). */
export async function add(a: Tensor, b: Tensor, out?: Tensor): Promise<Tensor> {
  return result(out, await native().add(a.native, b.native, out?.native ?? null));
}

/** a ⊙ b, broadcasting like add. */
export async function mul(a: Tensor, b: Tensor, out?: Tensor): Promise<Tensor> {
  return result(out, await native().mul(a.native, b.native, out?.native ?? null));
}

/** alpha · x. */
export async function scale(x: Tensor, alpha: number, out?: Tensor): Promise<Tensor> {
  return result(out, await native().scale(x.native, alpha, out?.native ?? null));
}

/**
 * Fills t in place with Uniform(a, b) or Normal(mean, std) draws. Element i depends only on (seed, i), so
 * CPU and CUDA give the same values (up to float rounding) for the same seed.
 */
export async function randomFill(
  t: Tensor,
  dist: { kind: 'uniform'; low?: number; high?: number } | { kind: 'normal'; mean?: number; std?: number },
  seed: number,
): Promise<Tensor> {
  if (dist.kind === 'uniform') await native().random(t.native, 'uniform', seed, dist.low ?? 0, dist.high ?? 1);
  else await native().random(t.native, 'normal', seed, dist.mean ?? 0, dist.std ?? 1);
  return t;
}

/** Sets every element of t to value, in place. */
export async function fill(t: Tensor, value: number): Promise<Tensor> {
  await native().fill(t.native, value);
  return t;
}

/**
 * Causal (GQA, varlen) attention forward on every enabled device against a float64 host reference that
 * materialises the score matrix; random inputs, outputs poisoned with NaN before each call.
 */
import { Tensor, attentionForward, InvalidArgumentError, type DType } from '../lib';
import { randn, relError, testDevices, cudaEnabled } from './helpers';

jest.setTimeout(300_000);

interface Ref {
  o: Float64Array;
  lse: Float64Array;
}

/**
 * o [B,T,H,D] and lse [B,H,T] in float64. Sequences: the ranges of `cu` over the flat B·T tokens (without
 * varlen, cu = [0, T, 2T, ...]). Tokens outside every sequence: o = 0, lse = −inf.
 */
function refAttention(
  q: ArrayLike<number>, k: ArrayLike<number>, v: ArrayLike<number>,
  B: number, T: number, H: number, HKV: number, D: number, scale: number, cu?: number[],
): Ref {
  const offs = cu ?? Array.from({ length: B + 1 }, (_, i) => i * T);
  const o = new Float64Array(B * T * H * D);
  const lse = new Float64Array(B * H * T).fill(-Infinity);
  const group = H / HKV;
  for (let n = 0; n + 1 < offs.length; n++) {
    const s0 = offs[n], s1 = offs[n + 1], L = s1 - s0;
    for (let h = 0; h < H; h++) {
      const hk = Math.floor(h / group);
      const S = new Float64Array(L * L);
      for (let i = 0; i < L; i++) {
        const qo = ((s0 + i) * H + h) * D;
        for (let j = 0; j <= i; j++) {
          const ko = ((s0 + j) * HKV + hk) * D;
          let d = 0;
          for (let x = 0; x < D; x++) d += q[qo + x] * k[ko + x];
          S[i * L + j] = scale * d;
        }
      }
      for (let i = 0; i < L; i++) {
        let m = -Infinity;
        for (let j = 0; j <= i; j++) m = Math.max(m, S[i * L + j]);
        let l = 0;
        for (let j = 0; j <= i; j++) l += Math.exp(S[i * L + j] - m);
        const row = s0 + i;
        const oo = (row * H + h) * D;
        for (let j = 0; j <= i; j++) {
          const p = Math.exp(S[i * L + j] - m) / l;
          const vo = ((s0 + j) * HKV + hk) * D;
          for (let x = 0; x < D; x++) o[oo + x] += p * v[vo + x];
        }
        const b = Math.floor(row / T), t = row % T;
        lse[(b * H + h) * T + t] = m + Math.log(l);
      }
    }
  }
  return { o, lse };
}

/** bf16 round-to-nearest-even of a whole array (in place on a copy). */
function roundAllBf16(a: Float32Array): Float32Array {
  const r = new Float32Array(a);
  const u = new Uint32Array(r.buffer);
  for (let i = 0; i < u.length; i++) u[i] = (u[i] + 0x7fff + ((u[i] >>> 16) & 1)) & 0xffff0000;
  return r;
}

/** Random q/k/v (never zeros); for bf16 the host copies are rounded the way the device sees them. */
function inputs(B: number, T: number, H: number, HKV: number, D: number, seed: number, dtype: DType) {
  const round = (a: Float32Array) => (dtype === 'bf16' ? roundAllBf16(a) : a);
  return {
    q: round(randn(B * T * H * D, seed, 1)),
    k: round(randn(B * T * HKV * D, seed + 1, 1)),
    v: round(randn(B * T * HKV * D, seed + 2, 1)),
  };
}

async function run(
  device: string, dtype: DType, B: number, T: number, H: number, HKV: number, D: number, seed: number,
  cu?: number[], scale?: number,
) {
  const x = inputs(B, T, H, HKV, D, seed, dtype);
  const q = await Tensor.fromArray(x.q, [B, T, H, D], { device, dtype });
  const k = await Tensor.fromArray(x.k, [B, T, HKV, D], { device, dtype });
  const v = await Tensor.fromArray(x.v, [B, T, HKV, D], { device, dtype });
  const o = await Tensor.full([B, T, H, D], NaN, { device, dtype });
  const lse = await Tensor.full([B, H, T], NaN, { device });
  const cuT = cu ? await Tensor.fromArray(Int32Array.from(cu), [cu.length], { device }) : undefined;
  const r = await attentionForward(q, k, v, { out: { o, lse }, cuSeqlens: cuT, scale, returnLse: true });
  expect(r.o).toBe(o);
  expect(r.lse).toBe(lse);
  const got = { o: await o.toFloat32(), lse: await lse.toFloat32() };
  const ref = refAttention(x.q, x.k, x.v, B, T, H, HKV, D, scale ?? 1 / Math.sqrt(D), cu);
  for (const t of [q, k, v, o, lse, ...(cuT ? [cuT] : [])]) t.dispose();
  return { got, ref };
}

const tol: Record<string, number> = { f32: 1e-5, bf16: 1e-2 };

describe.each(testDevices())('attentionForward on %s', (device) => {
  const cuda = device !== 'cpu';
  // CPU suites stay small (CI has 2 cores): f32 on every T, bf16 on a subset.
  const cases: [DType, number, number, number, number][] = [];
  for (const T of [1, 17, 64, 65, 200])
    for (const D of [64, 128])
      for (const [H, HKV] of [[4, 1], [2, 2]] as const) {
        cases.push(['f32', T, D, H, HKV]);
        if (cuda || T === 65 || T === 200) cases.push(['bf16', T, D, H, HKV]);
      }

  test.each(cases)('%s causal T=%d D=%d H=%d HKV=%d: o and lse match the fp64 reference', async (dtype, T, D, H, HKV) => {
    const B = T >= 200 ? 1 : 2;
    const { got, ref } = await run(device, dtype, B, T, H, HKV, D, 100 + T * 7 + D + H);
    expect(relError(got.o, ref.o)).toBeLessThan(tol[dtype]);
    expect(relError(got.lse, ref.lse)).toBeLessThan(dtype === 'f32' ? 1e-5 : 2e-3);
  });

  test.each(['f32', 'bf16'] as DType[])('%s varlen ragged [1, 63, 64, 130] + 2 padding tokens: no attention across boundaries', async (dtype) => {
    const lens = [1, 63, 64, 130];
    const cu = [0];
    for (const l of lens) cu.push(cu[cu.length - 1] + l);
    const T = cu[cu.length - 1] + 2;
    const H = 4, HKV = 1, D = 64;
    const { got, ref } = await run(device, dtype, 1, T, H, HKV, D, 7, cu);
    expect(relError(got.o, ref.o)).toBeLessThan(tol[dtype]);
    // The reference treats each sequence alone: a leak across a boundary would show as a large error at the
    // first tokens of each sequence, so check those rows separately too.
    for (const s of cu.slice(0, -1)) {
      const a = got.o.subarray(s * H * D, (s + 1) * H * D);
      const b = ref.o.subarray(s * H * D, (s + 1) * H * D);
      expect(relError(a, b)).toBeLessThan(tol[dtype]);
    }
    // Padding tokens: o = 0, lse = −inf.
    const tail = cu[cu.length - 1];
    expect(Array.from(got.o.subarray(tail * H * D)).every((x) => x === 0)).toBe(true);
    for (let h = 0; h < H; h++) for (let t = tail; t < T; t++) expect(got.lse[h * T + t]).toBe(-Infinity);
    const finite = (a: ArrayLike<number>) => Array.from(a).filter((x) => x !== -Infinity);
    expect(relError(finite(got.lse), finite(ref.lse))).toBeLessThan(dtype === 'f32' ? 1e-5 : 2e-3);
  });

  test('custom scale, returnLse without out, default outputs allocated', async () => {
    const B = 1, T = 33, H = 4, HKV = 2, D = 128;
    const x = inputs(B, T, H, HKV, D, 55, 'f32');
    const q = await Tensor.fromArray(x.q, [B, T, H, D], { device });
    const k = await Tensor.fromArray(x.k, [B, T, HKV, D], { device });
    const v = await Tensor.fromArray(x.v, [B, T, HKV, D], { device });
    const r = await attentionForward(q, k, v, { scale: 0.3, returnLse: true });
    expect(r.o.shape).toEqual([B, T, H, D]);
    expect(r.lse.shape).toEqual([B, H, T]);
    const ref = refAttention(x.q, x.k, x.v, B, T, H, HKV, D, 0.3);
    expect(relError(await r.o.toFloat32(), ref.o)).toBeLessThan(1e-5);
    expect(relError(await r.lse.toFloat32(), ref.lse)).toBeLessThan(1e-5);
    const r2 = await attentionForward(q, k, v, { scale: 0.3 });
    expect(r2).toBeInstanceOf(Tensor);
    expect(relError(await r2.toFloat32(), await r.o.toFloat32())).toBeLessThan(1e-5);
  });

  test('rejects bad shapes, dtypes and options with typed errors naming the argument', async () => {
    const mk = (shape: number[], dtype: DType = 'f32') => Tensor.fromArray(randn(shape.reduce((a, b) => a * b, 1), 3), shape, { device, dtype });
    const q = await mk([1, 8, 4, 64]);
    const k = await mk([1, 8, 2, 64]);
    const expectArg = async (p: Promise<unknown>, arg: string) => {
      const e = await p.then(() => null, (err: unknown) => err);
      expect(e).toBeInstanceOf(InvalidArgumentError);
      expect((e as InvalidArgumentError).argument).toBe(arg);
    };
    await expectArg(attentionForward(await mk([1, 8, 4, 264]), await mk([1, 8, 2, 264]), await mk([1, 8, 2, 264])), 'q');
    await expectArg(attentionForward(q, await mk([1, 8, 3, 64]), await mk([1, 8, 3, 64])), 'k');
    await expectArg(attentionForward(q, k, await mk([1, 8, 2, 64], 'bf16')), 'v');
    await expectArg(attentionForward(q, k, await mk([1, 7, 2, 64])), 'v');
    await expectArg(attentionForward(q, k, k, { scale: -1 }), 'scale');
    const qi = await Tensor.fromArray(new Int32Array(8 * 4 * 64).fill(1), [1, 8, 4, 64], { device });
    await expectArg(attentionForward(qi, k, k), 'q');
    const cuBad = await Tensor.fromArray(Int32Array.from([0, 3, 2]), [3], { device: 'cpu' });
    await expectArg(attentionForward(q, k, k, { cuSeqlens: cuBad }), 'cuSeqlens');
    const cuF = await Tensor.fromArray([0, 8], [2], { device: 'cpu' });
    await expectArg(attentionForward(q, k, k, { cuSeqlens: cuF }), 'cuSeqlens');
    const q2 = await mk([2, 8, 4, 64]);
    const k2 = await mk([2, 8, 2, 64]);
    const cu = await Tensor.fromArray(Int32Array.from([0, 8]), [2], { device: 'cpu' });
    await expectArg(attentionForward(q2, k2, k2, { cuSeqlens: cu }), 'cuSeqlens');
    await expectArg(attentionForward(q, k, k, { out: await mk([1, 8, 4, 128]) }), 'out.o');
  });

  if (cuda) {
    test.each([
      ['bf16', 1000, 128, 8, 2],
      ['bf16', 700, 64, 4, 4],
      ['bf16', 300, 256, 4, 1],
      ['f16', 777, 128, 4, 1],
      ['f32', 300, 256, 4, 1],
    ] as [DType, number, number, number, number][])('%s T=%d D=%d H=%d HKV=%d: many tiles against the CPU reference', async (dtype, T, D, H, HKV) => {
      const B = 1;
      const x = inputs(B, T, H, HKV, D, 900 + T, 'f32');
      const make = async (dev: string) => ({
        q: await Tensor.fromArray(x.q, [B, T, H, D], { device: dev, dtype }),
        k: await Tensor.fromArray(x.k, [B, T, HKV, D], { device: dev, dtype }),
        v: await Tensor.fromArray(x.v, [B, T, HKV, D], { device: dev, dtype }),
      });
      const g = await make(device);
      const c = await make('cpu');
      const o = await Tensor.full([B, T, H, D], NaN, { device, dtype });
      const r = await attentionForward(g.q, g.k, g.v, { out: o, returnLse: true });
      expect(r.o).toBe(o);
      const rc = await attentionForward(c.q, c.k, c.v, { returnLse: true });
      const t = dtype === 'f32' ? 1e-5 : 1e-2;
      expect(relError(await r.o.toFloat32(), await rc.o.toFloat32())).toBeLessThan(t);
      expect(relError(await r.lse.toFloat32(), await rc.lse.toFloat32())).toBeLessThan(dtype === 'f32' ? 1e-5 : 2e-3);
    });

    test('bf16 varlen with many sequences and long ones (work list, longest first) against the CPU', async () => {
      const lens = [5, 300, 1, 129, 128, 127, 700, 64, 0, 3];
      const cu = [0];
      for (const l of lens) cu.push(cu[cu.length - 1] + l);
      const T = cu[cu.length - 1] + 5, H = 8, HKV = 2, D = 128;
      const x = inputs(1, T, H, HKV, D, 4242, 'bf16');
      const res: Float32Array[][] = [];
      for (const dev of [device, 'cpu']) {
        const q = await Tensor.fromArray(x.q, [1, T, H, D], { device: dev, dtype: 'bf16' });
        const k = await Tensor.fromArray(x.k, [1, T, HKV, D], { device: dev, dtype: 'bf16' });
        const v = await Tensor.fromArray(x.v, [1, T, HKV, D], { device: dev, dtype: 'bf16' });
        const cuT = await Tensor.fromArray(Int32Array.from(cu), [cu.length], { device: dev });
        const o = await Tensor.full([1, T, H, D], NaN, { device: dev, dtype: 'bf16' });
        const lse = await Tensor.full([1, H, T], NaN, { device: dev });
        const r = await attentionForward(q, k, v, { cuSeqlens: cuT, out: { o, lse } });
        expect(r).toBe(o);
        res.push([await o.toFloat32(), await lse.toFloat32()]);
      }
      expect(relError(res[0][0], res[1][0])).toBeLessThan(1e-2);
      const tail = cu[cu.length - 1];
      const fin = (a: Float32Array) => Array.from(a).filter((_, i) => i % T < tail);
      for (let i = 0; i < H * T; i++) if (i % T >= tail) expect(res[0][1][i]).toBe(-Infinity);
      expect(relError(fin(res[0][1]), fin(res[1][1]))).toBeLessThan(2e-3);
    });
  }
});

test('CUDA suites ran when requested', () => {
  if ((process.env.TCAL_BACKEND ?? '').toLowerCase() === 'cuda') expect(cudaEnabled()).toBe(true);
});

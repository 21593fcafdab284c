/**
 * First ops (cast, add, mul, scale, fill, sum/mean, matmul) on every enabled device, against host references
 * computed in float64 on random inputs. Outputs are poisoned with NaN before each op where an `out` is used.
 */
import { Tensor, cast, add, mul, scale, fill, sum, mean, matmul, randomFill, InvalidArgumentError } from '../lib';
import { randn, relError, testDevices, roundBf16 } from './helpers';

jest.setTimeout(120_000);

function refMatmul(
  a: Float32Array, b: Float32Array, batch: number, m: number, n: number, k: number,
  transA: boolean, transB: boolean, bcastA = false, bcastB = false,
): Float64Array {
  const c = new Float64Array(batch * m * n);
  for (let z = 0; z < batch; z++) {
    const ao = bcastA ? 0 : z * m * k;
    const bo = bcastB ? 0 : z * k * n;
    for (let i = 0; i < m; i++)
      for (let j = 0; j < n; j++) {
        let s = 0;
        for (let p = 0; p < k; p++) {
          const av = transA ? a[ao + p * m + i] : a[ao + i * k + p];
          const bv = transB ? b[bo + j * k + p] : b[bo + p * n + j];
          s += av * bv;
        }
        c[z * m * n + i * n + j] = s;
      }
  }
  return c;
}

describe.each(testDevices())('ops on %s', (device) => {
  test('cast f32 → bf16 → f32 rounds to nearest even; f16 round-trips', async () => {
    const x = randn(1000, 1, 3);
    const t = await Tensor.fromArray(x, [10, 100], { device });
    const b = await cast(t, 'bf16');
    expect(b.dtype).toBe('bf16');
    const back = await b.toFloat32();
    for (let i = 0; i < x.length; i++) expect(back[i]).toBe(roundBf16(x[i]));
    const h = await cast(t, 'f16');
    const hb = await h.toFloat32();
    expect(relError(hb, x)).toBeLessThan(1e-3);
    expect(relError(hb, x)).toBeGreaterThan(0);
    for (const z of [t, b, h]) z.dispose();
  });

  test('add / mul with broadcasting, scale, fill; poisoned outputs are overwritten', async () => {
    const a = randn(6 * 7 * 5, 2);
    const bias = randn(7 * 5, 3);
    const ta = await Tensor.fromArray(a, [6, 7, 5], { device });
    const tb = await Tensor.fromArray(bias, [7, 5], { device });
    const out = await Tensor.full([6, 7, 5], NaN, { device });
    await add(ta, tb, out);
    const sumRef = a.map((v, i) => v + bias[i % bias.length]);
    expect(relError(await out.toFloat32(), sumRef)).toBeLessThan(1e-6);
    const prod = await mul(ta, tb);
    expect(relError(await prod.toFloat32(), a.map((v, i) => v * bias[i % bias.length]))).toBeLessThan(1e-6);
    const sc = await scale(ta, -2.5);
    expect(relError(await sc.toFloat32(), a.map((v) => -2.5 * v))).toBeLessThan(1e-6);
    await fill(sc, 4);
    expect(Array.from(await sc.toFloat32()).every((v) => v === 4)).toBe(true);
  });

  test('bf16 elementwise matches bf16-rounded float math', async () => {
    const a = randn(4096, 4);
    const b = randn(4096, 5);
    const ta = await Tensor.fromArray(a, [4096], { device, dtype: 'bf16' });
    const tb = await Tensor.fromArray(b, [4096], { device, dtype: 'bf16' });
    const r = await (await add(ta, tb)).toFloat32();
    for (let i = 0; i < 4096; i++) expect(r[i]).toBe(roundBf16(roundBf16(a[i]) + roundBf16(b[i])));
  });

  test.each([
    [[5, 300, 7], 1],
    [[3, 1000], -1],
    [[1000, 3], 0],
    [[200001], 0],
  ])('sum and mean of %j over axis %d', async (shape, axis) => {
    const n = shape.reduce((x, y) => x * y, 1);
    const x = randn(n, 6 + n);
    const t = await Tensor.fromArray(x, shape, { device });
    const ax = axis < 0 ? shape.length + axis : axis;
    const outer = shape.slice(0, ax).reduce((p, q) => p * q, 1);
    const len = shape[ax];
    const inner = shape.slice(ax + 1).reduce((p, q) => p * q, 1);
    const ref = new Float64Array(outer * inner);
    for (let o = 0; o < outer; o++)
      for (let j = 0; j < len; j++) for (let i = 0; i < inner; i++) ref[o * inner + i] += x[(o * len + j) * inner + i];
    const s = await sum(t, { axis });
    expect(s.shape).toEqual(shape.filter((_, i) => i !== ax));
    expect(relError(await s.toFloat32(), ref)).toBeLessThan(1e-5);
    const m = await mean(t, { axis, keepDims: true });
    expect(m.shape).toEqual(shape.map((d, i) => (i === ax ? 1 : d)));
    expect(relError(await m.toFloat32(), ref.map((v) => v / len))).toBeLessThan(1e-5);
  });

  test('sum of everything', async () => {
    const x = randn(123457, 9);
    const t = await Tensor.fromArray(x, [123457], { device });
    const s = await sum(t);
    expect(s.shape).toEqual([]);
    const ref = x.reduce((p, q) => p + q, 0);
    expect(Math.abs((await s.toFloat32())[0] - ref)).toBeLessThan(1e-3 * Math.sqrt(123457));
  });

  test.each([
    [1, 33, 17, 65, false, false],
    [1, 64, 48, 96, true, false],
    [3, 20, 31, 7, false, true],
    [2, 17, 40, 129, true, true],
  ])('matmul f32 batch %d m %d n %d k %d transA %s transB %s', async (batch, m, n, k, transA, transB) => {
    const a = randn(batch * m * k, 10 + m);
    const b = randn(batch * k * n, 20 + n);
    const ta = await Tensor.fromArray(a, transA ? [batch, k, m] : [batch, m, k], { device });
    const tb = await Tensor.fromArray(b, transB ? [batch, n, k] : [batch, k, n], { device });
    const c = await Tensor.full([batch, m, n], NaN, { device });
    await matmul(ta, tb, { transA, transB, c });
    const ref = refMatmul(a, b, batch, m, n, k, transA, transB);
    expect(relError(await c.toFloat32(), ref)).toBeLessThan(1e-5);
  });

  test('matmul alpha/beta accumulate into C, broadcast a 2-D weight, bf16 in f32 out', async () => {
    const batch = 3, m = 40, n = 24, k = 72;
    const a = randn(batch * m * k, 31);
    const w = randn(n * k, 32);
    const c0 = randn(batch * m * n, 33);
    const ta = await Tensor.fromArray(a, [batch, m, k], { device, dtype: 'bf16' });
    const tw = await Tensor.fromArray(w, [n, k], { device, dtype: 'bf16' });
    const tc = await Tensor.fromArray(c0, [batch, m, n], { device });
    await matmul(ta, tw, { transB: true, alpha: 0.5, beta: -1, c: tc });
    const ar = a.map(roundBf16);
    const wr = w.map(roundBf16);
    const prod = refMatmul(ar, wr, batch, m, n, k, false, true, false, true);
    const ref = prod.map((v, i) => 0.5 * v - c0[i]);
    expect(relError(await tc.toFloat32(), ref)).toBeLessThan(1e-5);
    const bf = await matmul(ta, tw, { transB: true });
    expect(bf.dtype).toBe('bf16');
    expect(relError(await bf.toFloat32(), prod)).toBeLessThan(1e-2);
  });

  test('randomFill draws the same counter-based stream on every device', async () => {
    const t = await randomFill(Tensor.empty([100000], { device }), { kind: 'normal', mean: 1, std: 2 }, 7);
    const x = await t.toFloat32();
    const m = x.reduce((p, q) => p + q, 0) / x.length;
    const sd = Math.sqrt(x.reduce((p, q) => p + (q - m) ** 2, 0) / x.length);
    expect(Math.abs(m - 1)).toBeLessThan(0.03);
    expect(Math.abs(sd - 2)).toBeLessThan(0.03);
    const cpu = await randomFill(Tensor.empty([100000], { device: 'cpu' }), { kind: 'normal', mean: 1, std: 2 }, 7);
    expect(relError(x, await cpu.toFloat32())).toBeLessThan(1e-6);
    const other = await randomFill(Tensor.empty([100000], { device }), { kind: 'normal', mean: 1, std: 2 }, 8);
    expect(relError(await other.toFloat32(), x)).toBeGreaterThan(0.5);
    const u = await (await randomFill(Tensor.empty([1000], { device }), { kind: 'uniform', low: -3, high: -2 }, 1)).toFloat32();
    expect(u.every((v) => v > -3 && v < -2)).toBe(true);
  });

  test('bad arguments are typed errors naming the argument', async () => {
    const a = await Tensor.fromArray(randn(12, 1), [3, 4], { device });
    const b = await Tensor.fromArray(randn(10, 2), [5, 2], { device });
    await expect(matmul(a, b)).rejects.toMatchObject({ name: 'InvalidArgumentError', argument: 'b' });
    await expect(add(a, b)).rejects.toBeInstanceOf(InvalidArgumentError);
    const h = await cast(a, 'bf16');
    await expect(add(a, h)).rejects.toMatchObject({ argument: 'b' });
    const wrongOut = Tensor.empty([4, 3], { device });
    await expect(add(a, a, wrongOut)).rejects.toMatchObject({ argument: 'out' });
    a.dispose();
    await expect(scale(a, 2)).rejects.toMatchObject({ argument: 'x', message: expect.stringContaining('disposed') });
  });
});

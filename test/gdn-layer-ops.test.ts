/**
 * The GDN layer's ops (causal depthwise conv, gated RMSNorm, SiLU) and their backwards: host f64 references and
 * central differences of a random scalar loss L = Σ r ⊙ y on the CPU in f64 (ragged varlen, tokens past the last
 * offset, accumulation into given gradients), then every enabled device (f32, bf16; poisoned outputs, ragged
 * shapes) against the CPU f64 oracle on the same rounded inputs, and bit-identical reruns on CUDA.
 */
import {
  Tensor, causalConv1d, causalConv1dBackward, gatedRmsNorm, gatedRmsNormBackward, silu, siluBackward,
} from '../lib';
import { randn, relError, testDevices, hostF64 as host, dot, numericGrad } from './helpers';

type Dt = 'f32' | 'bf16';
const f64 = (a: ArrayLike<number>, shape: number[]) => Tensor.fromArray(Float64Array.from(a), shape, { device: 'cpu', dtype: 'f64' });
const i32 = (a: number[], device = 'cpu') => Tensor.fromArray(Int32Array.from(a), [a.length], { device });

// float64 host forwards (the contracts of native/cpu/gdn_layer_ops.h)
function convRef(x: Float64Array, w: Float64Array, C: number, W: number, offsets: number[]): Float64Array {
  const y = new Float64Array(x.length);
  for (let n = 0; n + 1 < offsets.length; n++)
    for (let t = offsets[n]; t < offsets[n + 1]; t++)
      for (let c = 0; c < C; c++)
        for (let j = 0; j < W; j++) {
          const src = t - (W - 1) + j;
          if (src >= offsets[n]) y[t * C + c] += w[c * W + j] * x[src * C + c];
        }
  return y;
}
const sig = (v: number) => 1 / (1 + Math.exp(-v));
function gatedNormRef(x: Float64Array, w: Float64Array, g: Float64Array, eps: number): Float64Array {
  const d = w.length, y = new Float64Array(x.length);
  for (let r = 0; r < x.length / d; r++) {
    let ss = 0;
    for (let i = 0; i < d; i++) ss += x[r * d + i] ** 2;
    const inv = 1 / Math.sqrt(ss / d + eps);
    for (let i = 0; i < d; i++) y[r * d + i] = x[r * d + i] * inv * w[i] * g[r * d + i] * sig(g[r * d + i]);
  }
  return y;
}
const siluRef = (x: Float64Array) => x.map((v) => v * sig(v));

describe('GDN layer ops: central differences on the CPU (f64)', () => {
  test('causalConv1d and its backward, ragged varlen with a tail outside every sequence', async () => {
    const C = 3, W = 4, tokens = 12, offsets = [0, 3, 4, 10]; // tokens 10, 11 belong to no sequence
    const x = Float64Array.from(randn(tokens * C, 1)), w = Float64Array.from(randn(C * W, 2)), r = randn(tokens * C, 3);
    const cu = await i32(offsets);
    const tx = await f64(x, [1, tokens, C]), tw = await f64(w, [C, 1, W]);
    const y = await causalConv1d(tx, tw, { cuSeqlens: cu });
    expect(relError(await host(y), convRef(x, w, C, W, offsets))).toBeLessThan(1e-12);
    const prior = Float64Array.from(randn(C * W, 4));
    const dwAcc = await f64(prior, [C, 1, W]);
    const { dx, dw } = await causalConv1dBackward(tx, tw, await f64(r, [1, tokens, C]), { cuSeqlens: cu, accumulate: true, out: { dw: dwAcc } });
    expect(dw).toBe(dwAcc);
    expect(relError(await host(dx), numericGrad(x, (p) => convRef(p, w, C, W, offsets), r))).toBeLessThan(1e-8);
    const wantDw = numericGrad(w, (p) => convRef(x, p, C, W, offsets), r).map((v, i) => v + prior[i]);
    expect(relError(await host(dw), wantDw)).toBeLessThan(1e-8);
    // Batched rows are sequences of their own: [2, 5, C] equals varlen [0, 5, 10].
    const batched = await causalConv1d(await f64(x.subarray(0, 10 * C), [2, 5, C]), tw);
    expect(relError(await host(batched), convRef(x.subarray(0, 10 * C), w, C, W, [0, 5, 10]))).toBeLessThan(1e-12);
  });

  test('causalConv1d argument errors name the argument', async () => {
    const x = await f64(randn(2 * 5 * 3, 5), [2, 5, 3]);
    await expect(causalConv1d(x, await f64(randn(8, 6), [4, 2]))).rejects.toMatchObject({ argument: 'weight' });
    await expect(causalConv1d(x, await f64(randn(12, 6), [3, 4]), { cuSeqlens: await i32([0, 5, 10]) })).rejects.toMatchObject({ argument: 'x' });
    const one = await f64(randn(10 * 3, 7), [1, 10, 3]);
    await expect(causalConv1d(one, await f64(randn(12, 6), [3, 4]), { cuSeqlens: await i32([0, 6, 4]) })).rejects.toMatchObject({ argument: 'cuSeqlens' });
    await expect(causalConv1d(one, await f64(randn(12, 6), [3, 4]), { cuSeqlens: await i32([0, 11]) })).rejects.toMatchObject({ argument: 'cuSeqlens' });
    await expect(causalConv1dBackward(one, await f64(randn(12, 6), [3, 4]), one, { accumulate: true })).rejects.toMatchObject({ argument: 'out.dw' });
  });

  test('gatedRmsNorm and its backward (dx, dw accumulated, dGate), in place', async () => {
    const rows = 4, d = 6, eps = 1e-3;
    const x = Float64Array.from(randn(rows * d, 11, 1.5)), w = Float64Array.from(randn(d, 12)), g = Float64Array.from(randn(rows * d, 13, 2));
    const r = randn(rows * d, 14);
    const y = await gatedRmsNorm(await f64(x, [rows, d]), await f64(w, [d]), await f64(g, [rows, d]), eps);
    expect(relError(await host(y), gatedNormRef(x, w, g, eps))).toBeLessThan(1e-12);
    const prior = Float64Array.from(randn(d, 15));
    const tx = await f64(x, [rows, d]), tg = await f64(g, [rows, d]), dwAcc = await f64(prior, [d]);
    const res = await gatedRmsNormBackward(tx, await f64(w, [d]), tg, await f64(r, [rows, d]), eps, {
      accumulate: true, out: { dx: tx, dGate: tg, dw: dwAcc },
    });
    expect(res.dx).toBe(tx);
    expect(res.dGate).toBe(tg);
    expect(relError(await host(res.dx), numericGrad(x, (p) => gatedNormRef(p, w, g, eps), r))).toBeLessThan(1e-8);
    expect(relError(await host(res.dGate), numericGrad(g, (p) => gatedNormRef(x, w, p, eps), r))).toBeLessThan(1e-8);
    const wantDw = numericGrad(w, (p) => gatedNormRef(x, p, g, eps), r).map((v, i) => v + prior[i]);
    expect(relError(await host(res.dw), wantDw)).toBeLessThan(1e-8);
    await expect(gatedRmsNorm(tx, await f64(w, [d]), await f64(randn((rows + 1) * d, 16), [rows + 1, d]), eps)).rejects.toMatchObject({ argument: 'gate' });
    await expect(gatedRmsNorm(tx, await f64(w, [d]), tg, -1)).rejects.toMatchObject({ argument: 'eps' });
  });

  test('silu and its backward', async () => {
    const n = 11, x = Float64Array.from(randn(n, 21, 3)), r = randn(n, 22);
    expect(relError(await host(await silu(await f64(x, [n]))), siluRef(x))).toBeLessThan(1e-12);
    const dy = await f64(r, [n]);
    const dx = await siluBackward(await f64(x, [n]), dy, dy);
    expect(dx).toBe(dy);
    expect(relError(await host(dx), numericGrad(x, siluRef, r))).toBeLessThan(1e-8);
  });
});

const TOL: Record<Dt, number> = { f32: 1e-5, bf16: 1e-2 };
const sameBits = async (a: Tensor, b: Tensor) => Buffer.from((await a.toArray()).buffer).equals(Buffer.from((await b.toArray()).buffer));

describe.each(testDevices())('GDN layer ops on %s against the CPU f64 oracle', (device) => {
  const cuda = device !== 'cpu';
  const make = (a: Float32Array, shape: number[], dtype: Dt) => Tensor.fromArray(a, shape, { device, dtype });
  const nan = (shape: number[], dtype: Dt | 'f32') => Tensor.full(shape, NaN, { device, dtype });
  const asF64 = async (t: Tensor) => f64(await t.toFloat32(), t.shape);

  test.each(['f32', 'bf16'] as const)('causalConv1d forward and backward (%s), ragged varlen and batched rows', async (dtype) => {
    for (const { shape, offsets } of [
      { shape: [1, 300, 130], offsets: [0, 1, 64, 64, 200, 297] }, // an empty sequence, a 1-token one, a 3-token tail
      { shape: [3, 37, 67], offsets: undefined },
    ]) {
      const [B, T, C] = shape, W = 4, n = B * T * C;
      const x = await make(randn(n, T + 1), shape, dtype);
      const w = await make(randn(C * W, T + 2, 0.5), [C, 1, W], dtype);
      const dy = await make(randn(n, T + 3), shape, dtype);
      const cu = offsets ? await i32(offsets, device) : undefined;
      const cuCpu = offsets ? await i32(offsets) : undefined;
      const y = await nan(shape, dtype);
      await causalConv1d(x, w, { cuSeqlens: cu, out: y });
      const ref = await causalConv1d(await asF64(x), await asF64(w), { cuSeqlens: cuCpu });
      expect(relError(await y.toFloat32(), await host(ref))).toBeLessThan(TOL[dtype]);
      const prior = await Tensor.fromArray(randn(C * W, T + 4), [C, 1, W], { device });
      const out = { dx: await nan(shape, dtype), dw: prior };
      const priorHost = await host(prior);
      await causalConv1dBackward(x, w, dy, { cuSeqlens: cu, accumulate: true, out });
      const rb = await causalConv1dBackward(await asF64(x), await asF64(w), await asF64(dy), { cuSeqlens: cuCpu });
      expect(relError(await out.dx.toFloat32(), await host(rb.dx))).toBeLessThan(TOL[dtype]);
      expect(relError(await out.dw.toFloat32(), (await host(rb.dw)).map((v, i) => v + priorHost[i]))).toBeLessThan(1e-5);
      if (cuda) {
        const a = await causalConv1dBackward(x, w, dy, { cuSeqlens: cu });
        const b = await causalConv1dBackward(x, w, dy, { cuSeqlens: cu });
        expect(await sameBits(a.dw, b.dw)).toBe(true);
        expect(await sameBits(a.dx, out.dx)).toBe(true);
      }
    }
  });

  test.each(['f32', 'bf16'] as const)('gatedRmsNorm forward and backward (%s), ragged rows', async (dtype) => {
    for (const [rows, d] of [[37, 64], [515, 128], [3, 200]]) {
      const x = await make(randn(rows * d, rows + 1, 2), [rows, d], dtype);
      const w = await make(randn(d, d + 2), [d], dtype);
      const g = await make(randn(rows * d, rows + 3, 2), [rows, d], dtype);
      const dy = await make(randn(rows * d, rows + 4), [rows, d], dtype);
      const y = await nan([rows, d], dtype);
      await gatedRmsNorm(x, w, g, 1e-6, y);
      const ref = await gatedRmsNorm(await asF64(x), await asF64(w), await asF64(g), 1e-6);
      expect(relError(await y.toFloat32(), await host(ref))).toBeLessThan(TOL[dtype]);
      const out = { dx: await nan([rows, d], dtype), dw: await nan([d], 'f32'), dGate: await nan([rows, d], dtype) };
      await gatedRmsNormBackward(x, w, g, dy, 1e-6, { out });
      const rb = await gatedRmsNormBackward(await asF64(x), await asF64(w), await asF64(g), await asF64(dy), 1e-6);
      expect(relError(await out.dx.toFloat32(), await host(rb.dx))).toBeLessThan(TOL[dtype]);
      expect(relError(await out.dGate.toFloat32(), await host(rb.dGate))).toBeLessThan(TOL[dtype]);
      expect(relError(await out.dw.toFloat32(), await host(rb.dw))).toBeLessThan(1e-5);
      if (cuda) {
        const again = await gatedRmsNormBackward(x, w, g, dy, 1e-6);
        expect(await sameBits(again.dw, out.dw)).toBe(true);
        expect(await sameBits(again.dx, out.dx)).toBe(true);
      }
    }
  });

  test.each(['f32', 'bf16'] as const)('silu and siluBackward (%s)', async (dtype) => {
    const shape = [13, 77], n = 13 * 77;
    const x = await make(randn(n, 31, 4), shape, dtype), dy = await make(randn(n, 32), shape, dtype);
    const y = await nan(shape, dtype), dx = await nan(shape, dtype);
    await silu(x, y);
    await siluBackward(x, dy, dx);
    expect(relError(await y.toFloat32(), await host(await silu(await asF64(x))))).toBeLessThan(TOL[dtype]);
    expect(relError(await dx.toFloat32(), await host(await siluBackward(await asF64(x), await asF64(dy))))).toBeLessThan(TOL[dtype]);
  });
});

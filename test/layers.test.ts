/** RMSNorm, RoPE, embedding, SwiGLU and cross-entropy on every enabled device against float64 host math. */
import { Tensor, rmsNorm, rope, embedding, swiglu, crossEntropy } from '../lib';
import { randn, relError, testDevices } from './helpers';

describe.each(testDevices())('transformer layers on %s', (device) => {
  test.each(['f32', 'bf16'] as const)('rmsNorm (%s) over the last dimension, poisoned output', async (dtype) => {
    const rows = 37, d = 96;
    const x = randn(rows * d, 1, 2);
    const w = randn(d, 2);
    const tx = await Tensor.fromArray(x, [rows, d], { device, dtype });
    const tw = await Tensor.fromArray(w, [d], { device, dtype });
    const out = await Tensor.full([rows, d], NaN, { device, dtype });
    await rmsNorm(tx, tw, 1e-6, out);
    const xs = await tx.toFloat32();
    const ws = await tw.toFloat32();
    const ref = new Float64Array(rows * d);
    for (let r = 0; r < rows; r++) {
      let ss = 0;
      for (let i = 0; i < d; i++) ss += xs[r * d + i] ** 2;
      const inv = 1 / Math.sqrt(ss / d + 1e-6);
      for (let i = 0; i < d; i++) ref[r * d + i] = xs[r * d + i] * inv * ws[i];
    }
    expect(relError(await out.toFloat32(), ref)).toBeLessThan(dtype === 'f32' ? 1e-6 : 1e-2);
  });

  test('rope rotates the pairs (j, j + D/2) by position · invFreq, in place', async () => {
    const B = 2, T = 5, H = 3, D = 8;
    const x = randn(B * T * H * D, 3);
    const pos = Int32Array.from({ length: B * T }, (_, i) => (i * 7) % 11);
    const inv = Float32Array.from({ length: D / 2 }, (_, j) => 10000 ** (-(2 * j) / D));
    const tx = await Tensor.fromArray(x, [B, T, H, D], { device });
    await rope(tx, await Tensor.fromArray(pos, [B, T], { device }), await Tensor.fromArray(inv, [D / 2], { device }), tx);
    const ref = new Float64Array(x.length);
    for (let bt = 0; bt < B * T; bt++)
      for (let h = 0; h < H; h++)
        for (let j = 0; j < D / 2; j++) {
          const a = Math.fround(pos[bt] * inv[j]);
          const base = (bt * H + h) * D;
          ref[base + j] = x[base + j] * Math.cos(a) - x[base + j + D / 2] * Math.sin(a);
          ref[base + j + D / 2] = x[base + j + D / 2] * Math.cos(a) + x[base + j] * Math.sin(a);
        }
    expect(relError(await tx.toFloat32(), ref)).toBeLessThan(1e-6);
    await expect(rope(tx, await Tensor.fromArray(pos, [B * T], { device }), await Tensor.fromArray(inv, [D / 2], { device }))).rejects.toMatchObject({ argument: 'positions' });
  });

  test('embedding gathers rows; out-of-vocabulary ids are refused on the CPU', async () => {
    const V = 50, D = 24;
    const table = randn(V * D, 4);
    const ids = Int32Array.from([3, 0, 49, 3, 17]);
    const t = await Tensor.fromArray(table, [V, D], { device });
    const e = await embedding(t, await Tensor.fromArray(ids, [5], { device }));
    expect(e.shape).toEqual([5, D]);
    const got = await e.toFloat32();
    for (let i = 0; i < ids.length; i++)
      for (let j = 0; j < D; j++) expect(got[i * D + j]).toBe(table[ids[i] * D + j]);
    if (device === 'cpu') {
      await expect(embedding(t, await Tensor.fromArray(Int32Array.from([50]), [1], { device }))).rejects.toMatchObject({ argument: 'ids' });
    }
  });

  test('swiglu = silu(gate) · up', async () => {
    const g = randn(1000, 5, 3);
    const u = randn(1000, 6);
    const out = await swiglu(await Tensor.fromArray(g, [10, 100], { device }), await Tensor.fromArray(u, [10, 100], { device }));
    const ref = Array.from(g, (v, i) => (v / (1 + Math.exp(-v))) * u[i]);
    expect(relError(await out.toFloat32(), ref)).toBeLessThan(1e-6);
  });

  test('crossEntropy per row, negative targets ignored', async () => {
    const rows = 7, V = 1000;
    const logits = randn(rows * V, 7, 4);
    const targets = Int32Array.from([5, 999, 0, -1, 500, 17, 2]);
    const loss = await (await crossEntropy(
      await Tensor.fromArray(logits, [rows, V], { device }),
      await Tensor.fromArray(targets, [rows], { device }),
    )).toFloat32();
    for (let r = 0; r < rows; r++) {
      let m = -Infinity;
      for (let i = 0; i < V; i++) m = Math.max(m, logits[r * V + i]);
      let z = 0;
      for (let i = 0; i < V; i++) z += Math.exp(logits[r * V + i] - m);
      const ref = targets[r] < 0 ? 0 : m + Math.log(z) - logits[r * V + targets[r]];
      expect(loss[r]).toBeCloseTo(ref, 4);
    }
  });
});

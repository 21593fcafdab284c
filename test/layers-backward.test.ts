/**
 * Backward passes of RMSNorm, RoPE, SwiGLU, embedding, cross-entropy and the distillation KL: central differences of a random scalar loss
 * L = Σ r ⊙ y on the CPU in f64, then every enabled device (f32, bf16; poisoned outputs, ragged shapes) against the
 * CPU f64 oracle run on the same rounded inputs, and bit-identical reruns on CUDA.
 */
import {
  Tensor, rmsNormBackward, ropeBackward, swigluBackward, embeddingBackward, crossEntropyBackward,
  crossEntropyForwardBackward, klForwardBackward, rmsNorm, rope, swiglu, crossEntropy,
} from '../lib';
import { randn, relError, testDevices, hostF64 as host, dot, numericGrad } from './helpers';

type Dt = 'f32' | 'bf16';
const f64 = (a: ArrayLike<number>, shape: number[]) => Tensor.fromArray(Float64Array.from(a), shape, { device: 'cpu', dtype: 'f64' });
const i32 = (a: number[] | Int32Array, shape: number[], device = 'cpu') => Tensor.fromArray(Int32Array.from(a), shape, { device });

// float64 host forwards, the same semantics as native/cpu/layers.cc
function rmsNormRef(x: Float64Array, w: Float64Array, eps: number): Float64Array {
  const d = w.length, y = new Float64Array(x.length);
  for (let r = 0; r < x.length / d; r++) {
    let ss = 0;
    for (let i = 0; i < d; i++) ss += x[r * d + i] ** 2;
    const inv = 1 / Math.sqrt(ss / d + eps);
    for (let i = 0; i < d; i++) y[r * d + i] = x[r * d + i] * inv * w[i];
  }
  return y;
}
function ropeRef(x: Float64Array, pos: number[], inv: Float32Array, H: number, D: number): Float64Array {
  const y = new Float64Array(x.length), half = D / 2;
  for (let bt = 0; bt < pos.length; bt++)
    for (let h = 0; h < H; h++)
      for (let j = 0; j < half; j++) {
        const a = Math.fround(pos[bt] * inv[j]), b = (bt * H + h) * D;
        y[b + j] = x[b + j] * Math.cos(a) - x[b + j + half] * Math.sin(a);
        y[b + j + half] = x[b + j + half] * Math.cos(a) + x[b + j] * Math.sin(a);
      }
  return y;
}
const swigluRef = (g: Float64Array, u: Float64Array) => g.map((v, i) => (v / (1 + Math.exp(-v))) * u[i]);
function ceRef(logits: Float64Array, targets: number[]): Float64Array {
  const V = logits.length / targets.length;
  return Float64Array.from(targets, (t, r) => {
    if (t < 0) return 0;
    const row = logits.subarray(r * V, (r + 1) * V);
    const m = Math.max(...row);
    let z = 0;
    for (const v of row) z += Math.exp(v - m);
    return m + Math.log(z) - row[t];
  });
}
/** Per-row KL(softmax(t) ‖ softmax(s)) in float64; rows with a negative mask give 0. */
function klRef(student: Float64Array, teacher: Float64Array, mask: number[]): Float64Array {
  const V = student.length / mask.length, out = new Float64Array(mask.length);
  const lse = (a: Float64Array, o: number) => {
    let m = -Infinity;
    for (let i = 0; i < V; i++) m = Math.max(m, a[o + i]);
    let z = 0;
    for (let i = 0; i < V; i++) z += Math.exp(a[o + i] - m);
    return m + Math.log(z);
  };
  for (let r = 0; r < mask.length; r++) {
    if (mask[r] < 0) continue;
    const ls = lse(student, r * V), lt = lse(teacher, r * V);
    for (let i = 0; i < V; i++) {
      const p = Math.exp(teacher[r * V + i] - lt);
      out[r] += p * (teacher[r * V + i] - lt - (student[r * V + i] - ls));
    }
  }
  return out;
}

describe('layer backward: central differences on the CPU (f64)', () => {
  test('rmsNormBackward (dx and dw) and the f64 forward it differentiates', async () => {
    const rows = 3, d = 5, eps = 1e-3;
    const x = Float64Array.from(randn(rows * d, 11, 1.5)), w = Float64Array.from(randn(d, 12)), r = randn(rows * d, 13);
    expect(relError(await host(await rmsNorm(await f64(x, [rows, d]), await f64(w, [d]), eps)), rmsNormRef(x, w, eps))).toBeLessThan(1e-6);
    const { dx, dw } = await rmsNormBackward(await f64(x, [rows, d]), await f64(w, [d]), await f64(r, [rows, d]), eps);
    expect(dw.dtype).toBe('f64');
    expect(relError(await host(dx), numericGrad(x, (p) => rmsNormRef(p, w, eps), r))).toBeLessThan(1e-8);
    expect(relError(await host(dw), numericGrad(w, (p) => rmsNormRef(x, p, eps), r))).toBeLessThan(1e-8);
  });

  test('ropeBackward is the inverse rotation, in place', async () => {
    const H = 2, D = 6, pos = [3, 7, 0], inv = Float32Array.from({ length: D / 2 }, (_, j) => 10000 ** (-(2 * j) / D));
    const x = Float64Array.from(randn(pos.length * H * D, 21)), r = randn(x.length, 22);
    const tInv = await Tensor.fromArray(inv, [D / 2], { device: 'cpu' });
    const tPos = await i32(pos, [1, pos.length]);
    expect(relError(await host(await rope(await f64(x, [1, pos.length, H, D]), tPos, tInv)), ropeRef(x, pos, inv, H, D))).toBeLessThan(1e-6);
    const dy = await f64(r, [1, pos.length, H, D]);
    const dx = await ropeBackward(dy, tPos, tInv, dy);
    expect(dx).toBe(dy);
    expect(relError(await host(dx), numericGrad(x, (p) => ropeRef(p, pos, inv, H, D), r))).toBeLessThan(1e-8);
  });

  test('swigluBackward (dGate, dUp)', async () => {
    const n = 9, g = Float64Array.from(randn(n, 31, 3)), u = Float64Array.from(randn(n, 32)), r = randn(n, 33);
    expect(relError(await host(await swiglu(await f64(g, [n]), await f64(u, [n]))), swigluRef(g, u))).toBeLessThan(1e-6);
    const { dGate, dUp } = await swigluBackward(await f64(g, [n]), await f64(u, [n]), await f64(r, [n]));
    expect(relError(await host(dGate), numericGrad(g, (p) => swigluRef(p, u), r))).toBeLessThan(1e-8);
    expect(relError(await host(dUp), numericGrad(u, (p) => swigluRef(g, p), r))).toBeLessThan(1e-8);
  });

  test('embeddingBackward sums repeated ids, zero rows for unused ids; bad ids refused', async () => {
    const V = 6, D = 3, ids = [2, 0, 2, 5, 2];
    const table = Float64Array.from(randn(V * D, 41)), r = randn(ids.length * D, 42);
    const fwd = (t: Float64Array) => Float64Array.from({ length: ids.length * D }, (_, k) => t[ids[Math.floor(k / D)] * D + (k % D)]);
    const dT = await embeddingBackward(await i32(ids, [ids.length]), await f64(r, [ids.length, D]), V);
    expect(dT.shape).toEqual([V, D]);
    expect(relError(await host(dT), numericGrad(table, fwd, r))).toBeLessThan(1e-8);
    await expect(embeddingBackward(await i32([1, 6], [2]), await f64([1, 2, 3, 4, 5, 6], [2, D]), V)).rejects.toMatchObject({ argument: 'ids' });
    await expect(embeddingBackward(await i32([1, 2], [2]), await f64([1, 2, 3], [1, D]), V)).rejects.toMatchObject({ argument: 'dOut' });
  });

  test('crossEntropyBackward and crossEntropyForwardBackward (negative targets ignored, in place)', async () => {
    const rows = 4, V = 5, targets = [1, -1, 4, 0];
    const logits = Float64Array.from(randn(rows * V, 51, 2)), dLoss = randn(rows, 52);
    const tTargets = await i32(targets, [rows]);
    expect(relError(await host(await crossEntropy(await f64(logits, [rows, V]), tTargets)), ceRef(logits, targets))).toBeLessThan(1e-6);
    const want = numericGrad(logits, (p) => ceRef(p, targets), dLoss);
    const dl = await crossEntropyBackward(await f64(logits, [rows, V]), tTargets, await Tensor.fromArray(dLoss, [rows], { device: 'cpu' }));
    expect(relError(await host(dl), want)).toBeLessThan(1e-7);
    const scale = 0.37;
    const inPlace = await f64(logits, [rows, V]);
    const fb = await crossEntropyForwardBackward(inPlace, tTargets, scale, { dLogits: inPlace });
    expect(fb.dLogits).toBe(inPlace);
    expect(relError(await host(fb.loss), ceRef(logits, targets))).toBeLessThan(1e-6);
    const want2 = numericGrad(logits, (p) => ceRef(p, targets), new Float64Array(rows).fill(scale));
    expect(relError(await host(fb.dLogits), want2)).toBeLessThan(1e-7);
    await expect(crossEntropyForwardBackward(await f64(logits, [rows, V]), await i32([0, 5, 0, 0], [rows]), 1)).rejects.toMatchObject({ argument: 'targets' });
  });

  test('klForwardBackward: the KL and its student gradient (masked rows ignored, in place)', async () => {
    const rows = 4, V = 6, mask = [0, -1, 3, 1];
    const student = Float64Array.from(randn(rows * V, 55, 2)), teacher = Float64Array.from(randn(rows * V, 56, 2));
    const scale = 0.61;
    const s = await f64(student, [rows, V]);
    const r = await klForwardBackward(s, await f64(teacher, [rows, V]), await i32(mask, [rows]), scale, { dLogits: s });
    expect(r.dLogits).toBe(s);
    const want = klRef(student, teacher, mask);
    expect(relError(await host(r.loss), want)).toBeLessThan(1e-6);
    expect(want[0]).toBeGreaterThan(0);
    const grad = numericGrad(student, (p) => klRef(p, teacher, mask), new Float64Array(rows).fill(scale));
    expect(relError(await host(r.dLogits), grad)).toBeLessThan(1e-7);
    // KL of a distribution with itself is 0 and so is its gradient.
    const same = await klForwardBackward(await f64(teacher, [rows, V]), await f64(teacher, [rows, V]), await i32(mask, [rows]), 1);
    expect(Math.max(...Array.from(await host(same.loss), Math.abs))).toBeLessThan(1e-12);
    const t = await f64(teacher, [rows, V]);
    await expect(klForwardBackward(t, t, await i32(mask, [rows]), 1, { dLogits: t })).rejects.toMatchObject({ argument: 'out.dLogits' });
    await expect(klForwardBackward(s, await f64(teacher.slice(0, V * 2), [2, V]), await i32(mask, [rows]), 1)).rejects.toMatchObject({ argument: 'teacherLogits' });
  });
});

const TOL: Record<Dt, number> = { f32: 1e-5, bf16: 1e-2 };
const sameBits = async (a: Tensor, b: Tensor) => Buffer.from((await a.toArray()).buffer).equals(Buffer.from((await b.toArray()).buffer));

describe.each(testDevices())('layer backward on %s against the CPU f64 oracle', (device) => {
  const cuda = device !== 'cpu';
  const make = (a: Float32Array, shape: number[], dtype: Dt) => Tensor.fromArray(a, shape, { device, dtype });
  const nan = (shape: number[], dtype: Dt | 'f32') => Tensor.full(shape, NaN, { device, dtype });
  // The f64 CPU copy of a device tensor's (rounded) values.
  const asF64 = async (t: Tensor) => f64(await t.toFloat32(), t.shape);

  test.each(['f32', 'bf16'] as const)('rmsNormBackward (%s), ragged rows', async (dtype) => {
    for (const [rows, d] of [[37, 96], [300, 70], [2, 1030]]) {
      const x = await make(randn(rows * d, rows + 1, 2), [rows, d], dtype);
      const w = await make(randn(d, d + 2), [d], dtype);
      const dy = await make(randn(rows * d, rows + 3), [rows, d], dtype);
      const out = { dx: await nan([rows, d], dtype), dw: await nan([d], 'f32') };
      const got = await rmsNormBackward(x, w, dy, 1e-6, out);
      expect(got.dx).toBe(out.dx);
      const ref = await rmsNormBackward(await asF64(x), await asF64(w), await asF64(dy), 1e-6);
      expect(relError(await got.dx.toFloat32(), await host(ref.dx))).toBeLessThan(TOL[dtype]);
      expect(relError(await got.dw.toFloat32(), await host(ref.dw))).toBeLessThan(TOL[dtype]);
      if (cuda) {
        const again = await rmsNormBackward(x, w, dy, 1e-6);
        expect(await sameBits(again.dx, got.dx)).toBe(true);
        expect(await sameBits(again.dw, got.dw)).toBe(true);
      }
    }
  });

  test.each(['f32', 'bf16'] as const)('ropeBackward (%s), odd half-dimension', async (dtype) => {
    const B = 2, T = 5, H = 3, D = 10;
    const pos = await i32(Array.from({ length: B * T }, (_, i) => (i * 7) % 13), [B, T], device);
    const inv = await Tensor.fromArray(Float32Array.from({ length: D / 2 }, (_, j) => 10000 ** (-(2 * j) / D)), [D / 2], { device });
    const dy = await make(randn(B * T * H * D, 61), [B, T, H, D], dtype);
    const out = await nan([B, T, H, D], dtype);
    await ropeBackward(dy, pos, inv, out);
    const ref = await ropeBackward(await asF64(dy), await pos.to('cpu'), await inv.to('cpu'));
    expect(relError(await out.toFloat32(), await host(ref))).toBeLessThan(TOL[dtype]);
  });

  test.each(['f32', 'bf16'] as const)('swigluBackward (%s)', async (dtype) => {
    const shape = [13, 77], n = 13 * 77;
    const g = await make(randn(n, 71, 4), shape, dtype), u = await make(randn(n, 72), shape, dtype), d = await make(randn(n, 73), shape, dtype);
    const out = { dGate: await nan(shape, dtype), dUp: await nan(shape, dtype) };
    await swigluBackward(g, u, d, out);
    const ref = await swigluBackward(await asF64(g), await asF64(u), await asF64(d));
    expect(relError(await out.dGate.toFloat32(), await host(ref.dGate))).toBeLessThan(TOL[dtype]);
    expect(relError(await out.dUp.toFloat32(), await host(ref.dUp))).toBeLessThan(TOL[dtype]);
  });

  test.each(['f32', 'bf16'] as const)('embeddingBackward (%s), repeated and unused ids', async (dtype) => {
    const V = 50, D = 40, shape = [3, 101];
    const idsHost = Array.from(randn(303, 81), (v) => Math.min(V - 1, Math.floor(Math.abs(v) * 12)));
    const ids = await i32(idsHost, shape, device);
    const dOut = await make(randn(303 * D, 82), [...shape, D], dtype);
    const out = await nan([V, D], 'f32');
    await embeddingBackward(ids, dOut, V, out);
    const ref = await embeddingBackward(await ids.to('cpu'), await asF64(dOut), V);
    expect(relError(await out.toFloat32(), await host(ref))).toBeLessThan(1e-5);
    if (cuda) expect(await sameBits(await embeddingBackward(ids, dOut, V), out)).toBe(true);
  });

  test.each(['f32', 'bf16'] as const)('crossEntropy backward and fused forward-backward (%s), chunked rows', async (dtype) => {
    const rows = 9, V = 1237;
    const targets = await i32([5, 1236, 0, -1, 500, 17, 2, -3, 1000], [rows], device);
    const logits = await make(randn(rows * V, 91, 3), [rows, V], dtype);
    const dLoss = await Tensor.fromArray(randn(rows, 92), [rows], { device });
    const dl = await nan([rows, V], dtype);
    await crossEntropyBackward(logits, targets, dLoss, dl);
    const L64 = await asF64(logits), T64 = await targets.to('cpu');
    const ref = await crossEntropyBackward(L64, T64, await dLoss.to('cpu'));
    expect(relError(await dl.toFloat32(), await host(ref))).toBeLessThan(TOL[dtype]);
    // The fused op over row chunks, writing into each chunk of a copy of the logits (in place).
    const scale = 1 / 7;
    const work = await logits.to(device);
    const loss = await nan([rows], 'f32');
    for (const [b, e] of [[0, 4], [4, 9]]) {
      await crossEntropyForwardBackward(work.rows(b, e), targets.rows(b, e), scale, { loss: loss.rows(b, e), dLogits: work.rows(b, e) });
    }
    const ref2 = await crossEntropyForwardBackward(L64, T64, scale);
    expect(relError(await loss.toFloat32(), await host(ref2.loss))).toBeLessThan(1e-5);
    expect(relError(await work.toFloat32(), await host(ref2.dLogits))).toBeLessThan(TOL[dtype]);
    if (cuda) {
      const a = await crossEntropyForwardBackward(logits, targets, scale), b2 = await crossEntropyForwardBackward(logits, targets, scale);
      expect(await sameBits(a.dLogits, b2.dLogits)).toBe(true);
      expect(await sameBits(a.loss, b2.loss)).toBe(true);
    }
  });

  test.each(['f32', 'bf16'] as const)('klForwardBackward (%s), chunked rows in place', async (dtype) => {
    const rows = 7, V = 3001;
    const mask = await i32([0, 4, -1, 2, 9, -5, 1], [rows], device);
    const student = await make(randn(rows * V, 95, 2), [rows, V], dtype);
    const teacher = await make(randn(rows * V, 96, 2), [rows, V], dtype);
    const scale = 0.25;
    const work = await student.to(device);
    const loss = await nan([rows], 'f32');
    for (const [b, e] of [[0, 3], [3, 7]]) {
      await klForwardBackward(work.rows(b, e), teacher.rows(b, e), mask.rows(b, e), scale, { loss: loss.rows(b, e), dLogits: work.rows(b, e) });
    }
    const ref = await klForwardBackward(await asF64(student), await asF64(teacher), await mask.to('cpu'), scale);
    expect(relError(await loss.toFloat32(), await host(ref.loss))).toBeLessThan(1e-5);
    expect(relError(await work.toFloat32(), await host(ref.dLogits))).toBeLessThan(TOL[dtype]);
    if (cuda) {
      const a = await klForwardBackward(student, teacher, mask, scale), b2 = await klForwardBackward(student, teacher, mask, scale);
      expect(await sameBits(a.dLogits, b2.dLogits)).toBe(true);
      expect(await sameBits(a.loss, b2.loss)).toBe(true);
    }
  });
});

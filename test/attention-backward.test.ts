/**
 * attentionBackward: the CPU reference against finite differences of attentionForward (f64, tiny sizes), then
 * every enabled device and dtype against the CPU's fp64 backward on identical inputs (the values the device
 * holds: its q/k/v/dO and its forward's o and lse), random inputs, gradients poisoned with NaN before each call.
 */
import { Tensor, attentionForward, attentionBackward, InvalidArgumentError, type DType } from '../lib';
import { randn, relError, testDevices, cudaEnabled } from './helpers';

jest.setTimeout(300_000);

interface Case {
  B: number;
  T: number;
  H: number;
  HKV: number;
  D: number;
  cu?: number[];
  scale?: number;
}

async function cuTensor(cu: number[] | undefined, device: string): Promise<Tensor | undefined> {
  return cu ? Tensor.fromArray(Int32Array.from(cu), [cu.length], { device }) : undefined;
}

/**
 * Σ o ∘ w for causal attention at (q, k, v), all in float64 (the CPU forward converts its inputs to f32, too
 * coarse for finite differences). Sequences: the ranges of cu over the flat B·T tokens.
 */
function lossF64(c: Case, q: Float64Array, k: Float64Array, v: Float64Array, w: Float64Array): number {
  const { B, T, H, HKV, D } = c;
  const scale = c.scale ?? 1 / Math.sqrt(D);
  const offs = c.cu ?? Array.from({ length: B + 1 }, (_, i) => i * T);
  let loss = 0;
  for (let n = 0; n + 1 < offs.length; n++)
    for (let h = 0; h < H; h++) {
      const hk = Math.floor(h / (H / HKV));
      for (let t = offs[n]; t < offs[n + 1]; t++) {
        const s: number[] = [];
        for (let j = offs[n]; j <= t; j++) {
          let d = 0;
          for (let x = 0; x < D; x++) d += q[(t * H + h) * D + x] * k[(j * HKV + hk) * D + x];
          s.push(scale * d);
        }
        const m = Math.max(...s);
        const e = s.map((z) => Math.exp(z - m));
        const l = e.reduce((a, b) => a + b, 0);
        for (let x = 0; x < D; x++) {
          let o = 0;
          for (let j = 0; j < e.length; j++) o += (e[j] / l) * v[((offs[n] + j) * HKV + hk) * D + x];
          loss += o * w[(t * H + h) * D + x];
        }
      }
    }
  return loss;
}

describe('attentionBackward CPU reference', () => {
  test.each([
    ['MHA', { B: 2, T: 5, H: 2, HKV: 2, D: 3 }],
    ['GQA 4:2, custom scale', { B: 1, T: 6, H: 4, HKV: 2, D: 5, scale: 0.7 }],
    ['varlen [2, 3] + 1 padding token', { B: 1, T: 6, H: 2, HKV: 1, D: 4, cu: [0, 2, 5] }],
  ] as [string, Case][])('%s: gradients match central finite differences of the f64 forward', async (_name, c) => {
    const { B, T, H, HKV, D } = c;
    const f64 = (n: number, seed: number) => Float64Array.from(randn(n, seed, 1));
    const x = { q: f64(B * T * H * D, 11), k: f64(B * T * HKV * D, 12), v: f64(B * T * HKV * D, 13) };
    const w = f64(B * T * H * D, 14);
    const mk = (a: Float64Array, h: number) => Tensor.fromArray(a, [B, T, h, D], { device: 'cpu', dtype: 'f64' });
    const [q, k, v, dO] = [await mk(x.q, H), await mk(x.k, HKV), await mk(x.v, HKV), await mk(w, H)];
    const cu = await cuTensor(c.cu, 'cpu');
    const f = await attentionForward(q, k, v, { cuSeqlens: cu, scale: c.scale, returnLse: true });
    const g = await attentionBackward(q, k, v, f.o, f.lse, dO, { cuSeqlens: cu, scale: c.scale });
    const eps = 1e-6;
    for (const [name, grad] of [['q', g.dq], ['k', g.dk], ['v', g.dv]] as const) {
      const got = (await grad.toArray()) as Float64Array;
      const fd = new Float64Array(got.length);
      for (let i = 0; i < got.length; i++) {
        const plus = { q: x.q.slice(), k: x.k.slice(), v: x.v.slice() };
        const minus = { q: x.q.slice(), k: x.k.slice(), v: x.v.slice() };
        plus[name][i] += eps;
        minus[name][i] -= eps;
        fd[i] = (lossF64(c, plus.q, plus.k, plus.v, w) - lossF64(c, minus.q, minus.k, minus.v, w)) / (2 * eps);
      }
      // The forward's lse and o come from the f32-input CPU forward, so P and Dv carry ~1e-7 relative error:
      // the bound sits above that and far below any real mistake.
      expect(relError(got, fd)).toBeLessThan(1e-5);
    }
    if (c.cu) {
      // The padding token: zero gradients.
      const tail = c.cu[c.cu.length - 1];
      expect(Array.from(((await g.dq.toArray()) as Float64Array).subarray(tail * H * D)).every((z) => z === 0)).toBe(true);
      expect(Array.from(((await g.dk.toArray()) as Float64Array).subarray(tail * HKV * D)).every((z) => z === 0)).toBe(true);
    }
  });
});

/**
 * Forward then backward on `device` in `dtype` (gradients poisoned first), and the CPU's f64 backward on the same
 * values (q, k, v, dO as the device holds them; the device forward's o and lse).
 */
async function compare(device: string, dtype: DType, c: Case, seed: number) {
  const { B, T, H, HKV, D } = c;
  const qS = [B, T, H, D], kS = [B, T, HKV, D];
  const d = {
    q: await Tensor.fromArray(randn(B * T * H * D, seed, 1), qS, { device, dtype }),
    k: await Tensor.fromArray(randn(B * T * HKV * D, seed + 1, 1), kS, { device, dtype }),
    v: await Tensor.fromArray(randn(B * T * HKV * D, seed + 2, 1), kS, { device, dtype }),
    dO: await Tensor.fromArray(randn(B * T * H * D, seed + 3, 1), qS, { device, dtype }),
    cu: await cuTensor(c.cu, device),
  };
  const f = await attentionForward(d.q, d.k, d.v, { cuSeqlens: d.cu, scale: c.scale, returnLse: true });
  const out = {
    dq: await Tensor.full(qS, NaN, { device, dtype }),
    dk: await Tensor.full(kS, NaN, { device, dtype }),
    dv: await Tensor.full(kS, NaN, { device, dtype }),
  };
  const g = await attentionBackward(d.q, d.k, d.v, f.o, f.lse, d.dO, { cuSeqlens: d.cu, scale: c.scale, out });
  expect(g.dq).toBe(out.dq);
  expect(g.dk).toBe(out.dk);
  expect(g.dv).toBe(out.dv);
  const got = { dq: await g.dq.toFloat32(), dk: await g.dk.toFloat32(), dv: await g.dv.toFloat32() };

  // The reference takes exactly the values the device holds (bf16 / f16 rounded): where the exact gradient
  // vanishes (one-token sequences: o = v) any input mismatch would show as error.
  const f64 = async (t: Tensor, shape: number[]) =>
    Tensor.fromArray(Float64Array.from(await t.toFloat32()), shape, { device: 'cpu', dtype: 'f64' });
  const r = {
    q: await f64(d.q, qS), k: await f64(d.k, kS), v: await f64(d.v, kS), dO: await f64(d.dO, qS),
    cu: await cuTensor(c.cu, 'cpu'),
  };
  const o64 = await f64(f.o, qS);
  const lse = await Tensor.fromArray(await f.lse.toFloat32(), [B, H, T], { device: 'cpu' });
  const ref = await attentionBackward(r.q, r.k, r.v, o64, lse, r.dO, { cuSeqlens: r.cu, scale: c.scale });
  const want = {
    dq: (await ref.dq.toArray()) as Float64Array,
    dk: (await ref.dk.toArray()) as Float64Array,
    dv: (await ref.dv.toArray()) as Float64Array,
  };
  for (const t of [...Object.values(d), ...Object.values(r), f.o, f.lse, ...Object.values(out), o64, lse, ref.dq, ref.dk, ref.dv])
    t?.dispose();
  return { got, want };
}

const tol: Record<string, number> = { f64: 1e-9, f32: 1e-4, bf16: 2e-2, f16: 1e-2 };

/**
 * ‖got − want‖ / max(‖want‖, 1e-3·√n) (Infinity on NaN). The floor matters where the exact gradient vanishes:
 * a one-token sequence has P = 1, o = v and so dS = 0 (dq = dk = 0 up to rounding), where a plain relative
 * error would compare rounding noise with rounding noise. Gradients of N(0, 1) inputs are ≫ 1e-3 elsewhere.
 */
function gradError(got: ArrayLike<number>, want: ArrayLike<number>): number {
  if (Array.from(got).some((x) => !Number.isFinite(x))) return Infinity;
  let num = 0;
  let den = 0;
  for (let i = 0; i < want.length; i++) {
    num += (got[i] - want[i]) ** 2;
    den += want[i] ** 2;
  }
  return Math.sqrt(num) / Math.max(Math.sqrt(den), 1e-3 * Math.sqrt(want.length));
}

function expectClose(r: Awaited<ReturnType<typeof compare>>, dtype: DType) {
  for (const key of ['dq', 'dk', 'dv'] as const) {
    const e = gradError(r.got[key], r.want[key]);
    if (!(e < tol[dtype])) throw new Error(`${key}: relative error ${e} ≥ ${tol[dtype]}`);
  }
}

describe.each(testDevices())('attentionBackward on %s', (device) => {
  const cuda = device !== 'cpu';
  // The CPU runs a small subset (CI has 2 cores); CUDA every shape.
  const cases: [DType, number, number, number, number][] = [];
  for (const T of [1, 17, 64, 65, 200, 300])
    for (const D of [64, 128])
      for (const [H, HKV] of [[4, 1], [2, 2]] as const) {
        if (cuda || (T === 65 && D === 64)) cases.push(['f32', T, D, H, HKV], ['bf16', T, D, H, HKV]);
      }
  if (cuda) cases.push(['bf16', 65, 256, 4, 1], ['bf16', 300, 256, 2, 1], ['f32', 130, 256, 2, 1], ['f16', 200, 128, 4, 1],
    ['bf16', 90, 32, 4, 2], ['f32', 40, 16, 2, 1]);

  test.each(cases)('%s T=%d D=%d H=%d HKV=%d: dq, dk, dv match the fp64 reference', async (dtype, T, D, H, HKV) => {
    const B = T >= 200 ? 1 : 2;
    expectClose(await compare(device, dtype, { B, T, H, HKV, D }, 500 + T * 7 + D + H), dtype);
  });

  test.each(cuda ? [['f32', 64], ['bf16', 64], ['bf16', 128], ['f16', 64]] : [['f32', 64], ['bf16', 64]] as [DType, number][])(
    '%s D=%d varlen ragged [1, 63, 64, 130, 0, 200] + 3 padding tokens, GQA 4:1: zero gradients past the end', async (dtype, D) => {
      const lens = cuda ? [1, 63, 64, 130, 0, 200] : [1, 63, 64, 30];
      const cu = [0];
      for (const l of lens) cu.push(cu[cu.length - 1] + l);
      const T = cu[cu.length - 1] + 3, H = 4, HKV = 1;
      const r = await compare(device, dtype as DType, { B: 1, T, H, HKV, D, cu, scale: 0.11 }, 77);
      expectClose(r, dtype as DType);
      const tail = cu[cu.length - 1];
      expect(Array.from(r.got.dq.subarray(tail * H * D)).every((z) => z === 0)).toBe(true);
      expect(Array.from(r.got.dk.subarray(tail * HKV * D)).every((z) => z === 0)).toBe(true);
      expect(Array.from(r.got.dv.subarray(tail * HKV * D)).every((z) => z === 0)).toBe(true);
      // A leak across a boundary shows first at a sequence's first tokens: check those rows alone too.
      for (const s of cu.slice(0, -1)) {
        const row = (a: Float32Array | Float64Array, w: number) => a.subarray(s * w * D, (s + 1) * w * D);
        expect(gradError(row(r.got.dk, HKV), row(r.want.dk, HKV))).toBeLessThan(tol[dtype]);
        expect(gradError(row(r.got.dq, H), row(r.want.dq, H))).toBeLessThan(tol[dtype]);
      }
    });

  test('default outputs allocated; bad arguments give typed errors naming them', async () => {
    const B = 1, T = 8, H = 4, HKV = 2, D = 64;
    const mk = (shape: number[], dtype: DType = 'f32') =>
      Tensor.fromArray(randn(shape.reduce((a, b) => a * b, 1), 3), shape, { device, dtype });
    const q = await mk([B, T, H, D]);
    const k = await mk([B, T, HKV, D]);
    const v = await mk([B, T, HKV, D]);
    const f = await attentionForward(q, k, v, { returnLse: true });
    const g = await attentionBackward(q, k, v, f.o, f.lse, await mk([B, T, H, D]));
    expect(g.dq.shape).toEqual([B, T, H, D]);
    expect(g.dk.shape).toEqual([B, T, HKV, D]);
    expect(g.dv.dtype).toBe('f32');
    const expectArg = async (p: Promise<unknown>, arg: string) => {
      const e = await p.then(() => null, (err: unknown) => err);
      expect(e).toBeInstanceOf(InvalidArgumentError);
      expect((e as InvalidArgumentError).argument).toBe(arg);
    };
    const dO = await mk([B, T, H, D]);
    await expectArg(attentionBackward(q, k, v, f.o, f.lse, await mk([B, T, H, D], 'bf16')), 'dO');
    await expectArg(attentionBackward(q, k, v, f.o, f.lse, await mk([B, T, H, 32])), 'dO');
    await expectArg(attentionBackward(q, k, v, await mk([B, T, HKV, D]), f.lse, dO), 'o');
    await expectArg(attentionBackward(q, k, v, f.o, await mk([B, T, H]), dO), 'lse');
    await expectArg(attentionBackward(q, k, v, f.o, await mk([B, H, T], 'bf16'), dO), 'lse');
    await expectArg(attentionBackward(q, k, await mk([B, T, H, D]), f.o, f.lse, dO), 'v');
    await expectArg(attentionBackward(q, k, v, f.o, f.lse, dO, { out: { dk: await mk([B, T, H, D]) } }), 'out.dk');
    const dk = await mk([B, T, HKV, D]);
    await expectArg(attentionBackward(q, k, v, f.o, f.lse, dO, { out: { dk, dv: dk } }), 'out.dv');
  });
});

test('CUDA suites ran when requested', () => {
  if ((process.env.TCAL_BACKEND ?? '').toLowerCase() === 'cuda') expect(cudaEnabled()).toBe(true);
});

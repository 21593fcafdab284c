/**
 * Fused AdamW and the global gradient norm on every enabled device, against a plain TS reference that does
 * the same fp32 operations (Math.fround after each) on random, non-zero parameters, moments and gradients.
 */
import { Tensor, InvalidArgumentError, fill } from '../lib';
import { adamwStep, gradNormSquared, gradNormSquaredValue, type AdamwGroup } from '../lib/ops/adamw';
import { clipFactor, clipGradients } from '../lib/train/clip';
import { cudaEnabled, randn, relError, roundBf16, testDevices } from './helpers';

jest.setTimeout(120_000);

const f = Math.fround;

interface Hyper {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
}

/** The reference: the arithmetic of native/cpu/adamw.h, element by element, rounded to fp32 like the kernels. */
function refStep(p: Float32Array, m: Float32Array, v: Float32Array, g: Float32Array, h: Hyper, step: number, gradScale: number): void {
  const bc1 = 1 - Math.pow(h.beta1, step);
  const bc2 = 1 - Math.pow(h.beta2, step);
  const decay = f(1 - h.lr * h.weightDecay);
  const stepSize = f(h.lr / bc1);
  const b1 = f(h.beta1), omb1 = f(1 - h.beta1), b2 = f(h.beta2), omb2 = f(1 - h.beta2);
  const bc2Sqrt = f(Math.sqrt(bc2));
  const eps = f(h.eps), gs = f(gradScale);
  for (let i = 0; i < p.length; i++) {
    const gi = f(g[i] * gs);
    const pd = f(p[i] * decay);
    m[i] = f(f(b1 * m[i]) + f(omb1 * gi));
    v[i] = f(f(b2 * v[i]) + f(omb2 * f(gi * gi)));
    const denom = f(f(f(Math.sqrt(v[i])) / bc2Sqrt) + eps);
    p[i] = f(pd - f(stepSize * f(m[i] / denom)));
  }
}

interface Case {
  sizes: number[][];
  gradDtype: 'f32' | 'bf16';
  computeDtype?: 'bf16' | 'f32';
}

async function setup(device: string, shape: number[], seed: number, c: Case) {
  const n = shape.reduce((a, b) => a * b, 1);
  const p = randn(n, seed, 0.5);
  const m = randn(n, seed + 1, 0.01);
  const v = randn(n, seed + 2, 0.01).map((x) => x * x + 1e-6);
  let g = randn(n, seed + 3, 0.1);
  if (c.gradDtype === 'bf16') g = g.map(roundBf16);
  return {
    host: { p, m, v, g },
    buffers: {
      param: await Tensor.fromArray(p, shape, { device }),
      m: await Tensor.fromArray(m, shape, { device }),
      v: await Tensor.fromArray(v, shape, { device }),
      grad: await Tensor.fromArray(g, shape, { device, dtype: c.gradDtype }),
      // Poisoned: every element must be rewritten from the updated master.
      compute: c.computeDtype ? await Tensor.full(shape, NaN, { device, dtype: c.computeDtype }) : undefined,
    },
  };
}

describe.each(testDevices())('adamw on %s', (device) => {
  const hypers: Hyper[] = [
    { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0 },
    { lr: 3e-4, beta1: 0.85, beta2: 0.95, eps: 1e-6, weightDecay: 0.1 },
  ];

  test.each([
    [1, 1, 'f32', undefined],
    [1000, 1, 'f32', 'bf16'],
    [1, 0.37, 'bf16', 'bf16'],
    [1000, 0.5, 'bf16', 'f32'],
  ] as const)('step %d, gradScale %d, %s grads, compute copy %s: two groups (wd 0 and 0.1) match the reference', async (step, gradScale, gradDtype, computeDtype) => {
    const c: Case = { sizes: [[7], [33, 129], [5000], [3, 4, 5]], gradDtype, computeDtype };
    const groups: AdamwGroup[] = [];
    const refs: Array<{ host: Awaited<ReturnType<typeof setup>>['host']; h: Hyper; b: Awaited<ReturnType<typeof setup>>['buffers'] }> = [];
    let seed = 100 * step + 10;
    for (const h of hypers) {
      const params = [];
      for (const shape of c.sizes) {
        const s = await setup(device, shape, seed, c);
        seed += 7;
        params.push(s.buffers);
        refs.push({ host: s.host, h, b: s.buffers });
      }
      groups.push({ ...h, params });
    }
    await adamwStep(groups, { step, gradScale });
    for (const r of refs) {
      const { p, m, v, g } = r.host;
      const p0 = p.slice();
      refStep(p, m, v, g, r.h, step, gradScale);
      expect(relError(await r.b.param.toFloat32(), p)).toBeLessThan(1e-6);
      expect(relError(await r.b.m.toFloat32(), m)).toBeLessThan(1e-6);
      expect(relError(await r.b.v.toFloat32(), v)).toBeLessThan(1e-6);
      // The step really moved the parameters (by much more than the tolerance).
      expect(relError(p, p0)).toBeGreaterThan(1e-6);
      if (r.b.compute) {
        const got = await r.b.compute.toFloat32();
        const master = await r.b.param.toFloat32();
        for (let i = 0; i < got.length; i++) {
          const want = computeDtype === 'bf16' ? roundBf16(master[i]) : master[i];
          if (got[i] !== want) throw new Error(`compute[${i}] = ${got[i]}, want ${want}`);
        }
      }
    }
  });

  test('three consecutive steps carry the moments; the bias correction follows the step count', async () => {
    const shape = [4100];
    const c: Case = { sizes: [shape], gradDtype: 'f32' };
    const s = await setup(device, shape, 77, c);
    const h = hypers[1];
    for (let step = 1; step <= 3; step++) {
      const g = randn(4100, 900 + step, 0.1);
      const gt = await Tensor.fromArray(g, shape, { device });
      await adamwStep([{ ...h, params: [{ ...s.buffers, grad: gt }] }], { step });
      refStep(s.host.p, s.host.m, s.host.v, g, h, step, 1);
    }
    expect(relError(await s.buffers.param.toFloat32(), s.host.p)).toBeLessThan(1e-6);
    expect(relError(await s.buffers.v.toFloat32(), s.host.v)).toBeLessThan(1e-6);
  });

  test('gradNormSquared sums squares over a list of f32 and bf16 tensors in double', async () => {
    const a = randn(70001, 5, 0.3);
    const b = randn(1234, 6, 2).map(roundBf16);
    const c = randn(9, 7, 1);
    const ta = await Tensor.fromArray(a, [70001], { device });
    const tb = await Tensor.fromArray(b, [2, 617], { device, dtype: 'bf16' });
    const tc = await Tensor.fromArray(c, [3, 3], { device });
    let want = 0;
    for (const x of [a, b, c]) for (const y of x) want += y * y;
    const t = await gradNormSquared([ta, tb, tc]);
    expect(t.dtype).toBe('f64');
    expect(t.shape).toEqual([]);
    expect(Math.abs(((await t.toArray())[0] as number) - want) / want).toBeLessThan(1e-12);
    // Clipping: the factor that brings the norm to maxNorm, as a gradScale.
    const norm = Math.sqrt(want);
    const r = await clipGradients([ta, tb, tc], norm / 4);
    expect(r.finite).toBe(true);
    expect(r.norm).toBeCloseTo(norm, 9);
    expect(r.gradScale).toBeCloseTo(norm / 4 / (norm + 1e-6), 12);
    expect((await clipGradients([ta], undefined, 0.5)).gradScale).toBe(0.5);
    expect(clipFactor(1, 10)).toBe(1);
    const nan = await Tensor.fromArray([1, NaN, 2], [3], { device });
    expect(await clipGradients([nan], 1)).toEqual({ norm: NaN, gradScale: 0, finite: false });
    expect(await gradNormSquaredValue([tc])).toBeCloseTo(c.reduce((s2, x) => s2 + x * x, 0), 10);
  });

  test('bad arguments are refused with typed errors naming them', async () => {
    const p = await Tensor.fromArray(randn(8, 1), [8], { device });
    const m = await Tensor.fromArray(randn(8, 2), [8], { device });
    const v = await Tensor.full([8], 1, { device });
    const g = await Tensor.fromArray(randn(8, 3), [8], { device });
    const g4 = await Tensor.fromArray(randn(4, 3), [4], { device });
    const run = (params: AdamwGroup['params'], step = 1, extra: Partial<Hyper> = {}) => adamwStep([{ lr: 1e-3, ...extra, params }], { step });
    await expect(run([{ param: p, m, v, grad: g4 }])).rejects.toThrow(/items\[0\]\.grad/);
    await expect(run([{ param: p, m, v: m, grad: g }])).rejects.toThrow(/shares memory/);
    await expect(run([{ param: p, m, v, grad: g }, { param: p, m: v, v: m, grad: g }])).rejects.toThrow(/shares memory/);
    await expect(run([{ param: p, m, v, grad: g }], 0)).rejects.toThrow(InvalidArgumentError);
    await expect(run([{ param: p, m, v, grad: g }], 1, { beta2: 1 })).rejects.toThrow(/beta2/);
    const pb = await Tensor.fromArray(randn(8, 1), [8], { device, dtype: 'bf16' });
    await expect(run([{ param: pb, m, v, grad: g }])).rejects.toThrow(/items\[0\]\.param/);
    await expect(gradNormSquared([])).rejects.toThrow(InvalidArgumentError);
    // Nothing was changed by the refused calls.
    expect(Array.from(await v.toFloat32()).every((x) => x === 1)).toBe(true);
  });
});

(cudaEnabled() ? describe : describe.skip)('adamw: CUDA agrees with the CPU', () => {
  test('same inputs, same results to ~1e-6 (bf16 grads, bf16 compute copies, large tensors)', async () => {
    const shapes = [[1 << 20], [4097], [1], [256, 300]];
    const groups: Record<string, AdamwGroup[]> = {};
    const all: Record<string, Array<{ param: Tensor; m: Tensor; v: Tensor; compute: Tensor }>> = {};
    for (const device of ['cpu', 'cuda:0']) {
      const params = [];
      let seed = 5;
      for (const shape of shapes) {
        const s = await setup(device, shape, seed, { sizes: [shape], gradDtype: 'bf16', computeDtype: 'bf16' });
        seed += 11;
        params.push(s.buffers as typeof s.buffers & { compute: Tensor });
      }
      groups[device] = [{ lr: 2e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.05, params }];
      all[device] = params;
      await adamwStep(groups[device], { step: 1000, gradScale: 0.8 });
    }
    for (let i = 0; i < shapes.length; i++) {
      for (const k of ['param', 'm', 'v', 'compute'] as const) {
        expect(relError(await all['cuda:0'][i][k].toFloat32(), await all.cpu[i][k].toFloat32())).toBeLessThan(1e-6);
      }
    }
    const gc = await gradNormSquaredValue(groups.cpu[0].params.map((p) => p.grad));
    const gg = await gradNormSquaredValue(groups['cuda:0'][0].params.map((p) => p.grad));
    expect(Math.abs(gc - gg) / gc).toBeLessThan(1e-12);
  });
});

describe('AdamW optimizer (lib/train/adamw.ts)', () => {
  test('schedule, clipping and a checkpoint round trip in the middle give bit-identical results', async () => {
    const { AdamW } = await import('../lib/train/adamw');
    const { saveCheckpoint, loadCheckpoint } = await import('../lib/train/checkpoint');
    const os = await import('node:os');
    const fsp = (await import('node:fs')).promises;
    const path = await import('node:path');
    const make = async () => {
      const a = await Tensor.fromArray(randn(300, 1), [10, 30]);
      const b = await Tensor.fromArray(randn(40, 2), [40]);
      const bc = await Tensor.full([40], NaN, { dtype: 'bf16' });
      const opt = await AdamW.create(
        [
          { lr: 1e-2, weightDecay: 0.1, params: [{ name: 'a', param: a }] },
          { lr: 3e-2, params: [{ name: 'b', param: b, compute: bc }] },
        ],
        { kind: 'cosine', warmupSteps: 2, totalSteps: 6 },
      );
      return { a, b, bc, opt };
    };
    const grads = async (k: number) =>
      new Map([
        ['a', await Tensor.fromArray(randn(300, 50 + k), [10, 30])],
        ['b', await Tensor.fromArray(randn(40, 60 + k), [40], { dtype: 'bf16' })],
      ]);
    const x = await make();
    for (let k = 1; k <= 4; k++) await x.opt.stepWith(await grads(k), { maxGradNorm: 5, gradScale: 0.5 });
    const y = await make();
    for (let k = 1; k <= 2; k++) {
      const r = await y.opt.stepWith(await grads(k), { maxGradNorm: 5, gradScale: 0.5 });
      expect(r.applied).toBe(true);
      expect(r.lrs).toEqual([1e-2 * (k / 2), 3e-2 * (k / 2)]);
    }
    const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'tcal-opt-'));
    const saved = await saveCheckpoint(dir, {
      step: y.opt.step,
      model: new Map([
        ['a', { dtype: 'F32', shape: y.a.shape, data: (await y.a.toArray()) as Float32Array }],
        ['b', { dtype: 'F32', shape: y.b.shape, data: (await y.b.toArray()) as Float32Array }],
      ]),
      optimizer: await y.opt.stateForCheckpoint(),
      schedule: y.opt.schedule,
      data: null,
      rng: null,
    });
    const ck = await loadCheckpoint(saved);
    await fsp.rm(dir, { recursive: true, force: true });
    const z = await make();
    const viewF32 = (d: ArrayBufferView) => new Float32Array(d.buffer, d.byteOffset, d.byteLength / 4);
    z.a.dispose();
    z.b.dispose();
    const za = await Tensor.fromArray(viewF32(ck.model.get('a')!.data), [10, 30]);
    const zb = await Tensor.fromArray(viewF32(ck.model.get('b')!.data), [40]);
    const opt = await AdamW.create(
      [
        { lr: 1e-2, weightDecay: 0.1, params: [{ name: 'a', param: za }] },
        { lr: 3e-2, params: [{ name: 'b', param: zb, compute: z.bc }] },
      ],
      { kind: 'cosine', warmupSteps: 2, totalSteps: 6 },
    );
    await opt.loadCheckpointState(ck.step, ck.optimizer);
    for (let k = 3; k <= 4; k++) await opt.stepWith(await grads(k), { maxGradNorm: 5, gradScale: 0.5 });
    expect(opt.step).toBe(4);
    expect(Buffer.from((await za.toArray()).buffer).equals(Buffer.from((await x.a.toArray()).buffer))).toBe(true);
    expect(Buffer.from((await zb.toArray()).buffer).equals(Buffer.from((await x.b.toArray()).buffer))).toBe(true);
    expect(Buffer.from((await z.bc.toArray()).buffer).equals(Buffer.from((await x.bc.toArray()).buffer))).toBe(true);
    // A non-finite gradient skips the step.
    const bad = await grads(9);
    await fill(bad.get('a')!, NaN);
    const r = await opt.stepWith(bad);
    expect(r.applied).toBe(false);
    expect(opt.step).toBe(4);
  });
});

/**
 * The GDN student layer's explicit backward: every parameter's gradient and dx against central differences of
 * L = Σ r ⊙ y on the CPU in f64 at a tiny size (identity and SiLU activations, with and without the short conv,
 * batched rows and ragged varlen with a token outside every sequence), gradient accumulation across calls, and
 * on every enabled device a bf16 layer against the same weights in f32 on the CPU.
 */
import { GdnLayer, Tensor, scope, type GdnLayerConfig } from '../lib';
import { randn, relError, testDevices, hostF64 as host, dot } from './helpers';


/** Random host values for every parameter (larger than an init's, so every path carries signal). */
function hostParams(config: GdnLayerConfig, seed: number, projStd = 0.4): Map<string, { shape: number[]; data: Float64Array }> {
  const m = new Map<string, { shape: number[]; data: Float64Array }>();
  for (const [name, shape] of GdnLayer.parameterShapes(config)) {
    const n = shape.reduce((a, b) => a * b, 1);
    let data = Float64Array.from(randn(n, seed++, name.endsWith('proj.weight') ? projStd : 0.5));
    if (name === 'o_norm.weight') data = data.map((v) => 1 + v);
    if (name === 'A_log') data = data.map((v) => Math.log(1 + Math.abs(v) * 4));
    m.set(name, { shape, data });
  }
  return m;
}

async function upload(
  p: Map<string, { shape: number[]; data: Float64Array }>, device: string, dtype: 'f64' | 'f32' | 'bf16',
): Promise<Map<string, Tensor>> {
  const out = new Map<string, Tensor>();
  for (const [name, { shape, data }] of p) {
    const gate = name === 'A_log' || name === 'dt_bias';
    const dt = gate ? (dtype === 'f64' ? 'f64' : 'f32') : dtype;
    out.set(name, await Tensor.fromArray(dt === 'f64' ? data : Float32Array.from(data), shape, { device, dtype: dt }));
  }
  return out;
}

interface Case {
  name: string;
  config: GdnLayerConfig;
  shape: [number, number];
  offsets?: number[];
}

const CASES: Case[] = [
  { name: 'identity, no conv, two rows', config: { hidden: 6, heads: 2, headDim: 3 }, shape: [2, 5] },
  { name: 'SiLU with conv, two rows', config: { hidden: 6, heads: 2, headDim: 3, act: 'silu', conv: true }, shape: [2, 6] },
  // sequences of 3, 1 and 5 tokens, then one token outside every sequence
  { name: 'identity with conv, ragged varlen', config: { hidden: 5, heads: 2, headDim: 4, conv: true }, shape: [1, 10], offsets: [0, 3, 4, 9] },
];

describe('GDN layer backward: central differences on the CPU (f64)', () => {
  test.each(CASES)('$name', async ({ config, shape, offsets }) => {
    await scope(async () => {
      const [B, T] = shape;
      const pHost = hostParams(config, 100);
      const xHost = Float64Array.from(randn(B * T * config.hidden, 7));
      const r = randn(B * T * config.hidden, 8);
      const cu = offsets ? await Tensor.fromArray(Int32Array.from(offsets), [offsets.length], { device: 'cpu' }) : undefined;
      const loss = async (p: Map<string, { shape: number[]; data: Float64Array }>, x: Float64Array) =>
        scope(async () => {
          const layer = new GdnLayer(config, await upload(p, 'cpu', 'f64'));
          const { y } = await layer.forward(await Tensor.fromArray(x, [B, T, config.hidden], { device: 'cpu', dtype: 'f64' }), { cuSeqlens: cu });
          return dot(r, await host(y));
        });

      const layer = new GdnLayer(config, await upload(pHost, 'cpu', 'f64'));
      const grads = await layer.createGradients();
      const x = await Tensor.fromArray(xHost, [B, T, config.hidden], { device: 'cpu', dtype: 'f64' });
      const dy = await Tensor.fromArray(Float64Array.from(r), [B, T, config.hidden], { device: 'cpu', dtype: 'f64' });
      const { saved } = await layer.forward(x, { cuSeqlens: cu });
      const dx = await layer.backward(saved, dy, grads);
      expect(dx.shape).toEqual([B, T, config.hidden]);

      // Central differences on up to 8 entries of every parameter (spread over the tensor) and of x.
      const h = 1e-5;
      const check = async (got: Float64Array, perturb: (i: number, delta: number) => Promise<number>) => {
        const n = got.length, idx = [...new Set(Array.from({ length: Math.min(8, n) }, (_, j) => Math.floor((j * n) / Math.min(8, n) + (j * 7) % Math.max(1, Math.floor(n / 8)))))];
        const want: number[] = [], have: number[] = [];
        for (const i of idx) {
          want.push(((await perturb(i, h)) - (await perturb(i, -h))) / (2 * h));
          have.push(got[i]);
        }
        return relError(have, want);
      };
      for (const [name, { data }] of pHost) {
        const err = await check(await host(grads.get(name)!), async (i, delta) => {
          const q = new Map(pHost);
          const d = Float64Array.from(data);
          d[i] += delta;
          q.set(name, { shape: pHost.get(name)!.shape, data: d });
          return loss(q, xHost);
        });
        if (!(err < 1e-6)) throw new Error(`${name}: relative error ${err}`);
      }
      const errX = await check(await host(dx), async (i, delta) => {
        const d = Float64Array.from(xHost);
        d[i] += delta;
        return loss(pHost, d);
      });
      expect(errX).toBeLessThan(1e-6);

      // A second backward adds to the same accumulators.
      const before = await host(grads.get('q_proj.weight')!);
      await layer.backward(saved, dy, grads);
      expect(relError(await host(grads.get('q_proj.weight')!), before.map((v) => 2 * v))).toBeLessThan(1e-12);
    });
  }, 120_000);

  test('bad configurations and parameters are refused by name', async () => {
    expect(() => GdnLayer.parameterShapes({ hidden: 4, heads: 0, headDim: 2 })).toThrow(expect.objectContaining({ argument: 'heads' }));
    expect(() => GdnLayer.parameterShapes({ hidden: 4, heads: 1, headDim: 2, act: 'gelu' as 'silu' })).toThrow(expect.objectContaining({ argument: 'act' }));
    await scope(async () => {
      const config = { hidden: 4, heads: 1, headDim: 2 };
      const p = await upload(hostParams(config, 1), 'cpu', 'f32');
      p.delete('g_proj.bias');
      expect(() => new GdnLayer(config, p)).toThrow(expect.objectContaining({ argument: 'params' }));
      const layer = await GdnLayer.random(config, { seed: 3 });
      await expect(layer.forward(await Tensor.zeros([1, 3, 5], { device: 'cpu' }))).rejects.toMatchObject({ argument: 'x' });
      layer.dispose();
    });
  });
});

describe.each(testDevices())('GDN layer on %s: bf16 against the CPU in f32', (device) => {
  test.each([
    { name: 'identity, conv, ragged varlen', config: { hidden: 96, heads: 2, headDim: 64, conv: true } as GdnLayerConfig, T: 150, offsets: [0, 70, 71, 140] },
    { name: 'SiLU, no conv, two rows', config: { hidden: 64, heads: 2, headDim: 64, act: 'silu' } as GdnLayerConfig, T: 40, B: 2 },
  ])('$name', async ({ config, T, offsets, B = 1 }) => {
    await scope(async () => {
      const pHost = hostParams(config, 300, 0.1);
      // Round every input to bf16 once, so both sides start from the same values.
      const bf = await upload(pHost, device, 'bf16');
      const rounded = new Map<string, { shape: number[]; data: Float64Array }>();
      for (const [name, t] of bf) rounded.set(name, { shape: t.shape, data: await host(t) });
      const ref = new GdnLayer(config, await upload(rounded, 'cpu', 'f32'));
      const dut = new GdnLayer(config, bf);
      const shape = [B, T, config.hidden];
      const x = await Tensor.fromArray(randn(B * T * config.hidden, 9), shape, { device, dtype: 'bf16' });
      const dy = await Tensor.fromArray(randn(B * T * config.hidden, 10), shape, { device, dtype: 'bf16' });
      const cu = offsets ? Int32Array.from(offsets) : undefined;
      const run = async (layer: GdnLayer, dev: string, xIn: Tensor, dyIn: Tensor) => {
        const grads = await layer.createGradients();
        const { y, saved } = await layer.forward(xIn, { cuSeqlens: cu && (await Tensor.fromArray(cu, [cu.length], { device: dev })) });
        const dx = await layer.backward(saved, dyIn, grads);
        return { y: await host(y), dx: await host(dx), grads };
      };
      const toF32 = async (t: Tensor) => Tensor.fromArray(await t.toFloat32(), t.shape, { device: 'cpu' });
      const got = await run(dut, device, x, dy);
      const want = await run(ref, 'cpu', await toF32(x), await toF32(dy));
      expect(relError(got.y, want.y)).toBeLessThan(2e-2);
      expect(relError(got.dx, want.dx)).toBeLessThan(3e-2);
      for (const name of pHost.keys()) {
        const err = relError(await host(got.grads.get(name)!), await host(want.grads.get(name)!));
        if (!(err < 5e-2)) throw new Error(`${name}: relative error ${err}`);
      }
    });
  }, 120_000);
});

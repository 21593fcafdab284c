/**
 * The Taylor attention-moment reduction (DESIGN §5.1 Pass 1): the streaming (online-softmax) path against
 * the materialising oracle ≤ 1e-10 in f64, hand-checkable cases (a single token; uniform attention when
 * q = 0), key/value/input moments against direct sums, batch splitting, and typed argument errors. On CUDA:
 * both tensor-core passes (online softmax; exact probabilities from the forward's lse) against the oracle.
 */
import * as path from 'path';
import { Tensor, scope } from '../lib/tensor';
import { rope } from '../lib/ops/layers';
import { attentionForward } from '../lib/ops/attention';
import { Teacher, type LayerActivations } from '../lib/model/teacher';
import { taylorStatsMeta } from '../lib/calibrate/statistics';
import {
  createMomentAccumulators,
  disposeMomentAccumulators,
  momentBins,
  readMomentAccumulators,
  scanDecays,
  taylorMoments,
  type MomentAccumulators,
  type TaylorMomentsOptions,
} from '../lib/ops/moments';
import { cudaEnabled, randn, relError, rng, roundBf16, withKernelSwitch } from './helpers';

type Stats = Partial<Record<keyof MomentAccumulators, Float64Array>>;

function invFreqOf(D: number, base = 10000): Float64Array {
  return Float64Array.from({ length: D / 2 }, (_, j) => 1 / Math.pow(base, (2 * j) / D));
}

interface Case {
  q: Float32Array;
  k: Float32Array;
  v: Float32Array;
  x?: Float32Array;
  shape: { B: number; T: number; H: number; HKV: number; D: number; Dx?: number };
  cu?: Int32Array;
  include?: Int32Array;
  decays?: Float64Array;
  invFreq?: Float64Array;
  /** The teacher's context [B,T,H,D] handed to the op (else the op forms it). */
  context?: Float32Array;
  /** The attention's lse [B,H,T] handed to the op. */
  lse?: Float32Array;
}

async function run(
  c: Case,
  algorithm: 'stream' | 'materialize',
  extra: TaylorMomentsOptions = {},
  device = 'cpu',
  dtype: 'f32' | 'bf16' | 'f16' = 'f32',
): Promise<Stats> {
  return scope(async () => {
    const { B, T, H, HKV, D, Dx } = c.shape;
    const decays = c.decays ?? scanDecays(6);
    const inv = c.invFreq ?? invFreqOf(D);
    const acc = await createMomentAccumulators({ heads: H, kvHeads: HKV, headDim: D, decays: decays.length, inputDim: Dx }, device);
    const dev = { device };
    const input = { device, dtype };
    await taylorMoments(
      await Tensor.fromArray(c.q, [B, T, H, D], input),
      await Tensor.fromArray(c.k, [B, T, HKV, D], input),
      await Tensor.fromArray(c.v, [B, T, HKV, D], input),
      await Tensor.fromArray(inv, [D / 2], dev),
      await Tensor.fromArray(decays, [decays.length], dev),
      acc,
      {
        algorithm,
        cuSeqlens: c.cu ? await Tensor.fromArray(c.cu, [c.cu.length], dev) : undefined,
        include: c.include ? await Tensor.fromArray(c.include, [c.include.length], dev) : undefined,
        x: c.x ? await Tensor.fromArray(c.x, [B, T, Dx!], dev) : undefined,
        context: c.context ? await Tensor.fromArray(c.context, [B, T, H, D], dev) : undefined,
        lse: c.lse ? await Tensor.fromArray(c.lse, [B, H, T], dev) : undefined,
        ...extra,
      },
    );
    const out = await readMomentAccumulators(acc);
    disposeMomentAccumulators(acc);
    return out;
  });
}

function expectClose(a: Stats, b: Stats, tol: number): void {
  for (const key of Object.keys(b) as (keyof MomentAccumulators)[]) {
    const err = relError(a[key]!, b[key]!);
    if (!(err <= tol)) throw new Error(`${key}: relative error ${err} > ${tol}`);
  }
}

/**
 * The attention's row log-sum-exp [B,H,T] of the case's (scale D^-1/2) scores in f64, per sequence, as
 * attentionForward defines it (−inf on tokens of no sequence); `offset` adds a per-row constant.
 */
function lseOf(c: Case, offset?: (i: number) => number): Float32Array {
  const { B, T, H, HKV, D } = c.shape;
  const out = new Float32Array(B * H * T).fill(-Infinity);
  const scale = 1 / Math.sqrt(D);
  const cu = c.cu ?? Int32Array.from({ length: B + 1 }, (_, i) => i * T);
  const flat = (b: number, t: number) => b * T + t;
  for (let n = 0; n + 1 < cu.length; n++) {
    const s0 = cu[n];
    const s1 = cu[n + 1];
    const b = c.cu ? 0 : n;
    const base = c.cu ? 0 : -b * T;  // row-local positions without varlen
    for (let t = s0; t < s1; t++)
      for (let h = 0; h < H; h++) {
        const hk = Math.floor(h / (H / HKV));
        const sc: number[] = [];
        for (let u = s0; u <= t; u++) {
          let dot = 0;
          for (let i = 0; i < D; i++) dot += c.q[(flat(b, t + base) * H + h) * D + i] * c.k[(flat(b, u + base) * HKV + hk) * D + i];
          sc.push(dot * scale);
        }
        const m = Math.max(...sc);
        const i = (b * H + h) * T + (t + base);
        out[i] = m + Math.log(sc.reduce((a, x) => a + Math.exp(x - m), 0)) + (offset ? offset(i) : 0);
      }
  }
  return out;
}

// Runs body with the case's context as a 16-bit device tensor and TCAL_MOMENTS_SCAN=mode, or unset for the default
// (restored afterwards).
async function withScanMode<R>(mode: string | undefined, c: Case, dtype: 'bf16' | 'f16', body: (extra: TaylorMomentsOptions) => Promise<R>): Promise<R> {
  const { B, T, H, D } = c.shape;
  const ctx = await Tensor.fromArray(c.context!, [B, T, H, D], { device: 'cuda:0', dtype });
  try {
    return await withKernelSwitch('TCAL_MOMENTS_SCAN', mode, () => body({ context: ctx }));
  } finally {
    ctx.dispose();
  }
}

// Sequences lo … hi−1 of a packed case (cu its offsets) as a case of their own: the batch-split invariance tests.
function splitSequences(c: Case, cu: number[], lo: number, hi: number): Case {
  if (c.lse) throw new Error('splitSequences: a case with lse is not split here');
  const { H, HKV, D, Dx } = c.shape;
  const a = cu[lo];
  const b = cu[hi];
  return {
    ...c,
    q: c.q.slice(a * H * D, b * H * D),
    k: c.k.slice(a * HKV * D, b * HKV * D),
    v: c.v.slice(a * HKV * D, b * HKV * D),
    x: c.x?.slice(a * Dx!, b * Dx!),
    context: c.context?.slice(a * H * D, b * H * D),
    include: c.include?.slice(lo, hi),
    shape: { ...c.shape, T: b - a },
    cu: Int32Array.from(cu.slice(lo, hi + 1), (x) => x - a),
  };
}

function randomCase(seed: number, opts: { T: number; cu?: number[]; include?: number[]; H?: number; HKV?: number; D?: number; Dx?: number; qStd?: number }): Case {
  const H = opts.H ?? 4;
  const HKV = opts.HKV ?? 2;
  const D = opts.D ?? 16;
  const T = opts.T;
  const Dx = opts.Dx;
  return {
    q: randn(T * H * D, seed, opts.qStd ?? 1.5),
    k: randn(T * HKV * D, seed + 1, 1),
    v: randn(T * HKV * D, seed + 2, 1),
    x: Dx ? randn(T * Dx, seed + 3, 1) : undefined,
    shape: { B: 1, T, H, HKV, D, Dx },
    cu: opts.cu ? Int32Array.from(opts.cu) : undefined,
    include: opts.include ? Int32Array.from(opts.include) : undefined,
  };
}

describe('taylorMoments on the CPU', () => {
  test('streaming path equals the materialising oracle (ragged varlen, GQA, a padding segment, a tail)', async () => {
    // Sequences of 1, 70 (crosses key and query blocks), 3, 97, an excluded one of 20, then 9 tail tokens.
    const cu = [0, 1, 71, 74, 171, 191];
    const c = randomCase(11, { T: 200, cu, include: [1, 1, 1, 1, 0], Dx: 24 });
    const oracle = await run(c, 'materialize');
    const stream = await run(c, 'stream');
    expectClose(stream, oracle, 1e-10);
    expect(oracle.count![0]).toBe(171);
    // Sharper attention (larger scores) too.
    const sharp = randomCase(12, { T: 80, qStd: 6, H: 2, HKV: 1, D: 32 });
    expectClose(await run(sharp, 'stream'), await run(sharp, 'materialize'), 1e-10);
  });

  test('a single-token sequence: Δ = 0, entropy 0, φ = 1, all mass on the sink, o = v', async () => {
    const D = 8;
    const H = 2;
    const c = randomCase(5, { T: 1, H, HKV: 1, D });
    const decays = Float64Array.from([1, 0.5]);
    for (const alg of ['stream', 'materialize'] as const) {
      const s = await run({ ...c, decays }, alg);
      expect(s.count![0]).toBe(1);
      for (let h = 0; h < H; h++) {
        expect(Array.from(s.attention!.subarray(h * 5, h * 5 + 5))).toEqual([0, 0, 0, 1, 1]);
        const hist = s.histogram!.subarray(h * momentBins(), (h + 1) * momentBins());
        expect(hist[0]).toBe(1);
        expect(hist.slice(1).every((x) => x === 0)).toBe(true);
        for (let j = 0; j < D / 2; j++) {
          expect(s.phi![h * D + 2 * j]).toBeCloseTo(1, 14);
          expect(s.phi![h * D + 2 * j + 1]).toBeCloseTo(0, 14);
        }
        // y = v for every decay; ŷ = v / rms(v).
        const v = Array.from(c.v.subarray(0, D));
        const rms = Math.sqrt(v.reduce((a, x) => a + x * x, 0) / D + 1e-6);
        for (let k = 0; k < 2; k++) {
          for (let ch = 0; ch < D; ch++) {
            expect(s.contextSum![h * D + ch]).toBeCloseTo(v[ch], 6);
            expect(s.scanCross![(h * 2 + k) * D + ch]).toBeCloseTo((v[ch] / rms) * v[ch], 5);
            expect(s.scanSq![(h * 2 + k) * D + ch]).toBeCloseTo((v[ch] / rms) ** 2, 5);
          }
        }
      }
    }
  });

  test('q = 0 gives uniform attention: E[Δ] = (n−1)/2, entropy ln n, φ the mean of e^{iθΔ}', async () => {
    const D = 8;
    const lens = [5, 40];
    const cu = [0, 5, 45];
    const T = 45;
    const c = randomCase(7, { T, cu, H: 2, HKV: 1, D });
    c.q.fill(0);
    const inv = invFreqOf(D, 100);
    const want = { dist: 0, dist2: 0, ent: 0, sink: 0, local: 0, hist: new Float64Array(momentBins()), phi: new Float64Array(D) };
    for (const len of lens) {
      for (let t = 0; t < len; t++) {
        const n = t + 1;
        want.dist += (n - 1) / 2;
        want.dist2 += (t * (2 * t + 1)) / 6;
        want.ent += Math.log(n);
        want.sink += 1 / n;
        want.local += Math.min(n, 16) / n;
        for (let delta = 0; delta <= t; delta++) {
          const bin = delta === 0 ? 0 : Math.min(Math.floor(Math.log2(delta)) + 1, momentBins() - 1);
          want.hist[bin] += 1 / n;
          for (let j = 0; j < D / 2; j++) {
            want.phi[2 * j] += Math.cos(inv[j] * delta) / n;
            want.phi[2 * j + 1] += Math.sin(inv[j] * delta) / n;
          }
        }
      }
    }
    for (const alg of ['stream', 'materialize'] as const) {
      const s = await run({ ...c, invFreq: inv }, alg);
      for (let h = 0; h < 2; h++) {
        const a = s.attention!.subarray(h * 5, h * 5 + 5);
        expect(relError(a, [want.dist, want.dist2, want.ent, want.sink, want.local])).toBeLessThan(1e-13);
        expect(relError(s.histogram!.subarray(h * momentBins(), (h + 1) * momentBins()), want.hist)).toBeLessThan(1e-13);
        expect(relError(s.phi!.subarray(h * D, (h + 1) * D), want.phi)).toBeLessThan(1e-12);
      }
    }
  });

  test('key (pre-RoPE), value and input moments equal direct sums; the context is softmax attention', async () => {
    const T = 37;
    const H = 2;
    const HKV = 1;
    const D = 16;
    const Dx = 12;
    const cu = Int32Array.from([0, 20, 37]);
    const inv = invFreqOf(D);
    const kPre = randn(T * HKV * D, 21, 1);
    const c = randomCase(20, { T, H, HKV, D, Dx });
    const positions = Int32Array.from({ length: T }, (_, i) => (i < 20 ? i : i - 20));
    await scope(async () => {
      const dev = { device: 'cpu' };
      const k = await rope(
        await Tensor.fromArray(kPre, [1, T, HKV, D], dev),
        await Tensor.fromArray(positions, [1, T], dev),
        await Tensor.fromArray(Float32Array.from(inv), [D / 2], dev),
      );
      c.k = (await k.toArray()) as Float32Array;
    });
    c.cu = cu;
    const s = await run({ ...c, invFreq: inv }, 'stream');
    // Reference context: softmax(q·k / √D) v within each sequence.
    const ref = new Float64Array(T * H * D);
    for (let t = 0; t < T; t++) {
      const start = t < 20 ? 0 : 20;
      for (let h = 0; h < H; h++) {
        const scores: number[] = [];
        for (let u = start; u <= t; u++) {
          let dot = 0;
          for (let i = 0; i < D; i++) dot += c.q[(t * H + h) * D + i] * c.k[u * D + i];
          scores.push(dot / Math.sqrt(D));
        }
        const m = Math.max(...scores);
        const w = scores.map((x) => Math.exp(x - m));
        const l = w.reduce((a, b) => a + b, 0);
        for (let u = start; u <= t; u++)
          for (let i = 0; i < D; i++) ref[(t * H + h) * D + i] += (w[u - start] / l) * c.v[u * D + i];
      }
    }

    const sum = (rows: number, width: number, get: (t: number, i: number) => number) => {
      const s1 = new Float64Array(width);
      const s2 = new Float64Array(width * width);
      for (let t = 0; t < rows; t++)
        for (let i = 0; i < width; i++) {
          s1[i] += get(t, i);
          for (let j = 0; j < width; j++) s2[i * width + j] += get(t, i) * get(t, j);
        }
      return [s1, s2];
    };
    const [kS, kO] = sum(T, D, (t, i) => kPre[t * D + i]);
    expect(relError(s.keySum!, kS)).toBeLessThan(1e-5);
    expect(relError(s.keyOuter!, kO)).toBeLessThan(1e-5);
    const [vS, vO] = sum(T, D, (t, i) => c.v[t * D + i]);
    expect(relError(s.valueSum!, vS)).toBeLessThan(1e-14);
    expect(relError(s.valueOuter!, vO)).toBeLessThan(1e-14);
    const [xS, xO] = sum(T, Dx, (t, i) => c.x![t * Dx + i]);
    expect(relError(s.inputSum!, xS)).toBeLessThan(1e-14);
    expect(relError(s.inputOuter!, xO)).toBeLessThan(1e-14);
    // Σo, Σo² of the context the op formed; handing it that context (f32-rounded) changes nothing but the rounding.
    const oS = new Float64Array(H * D);
    const oQ = new Float64Array(H * D);
    for (let t = 0; t < T; t++)
      for (let i = 0; i < H * D; i++) {
        oS[i] += ref[t * H * D + i];
        oQ[i] += ref[t * H * D + i] ** 2;
      }
    expect(relError(s.contextSum!, oS)).toBeLessThan(1e-12);
    expect(relError(s.contextSq!, oQ)).toBeLessThan(1e-12);
    const given = await run({ ...c, invFreq: inv, context: Float32Array.from(ref) }, 'stream');
    for (const key of ['contextSum', 'contextSq', 'scanCross'] as const) expect(relError(given[key]!, s[key]!)).toBeLessThan(1e-6);
    for (const key of ['attention', 'histogram', 'phi', 'scanSq', 'keyOuter'] as const) expect(given[key]).toEqual(s[key]);
  });

  test('sequences streamed in two calls add up to one call over all of them, for both algorithms', async () => {
    const cu = [0, 30, 31, 80, 100];
    const c = randomCase(31, { T: 100, cu, Dx: 8 });
    const split = (lo: number, hi: number): Case => splitSequences(c, cu, lo, hi);
    for (const alg of ['stream', 'materialize'] as const) {
      const whole = await run(c, alg);
      const p1 = await run(split(0, 2), alg);
      const p2 = await run(split(2, 4), alg);
      const merged: Stats = {};
      for (const key of Object.keys(whole) as (keyof MomentAccumulators)[]) {
        merged[key] = Float64Array.from(p1[key]!, (x, i) => x + p2[key]![i]);
      }
      expectClose(merged, whole, 1e-14);
    }
  });

  test('typed errors name the argument', async () => {
    await scope(async () => {
      const dev = { device: 'cpu' };
      const q = await Tensor.zeros([1, 4, 3, 8], dev);
      const k = await Tensor.zeros([1, 4, 2, 8], dev);
      const inv = await Tensor.fromArray(invFreqOf(8), [4], dev);
      const dec = await Tensor.fromArray(scanDecays(3), [3], dev);
      const acc = await createMomentAccumulators({ heads: 4, kvHeads: 2, headDim: 8, decays: 3 }, 'cpu');
      await expect(taylorMoments(q, k, k, inv, dec, acc)).rejects.toMatchObject({ name: 'InvalidArgumentError', argument: 'k' });
      const q4 = await Tensor.zeros([1, 4, 4, 8], dev);
      const bad = { ...acc, phi: await Tensor.zeros([4, 4], { dtype: 'f64', ...dev }) };
      await expect(taylorMoments(q4, k, k, inv, dec, bad)).rejects.toMatchObject({ argument: 'acc.phi' });
      await expect(taylorMoments(q4, k, k, dec, dec, acc)).rejects.toMatchObject({ argument: 'invFreq' });
      const badDecay = await Tensor.fromArray(Float64Array.from([0.5, 1.5, 0.1]), [3], dev);
      await expect(taylorMoments(q4, k, k, inv, badDecay, acc)).rejects.toMatchObject({ argument: 'decays' });
      const cu = await Tensor.fromArray(Int32Array.from([0, 3, 2]), [3], dev);
      await expect(taylorMoments(q4, k, k, inv, dec, acc, { cuSeqlens: cu })).rejects.toMatchObject({ argument: 'cuSeqlens' });
      // lse: attentionForward's f32 [B, H, T].
      const lseBad = await Tensor.zeros([1, 4, 4, 1], dev);
      await expect(taylorMoments(q4, k, k, inv, dec, acc, { lse: lseBad })).rejects.toMatchObject({ name: 'InvalidArgumentError', argument: 'lse' });
      const lseT = await Tensor.zeros([1, 4, 3], dev);  // [B, T, H]-ordered by mistake
      await expect(taylorMoments(q4, k, k, inv, dec, acc, { lse: lseT })).rejects.toMatchObject({ argument: 'lse' });
      const lse64 = await Tensor.zeros([1, 4, 4], { dtype: 'f64', ...dev });
      await expect(taylorMoments(q4, k, k, inv, dec, acc, { lse: lse64 })).rejects.toMatchObject({ argument: 'lse' });
      await taylorMoments(q4, k, k, inv, dec, acc, { lse: await Tensor.zeros([1, 4, 4], dev) });
      await taylorMoments(q4, k, k, inv, dec, acc);
      disposeMomentAccumulators(acc);
    });
  });
});

/** Local heads: the first query head of each KV head attends mostly to Δ = 1 (k_s ∝ q_{s+1}), so E[Δ], E[Δ²] are
 *  ~1 and the histogram sits in bins 0–2: exact-Δ sums and bin tails near the diagonal carry the statistics. */
function localCase(seed: number, opts: { T: number; cu?: number[]; H: number; HKV: number; D: number }): Case {
  const c = randomCase(seed, opts);
  const { T, H, HKV, D } = c.shape;
  const group = H / HKV;
  for (let s = 0; s + 1 < T; s++)
    for (let hk = 0; hk < HKV; hk++)
      for (let i = 0; i < D; i++) c.k[(s * HKV + hk) * D + i] = 0.6 * c.q[((s + 1) * H + hk * group) * D + i] + 0.3 * c.k[(s * HKV + hk) * D + i];
  return c;
}

(cudaEnabled() ? describe : describe.skip)('taylorMoments on CUDA against the CPU oracle', () => {
  const cases: [string, () => Case][] = [
    ['ragged varlen, GQA, padding, tail (D 16)', () => randomCase(11, { T: 200, cu: [0, 1, 71, 74, 171, 191], include: [1, 1, 1, 1, 0], Dx: 24 })],
    ['sharp attention (D 32)', () => randomCase(12, { T: 80, qStd: 6, H: 2, HKV: 1, D: 32 })],
    ['many tiles (D 64, T 300)', () => randomCase(13, { T: 300, H: 4, HKV: 1, D: 64, Dx: 40 })],
    ['D 128', () => randomCase(14, { T: 100, cu: [0, 37, 100], H: 4, HKV: 2, D: 128 })],
    ['D 256', () => randomCase(15, { T: 40, H: 2, HKV: 1, D: 256 })],
    // Several 128-row query tiles and 64-key tiles, lengths off both, a 1-token sequence, GQA 4:1.
    ['long ragged (D 64, T 700)', () => randomCase(17, { T: 700, cu: [0, 300, 301, 650, 700], include: [1, 1, 1, 0], H: 8, HKV: 2, D: 64, Dx: 16 })],
    ['long, sharp (D 128, T 520)', () => randomCase(18, { T: 520, cu: [0, 389, 520], qStd: 4, H: 4, HKV: 1, D: 128 })],
    ['local heads, Δ = 1 dominant (D 128, T 1100, bin edges up to 1024)', () => localCase(21, { T: 1100, cu: [0, 1090, 1100], H: 4, HKV: 2, D: 128 })],
  ];
  const withContext = (c: Case, seed: number): Case => {
    const { T, H, D } = c.shape;
    return { ...c, context: randn(T * H * D, seed, 0.5) };
  };
  const rounded = (c: Case): Case => {
    const r = (a: Float32Array) => a.map(roundBf16);
    return { ...c, q: r(c.q), k: r(c.k), v: r(c.v) };
  };

  test.each(cases)('f32, the CUDA-core pass forming o: %s', async (_name, make) => {
    const c = make();
    expectClose(await run(c, 'stream', {}, 'cuda:0'), await run(c, 'materialize'), 1e-4);
  });

  test.each(cases)('bf16 with the context, the tensor-core pass: %s', async (_name, make) => {
    // The oracle sees the same bf16-rounded q, k, v and the same context.
    const c = withContext(make(), 99);
    expectClose(await run(c, 'stream', {}, 'cuda:0', 'bf16'), await run(rounded(c), 'materialize'), 1e-4);
  });

  test.each(cases)('bf16 with the context and lse (exact probabilities): %s', async (_name, make) => {
    const c = rounded(withContext(make(), 96));
    const exact = { ...c, lse: lseOf(c) };
    expectClose(await run(exact, 'stream', {}, 'cuda:0', 'bf16'), await run(c, 'materialize'), 1e-4);
  });

  test('an lse off by a per-row constant changes nothing (each row is normalised by its own sum); repeats are bit-identical', async () => {
    const c = rounded(withContext(randomCase(21, { T: 700, cu: [0, 300, 301, 650, 700], include: [1, 1, 1, 0], H: 8, HKV: 2, D: 64, Dx: 16 }), 95));
    const r = rng(5);
    const shifted = { ...c, lse: lseOf(c, () => 4 * r() - 2) };
    const oracle = await run(c, 'materialize');
    const got = await run(shifted, 'stream', {}, 'cuda:0', 'bf16');
    expectClose(got, oracle, 1e-4);
    expect(await run(shifted, 'stream', {}, 'cuda:0', 'bf16')).toEqual(got);
  });

  test.each([
    ['D 128, ragged varlen, GQA 2:1, a 1-token sequence', 128, 17, { T: 600, cu: [0, 1, 250, 251, 600], H: 4, HKV: 2, D: 128 }],
    ['D 64, sharp, GQA 4:1, lengths off the tiles', 64, 23, { T: 333, cu: [0, 129, 333], qStd: 5, H: 8, HKV: 2, D: 64 }],
  ] as const)('context and lse from attentionForward on CUDA (the path collectTaylorStats takes): %s', async (_name, _D, seed, o) => {
    const c = rounded(randomCase(seed, { ...o, cu: [...o.cu] }));
    const { T, H, HKV, D } = c.shape;
    const fwd = await scope(async () => {
      const input = { device: 'cuda:0', dtype: 'bf16' as const };
      const r = await attentionForward(
        await Tensor.fromArray(c.q, [1, T, H, D], input),
        await Tensor.fromArray(c.k, [1, T, HKV, D], input),
        await Tensor.fromArray(c.v, [1, T, HKV, D], input),
        { cuSeqlens: await Tensor.fromArray(c.cu!, [c.cu!.length], { device: 'cuda:0' }), returnLse: true },
      );
      return { o: await r.o.toFloat32(), lse: (await r.lse.toArray()) as Float32Array };
    });
    const withFwd = { ...c, context: fwd.o };
    expectClose(await run({ ...withFwd, lse: fwd.lse }, 'stream', {}, 'cuda:0', 'bf16'), await run(withFwd, 'materialize'), 1e-4);
  });

  test("the fixture teacher's activations with its own context and lse (bf16 q, k, v)", async () => {
    const teacher = await Teacher.load(path.join(__dirname, 'fixtures', 'hf', 'llama-gqa-llama3-sharded'), { device: 'cpu', dtype: 'f32' });
    try {
      const cfg = teacher.config;
      const lens = [5, 1, 24, 133, 70];
      const N = lens.reduce((a, b) => a + b, 0);
      const cu = Int32Array.from([0, ...lens.map((_, i) => lens.slice(0, i + 1).reduce((a, b) => a + b, 0))]);
      const r = rng(8);
      const ids = Int32Array.from({ length: N }, () => Math.floor(r() * cfg.vocabSize));
      const layers: Case[] = [];
      await teacher.hidden(ids, [1, N], {
        cuSeqlens: cu,
        onLayer: async (a: LayerActivations) => {
          const shape = { B: 1, T: N, H: cfg.numHeads, HKV: cfg.numKvHeads, D: cfg.headDim };
          const r16 = (x: Float32Array) => x.map(roundBf16);
          layers.push({
            q: r16(await a.q.toFloat32()),
            k: r16(await a.k.toFloat32()),
            v: r16(await a.v.toFloat32()),
            context: await a.context.toFloat32(),
            lse: (await a.lse.toArray()) as Float32Array,  // the f32 forward's: off the bf16 scores by a little
            shape,
            cu,
            invFreq: Float64Array.from(taylorStatsMeta(cfg, scanDecays(6)).invFreq),
          });
        },
      });
      expect(layers.length).toBe(cfg.numLayers);
      for (const c of layers) expectClose(await run(c, 'stream', {}, 'cuda:0', 'bf16'), await run(c, 'materialize'), 1e-4);
    } finally {
      teacher.dispose();
    }
  });

  test('f16 inputs with the context; bf16 without it (the CUDA-core pass)', async () => {
    const c = withContext(randomCase(16, { T: 150, cu: [0, 90, 150], H: 4, HKV: 2, D: 128, Dx: 32 }), 98);
    const roundF16 = (a: Float32Array): Float32Array => {
      const h = new Float32Array(a.length);
      for (let i = 0; i < a.length; i++) {
        // Round to the nearest f16 (11-bit significand; the values here are normal f16 numbers).
        const x = a[i];
        if (x === 0) continue;
        const e = Math.floor(Math.log2(Math.abs(x)));
        const ulp = Math.pow(2, e - 10);
        h[i] = Math.round(x / ulp) * ulp;
      }
      return h;
    };
    const f16: Case = { ...c, q: roundF16(c.q), k: roundF16(c.k), v: roundF16(c.v) };
    expectClose(await run(c, 'stream', {}, 'cuda:0', 'f16'), await run(f16, 'materialize'), 1e-4);
    const noCtx: Case = { ...c, context: undefined };
    expectClose(await run(noCtx, 'stream', {}, 'cuda:0', 'bf16'), await run(rounded(noCtx), 'materialize'), 1e-4);
  });

  test('batch-split invariance on the tensor-core pass: two calls add up to one', async () => {
    const cu = [0, 130, 131, 400, 520];
    const c = withContext(randomCase(19, { T: 520, cu, H: 4, HKV: 2, D: 64, Dx: 8 }), 97);
    const { H, HKV, D, Dx } = c.shape;
    const split = (lo: number, hi: number): Case => splitSequences(c, cu, lo, hi);
    const whole = await run(c, 'stream', {}, 'cuda:0', 'bf16');
    const p1 = await run(split(0, 2), 'stream', {}, 'cuda:0', 'bf16');
    const p2 = await run(split(2, 4), 'stream', {}, 'cuda:0', 'bf16');
    const merged: Stats = {};
    for (const key of Object.keys(whole) as (keyof MomentAccumulators)[]) merged[key] = Float64Array.from(p1[key]!, (x, i) => x + p2[key]![i]);
    expectClose(merged, whole, 1e-6);
    // And deterministic: the same call twice gives the same bits.
    expect(await run(c, 'stream', {}, 'cuda:0', 'bf16')).toEqual(whole);
  });
});

(cudaEnabled() ? describe : describe.skip)('γ₀ scan on CUDA (native/cuda/moments_scan.cu) against the CPU oracle', () => {
  // bf16-rounded q, k, v (what the device sees) and a random context, as the tensor-core path takes them. The
  // context is bf16-rounded too, so handing it over in f32 (the CUDA-core apply) or in bf16 with
  // TCAL_MOMENTS_SCAN=tc (the tensor-core apply, scanApplyTC: 16-bit v and context of one type) gives the op the
  // same values and one oracle serves both.
  // (Values under 1e-4 are flushed to 0 so that every value is exact in f16 as well: the f16 case reuses them.)
  const bf16Case = (c: Case, seed: number): Case => {
    const { T, H, D } = c.shape;
    const r = (a: Float32Array) => a.map((x) => (Math.abs(x) < 1e-4 ? 0 : roundBf16(x)));
    return { ...c, q: r(c.q), k: r(c.k), v: r(c.v), context: r(randn(T * H * D, seed, 0.5)) };
  };
  // The case's context as a 16-bit tensor on the device, with the tensor-core apply chosen (TCAL_MOMENTS_SCAN=tc).
  const withBf16Context = (c: Case, body: (extra: TaylorMomentsOptions) => Promise<void>, dtype: 'bf16' | 'f16' = 'bf16'): Promise<void> =>
    withScanMode('tc', c, dtype, body);

  test('spans of several chunks (the bench mapping: 8 KV heads, 4 heads each, D 128, K0 48): restarts from the carried state inside a CTA, a sequence start and a padding segment mid-span; both applies', async () => {
    // One 12-warp CTA per SM and 8 KV heads give 16 spans on a 132-SM H200: 1150 included entries in chunks of
    // 64 (18 chunks) put two chunks in a span (CUDA-core apply) and 4 chunks in a segment group (tensor-core
    // apply: 5 groups, the last one short). The oracle is the CPU streaming path (≤ 1e-10 of the materialising one).
    const c: Case = {
      ...bf16Case(randomCase(41, { T: 1600, cu: [0, 100, 101, 700, 1150, 1600], include: [1, 1, 1, 0, 1], H: 32, HKV: 8, D: 128 }), 94),
      decays: scanDecays(48),
    };
    const oracle = await run(c, 'stream');
    const got = await run(c, 'stream', {}, 'cuda:0', 'bf16');
    expectClose(got, oracle, 1e-4);
    expect(await run(c, 'stream', {}, 'cuda:0', 'bf16')).toEqual(got);
    await withBf16Context(c, async (extra) => {
      const tc = await run(c, 'stream', extra, 'cuda:0', 'bf16');
      expectClose(tc, oracle, 1e-4);
      expect(await run(c, 'stream', extra, 'cuda:0', 'bf16')).toEqual(tc);
    });
  });

  test('tensor-core apply: batch-split invariance (two calls add up to one, ≤ 1e-6) over several segment groups', async () => {
    const cu = [0, 130, 131, 400, 600];
    const c: Case = { ...bf16Case(randomCase(43, { T: 600, cu, H: 8, HKV: 2, D: 128 }), 95), decays: scanDecays(48) };
    const { H, HKV, D } = c.shape;
    const split = (lo: number, hi: number): Case => splitSequences(c, cu, lo, hi);
    const go = async (x: Case): Promise<Stats> => {
      let out: Stats = {};
      await withBf16Context(x, async (extra) => {
        out = await run(x, 'stream', extra, 'cuda:0', 'bf16');
      });
      return out;
    };
    const whole = await go(c);
    const p1 = await go(split(0, 2));
    const p2 = await go(split(2, 4));
    const merged: Stats = {};
    for (const key of Object.keys(whole) as (keyof MomentAccumulators)[]) merged[key] = Float64Array.from(p1[key]!, (x, i) => x + p2[key]![i]);
    expectClose(merged, whole, 1e-6);
    expectClose(whole, await run(c, 'materialize'), 1e-4);
  });

  test('K0 = 1, 13 and 60 decays (partly filled warps and m-tiles, two decay groups); D 128, 256, 48 and 18; f16', async () => {
    for (const [K0, D] of [[1, 128], [13, 128], [60, 128], [13, 256], [60, 48]]) {
      const c: Case = { ...bf16Case(randomCase(50 + K0 + D, { T: 150, cu: [0, 90, 150], H: 8, HKV: 2, D }), 93), decays: scanDecays(K0) };
      const oracle = await run(c, 'materialize');
      expectClose(await run(c, 'stream', {}, 'cuda:0', 'bf16'), oracle, 1e-4);
      await withBf16Context(c, async (extra) => expectClose(await run(c, 'stream', extra, 'cuda:0', 'bf16'), oracle, 1e-4));
    }
    // f16 v and context (the same values, exact in f16): the tensor-core apply's f16 conversions.
    const h: Case = { ...bf16Case(randomCase(77, { T: 150, cu: [0, 90, 150], H: 8, HKV: 2, D: 64 }), 92), decays: scanDecays(13) };
    await withBf16Context(h, async (extra) => expectClose(await run(h, 'stream', extra, 'cuda:0', 'f16'), await run(h, 'materialize'), 1e-4), 'f16');
    // f32, no context: f32 staging rows (shorter stages at D 256), and D 18 (not a multiple of 4: 2-wide conversion).
    for (const D of [256, 18]) {
      const c: Case = { ...randomCase(60 + D, { T: 130, cu: [0, 7, 130], H: 4, HKV: 1, D }), decays: scanDecays(13) };
      expectClose(await run(c, 'stream', {}, 'cuda:0'), await run(c, 'materialize'), 1e-4);
    }
  });
});

/**
 * The statistics pass at D = 128 on the edges that depend on the wgmma kernels' rows per CTA (mreview, session 6):
 * 64 rows for the default `wg1` and for `wg1k` (one K buffer), 128 for `wg2`, 2 × 64 for the mma.sync `mtail`. Query
 * tiles are per sequence, so the edges are sequence lengths against 16 (a warp's rows), 64 and 128: a last tile of
 * 1–15 rows (the CTA's other warps hold only rows past the end), exact multiples, lengths 1 and 2, many work items;
 * plus a head dim zero-padded to 128 (half = 50: the φ columns past it are 0) and batch rows without varlen (the lse
 * row of batch b). Each with the forward's lse and with the online softmax, bf16, with a context.
 */
(cudaEnabled() ? describe : describe.skip)('statistics pass at D = 128 on the tile edges of the wgmma kernels (CUDA)', () => {
  // Lengths on and off 16 / 64 / 128, 1-token sequences, an excluded one (64) and 5 tail tokens past the last.
  const lens = [1, 2, 15, 16, 17, 33, 63, 64, 65, 127, 128, 129, 1, 191, 192, 193, 64, 7, 96, 257];
  const manyCu = lens.reduce((cu, n) => [...cu, cu[cu.length - 1] + n], [0]);
  const many = (): Case =>
    randomCase(61, { T: manyCu[manyCu.length - 1] + 5, cu: manyCu, include: lens.map((_, i) => (i === 16 ? 0 : 1)), qStd: 2.5, H: 4, HKV: 1, D: 128 });
  const batchRows = (): Case => {
    const [B, T, H, HKV, D] = [3, 70, 4, 2, 128];
    return { q: randn(B * T * H * D, 62, 1.5), k: randn(B * T * HKV * D, 63, 1), v: randn(B * T * HKV * D, 64, 1), shape: { B, T, H, HKV, D } };
  };
  const cases: [string, () => Case][] = [
    ['many sequences, lengths 1–257 on and off 16 / 64 / 128, GQA 4:1, an excluded one, a tail', many],
    ['head dim 100 (zero-padded to 128)', () => randomCase(65, { T: 300, cu: [0, 129, 300], H: 4, HKV: 2, D: 100 })],
    ['batch rows without varlen (B 3, T 70)', batchRows],
    ['one token (T 1)', () => randomCase(66, { T: 1, H: 2, HKV: 1, D: 128 })],
  ];
  const prepared = (c: Case, seed: number): Case => {
    const { B, T, H, D } = c.shape;
    const r = (a: Float32Array) => a.map(roundBf16);
    return { ...c, q: r(c.q), k: r(c.k), v: r(c.v), context: randn(B * T * H * D, seed, 0.5) };
  };
  // Runs `body` with TCAL_MOMENTS_KERNEL = v ('' = the default kernel), restoring the variable after.
  const withKernel = <R>(v: string, body: () => Promise<R>): Promise<R> => withKernelSwitch('TCAL_MOMENTS_KERNEL', v || undefined, body);

  test.each(cases)('lse and online softmax against the oracle (the kernel TCAL_MOMENTS_KERNEL selects): %s', async (_name, make) => {
    const c = prepared(make(), 91);
    const oracle = await run(c, 'materialize');
    expectClose(await run({ ...c, lse: lseOf(c) }, 'stream', {}, 'cuda:0', 'bf16'), oracle, 1e-4);
    expectClose(await run(c, 'stream', {}, 'cuda:0', 'bf16'), oracle, 1e-4);
  });

  test('every D = 128 kernel on the many-sequence case: wg1 (default) and wg1k bit-identical, repeats too; wg2, mtail, edges within 1e-4 of the oracle', async () => {
    // wg1 and wg1k run the same arithmetic on the same 64-row CTAs (they differ in K buffering and barriers only),
    // so any difference between them, or between two wg1k runs, is a race on the single K buffer. Without sm_90a
    // code every variant but edges is mtail (the probe), and the comparisons still hold.
    const c = prepared(many(), 92);
    const oracle = await run(c, 'materialize');
    for (const withLse of [true, false]) {
      const x = withLse ? { ...c, lse: lseOf(c) } : c;
      const got: Record<string, Stats> = {};
      for (const v of ['', 'wg1k', 'wg2', 'mtail', 'edges']) {
        got[v] = await withKernel(v, () => run(x, 'stream', {}, 'cuda:0', 'bf16'));
        try {
          expectClose(got[v], oracle, 1e-4);
        } catch (e) {
          throw new Error(`TCAL_MOMENTS_KERNEL=${v || '(default)'}, ${withLse ? 'lse' : 'online'}: ${(e as Error).message}`);
        }
      }
      expect(got.wg1k).toEqual(got['']);
      expect(await withKernel('wg1k', () => run(x, 'stream', {}, 'cuda:0', 'bf16'))).toEqual(got.wg1k);
    }
  });
});

(cudaEnabled() ? describe : describe.skip)('γ₀ scan, rs from the norm recurrence (scanRmsNorm + the tensor-core apply: the default for 16-bit context, D 64 / 128)', () => {
  // bf16-rounded q, k, v and context (values under 1e-4 flushed to 0 so that they are exact in f16 too), as the
  // scan block above builds them; the context goes over in the 16-bit type of v, which the tensor-core apply needs.
  const norm16 = (c: Case, seed: number): Case => {
    const { T, H, D } = c.shape;
    const r = (a: Float32Array) => a.map((x) => (Math.abs(x) < 1e-4 ? 0 : roundBf16(x)));
    return { ...c, q: r(c.q), k: r(c.k), v: r(c.v), context: r(randn(T * H * D, seed, 0.5)) };
  };
  const withScan = (mode: 'norm' | 'tc' | 'v4' | undefined, c: Case, dtype: 'bf16' | 'f16' = 'bf16'): Promise<Stats> =>
    withScanMode(mode, c, dtype, (extra) => run(c, 'stream', extra, 'cuda:0', dtype));

  test('the bench mapping (8 KV heads × 4 heads, D 128, K0 48): against the oracle, beside the kRms pass, bit-identical repeats', async () => {
    // 1150 included entries in chunks of 64 (4 blocks of 16 each; the last chunk 62 entries: a partial block), a
    // sequence of length 1, a sequence start mid-chunk and mid-block, an excluded sequence.
    const c: Case = {
      ...norm16(randomCase(141, { T: 1600, cu: [0, 100, 101, 700, 1150, 1600], include: [1, 1, 1, 0, 1], H: 32, HKV: 8, D: 128 }), 194),
      decays: scanDecays(48),
    };
    const oracle = await run(c, 'stream');
    const got = await withScan('norm', c);
    expectClose(got, oracle, 1e-4);
    // The same apply with rs from the kRms pass (Σ y² of the fp32 state): rs agree to ~1e-6.
    expectClose(got, await withScan('tc', c), 1e-5);
    expect(await withScan('norm', c)).toEqual(got);
  });

  test('K0 1, 13, 48, 60 × D 128, 64; T not a multiple of 16; sequences of length 1; bf16 and f16', async () => {
    for (const [K0, D] of [[1, 128], [13, 64], [48, 128], [60, 64], [60, 128], [1, 64]]) {
      const c: Case = {
        ...norm16(randomCase(150 + K0 + D, { T: 157, cu: [0, 1, 2, 93, 94, 157], H: 8, HKV: 2, D }), 193),
        decays: scanDecays(K0),
      };
      const oracle = await run(c, 'materialize');
      expectClose(await withScan('norm', c), oracle, 1e-4);
      if (K0 === 13 || K0 === 60) expectClose(await withScan('norm', c, 'f16'), oracle, 1e-4);
    }
  });

  test('batch-split invariance (two calls add up to one, ≤ 1e-6): block starts move with the split', async () => {
    const cu = [0, 130, 131, 405, 600];
    const c: Case = { ...norm16(randomCase(143, { T: 600, cu, H: 8, HKV: 2, D: 128 }), 195), decays: scanDecays(48) };
    const { H, HKV, D } = c.shape;
    const split = (lo: number, hi: number): Case => splitSequences(c, cu, lo, hi);
    const whole = await withScan('norm', c);
    const p1 = await withScan('norm', split(0, 2));
    const p2 = await withScan('norm', split(2, 4));
    const merged: Stats = {};
    for (const key of Object.keys(whole) as (keyof MomentAccumulators)[]) merged[key] = Float64Array.from(p1[key]!, (x, i) => x + p2[key]![i]);
    expectClose(merged, whole, 1e-6);
    expectClose(whole, await run(c, 'materialize'), 1e-4);
  });

  test('the default with a 16-bit context is the norm path where it applies (D 64 / 128), the CUDA-core apply elsewhere; v4 forces the latter; an unknown mode is refused', async () => {
    for (const [D, K0, want] of [[128, 48, 'norm'], [64, 13, 'norm'], [32, 13, 'v4'], [96, 60, 'v4']] as const) {
      const c: Case = { ...norm16(randomCase(160 + D, { T: 157, cu: [0, 1, 93, 157], H: 8, HKV: 2, D }), 197), decays: scanDecays(K0) };
      const got = await withScan(undefined, c);
      expect(got).toEqual(await withScan(want, c));
      expectClose(got, await run(c, 'materialize'), 1e-4);
      // The CUDA-core apply forms rs another way (sweep 1 in fp32): close, not the same bits.
      if (want === 'norm') {
        const v4 = await withScan('v4', c);
        expectClose(v4, got, 1e-5);
        expect(v4).not.toEqual(got);
      }
    }
    const c: Case = { ...norm16(randomCase(170, { T: 40, H: 4, HKV: 1, D: 64 }), 198), decays: scanDecays(4) };
    await expect(withScanMode('v4norm', c, 'bf16', (extra) => run(c, 'stream', extra, 'cuda:0', 'bf16'))).rejects.toThrow(
      /TCAL_MOMENTS_SCAN.*expected v4, tc or norm, got 'v4norm'/,
    );
  });

  test('the cancellation guard: v anti-aligned with the slowest decay state on alternate steps (blocks rerun directly)', async () => {
    // v_t = bf16(−0.9·γ·y_{t−1}) (fp64 y of decay 0, r = 1e-4) on odd steps: ‖y_t‖² ≈ 0.01‖γy_{t−1}‖² while the norm
    // step's terms add to ≈ 3.6‖γy_{t−1}‖², under the guard's 1/64 (test/moments-scan-norm.test.ts), so those
    // warps rerun their blocks with Σ y² of the fp32 state.
    const base = norm16(randomCase(147, { T: 200, cu: [0, 120, 200], H: 4, HKV: 1, D: 64 }), 196);
    const decays = scanDecays(13);
    const { D } = base.shape;
    const v = Float32Array.from(base.v);
    const y = new Float64Array(D);
    for (let t = 0; t < 200; t++) {
      if (t === 120) y.fill(0);
      if (t % 2 === 1 && t !== 120) for (let c = 0; c < D; c++) v[t * D + c] = roundBf16(-0.9 * decays[0] * y[c]);
      for (let c = 0; c < D; c++) y[c] = decays[0] * y[c] + v[t * D + c];
    }
    const c: Case = { ...base, v, decays };
    const oracle = await run(c, 'materialize');
    const got = await withScan('norm', c);
    expectClose(got, oracle, 1e-4);
    expectClose(got, await withScan('tc', c), 1e-4);
  });
});

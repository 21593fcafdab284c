/**
 * Taylor statistics over a fixture teacher (GQA Llama, test/fixtures/hf) on the CPU: ragged packed batches,
 * padding left out, streaming over batches equal to one batch whatever the split, merge = addition, an exact
 * save / load round trip, the summary's formulas, and agreement with the teacher's own activations.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { Teacher, type LayerActivations } from '../lib/model/teacher';
import {
  collectTaylorStats,
  loadTaylorStats,
  mergeTaylorStats,
  saveTaylorStats,
  summarizeHeads,
  scanExplainedVariance,
  type CalibrationBatch,
  type StatsTeacher,
  type TaylorStats,
} from '../lib/calibrate/statistics';
import { cudaEnabled, relError, rng } from './helpers';
import { Tensor, scope } from '../lib/tensor';
import { cast } from '../lib/ops/elementwise';

const FIXTURE = path.join(__dirname, 'fixtures', 'hf', 'llama-gqa-llama3-sharded');

/** Every number of the statistics, flattened in a fixed order (for comparisons). */
function flatten(s: TaylorStats): Float64Array {
  const out: number[] = [s.tokens, s.sequences];
  for (const l of s.layers) {
    out.push(l.layer, l.tokens, ...l.inputSum, ...l.inputOuter);
    for (const h of l.heads) {
      out.push(h.distance, h.distanceSq, h.entropy, h.sink, h.local);
      for (const a of [h.histogram, h.phi, h.contextSum, h.contextSq, h.scanCross, h.scanSq]) out.push(...a);
    }
    for (const h of l.kvHeads) for (const a of [h.keySum, h.keyOuter, h.valueSum, h.valueOuter]) out.push(...a);
  }
  return Float64Array.from(out);
}

/** One packed row of the given sequence lengths (random ids). */
function packed(lengths: number[], vocab: number, seed: number): CalibrationBatch {
  const r = rng(seed);
  const N = lengths.reduce((a, b) => a + b, 0);
  const cu = [0];
  for (const len of lengths) cu.push(cu[cu.length - 1] + len);
  return {
    inputIds: Int32Array.from({ length: N }, () => Math.floor(r() * vocab)),
    rows: 1,
    seqLen: N,
    cuSeqlens: Int32Array.from(cu),
  };
}

/** The sequences of a batch, one batch each (ids copied). */
function perSequence(b: CalibrationBatch): CalibrationBatch[] {
  const cu = b.cuSeqlens!;
  const out: CalibrationBatch[] = [];
  for (let n = 0; n + 1 < cu.length; n++) {
    const len = cu[n + 1] - cu[n];
    out.push({ inputIds: b.inputIds.slice(cu[n], cu[n + 1]), rows: 1, seqLen: len });
  }
  return out;
}

let teacher: Teacher;
beforeAll(async () => {
  teacher = await Teacher.load(FIXTURE, { device: 'cpu', dtype: 'f32' });
});
afterAll(() => teacher?.dispose());

describe('collectTaylorStats on a GQA fixture teacher (CPU)', () => {
  const lengths = [5, 1, 24, 18, 33];

  test('ragged varlen: counts, invariants, stream = oracle, and the teacher’s own activations', async () => {
    const c = teacher.config;
    expect(c.numKvHeads).toBeLessThan(c.numHeads); // GQA
    const batch = packed(lengths, c.vocabSize, 1);
    const stats = await collectTaylorStats(teacher, [batch]);
    const N = lengths.reduce((a, b) => a + b, 0);
    expect(stats.tokens).toBe(N);
    expect(stats.sequences).toBe(lengths.length);
    expect(stats.sequenceLengths).toEqual([...lengths].sort((a, b) => a - b).map((l) => [l, 1]));
    expect(stats.layers.map((l) => l.layer)).toEqual([0, 1]);
    for (const l of stats.layers) {
      expect(l.tokens).toBe(N);
      expect(l.heads).toHaveLength(c.numHeads);
      expect(l.kvHeads).toHaveLength(c.numKvHeads);
      for (const h of l.heads) {
        // Histogram mass and Re φ_0 ≤ 1 per token; sink ≥ one per sequence at its first token.
        expect(h.histogram.reduce((a, b) => a + b, 0)).toBeCloseTo(N, 9);
        expect(h.local).toBeLessThanOrEqual(N + 1e-9);
        expect(h.sink).toBeGreaterThanOrEqual(lengths.length - 1e-9);
        expect(h.distance).toBeGreaterThan(0);
        expect(h.entropy).toBeGreaterThan(0);
        for (let j = 0; j < c.headDim / 2; j++) expect(Math.abs(h.phi[2 * j])).toBeLessThanOrEqual(N + 1e-9);
      }
    }
    // The oracle agrees with the streaming path through the whole pipeline.
    const oracle = await collectTaylorStats(teacher, [batch], { algorithm: 'materialize' });
    expect(relError(flatten(stats), flatten(oracle))).toBeLessThan(1e-10);

    // Input moments and context sums against the teacher's own activations (its f32 attention).
    const seen = new Map<number, { x: Float32Array; ctx: Float32Array }>();
    await teacher.hidden(batch.inputIds, [1, N], {
      cuSeqlens: batch.cuSeqlens,
      onLayer: async (a: LayerActivations) => {
        seen.set(a.layer, { x: await a.input.toFloat32(), ctx: await a.context.toFloat32() });
      },
    });
    for (const l of stats.layers) {
      const { x, ctx } = seen.get(l.layer)!;
      const D = c.hiddenSize;
      const xs = new Float64Array(D);
      const xx = new Float64Array(D * D);
      for (let t = 0; t < N; t++)
        for (let i = 0; i < D; i++) {
          xs[i] += x[t * D + i];
          for (let j = 0; j < D; j++) xx[i * D + j] += x[t * D + i] * x[t * D + j];
        }
      expect(relError(l.inputSum, xs)).toBeLessThan(1e-12);
      expect(relError(l.inputOuter, xx)).toBeLessThan(1e-12);
      const hd = c.headDim;
      for (let h = 0; h < c.numHeads; h++) {
        const want = new Float64Array(hd);
        for (let t = 0; t < N; t++) for (let i = 0; i < hd; i++) want[i] += ctx[(t * c.numHeads + h) * hd + i];
        expect(relError(l.heads[h].contextSum, want)).toBeLessThan(1e-6);
      }
    }
  });

  test('streaming over batches equals one batch, whatever the split; merge is addition', async () => {
    const batch = packed(lengths, teacher.config.vocabSize, 2);
    const whole = flatten(await collectTaylorStats(teacher, [batch]));
    const singles = perSequence(batch);
    const oneEach = flatten(await collectTaylorStats(teacher, singles));
    expect(relError(oneEach, whole)).toBeLessThan(1e-12);
    // An async iterable of two packed batches of different composition.
    async function* twoBatches(): AsyncGenerator<CalibrationBatch> {
      const cu = batch.cuSeqlens!;
      yield { inputIds: batch.inputIds.slice(0, cu[3]), rows: 1, seqLen: cu[3], cuSeqlens: cu.slice(0, 4) };
      yield { inputIds: batch.inputIds.slice(cu[3]), rows: 1, seqLen: cu[5] - cu[3], cuSeqlens: Int32Array.from(cu.slice(3), (x) => x - cu[3]) };
    }
    const progress: number[] = [];
    const two = await collectTaylorStats(teacher, twoBatches(), { onProgress: (p) => progress.push(p.tokens) });
    expect(progress).toEqual([30, 81]);
    expect(relError(flatten(two), whole)).toBeLessThan(1e-12);
    const merged = mergeTaylorStats(
      await collectTaylorStats(teacher, singles.slice(0, 2)),
      await collectTaylorStats(teacher, singles.slice(2)),
    );
    expect(merged.sequences).toBe(lengths.length);
    expect(relError(flatten(merged), whole)).toBeLessThan(1e-12);
  });

  test('padding sequences are left out; a selected layer subset; typed errors', async () => {
    const c = teacher.config;
    // Two rows of 16: [doc 10 | pad 6], [doc 16]. Padding is a segment of its own.
    const r = rng(3);
    const ids = Int32Array.from({ length: 32 }, () => Math.floor(r() * c.vocabSize));
    const mask = new Uint8Array(32).fill(1);
    mask.fill(0, 10, 16);
    const padded: CalibrationBatch = { inputIds: ids, rows: 2, seqLen: 16, cuSeqlens: Int32Array.from([0, 10, 16, 32]), attentionMask: mask };
    const withPad = await collectTaylorStats(teacher, [padded], { layers: [1] });
    expect(withPad.layers.map((l) => l.layer)).toEqual([1]);
    expect(withPad.tokens).toBe(26);
    const clean = await collectTaylorStats(
      teacher,
      [
        { inputIds: ids.slice(0, 10), rows: 1, seqLen: 10 },
        { inputIds: ids.slice(16), rows: 1, seqLen: 16 },
      ],
      { layers: [1] },
    );
    expect(relError(flatten(withPad), flatten(clean))).toBeLessThan(1e-12);
    const mixed = { ...padded, cuSeqlens: Int32Array.from([0, 16, 32]) };
    await expect(collectTaylorStats(teacher, [mixed])).rejects.toMatchObject({ name: 'InvalidArgumentError', argument: 'batches' });
    await expect(collectTaylorStats(teacher, [padded], { layers: [2] })).rejects.toMatchObject({ argument: 'layers' });
    expect(() => mergeTaylorStats(withPad, clean)).not.toThrow();
    const ac = new AbortController();
    ac.abort();
    await expect(collectTaylorStats(teacher, [padded], { signal: ac.signal })).rejects.toMatchObject({ name: 'AbortError' });
  });

  test('save / load round trip is exact; merge refuses different layers', async () => {
    const stats = await collectTaylorStats(teacher, [packed([7, 12], teacher.config.vocabSize, 4)]);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tcal-stats-'));
    try {
      await saveTaylorStats(dir, stats);
      const back = await loadTaylorStats(dir);
      expect(back.meta).toEqual(stats.meta);
      expect(back.sequenceLengths).toEqual(stats.sequenceLengths);
      const a = flatten(stats);
      const b = flatten(back);
      expect(Buffer.from(b.buffer).equals(Buffer.from(a.buffer))).toBe(true);
      const other = await collectTaylorStats(teacher, [packed([3], teacher.config.vocabSize, 5)], { layers: [0] });
      expect(() => mergeTaylorStats(stats, other)).toThrow(/different layers/);
      // A damaged file is refused with a CheckpointFormatError.
      fs.writeFileSync(path.join(dir, 'taylor-stats.json'), '{"format":"tcal-taylor-stats","meta":{"version":99}}');
      await expect(loadTaylorStats(dir)).rejects.toMatchObject({ name: 'CheckpointFormatError' });
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('summarizeHeads', () => {
  test('means, the distance spread, and the best γ₀ by explained variance', () => {
    const D = 2;
    const decays = [0.5, 0.9, 0.99];
    const head = {
      distance: 30,
      distanceSq: 1000,
      entropy: 20,
      sink: 5,
      local: 8,
      histogram: new Float64Array(3),
      phi: new Float64Array(D),
      contextSum: new Float64Array(D),
      contextSq: Float64Array.from([4, 6]), // Σo² = 10
      // EV_k = Σ_c cross² / sq / 10: k=0 → (1/1 + 1/1)/10 = 0.2; k=1 → (4/1 + 4/2)/10 = 0.6; k=2 → (1/1 + 0)/10
      scanCross: Float64Array.from([1, 1, 2, 2, 1, 0]),
      scanSq: Float64Array.from([1, 1, 1, 2, 1, 0]),
    };
    expect(Array.from(scanExplainedVariance(head, 3))).toEqual([0.2, 0.6, 0.1].map((x) => expect.closeTo(x, 15)));
    const stats: TaylorStats = {
      meta: {
        version: 1, architecture: 'x', numLayers: 1, hiddenSize: 1, numHeads: 1, numKvHeads: 1, headDim: D,
        scale: 1, invFreq: [1], decays, bins: 3, localWindow: 16, scanEps: 1e-6,
      },
      tokens: 10,
      sequences: 1,
      sequenceLengths: [[10, 1]],
      layers: [{ layer: 0, tokens: 10, inputSum: new Float64Array(1), inputOuter: new Float64Array(1), heads: [head], kvHeads: [] }],
    };
    const [row] = summarizeHeads(stats);
    expect(row).toMatchObject({ layer: 0, head: 0, kvHead: 0, meanDistance: 3, entropy: 2, sinkMass: 0.5, localMass: 0.8, gamma0: 0.9 });
    expect(row.distanceStd).toBeCloseTo(Math.sqrt(100 - 9), 12);
    expect(row.explainedVariance).toBeCloseTo(0.6, 15);
    expect(row.halfLife).toBeCloseTo(Math.LN2 / -Math.log(0.9), 12);
  });
});

(cudaEnabled() ? describe : describe.skip)('collectTaylorStats reducing on CUDA', () => {
  // The fixture's head dim (16) is below what the CUDA attention takes, so the teacher runs on the CPU and a
  // wrapper hands its activations (optionally cast to bf16 first) to the reduction on `device`.
  const handOver = (device: string, dtype?: 'bf16'): StatsTeacher => ({
    config: teacher.config,
    device,
    hidden: (ids, shape, opts = {}) =>
      teacher.hidden(ids, shape, {
        ...opts,
        onLayer: async (a: LayerActivations) => {
          await scope(async () => {
            const to = async (x: Tensor) => {
              const y = await x.to(device);
              return dtype ? cast(y, dtype) : y;
            };
            const acts = { ...a, input: await to(a.input), q: await to(a.q), k: await to(a.k), v: await to(a.v), context: await a.context.to(device) };
            await opts.onLayer?.(acts);
          });
        },
      }),
  });

  test('the CUDA reduction equals the CPU reduction of the same activations (f32: the CUDA-core pass)', async () => {
    const batch = packed([5, 1, 24, 18, 33], teacher.config.vocabSize, 6);
    const gpu = await collectTaylorStats(handOver('cuda:0'), [batch]);
    const cpu = await collectTaylorStats(teacher, [batch]);
    expect(relError(flatten(gpu), flatten(cpu))).toBeLessThan(1e-4);
  });

  test('bf16 activations with the teacher context: the tensor-core pass equals the CPU oracle on the same values', async () => {
    const batch = packed([5, 1, 24, 18, 133, 70], teacher.config.vocabSize, 7);
    const gpu = await collectTaylorStats(handOver('cuda:0', 'bf16'), [batch]);
    const cpu = await collectTaylorStats(handOver('cpu', 'bf16'), [batch], { algorithm: 'materialize' });
    expect(relError(flatten(gpu), flatten(cpu))).toBeLessThan(1e-4);
    // Per statistic as well (the flattened norm is dominated by the largest sums).
    for (let l = 0; l < gpu.layers.length; l++)
      for (let h = 0; h < gpu.layers[l].heads.length; h++) {
        const g = gpu.layers[l].heads[h];
        const c = cpu.layers[l].heads[h];
        expect(relError([g.distance, g.distanceSq, g.entropy, g.sink, g.local], [c.distance, c.distanceSq, c.entropy, c.sink, c.local])).toBeLessThan(1e-4);
        for (const key of ['histogram', 'phi', 'contextSum', 'contextSq', 'scanCross', 'scanSq'] as const) expect(relError(g[key], c[key])).toBeLessThan(1e-4);
      }
  });
});

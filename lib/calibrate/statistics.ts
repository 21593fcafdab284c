/**
 * Taylor statistics (DESIGN.md §5.1 Pass 1): the teacher runs over calibration batches and, per selected
 * layer, its attention activations feed the moment reduction (lib/ops/moments.ts). The result is a typed,
 * serialisable `TaylorStats` of sums — per layer the shared input moments, per KV head key / value moments,
 * per query head the attention statistics, context moments and the γ₀ scan — so runs over parts of a data
 * set combine by addition (`mergeTaylorStats`). `summarizeHeads` turns the sums into per-head means.
 *
 * On disk (`saveTaylorStats(dir)`): `taylor-stats.json` (meta, counts, layers) and
 * `taylor-stats.safetensors`, whose tensors hold the f64 sums as their raw IEEE-754 bit patterns in I64
 * (safetensors readers here stop at F32), so a save / load round trip is exact.
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { CheckpointFormatError, InvalidArgumentError, throwIfAborted } from '../errors';
import { type TeacherConfig, ropeInvFreq } from '../io/hf-config';
import { openSafetensors, writeSafetensors, type TensorToWrite } from '../io/safetensors';
import { writeFileAtomically, writeAll } from '../io/file-io';
import { isPlainObject } from '../io/json-values';
import { Tensor, scope } from '../tensor';
import type { LayerActivations, ForwardOptions } from '../model/teacher';
import {
  ATTENTION_COLUMNS,
  createMomentAccumulators,
  disposeMomentAccumulators,
  momentBins,
  momentAccumulatorShapes,
  momentLocalWindow,
  readMomentAccumulators,
  scanDecays,
  taylorMoments,
  taylorMomentsOnDevice,
  type MomentAccumulators,
} from '../ops/moments';

export const TAYLOR_STATS_VERSION = 1;
export const TAYLOR_STATS_JSON = 'taylor-stats.json';
export const TAYLOR_STATS_TENSORS = 'taylor-stats.safetensors';
/** RMSNorm ε of the γ₀ scan (native/cpu/moments.h kScanEps). */
export const SCAN_EPS = 1e-6;

/** What the statistics were computed with; two TaylorStats merge only when these agree. */
export interface TaylorStatsMeta {
  version: number;
  architecture: string;
  numLayers: number;
  hiddenSize: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  /** Attention score scale (headDim^-1/2). */
  scale: number;
  /** RoPE inverse frequencies θ_j of the pairs (j, j + headDim/2), as the teacher applies them. */
  invFreq: number[];
  /** γ₀-scan decays γ_k = exp(−r_k). */
  decays: number[];
  /** Distance histogram bins: Δ = 0, then [2^(b−1), 2^b), the last open-ended. */
  bins: number;
  /** Local mass counts keys with Δ < localWindow. */
  localWindow: number;
  scanEps: number;
}

/** Sums over every calibration token of one query head. */
export interface HeadStats {
  /** Σ E_A[Δ] */
  distance: number;
  /** Σ E_A[Δ²] */
  distanceSq: number;
  /** Σ −Σ_s A ln A */
  entropy: number;
  /** Σ attention mass on the sequence's first token. */
  sink: number;
  /** Σ attention mass on Δ < localWindow. */
  local: number;
  /** [bins] Σ mass per distance bin. */
  histogram: Float64Array;
  /** [headDim/2 × 2] Σ Re φ_j, Σ Im φ_j, φ_j = E_A[exp(iθ_j Δ)]. */
  phi: Float64Array;
  /** [headDim] Σ o, Σ o² of the head's context o_t = Σ_s A_ts v_s. */
  contextSum: Float64Array;
  contextSq: Float64Array;
  /** [decays × headDim] γ₀ scan: Σ ŷ∘o and Σ ŷ². */
  scanCross: Float64Array;
  scanSq: Float64Array;
}

/** Sums over every calibration token of one KV head. Keys are pre-RoPE (RoPE undone at each position). */
export interface KvHeadStats {
  keySum: Float64Array; // [headDim]
  keyOuter: Float64Array; // [headDim × headDim]
  valueSum: Float64Array; // [headDim]
  valueOuter: Float64Array; // [headDim × headDim]
}

export interface LayerStats {
  layer: number;
  /** Tokens summed over. */
  tokens: number;
  /** [hiddenSize] Σ x of the normalised attention input. */
  inputSum: Float64Array;
  /** [hiddenSize × hiddenSize] Σ x xᵀ. */
  inputOuter: Float64Array;
  heads: HeadStats[];
  kvHeads: KvHeadStats[];
}

export interface TaylorStats {
  meta: TaylorStatsMeta;
  /** Tokens and sequences summed over (padding excluded). */
  tokens: number;
  sequences: number;
  /** [length, count] pairs, by length: the sequence-length distribution (n_t for the geometric-mean rule). */
  sequenceLengths: Array<[number, number]>;
  /** The collected layers, in increasing order. */
  layers: LayerStats[];
}

/** A calibration batch; lib/io/dataset's PackedBatch is one. */
export interface CalibrationBatch {
  /** rows × seqLen token ids, row-major. */
  inputIds: Int32Array;
  rows: number;
  seqLen: number;
  /** Sequence boundaries over the flattened tokens (N+1, from 0 to rows·seqLen); default one per row. */
  cuSeqlens?: Int32Array;
  /** 1 = real token, 0 = padding; a sequence must be all real or all padding, and padding is left out. */
  attentionMask?: Uint8Array;
}

/** What collectTaylorStats needs of a teacher (lib/model/teacher's Teacher). */
export interface StatsTeacher {
  readonly config: TeacherConfig;
  readonly device: string;
  hidden(ids: Int32Array, shape: [number, number], options?: ForwardOptions): Promise<Tensor>;
}

export interface CollectProgress {
  /** Batches done. */
  batches: number;
  tokens: number;
  sequences: number;
}

export interface CollectOptions {
  /** Teacher layers to collect (default all). */
  layers?: number[];
  signal?: AbortSignal;
  onProgress?: (p: CollectProgress) => void;
  /** γ₀-scan decays (default scanDecays(): 48, r log-spaced in [1e-4, 3]). */
  decays?: ArrayLike<number>;
  /** The CPU reduction's algorithm ('stream' unless testing against the oracle). */
  algorithm?: 'stream' | 'materialize';
  /**
   * Where the moment reduction runs: 'auto' (default) — the teacher's device when the moment kernel runs
   * there, else the CPU (activations are copied); 'cpu' — always the CPU reference.
   */
  reductionDevice?: 'auto' | 'cpu';
}

/** The meta a teacher's statistics carry. */
export function taylorStatsMeta(config: TeacherConfig, decays: ArrayLike<number> = scanDecays()): TaylorStatsMeta {
  return {
    version: TAYLOR_STATS_VERSION,
    architecture: config.architecture,
    numLayers: config.numLayers,
    hiddenSize: config.hiddenSize,
    numHeads: config.numHeads,
    numKvHeads: config.numKvHeads,
    headDim: config.headDim,
    scale: 1 / Math.sqrt(config.headDim),
    // The teacher rotates with the f32 values of these frequencies.
    invFreq: Array.from(Float32Array.from(ropeInvFreq(config))),
    decays: Array.from(decays),
    bins: momentBins(),
    localWindow: momentLocalWindow(),
    scanEps: SCAN_EPS,
  };
}

/** Include flags per sequence from an attention mask: sequences wholly of padding are left out. */
function includeFlags(cu: Int32Array, mask: Uint8Array | undefined): Int32Array {
  const flags = new Int32Array(cu.length - 1).fill(1);
  if (!mask) return flags;
  for (let n = 0; n + 1 < cu.length; n++) {
    const a = cu[n];
    const b = cu[n + 1];
    if (b <= a) continue;
    const first = mask[a] ? 1 : 0;
    for (let i = a + 1; i < b; i++) {
      if ((mask[i] ? 1 : 0) !== first) {
        throw new InvalidArgumentError('batches', `sequence ${n} [${a}, ${b}) mixes real tokens and padding; padding must be a sequence of its own`);
      }
    }
    flags[n] = first;
  }
  return flags;
}

function checkBatch(b: CalibrationBatch, index: number): Int32Array {
  const N = b.rows * b.seqLen;
  if (!Number.isSafeInteger(b.rows) || !Number.isSafeInteger(b.seqLen) || b.rows <= 0 || b.seqLen <= 0) {
    throw new InvalidArgumentError('batches', `batch ${index}: rows and seqLen must be positive integers`);
  }
  if (b.inputIds.length !== N) throw new InvalidArgumentError('batches', `batch ${index}: ${b.inputIds.length} ids for ${b.rows} × ${b.seqLen}`);
  if (b.attentionMask && b.attentionMask.length !== N) throw new InvalidArgumentError('batches', `batch ${index}: attentionMask length ${b.attentionMask.length}, expected ${N}`);
  const cu = b.cuSeqlens ?? Int32Array.from({ length: b.rows + 1 }, (_, i) => i * b.seqLen);
  if (cu.length < 2 || cu[0] !== 0 || cu[cu.length - 1] !== N) {
    throw new InvalidArgumentError('batches', `batch ${index}: cuSeqlens must run from 0 to ${N}`);
  }
  for (let i = 1; i < cu.length; i++) {
    if (cu[i] < cu[i - 1]) throw new InvalidArgumentError('batches', `batch ${index}: cuSeqlens decreases at entry ${i}`);
  }
  return cu;
}

/**
 * Runs the teacher over `batches` and reduces the selected layers' attention into TaylorStats. The
 * accumulators stay on the reduction device (the teacher's when the moment kernel runs there, else the CPU)
 * for the whole run and are read back once at the end.
 */
export async function collectTaylorStats(
  teacher: StatsTeacher,
  batches: Iterable<CalibrationBatch> | AsyncIterable<CalibrationBatch>,
  options: CollectOptions = {},
): Promise<TaylorStats> {
  const c = teacher.config;
  const layers = [...new Set(options.layers ?? Array.from({ length: c.numLayers }, (_, i) => i))].sort((a, b) => a - b);
  if (layers.length === 0) throw new InvalidArgumentError('layers', 'select at least one layer');
  for (const l of layers) {
    if (!Number.isInteger(l) || l < 0 || l >= c.numLayers) throw new InvalidArgumentError('layers', `layer ${l} is not in [0, ${c.numLayers})`);
  }
  const meta = taylorStatsMeta(c, options.decays ?? scanDecays());
  for (const g of meta.decays) if (!(g > 0 && g <= 1)) throw new InvalidArgumentError('decays', `every decay must lie in (0, 1], got ${g}`);
  const auto = (options.reductionDevice ?? 'auto') === 'auto';
  const device = auto && taylorMomentsOnDevice(teacher.device) ? teacher.device : 'cpu';
  const onDevice = device === teacher.device;
  const accs = new Map<number, MomentAccumulators>();
  const lengths = new Map<number, number>();
  let tokens = 0;
  let sequences = 0;
  let done = 0;
  // The op reads cu_seqlens, include, θ and the decays on the host: keeping them there spares a blocking
  // device → host copy (a stall of the teacher's queued work) in every layer's call.
  const host = { device: 'cpu' };
  const invFreq = await Tensor.fromArray(Float64Array.from(meta.invFreq), [meta.invFreq.length], host);
  const decays = await Tensor.fromArray(Float64Array.from(meta.decays), [meta.decays.length], host);
  try {
    for (const l of layers) {
      accs.set(
        l,
        await createMomentAccumulators(
          { heads: c.numHeads, kvHeads: c.numKvHeads, headDim: c.headDim, decays: meta.decays.length, inputDim: c.hiddenSize },
          device,
        ),
      );
    }
    const lastLayer = layers[layers.length - 1];
    for await (const batch of batches) {
      throwIfAborted(options.signal);
      const cu = checkBatch(batch, done);
      const include = includeFlags(cu, batch.attentionMask);
      const N = batch.rows * batch.seqLen;
      await scope(async () => {
        const cuT = await Tensor.fromArray(cu, [cu.length], host);
        const incT = await Tensor.fromArray(include, [include.length], host);
        const onLayer = async (a: LayerActivations): Promise<void> => {
          const acc = accs.get(a.layer);
          if (!acc) return;
          await scope(async () => {
            const flat = async (t: Tensor, shape: number[]): Promise<Tensor> => {
              const view = t.view(shape);
              return onDevice ? view : view.to('cpu');
            };
            const q = await flat(a.q, [1, N, c.numHeads, c.headDim]);
            const k = await flat(a.k, [1, N, c.numKvHeads, c.headDim]);
            const v = await flat(a.v, [1, N, c.numKvHeads, c.headDim]);
            const x = await flat(a.input, [1, N, c.hiddenSize]);
            // The teacher's own context: the moments of what it computed, and A·V is not formed again.
            const context = await flat(a.context, [1, N, c.numHeads, c.headDim]);
            // Its attention's lse: the CUDA pass then needs no online softmax (where it lies on q's device).
            const lse = a.lse?.device === q.device ? a.lse : undefined;
            await taylorMoments(q, k, v, invFreq, decays, acc, {
              cuSeqlens: cuT,
              include: incT,
              x,
              context,
              lse,
              scale: meta.scale,
              algorithm: options.algorithm,
            });
          });
        };
        await teacher.hidden(batch.inputIds, [batch.rows, batch.seqLen], {
          cuSeqlens: cu,
          stopAfterLayer: lastLayer,
          onLayer,
          signal: options.signal,
        });
      });
      for (let n = 0; n + 1 < cu.length; n++) {
        const len = cu[n + 1] - cu[n];
        if (len > 0 && include[n]) {
          lengths.set(len, (lengths.get(len) ?? 0) + 1);
          tokens += len;
          sequences++;
        }
      }
      done++;
      options.onProgress?.({ batches: done, tokens, sequences });
    }
    const out: LayerStats[] = [];
    for (const l of layers) out.push(layerStatsFrom(l, meta, await readMomentAccumulators(accs.get(l)!)));
    return {
      meta,
      tokens,
      sequences,
      sequenceLengths: [...lengths].sort((a, b) => a[0] - b[0]),
      layers: out,
    };
  } finally {
    for (const acc of accs.values()) disposeMomentAccumulators(acc);
    invFreq.dispose();
    decays.dispose();
  }
}

// ---- Layout: the stacked per-layer arrays (as the op and the file hold them) ↔ per-head objects ----

type Stacked = Partial<Record<keyof MomentAccumulators, Float64Array>>;

function layerShapes(meta: TaylorStatsMeta): Record<Exclude<keyof MomentAccumulators, 'count'>, number[]> {
  const shapes = momentAccumulatorShapes({
    heads: meta.numHeads,
    kvHeads: meta.numKvHeads,
    headDim: meta.headDim,
    decays: meta.decays.length,
    inputDim: meta.hiddenSize,
  });
  const { count: _count, ...perLayer } = shapes;
  // The bin count saved with the statistics, not the op's current one.
  return { ...perLayer, histogram: [meta.numHeads, meta.bins] } as Record<Exclude<keyof MomentAccumulators, 'count'>, number[]>;
}

function slice(a: Float64Array, i: number, width: number): Float64Array {
  return a.slice(i * width, (i + 1) * width);
}

function layerStatsFrom(layer: number, meta: TaylorStatsMeta, s: Stacked): LayerStats {
  const { numHeads: H, numKvHeads: HKV, headDim: D, bins } = meta;
  const K0 = meta.decays.length;
  const C = ATTENTION_COLUMNS.length;
  const heads: HeadStats[] = [];
  for (let h = 0; h < H; h++) {
    const a = s.attention!;
    heads.push({
      distance: a[h * C],
      distanceSq: a[h * C + 1],
      entropy: a[h * C + 2],
      sink: a[h * C + 3],
      local: a[h * C + 4],
      histogram: slice(s.histogram!, h, bins),
      phi: slice(s.phi!, h, D),
      contextSum: slice(s.contextSum!, h, D),
      contextSq: slice(s.contextSq!, h, D),
      scanCross: slice(s.scanCross!, h, K0 * D),
      scanSq: slice(s.scanSq!, h, K0 * D),
    });
  }
  const kvHeads: KvHeadStats[] = [];
  for (let h = 0; h < HKV; h++) {
    kvHeads.push({
      keySum: slice(s.keySum!, h, D),
      keyOuter: slice(s.keyOuter!, h, D * D),
      valueSum: slice(s.valueSum!, h, D),
      valueOuter: slice(s.valueOuter!, h, D * D),
    });
  }
  const count = s.count ? s.count[0] : 0;
  // s holds fresh host copies: Σxxᵀ (Dx² f64, 33 MB at Dx = 2048) is taken as it is, not copied again.
  return { layer, tokens: count, inputSum: s.inputSum!, inputOuter: s.inputOuter!, heads, kvHeads };
}

function concat(parts: Float64Array[]): Float64Array {
  const out = new Float64Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

function stackedFrom(l: LayerStats): Stacked {
  return {
    attention: Float64Array.from(l.heads.flatMap((h) => [h.distance, h.distanceSq, h.entropy, h.sink, h.local])),
    histogram: concat(l.heads.map((h) => h.histogram)),
    phi: concat(l.heads.map((h) => h.phi)),
    contextSum: concat(l.heads.map((h) => h.contextSum)),
    contextSq: concat(l.heads.map((h) => h.contextSq)),
    scanCross: concat(l.heads.map((h) => h.scanCross)),
    scanSq: concat(l.heads.map((h) => h.scanSq)),
    keySum: concat(l.kvHeads.map((h) => h.keySum)),
    keyOuter: concat(l.kvHeads.map((h) => h.keyOuter)),
    valueSum: concat(l.kvHeads.map((h) => h.valueSum)),
    valueOuter: concat(l.kvHeads.map((h) => h.valueOuter)),
    inputSum: l.inputSum,
    inputOuter: l.inputOuter,
  };
}

// ---- Merging ----

function sameMeta(a: TaylorStatsMeta, b: TaylorStatsMeta): string | null {
  for (const key of Object.keys(a) as (keyof TaylorStatsMeta)[]) {
    if (JSON.stringify(a[key]) !== JSON.stringify(b[key])) return key;
  }
  return null;
}

function add(a: Float64Array, b: Float64Array): Float64Array {
  return Float64Array.from(a, (x, i) => x + b[i]);
}

/** a + b: statistics of the union of two calibration sets (same teacher, decays and layers). */
export function mergeTaylorStats(a: TaylorStats, b: TaylorStats): TaylorStats {
  const differs = sameMeta(a.meta, b.meta);
  if (differs) throw new InvalidArgumentError('b', `statistics were made with different ${differs}`);
  const la = a.layers.map((l) => l.layer);
  const lb = b.layers.map((l) => l.layer);
  if (JSON.stringify(la) !== JSON.stringify(lb)) {
    throw new InvalidArgumentError('b', `statistics cover different layers ([${la.join(', ')}] vs [${lb.join(', ')}])`);
  }
  const lengths = new Map<number, number>(a.sequenceLengths);
  for (const [len, n] of b.sequenceLengths) lengths.set(len, (lengths.get(len) ?? 0) + n);
  return {
    meta: structuredClone(a.meta),
    tokens: a.tokens + b.tokens,
    sequences: a.sequences + b.sequences,
    sequenceLengths: [...lengths].sort((x, y) => x[0] - y[0]),
    layers: a.layers.map((x, i) => {
      const y = b.layers[i];
      return {
        layer: x.layer,
        tokens: x.tokens + y.tokens,
        inputSum: add(x.inputSum, y.inputSum),
        inputOuter: add(x.inputOuter, y.inputOuter),
        heads: x.heads.map((h, j) => {
          const g = y.heads[j];
          return {
            distance: h.distance + g.distance,
            distanceSq: h.distanceSq + g.distanceSq,
            entropy: h.entropy + g.entropy,
            sink: h.sink + g.sink,
            local: h.local + g.local,
            histogram: add(h.histogram, g.histogram),
            phi: add(h.phi, g.phi),
            contextSum: add(h.contextSum, g.contextSum),
            contextSq: add(h.contextSq, g.contextSq),
            scanCross: add(h.scanCross, g.scanCross),
            scanSq: add(h.scanSq, g.scanSq),
          };
        }),
        kvHeads: x.kvHeads.map((h, j) => {
          const g = y.kvHeads[j];
          return {
            keySum: add(h.keySum, g.keySum),
            keyOuter: add(h.keyOuter, g.keyOuter),
            valueSum: add(h.valueSum, g.valueSum),
            valueOuter: add(h.valueOuter, g.valueOuter),
          };
        }),
      };
    }),
  };
}

// ---- Files ----

const TENSOR_NAMES: Record<Exclude<keyof MomentAccumulators, 'count'>, string> = {
  attention: 'attention',
  histogram: 'histogram',
  phi: 'phi',
  contextSum: 'context_sum',
  contextSq: 'context_sq',
  scanCross: 'scan_cross',
  scanSq: 'scan_sq',
  keySum: 'key_sum',
  keyOuter: 'key_outer',
  valueSum: 'value_sum',
  valueOuter: 'value_outer',
  inputSum: 'input_sum',
  inputOuter: 'input_outer',
};

interface StatsHeader {
  format: 'tcal-taylor-stats';
  meta: TaylorStatsMeta;
  tokens: number;
  sequences: number;
  sequenceLengths: Array<[number, number]>;
  layers: Array<{ layer: number; tokens: number }>;
  /** How the tensors are stored. */
  encoding: string;
}

/** Writes `stats` into `dir` (created if needed): taylor-stats.safetensors, then taylor-stats.json. */
export async function saveTaylorStats(dir: string, stats: TaylorStats): Promise<void> {
  await fsp.mkdir(dir, { recursive: true });
  const tensors: TensorToWrite[] = [];
  for (const l of stats.layers) {
    const stacked = stackedFrom(l);
    for (const [key, shape] of Object.entries(layerShapes(stats.meta))) {
      const data = stacked[key as keyof Stacked]!;
      // The f64 bytes, labelled I64: their bit patterns travel unchanged.
      tensors.push({ name: `layers.${l.layer}.${TENSOR_NAMES[key as keyof typeof TENSOR_NAMES]}`, dtype: 'I64', shape, data });
    }
  }
  const header: StatsHeader = {
    format: 'tcal-taylor-stats',
    meta: stats.meta,
    tokens: stats.tokens,
    sequences: stats.sequences,
    sequenceLengths: stats.sequenceLengths,
    layers: stats.layers.map((l) => ({ layer: l.layer, tokens: l.tokens })),
    encoding: 'every tensor holds float64 values as their IEEE-754 bit patterns, stored as I64',
  };
  await writeSafetensors(path.join(dir, TAYLOR_STATS_TENSORS), tensors, {
    format: 'tcal-taylor-stats',
    version: String(TAYLOR_STATS_VERSION),
    encoding: 'f64-bits-as-i64',
  });
  const json = Buffer.from(JSON.stringify(header, null, 1) + '\n', 'utf8');
  await writeFileAtomically(path.join(dir, TAYLOR_STATS_JSON), (fh) => writeAll(fh, json, null));
}

function headerError(file: string, message: string): CheckpointFormatError {
  return new CheckpointFormatError(message, { file });
}

function checkHeader(file: string, h: unknown): StatsHeader {
  if (!isPlainObject(h) || h.format !== 'tcal-taylor-stats') throw headerError(file, 'not a Taylor statistics header (format ≠ tcal-taylor-stats)');
  const meta = h.meta as TaylorStatsMeta | undefined;
  if (!isPlainObject(meta) || meta.version !== TAYLOR_STATS_VERSION) {
    throw headerError(file, `unsupported statistics version ${JSON.stringify(isPlainObject(meta) ? meta.version : undefined)}`);
  }
  const positiveInts: (keyof TaylorStatsMeta)[] = ['numLayers', 'hiddenSize', 'numHeads', 'numKvHeads', 'headDim', 'bins', 'localWindow'];
  for (const k of positiveInts) {
    const v = meta[k];
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0 || v > 1 << 20) throw headerError(file, `meta.${k} must be a positive integer`);
  }
  if (meta.headDim % 2 !== 0 || meta.numHeads % meta.numKvHeads !== 0) throw headerError(file, 'meta head counts / dims are inconsistent');
  const nums = (v: unknown, n?: number) => Array.isArray(v) && (n === undefined || v.length === n) && v.every((x) => typeof x === 'number' && Number.isFinite(x));
  if (!nums(meta.invFreq, meta.headDim / 2)) throw headerError(file, 'meta.invFreq must hold headDim/2 numbers');
  if (!nums(meta.decays) || meta.decays.length === 0) throw headerError(file, 'meta.decays must be a non-empty list of numbers');
  if (typeof meta.scale !== 'number' || typeof meta.scanEps !== 'number' || typeof meta.architecture !== 'string') throw headerError(file, 'meta is incomplete');
  if (typeof h.tokens !== 'number' || typeof h.sequences !== 'number') throw headerError(file, 'tokens / sequences missing');
  if (!Array.isArray(h.sequenceLengths) || !h.sequenceLengths.every((p: unknown) => nums(p, 2))) throw headerError(file, 'sequenceLengths must be [length, count] pairs');
  if (!Array.isArray(h.layers)) throw headerError(file, 'layers missing');
  let prev = -1;
  for (const l of h.layers as unknown[]) {
    if (!isPlainObject(l) || typeof l.layer !== 'number' || !Number.isInteger(l.layer) || l.layer <= prev || l.layer >= meta.numLayers || typeof l.tokens !== 'number') {
      throw headerError(file, 'layers must be increasing {layer, tokens} entries inside [0, numLayers)');
    }
    prev = l.layer;
  }
  return h as unknown as StatsHeader;
}

/** Reads statistics written by saveTaylorStats (exactly as saved). */
export async function loadTaylorStats(dir: string): Promise<TaylorStats> {
  const jsonFile = path.join(dir, TAYLOR_STATS_JSON);
  let parsed: unknown;
  try {
    parsed = JSON.parse(await fsp.readFile(jsonFile, 'utf8'));
  } catch (cause) {
    throw new CheckpointFormatError(`cannot read the statistics header: ${(cause as Error).message}`, { file: jsonFile, cause });
  }
  const header = checkHeader(jsonFile, parsed);
  const shapes = layerShapes(header.meta);
  const reader = await openSafetensors(path.join(dir, TAYLOR_STATS_TENSORS));
  try {
    const layers: LayerStats[] = [];
    for (const { layer, tokens } of header.layers) {
      const stacked: Stacked = { count: Float64Array.of(tokens) };
      for (const [key, shape] of Object.entries(shapes)) {
        const name = `layers.${layer}.${TENSOR_NAMES[key as keyof typeof TENSOR_NAMES]}`;
        if (!reader.has(name)) throw new CheckpointFormatError('missing tensor', { file: reader.file, tensor: name });
        const info = reader.info(name);
        if (info.dtype !== 'I64' || JSON.stringify(info.shape) !== JSON.stringify(shape)) {
          throw new CheckpointFormatError(`expected I64 ${JSON.stringify(shape)}, found ${info.dtype} ${JSON.stringify(info.shape)}`, {
            file: reader.file,
            tensor: name,
            offset: info.offset,
          });
        }
        const values = new Float64Array(info.byteLength / 8);
        await reader.readTensorInto(name, new Uint8Array(values.buffer));
        stacked[key as keyof Stacked] = values;
      }
      layers.push(layerStatsFrom(layer, header.meta, stacked));
    }
    return {
      meta: header.meta,
      tokens: header.tokens,
      sequences: header.sequences,
      sequenceLengths: header.sequenceLengths.map(([a, b]) => [a, b] as [number, number]),
      layers,
    };
  } finally {
    await reader.close();
  }
}

// ---- Summaries ----

/**
 * The γ₀ scan's explained variance per decay: Σ_c (Σ ŷ_c o_c)² / Σ ŷ_c²  /  Σ_c Σ o_c² (the fraction of the
 * context's energy a per-channel least-squares scale of ŷ recovers; 0 where undefined).
 */
export function scanExplainedVariance(head: HeadStats, decays: number): Float64Array {
  const D = head.contextSq.length;
  let energy = 0;
  for (let c = 0; c < D; c++) energy += head.contextSq[c];
  const out = new Float64Array(decays);
  for (let k = 0; k < decays; k++) {
    let ev = 0;
    for (let c = 0; c < D; c++) {
      const sq = head.scanSq[k * D + c];
      if (sq > 0) ev += head.scanCross[k * D + c] ** 2 / sq;
    }
    out[k] = energy > 0 ? ev / energy : 0;
  }
  return out;
}

export interface HeadSummary {
  layer: number;
  head: number;
  kvHead: number;
  /** Mean over tokens of E_A[Δ]. */
  meanDistance: number;
  /** Standard deviation of Δ over all tokens' attention (√(mean E_A[Δ²] − mean E_A[Δ]²)). */
  distanceStd: number;
  /** Mean attention entropy (nats). */
  entropy: number;
  sinkMass: number;
  localMass: number;
  /** The γ₀ scan's best decay, its explained variance and half-life ln 2 / −ln γ₀ (tokens). */
  gamma0: number;
  explainedVariance: number;
  halfLife: number;
}

/** Per-head means of the sums, one row per (layer, head). */
export function summarizeHeads(stats: TaylorStats): HeadSummary[] {
  const rows: HeadSummary[] = [];
  const group = stats.meta.numHeads / stats.meta.numKvHeads;
  const K0 = stats.meta.decays.length;
  for (const l of stats.layers) {
    const n = Math.max(l.tokens, 1);
    l.heads.forEach((h, i) => {
      const mean = h.distance / n;
      const ev = scanExplainedVariance(h, K0);
      let best = 0;
      for (let k = 1; k < K0; k++) if (ev[k] > ev[best]) best = k;
      const gamma0 = stats.meta.decays[best];
      rows.push({
        layer: l.layer,
        head: i,
        kvHead: Math.floor(i / group),
        meanDistance: mean,
        distanceStd: Math.sqrt(Math.max(0, h.distanceSq / n - mean * mean)),
        entropy: h.entropy / n,
        sinkMass: h.sink / n,
        localMass: h.local / n,
        gamma0,
        explainedVariance: ev[best],
        halfLife: gamma0 >= 1 ? Infinity : Math.LN2 / -Math.log(gamma0),
      });
    });
  }
  return rows;
}

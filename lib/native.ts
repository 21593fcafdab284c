/**
 * The only loader of the compiled addon. Types every export, refuses a missing or stale binary with
 * NativeBindingError, and turns the addon's error objects into the typed errors of lib/errors.ts.
 */
import * as fs from 'fs';
import * as path from 'path';
import {
  CudaError,
  InvalidArgumentError,
  NativeBindingError,
  NotCompiledError,
  OutOfMemoryError,
  TcalError,
} from './errors';

export type DType = 'f32' | 'bf16' | 'f16' | 'i32' | 'i64' | 'f64';
/** 'cpu', or 'cuda:N' ('cuda' is accepted as input and means cuda:0). */
export type DeviceName = 'cpu' | 'cuda' | `cuda:${number}`;

/** The addon's tensor handle. lib/tensor.ts wraps it; user code should not need it. */
export interface NativeTensor {
  readonly shape: number[];
  readonly dtype: DType;
  readonly device: string;
  readonly nbytes: number;
  readonly disposed: boolean;
  dispose(): void;
  /** Same storage, another shape with the same element count. */
  view(shape: number[]): NativeTensor;
  sameStorage(other: NativeTensor): boolean;
  /** Rows [begin, end) of the first dimension, sharing storage. */
  rows(begin: number, end: number): NativeTensor;
}

export interface CudaDeviceCount {
  compiled: boolean;
  count: number;
  reason: string;
}

export interface CudaDeviceInfo {
  index: number;
  name: string;
  computeCapability: string;
  multiprocessors: number;
  totalMemory: number;
  freeMemory: number;
  l2Bytes: number;
  sharedPerBlockOptin: number;
}

export interface MemoryStats {
  allocated: number;
  reserved: number;
  peakAllocated: number;
  allocCalls: number;
  cacheHits: number;
}

export interface MatmulNativeOptions {
  transA?: boolean;
  transB?: boolean;
  alpha?: number;
  beta?: number;
  c?: NativeTensor;
  outDtype?: DType;
  allowTf32?: boolean;
}

export interface GdnNativeOptions {
  scale?: number;
  l2norm?: boolean;
  initialState?: NativeTensor | null;
  outputFinalState?: boolean;
  cuSeqlens?: NativeTensor | null;
  aLog?: NativeTensor | null;
  dtBias?: NativeTensor | null;
  algorithm?: 'chunk' | 'recurrent';
  precision?: 'f32' | 'f64';
  outDtype?: DType;
  dFinalState?: NativeTensor | null;
  /** Forward: also return the chunk-start states (CUDA); 'full': and the backward prep's outputs (`handover`). */
  saveForBackward?: boolean | 'full';
  /** Backward: the forward's chunk-start states [chunks, HV, K, V] (f32 or bf16); the backward then skips its recompute. */
  chunkStates?: NativeTensor | null;
  /** Backward: the forward's hand-over (saveForBackward 'full'); the backward then skips its prep. */
  handover?: GdnNativeHandover | null;
  out?: Record<string, NativeTensor | undefined>;
}

/** What a training forward with saveForBackward 'full' writes for the backward's kernels (see GdnSaved in lib/ops/gdn.ts). */
export interface GdnNativeHandover {
  A: NativeTensor;
  QKG: NativeTensor;
  gates: NativeTensor;
  gateEnds: NativeTensor;
  norms: NativeTensor | null;
}

export interface GdnNativeGrads {
  dq: NativeTensor;
  dk: NativeTensor;
  dv: NativeTensor;
  dg: NativeTensor;
  dbeta: NativeTensor;
  dh0: NativeTensor | null;
  dALog: NativeTensor | null;
  dDtBias: NativeTensor | null;
}

type HostData = ArrayBufferView | ArrayBuffer;

/** Every export of the addon, typed. */
export interface AttentionNativeOptions {
  scale?: number;
  cuSeqlens?: NativeTensor | null;
  returnLse?: boolean;
  out?: NativeTensor | { o?: NativeTensor; lse?: NativeTensor } | null;
}

export interface AttentionBackwardNativeOptions {
  scale?: number;
  cuSeqlens?: NativeTensor | null;
  out?: { dq?: NativeTensor; dk?: NativeTensor; dv?: NativeTensor } | null;
}

export interface TaylorMomentsNativeOptions {
  scale?: number;
  cuSeqlens?: NativeTensor | null;
  include?: NativeTensor | null;
  x?: NativeTensor | null;
  context?: NativeTensor | null;
  lse?: NativeTensor | null;
  algorithm?: 'stream' | 'materialize';
}

/** One parameter of a fused AdamW step (native/napi/adamw.cc); hyperparameters already resolved per item. */
export interface AdamwNativeItem {
  param: NativeTensor;
  grad: NativeTensor;
  m: NativeTensor;
  v: NativeTensor;
  compute?: NativeTensor | null;
  lr: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  weightDecay?: number;
}

export interface NativeAddon {
  readonly sourceHash: string;
  readonly buildSystem: string;
  readonly abiVersion: number;
  cudaDeviceCount(): CudaDeviceCount;
  cudaDeviceInfo(index: number): CudaDeviceInfo;
  compiledKernels(): string[];
  blasStatus(): { available: boolean; detail: string };
  empty(shape: number[], dtype: DType, device: string): NativeTensor;
  upload(data: HostData, shape: number[], dtype: DType, device: string): Promise<NativeTensor>;
  wrapHost(data: HostData, shape: number[], dtype: DType): NativeTensor;
  download(t: NativeTensor): Promise<ArrayBuffer>;
  copyInto(dst: NativeTensor, src: NativeTensor): Promise<NativeTensor>;
  synchronize(device: string): Promise<void>;
  memoryStats(device: string): MemoryStats;
  emptyCache(device: string): void;
  /** Sets (or with null clears) one TCAL_* kernel switch in the C environment the launchers read; not while native work runs. */
  setKernelSwitch(name: string, value: string | null): void;
  cast(x: NativeTensor, dtype: DType, out?: NativeTensor | null): Promise<NativeTensor>;
  add(a: NativeTensor, b: NativeTensor, out?: NativeTensor | null): Promise<NativeTensor>;
  mul(a: NativeTensor, b: NativeTensor, out?: NativeTensor | null): Promise<NativeTensor>;
  scale(x: NativeTensor, alpha: number, out?: NativeTensor | null): Promise<NativeTensor>;
  fill(t: NativeTensor, value: number): Promise<NativeTensor>;
  random(t: NativeTensor, kind: 'uniform' | 'normal', seed: number, a: number, b: number): Promise<NativeTensor>;
  reduceSum(
    x: NativeTensor,
    axis: number | null,
    mean: boolean,
    keepDims: boolean,
    out?: NativeTensor | null,
  ): Promise<NativeTensor>;
  matmul(a: NativeTensor, b: NativeTensor, opts: MatmulNativeOptions): Promise<NativeTensor>;
  rmsNorm(x: NativeTensor, weight: NativeTensor, eps: number, out?: NativeTensor | null): Promise<NativeTensor>;
  rope(x: NativeTensor, positions: NativeTensor, invFreq: NativeTensor, out?: NativeTensor | null): Promise<NativeTensor>;
  embedding(table: NativeTensor, ids: NativeTensor, out?: NativeTensor | null): Promise<NativeTensor>;
  swiglu(gate: NativeTensor, up: NativeTensor, out?: NativeTensor | null): Promise<NativeTensor>;
  crossEntropy(logits: NativeTensor, targets: NativeTensor, out?: NativeTensor | null): Promise<NativeTensor>;
  rmsNormBackward(
    x: NativeTensor, weight: NativeTensor, dy: NativeTensor, eps: number, out?: { dx?: NativeTensor; dw?: NativeTensor } | null,
  ): Promise<{ dx: NativeTensor; dw: NativeTensor }>;
  ropeBackward(dy: NativeTensor, positions: NativeTensor, invFreq: NativeTensor, out?: NativeTensor | null): Promise<NativeTensor>;
  swigluBackward(
    gate: NativeTensor, up: NativeTensor, dOut: NativeTensor, out?: { dGate?: NativeTensor; dUp?: NativeTensor } | null,
  ): Promise<{ dGate: NativeTensor; dUp: NativeTensor }>;
  embeddingBackward(ids: NativeTensor, dOut: NativeTensor, vocabSize: number, out?: NativeTensor | null): Promise<NativeTensor>;
  crossEntropyBackward(
    logits: NativeTensor, targets: NativeTensor, dLoss: NativeTensor, out?: NativeTensor | null,
  ): Promise<NativeTensor>;
  crossEntropyForwardBackward(
    logits: NativeTensor, targets: NativeTensor, scale: number, out?: { loss?: NativeTensor; dLogits?: NativeTensor } | null,
  ): Promise<{ loss: NativeTensor; dLogits: NativeTensor }>;
  klForwardBackward(
    student: NativeTensor, teacher: NativeTensor, rowMask: NativeTensor, scale: number,
    out?: { loss?: NativeTensor; dLogits?: NativeTensor } | null,
  ): Promise<{ loss: NativeTensor; dLogits: NativeTensor }>;
  gdnForward(
    q: NativeTensor, k: NativeTensor, v: NativeTensor, g: NativeTensor, beta: NativeTensor, opts: GdnNativeOptions,
  ): Promise<{ o: NativeTensor; finalState: NativeTensor | null; chunkStates: NativeTensor | null; handover: GdnNativeHandover | null }>;
  gdnBackward(
    q: NativeTensor, k: NativeTensor, v: NativeTensor, g: NativeTensor, beta: NativeTensor, dO: NativeTensor,
    opts: GdnNativeOptions,
  ): Promise<GdnNativeGrads>;
  gdnDecodeStep(
    q: NativeTensor, k: NativeTensor, v: NativeTensor, g: NativeTensor, beta: NativeTensor, state: NativeTensor,
    opts: { scale?: number; l2norm?: boolean; aLog?: NativeTensor | null; dtBias?: NativeTensor | null; out?: NativeTensor | null },
  ): Promise<NativeTensor>;
  attentionForward(
    q: NativeTensor, k: NativeTensor, v: NativeTensor, opts: AttentionNativeOptions,
  ): Promise<{ o: NativeTensor; lse: NativeTensor | null }>;
  attentionBackward(
    q: NativeTensor, k: NativeTensor, v: NativeTensor, o: NativeTensor, lse: NativeTensor, dO: NativeTensor,
    opts: AttentionBackwardNativeOptions,
  ): Promise<{ dq: NativeTensor; dk: NativeTensor; dv: NativeTensor }>;
  taylorMoments(
    q: NativeTensor, k: NativeTensor, v: NativeTensor, invFreq: NativeTensor, decays: NativeTensor,
    acc: Record<string, NativeTensor>, opts: TaylorMomentsNativeOptions,
  ): Promise<void>;
  adamwStep(items: AdamwNativeItem[], opts: { step: number; gradScale?: number }): Promise<void>;
  gradNormSquared(grads: NativeTensor[], out?: NativeTensor | null): Promise<NativeTensor>;
  // GDN student layer ops (native/napi/gdn_layer_ops.cc)
  causalConv1d(
    x: NativeTensor, weight: NativeTensor, opts?: { cuSeqlens?: NativeTensor | null; out?: NativeTensor | null },
  ): Promise<NativeTensor>;
  causalConv1dBackward(
    x: NativeTensor, weight: NativeTensor, dy: NativeTensor,
    opts?: { cuSeqlens?: NativeTensor | null; accumulate?: boolean; out?: { dx?: NativeTensor; dw?: NativeTensor } },
  ): Promise<{ dx: NativeTensor; dw: NativeTensor }>;
  gatedRmsNorm(x: NativeTensor, weight: NativeTensor, gate: NativeTensor, eps: number, out?: NativeTensor | null): Promise<NativeTensor>;
  gatedRmsNormBackward(
    x: NativeTensor, weight: NativeTensor, gate: NativeTensor, dy: NativeTensor, eps: number,
    opts?: { accumulate?: boolean; out?: { dx?: NativeTensor; dw?: NativeTensor; dGate?: NativeTensor } },
  ): Promise<{ dx: NativeTensor; dw: NativeTensor; dGate: NativeTensor }>;
  silu(x: NativeTensor, out?: NativeTensor | null): Promise<NativeTensor>;
  siluBackward(x: NativeTensor, dy: NativeTensor, out?: NativeTensor | null): Promise<NativeTensor>;
  readonly taylorMomentsBins: number;
  readonly taylorMomentsLocalWindow: number;
  readonly taylorMomentsCuda: boolean;
}

/** The ABI this TS layer was written against; the addon reports its own. */
const ABI_VERSION = 1;

interface RawNativeError extends Error {
  tcalKind?: string;
  argument?: string;
  cudaName?: string;
  number?: number;
  op?: string;
  requested?: number;
  free?: number;
  device?: string;
}

/** Maps an error thrown or rejected by the addon to its typed class; other values pass through. */
export function translateNativeError(e: unknown): unknown {
  const raw = e as RawNativeError;
  if (!raw || typeof raw !== 'object' || typeof raw.tcalKind !== 'string') return e;
  const message = raw.message;
  switch (raw.tcalKind) {
    case 'InvalidArgument':
      return new InvalidArgumentError(raw.argument ?? 'argument', message.replace(`${raw.argument}: `, ''), { cause: e });
    case 'Cuda':
      return new CudaError(message, { cudaName: raw.cudaName ?? 'unknown', number: raw.number ?? -1, op: raw.op ?? '', cause: e });
    case 'OutOfMemory':
      return new OutOfMemoryError(message, {
        requested: raw.requested ?? 0,
        free: raw.free ?? 0,
        device: raw.device ?? '',
        cause: e,
      });
    case 'NotCompiled':
      return new NotCompiledError(message, { cause: e });
    default:
      return new TcalError('NATIVE_BINDING', `internal native error: ${message}`, { cause: e });
  }
}

/** Calls a NativeTensor method (not wrapped like the module's functions), translating its errors. */
export function callNative<T>(fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    throw translateNativeError(e);
  }
}

function wrapFunction<F extends (...args: never[]) => unknown>(fn: F): F {
  return function (this: unknown, ...args: never[]) {
    let r: unknown;
    try {
      r = fn.apply(this, args);
    } catch (e) {
      throw translateNativeError(e);
    }
    // A thenable, not instanceof Promise: jest's sandbox has its own Promise class.
    if (r && typeof (r as PromiseLike<unknown>).then === 'function') {
      return (r as Promise<unknown>).then(undefined, (e: unknown) => Promise.reject(translateNativeError(e)));
    }
    return r;
  } as F;
}

/** Project root: two levels up from dist/lib or one from lib (ts-jest runs the sources). */
function packageRoot(): string {
  let dir = __dirname;
  for (let i = 0; i < 4; i++) {
    if (fs.existsSync(path.join(dir, 'package.json')) && fs.existsSync(path.join(dir, 'native'))) return dir;
    dir = path.dirname(dir);
  }
  return path.resolve(__dirname, '..');
}

/** Candidate binaries, in order: TCAL_NATIVE_PATH, the cmake-js build, the node-gyp build. */
function candidatePaths(root: string): string[] {
  const env = process.env.TCAL_NATIVE_PATH;
  return [
    ...(env ? [env] : []),
    path.join(root, 'build', 'Release', 'tcal.node'),
    path.join(root, 'build', 'Debug', 'tcal.node'),
  ];
}

let loaded: NativeAddon | undefined;
let loadedPath: string | undefined;

/** Loads (once) and returns the addon. Throws NativeBindingError when missing or stale. */
export function native(): NativeAddon {
  if (loaded) return loaded;
  const root = packageRoot();
  const file = candidatePaths(root).find((p) => fs.existsSync(p));
  if (!file) {
    throw new NativeBindingError(
      `the native addon is not built (looked for ${candidatePaths(root).join(', ')}); run \`npm run build:native\``,
    );
  }
  let raw: Record<string, unknown>;
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    raw = require(file);
  } catch (e) {
    throw new NativeBindingError(`cannot load ${file}: ${(e as Error).message}`, { path: file, cause: e });
  }
  if (raw.abiVersion !== ABI_VERSION) {
    throw new NativeBindingError(
      `${file} has ABI ${String(raw.abiVersion)}, this package expects ${ABI_VERSION}; rebuild with \`npm run build:native\``,
      { path: file },
    );
  }
  if (process.env.TCAL_SKIP_STALE_CHECK !== '1') checkFresh(root, file, String(raw.sourceHash));
  const wrapped: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(raw)) {
    wrapped[k] = typeof v === 'function' && k !== 'NativeTensor' ? wrapFunction(v as (...a: never[]) => unknown) : v;
  }
  loaded = wrapped as unknown as NativeAddon;
  loadedPath = file;
  return loaded;
}

/** Where the addon was loaded from (after native()). */
export function nativePath(): string | undefined {
  return loadedPath;
}

/** A binary built from other native sources than the ones beside it is stale: refuse it with a reason. */
export function checkFresh(root: string, file: string, builtHash: string): void {
  if (builtHash === 'unknown') return;
  const hasher = path.join(root, 'native', 'source-hash.js');
  if (!fs.existsSync(hasher)) return;
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { sourceHash } = require(hasher) as { sourceHash(root: string): string };
  const current = sourceHash(root);
  if (current !== builtHash) {
    throw new NativeBindingError(
      `${file} is stale: built from native sources ${builtHash}, the sources here are ${current}; ` +
        'rebuild with `npm run build:native` (or set TCAL_SKIP_STALE_CHECK=1)',
      { path: file },
    );
  }
}

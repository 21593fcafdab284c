/**
 * Tensor: a handle to native memory on one device (dense, row-major). Memory is released by `dispose()`,
 * by `scope()` for every tensor created inside it and not returned, or at the latest by garbage collection.
 */
import { AsyncLocalStorage } from 'async_hooks';
import { InvalidArgumentError } from './errors';
import { defaultDevice } from './backend';
import { callNative, native, type DType, type DeviceName, type NativeTensor } from './native';

export type { DType, DeviceName } from './native';

export type HostArray = Float32Array | Float64Array | Int32Array | BigInt64Array | Uint16Array;

export interface CreateOptions {
  dtype?: DType;
  device?: DeviceName | string;
}

const scopes = new AsyncLocalStorage<Set<Tensor>>();

export class Tensor {
  /** The addon's handle; ops pass it to native code. */
  readonly native: NativeTensor;

  /** Wraps a native handle and registers it with the enclosing scope, if any. */
  constructor(handle: NativeTensor) {
    this.native = handle;
    scopes.getStore()?.add(this);
  }

  get shape(): number[] {
    return this.native.shape;
  }
  get dtype(): DType {
    return this.native.dtype;
  }
  get device(): DeviceName {
    return this.native.device as DeviceName;
  }
  get numel(): number {
    return this.native.shape.reduce((a, b) => a * b, 1);
  }
  get nbytes(): number {
    return this.native.nbytes;
  }
  get disposed(): boolean {
    return this.native.disposed;
  }

  /** Releases this handle's memory (once ops already queued on it have finished). Idempotent. */
  dispose(): void {
    this.native.dispose();
  }

  /** Same memory, another shape with the same element count. */
  view(shape: number[]): Tensor {
    return new Tensor(callNative(() => this.native.view(shape)));
  }

  /** Rows [begin, end) of the first dimension, sharing memory. */
  rows(begin: number, end: number): Tensor {
    return new Tensor(callNative(() => this.native.rows(begin, end)));
  }

  /** A copy of the raw elements on the host: bf16 / f16 come back as their 16-bit words (Uint16Array). */
  async toArray(): Promise<HostArray> {
    const buf = await native().download(this.native);
    return hostView(this.dtype, buf);
  }

  /** The elements as float32 on the host (converted on the tensor's device first when needed). */
  async toFloat32(): Promise<Float32Array> {
    if (this.dtype === 'f32') return new Float32Array(await native().download(this.native));
    const f = await native().cast(this.native, 'f32', null);
    try {
      return new Float32Array(await native().download(f));
    } finally {
      f.dispose();
    }
  }

  /** A copy on another device (or the same one). */
  async to(device: DeviceName | string): Promise<Tensor> {
    const dst = native().empty(this.shape, this.dtype, device);
    await native().copyInto(dst, this.native);
    return new Tensor(dst);
  }

  /** Uninitialised memory. */
  static empty(shape: number[], options: CreateOptions = {}): Tensor {
    return new Tensor(native().empty(shape, options.dtype ?? 'f32', options.device ?? defaultDevice()));
  }

  static async full(shape: number[], value: number, options: CreateOptions = {}): Promise<Tensor> {
    const t = Tensor.empty(shape, options);
    await native().fill(t.native, value);
    return t;
  }

  static zeros(shape: number[], options: CreateOptions = {}): Promise<Tensor> {
    return Tensor.full(shape, 0, options);
  }

  /**
   * A tensor holding `data` (copied). Float32Array / number[] data may target f32, bf16 or f16 (converted on
   * the device); other arrays must match the dtype's host type (Uint16Array for bf16 / f16 bit patterns).
   */
  static async fromArray(data: HostArray | number[], shape: number[], options: CreateOptions = {}): Promise<Tensor> {
    const device = options.device ?? defaultDevice();
    const src = Array.isArray(data) ? Float32Array.from(data) : data;
    const dtype = options.dtype ?? defaultDTypeOf(src);
    const count = shape.reduce((a, b) => a * b, 1);
    if (src.length !== count) {
      throw new InvalidArgumentError('data', `${src.length} elements do not fill shape [${shape.join(',')}] (${count})`);
    }
    if (src instanceof Float32Array && dtype !== 'f32' && (dtype === 'bf16' || dtype === 'f16')) {
      const f32 = await native().upload(src, shape, 'f32', device);
      try {
        return new Tensor(await native().cast(f32, dtype, null));
      } finally {
        f32.dispose();
      }
    }
    if (defaultDTypeOf(src) !== dtype && !(src instanceof Uint16Array && (dtype === 'bf16' || dtype === 'f16'))) {
      throw new InvalidArgumentError('data', `${src.constructor.name} cannot hold dtype ${dtype}`);
    }
    return new Tensor(await native().upload(src, shape, dtype, device));
  }

  /**
   * Zero-copy CPU tensor over a typed array's memory: writes through either side are visible to the other.
   * The array is kept alive as long as the tensor.
   */
  static wrap(data: HostArray, shape: number[], dtype?: DType): Tensor {
    return new Tensor(native().wrapHost(data, shape, dtype ?? defaultDTypeOf(data)));
  }
}

function defaultDTypeOf(a: HostArray): DType {
  if (a instanceof Float32Array) return 'f32';
  if (a instanceof Float64Array) return 'f64';
  if (a instanceof Int32Array) return 'i32';
  if (a instanceof BigInt64Array) return 'i64';
  return 'bf16';
}

function hostView(dtype: DType, buf: ArrayBuffer): HostArray {
  switch (dtype) {
    case 'f32':
      return new Float32Array(buf);
    case 'f64':
      return new Float64Array(buf);
    case 'i32':
      return new Int32Array(buf);
    case 'i64':
      return new BigInt64Array(buf);
    default:
      return new Uint16Array(buf);
  }
}

/** Tensors reachable from a returned value (tensors, arrays, plain objects, Maps, Sets). */
function collectTensors(v: unknown, into: Set<Tensor>, seen = new Set<unknown>()): void {
  if (v === null || typeof v !== 'object' || seen.has(v)) return;
  seen.add(v);
  if (v instanceof Tensor) {
    into.add(v);
    return;
  }
  if (ArrayBuffer.isView(v)) return;
  const items = v instanceof Map ? [...v.values()] : v instanceof Set ? [...v] : Array.isArray(v) ? v : Object.values(v);
  for (const x of items) collectTensors(x, into, seen);
}

/**
 * Runs `fn`; every tensor created inside it (also across awaits) and not reachable from its result is
 * disposed when it ends, also when it throws. Returned tensors move to the enclosing scope.
 */
export async function scope<T>(fn: () => T | Promise<T>): Promise<T> {
  const owned = new Set<Tensor>();
  const parent = scopes.getStore();
  let result: T | undefined;
  try {
    result = await scopes.run(owned, fn);
    return result;
  } finally {
    const kept = new Set<Tensor>();
    collectTensors(result, kept);
    for (const t of owned) {
      if (kept.has(t)) parent?.add(t);
      else t.dispose();
    }
  }
}

/** Moves `t` out of the current scope so it outlives it (the caller disposes it). */
export function keep<T extends Tensor>(t: T): T {
  scopes.getStore()?.delete(t);
  return t;
}

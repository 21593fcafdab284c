/** Shared test helpers: seeded random data, error norms, and which backends to run suites on. */
import { native } from '../lib/native';
import type { Tensor } from '../lib/tensor';

/** mulberry32: a small seeded PRNG so every test draws fresh but reproducible data. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Normal(0, std) samples (Box–Muller). */
export function randn(n: number, seed: number, std = 1): Float32Array {
  const r = rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const u = Math.max(r(), 1e-12);
    out[i] = std * Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * r());
  }
  return out;
}

/** ‖a − b‖ / ‖b‖, with NaN anywhere giving Infinity (an unwritten poisoned output must fail). */
export function relError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs ${b.length}`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    if (!Number.isFinite(a[i]) || !Number.isFinite(b[i])) return Infinity;
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / Math.max(den, 1e-300));
}

/**
 * Runs `body` with the TCAL_* kernel switch `name` set to `value` (undefined: cleared) in the C environment the
 * native launchers read, restoring it after. Jest's process.env is a copy that never reaches getenv, so a test
 * must switch kernels through the addon. The value before is taken from the real environment jest started with.
 */
export async function withKernelSwitch<R>(name: string, value: string | undefined, body: () => Promise<R>): Promise<R> {
  const before = process.env[name];
  native().setKernelSwitch(name, value ?? null);
  try {
    return await body();
  } finally {
    native().setKernelSwitch(name, before ?? null);
  }
}

/** withKernelSwitch for several switches at once (each set before `body`, each restored after). */
export function withKernelSwitches<R>(switches: Record<string, string>, body: () => Promise<R>): Promise<R> {
  return Object.entries(switches).reduceRight<() => Promise<R>>((inner, [name, value]) => () => withKernelSwitch(name, value, inner), body)();
}

/** Whether the CUDA suites should run: TCAL_BACKEND=cuda and a device answers. */
export function cudaEnabled(): boolean {
  if ((process.env.TCAL_BACKEND ?? '').toLowerCase() !== 'cuda') return false;
  return native().cudaDeviceCount().count > 0;
}

/** Devices the device-generic suites run on: CPU always, CUDA when enabled. */
export function testDevices(): string[] {
  return cudaEnabled() ? ['cpu', 'cuda:0'] : ['cpu'];
}

/** bf16 rounding of a float (round to nearest even), for host-side expectations. */
export function roundBf16(x: number): number {
  const f = new Float32Array([x]);
  const u = new Uint32Array(f.buffer);
  u[0] = (u[0] + 0x7fff + ((u[0] >> 16) & 1)) & 0xffff0000;
  return f[0];
}

/**
 * The start of a `node -e` script that can require our TypeScript sources (transpiled on load, no type check):
 * for tests that kill a child process mid-work.
 */
export function tsChildPrelude(): string {
  return `
const fs = require('fs');
const ts = require(${JSON.stringify(require.resolve('typescript'))});
require.extensions['.ts'] = (m, file) => {
  const src = fs.readFileSync(file, 'utf8');
  const js = ts.transpileModule(src, { fileName: file, compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022 } }).outputText;
  m._compile(js, file);
};
`;
}

/** A tensor's elements as f64 on the host (f64 read as is, every other dtype through f32). */
export async function hostF64(t: Tensor): Promise<Float64Array> {
  return t.dtype === 'f64' ? ((await t.toArray()) as Float64Array) : Float64Array.from(await t.toFloat32());
}

export function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
}

/** Central differences of L(p) = Σ r ⊙ f(p) with respect to every element of p. */
export function numericGrad(p: Float64Array, f: (p: Float64Array) => ArrayLike<number>, r: ArrayLike<number>, h = 1e-5): Float64Array {
  const g = new Float64Array(p.length);
  for (let i = 0; i < p.length; i++) {
    const q = Float64Array.from(p);
    q[i] = p[i] + h;
    const up = dot(r, f(q));
    q[i] = p[i] - h;
    g[i] = (up - dot(r, f(q))) / (2 * h);
  }
  return g;
}

/**
 * Backend selection: 'auto' takes CUDA when a device answers and otherwise falls back to the CPU with a reason
 * you can read; 'cuda' insists (a typed error says why it cannot); 'cpu' never touches CUDA.
 * The default comes from TCAL_BACKEND, else 'auto'.
 */
import { CudaError, InvalidArgumentError, NotCompiledError } from './errors';
import { native, type CudaDeviceInfo, type DeviceName } from './native';

export type BackendChoice = 'auto' | 'cuda' | 'cpu';

export interface BackendInfo {
  /** What was asked for. */
  requested: BackendChoice;
  /** What runs. */
  backend: 'cuda' | 'cpu';
  /** The default device of new tensors. */
  device: DeviceName;
  /** Why this backend (e.g. why CUDA was not taken). */
  reason: string;
  cudaCompiled: boolean;
  cudaDevices: number;
}

let current: BackendInfo | undefined;

function parseChoice(v: string | undefined, source: string): BackendChoice {
  const choice = (v ?? 'auto').toLowerCase();
  if (choice === 'auto' || choice === 'cuda' || choice === 'cpu') return choice;
  throw new InvalidArgumentError(source, `unknown backend '${v}' (expected auto, cuda or cpu)`);
}

/** Chooses the backend (once per call; later calls re-choose). */
export function initBackend(options: { backend?: BackendChoice } = {}): BackendInfo {
  const requested = options.backend
    ? parseChoice(options.backend, 'backend')
    : parseChoice(process.env.TCAL_BACKEND, 'TCAL_BACKEND');
  const n = native();
  const cuda = n.cudaDeviceCount();
  const base = { requested, cudaCompiled: cuda.compiled, cudaDevices: cuda.count };
  if (requested === 'cpu') {
    current = { ...base, backend: 'cpu', device: 'cpu', reason: 'CPU requested' };
  } else if (cuda.count > 0) {
    current = { ...base, backend: 'cuda', device: 'cuda:0', reason: `${cuda.count} CUDA device(s) found` };
  } else if (requested === 'cuda') {
    if (!cuda.compiled) throw new NotCompiledError(`CUDA backend requested but ${cuda.reason}`);
    throw new CudaError(`CUDA backend requested but ${cuda.reason}`, { cudaName: 'cudaErrorNoDevice', number: 100, op: 'cudaGetDeviceCount' });
  } else {
    current = { ...base, backend: 'cpu', device: 'cpu', reason: `falling back to CPU: ${cuda.reason}` };
  }
  return current;
}

/** The backend in force (chosen on first use). */
export function backendInfo(): BackendInfo {
  return current ?? initBackend();
}

/** Device that new tensors go to when none is named. */
export function defaultDevice(): DeviceName {
  return backendInfo().device;
}

/** Facts about each CUDA device (empty when none). */
export function cudaDevices(): CudaDeviceInfo[] {
  const n = native();
  const { count } = n.cudaDeviceCount();
  return Array.from({ length: count }, (_, i) => n.cudaDeviceInfo(i));
}

/**
 * Typed errors (DESIGN.md §8). Every error carries a stable `code` and, where it wraps another, `cause`.
 * Native failures arrive as plain objects from the addon and are turned into these by lib/native.ts.
 */

export type ErrorCode =
  | 'CHECKPOINT_FORMAT'
  | 'CONFIG'
  | 'TOKENIZER'
  | 'DATA'
  | 'CUDA'
  | 'OUT_OF_MEMORY'
  | 'NATIVE_BINDING'
  | 'ABORT'
  | 'INVALID_ARGUMENT'
  | 'NOT_COMPILED';

export class TcalError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** A checkpoint file is malformed: names the file, and where known the tensor and byte offset. */
export class CheckpointFormatError extends TcalError {
  readonly file: string;
  readonly tensor?: string;
  readonly offset?: number;
  constructor(message: string, info: { file: string; tensor?: string; offset?: number; cause?: unknown }) {
    const where = [info.file, info.tensor && `tensor ${info.tensor}`, info.offset !== undefined && `offset ${info.offset}`]
      .filter(Boolean)
      .join(', ');
    super('CHECKPOINT_FORMAT', `${where}: ${message}`, { cause: info.cause });
    this.file = info.file;
    this.tensor = info.tensor;
    this.offset = info.offset;
  }
}

/** An unsupported or inconsistent model / run configuration: names the key and the value. */
export class ConfigError extends TcalError {
  readonly key?: string;
  readonly value?: unknown;
  readonly file?: string;
  constructor(message: string, info: { key?: string; value?: unknown; file?: string; cause?: unknown } = {}) {
    super('CONFIG', info.file ? `${info.file}: ${message}` : message, { cause: info.cause });
    this.key = info.key;
    this.value = info.value;
    this.file = info.file;
  }
}

export class TokenizerError extends TcalError {
  readonly file?: string;
  constructor(message: string, info: { file?: string; cause?: unknown } = {}) {
    super('TOKENIZER', info.file ? `${info.file}: ${message}` : message, { cause: info.cause });
    this.file = info.file;
  }
}

export class DataError extends TcalError {
  readonly file?: string;
  readonly line?: number;
  constructor(message: string, info: { file?: string; line?: number; cause?: unknown } = {}) {
    const where = info.file ? `${info.file}${info.line !== undefined ? `:${info.line}` : ''}: ` : '';
    super('DATA', `${where}${message}`, { cause: info.cause });
    this.file = info.file;
    this.line = info.line;
  }
}

/** A CUDA runtime / driver / cuBLAS call failed. `name` of the CUDA error is `cudaName` (Error.name is the class). */
export class CudaError extends TcalError {
  readonly cudaName: string;
  readonly number: number;
  readonly op: string;
  constructor(message: string, info: { cudaName: string; number: number; op: string; cause?: unknown }) {
    super('CUDA', message, { cause: info.cause });
    this.cudaName = info.cudaName;
    this.number = info.number;
    this.op = info.op;
  }
}

/** A device allocation failed even after the caching allocator released its cache. */
export class OutOfMemoryError extends TcalError {
  readonly requested: number;
  readonly free: number;
  readonly device: string;
  constructor(message: string, info: { requested: number; free: number; device: string; cause?: unknown }) {
    super('OUT_OF_MEMORY', message, { cause: info.cause });
    this.requested = info.requested;
    this.free = info.free;
    this.device = info.device;
  }
}

/** The addon is missing, stale (built from other sources or for another ABI), or failed to load. */
export class NativeBindingError extends TcalError {
  readonly path?: string;
  constructor(message: string, info: { path?: string; cause?: unknown } = {}) {
    super('NATIVE_BINDING', message, { cause: info.cause });
    this.path = info.path;
  }
}

export class AbortError extends TcalError {
  constructor(message = 'the operation was aborted', options?: { cause?: unknown }) {
    super('ABORT', message, options);
  }
}

/** A bad argument to an API call: names the argument. */
export class InvalidArgumentError extends TcalError {
  readonly argument: string;
  constructor(argument: string, message: string, options?: { cause?: unknown }) {
    super('INVALID_ARGUMENT', `${argument}: ${message}`, options);
    this.argument = argument;
  }
}

/** The requested kernel / backend was not compiled into this binary. */
export class NotCompiledError extends TcalError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('NOT_COMPILED', message, options);
  }
}

/** Throws AbortError if the signal has fired. */
export function throwIfAborted(signal?: AbortSignal): void {
  if (signal?.aborted) throw new AbortError('the operation was aborted', { cause: signal.reason });
}

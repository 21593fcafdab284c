/**
 * Training checkpoints (resumable training, DESIGN.md §5.5 / §8): model tensors, AdamW moments, schedule state,
 * data position, RNG state and step, in one directory per save:
 *
 *   <out>/step-<N>/model.safetensors      model tensors (any safetensors dtype, bit-exact)
 *                  optimizer.safetensors  "m.<name>" and "v.<name>" for every parameter with optimizer state
 *                  trainer_state.json     step, schedule, data, rng, extra, and each file's byte size
 *
 * A save writes everything into a hidden temporary directory in `<out>` (`.step-<N>.tmp-<pid>-<random>`),
 * fsyncs each file and the directory, then renames it to `step-<N>` and fsyncs `<out>`. The rename is the
 * commit: a crash at any moment leaves either no `step-<N>` or a complete one. Only after that are older
 * checkpoints beyond `keep` deleted. latestCheckpoint never looks at temporary directories.
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { CheckpointFormatError, InvalidArgumentError } from '../errors';
import type { Dtype } from '../io/dtype';
import { writeAll } from '../io/file-io';
import { isPlainObject } from '../io/json-values';
import { openSafetensors, writeSafetensors, type TensorToWrite } from '../io/safetensors';

export const CHECKPOINT_FORMAT = 'tcal-training-checkpoint';
export const CHECKPOINT_VERSION = 1;
const MODEL_FILE = 'model.safetensors';
const OPTIMIZER_FILE = 'optimizer.safetensors';
const STATE_FILE = 'trainer_state.json';
const STEP_DIR = /^step-(0|[1-9]\d*)$/;
const TEMP_DIR = /^\.step-\d+\.(tmp|old)-(\d+)-[0-9a-f]+$/;

/** A tensor on the host: little-endian element bytes of a safetensors dtype. */
export interface HostTensor {
  dtype: Dtype;
  shape: number[];
  data: ArrayBufferView;
}

export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };

export interface TrainingCheckpoint {
  /** Optimizer steps completed. */
  step: number;
  model: ReadonlyMap<string, HostTensor>;
  /** AdamW first and second moments by parameter name (f32, the parameter's shape). */
  optimizer: { m: ReadonlyMap<string, HostTensor>; v: ReadonlyMap<string, HostTensor> };
  /** The lr schedule's state (its config; the step is above). */
  schedule: JsonValue;
  /** Where the data stream stands (epoch, offset, shuffle seed, ...). */
  data: JsonValue;
  /** RNG state(s) needed to continue identically. */
  rng: JsonValue;
  /** Anything else the trainer wants back (config, metrics so far). */
  extra?: JsonValue;
}

export interface SaveOptions {
  /** Keep this many most recent checkpoints (by step) in `out`, the new one included; default: keep all. */
  keep?: number;
}

function stepDirName(step: number): string {
  return `step-${step}`;
}

async function syncPath(p: string): Promise<void> {
  let handle: fsp.FileHandle | undefined;
  try {
    handle = await fsp.open(p, 'r');
    await handle.sync();
  } catch {
    // Directories cannot be opened on Windows and some file systems refuse fsync on them: best effort.
  } finally {
    await handle?.close().catch(() => undefined);
  }
}

function toWrite(prefix: string, tensors: ReadonlyMap<string, HostTensor>): TensorToWrite[] {
  return [...tensors].map(([name, t]) => ({ name: prefix + name, dtype: t.dtype, shape: t.shape, data: t.data }));
}

function checkState(state: TrainingCheckpoint): void {
  if (!Number.isSafeInteger(state.step) || state.step < 0) throw new InvalidArgumentError('step', `must be a non-negative integer, got ${state.step}`);
  for (const which of ['m', 'v'] as const) {
    for (const [name, t] of state.optimizer[which]) {
      const p = state.model.get(name);
      if (!p) throw new InvalidArgumentError('optimizer', `${which}.${name} has no model tensor ${name}`);
      if (t.dtype !== 'F32') throw new InvalidArgumentError('optimizer', `${which}.${name} must be F32, got ${t.dtype}`);
      if (t.shape.length !== p.shape.length || t.shape.some((d, i) => d !== p.shape[i]))
        throw new InvalidArgumentError('optimizer', `${which}.${name} has shape ${JSON.stringify(t.shape)}, the parameter ${JSON.stringify(p.shape)}`);
    }
  }
}

/**
 * Saves `state` as `<out>/step-<state.step>` (replacing a checkpoint of the same step, if any) and returns
 * that directory. Older checkpoints beyond `keep` are removed only once the new one is in place.
 */
export async function saveCheckpoint(out: string, state: TrainingCheckpoint, options: SaveOptions = {}): Promise<string> {
  checkState(state);
  const keep = options.keep;
  if (keep !== undefined && !(Number.isSafeInteger(keep) && keep >= 1)) throw new InvalidArgumentError('keep', `must be a positive integer, got ${keep}`);
  await fsp.mkdir(out, { recursive: true });
  const name = stepDirName(state.step);
  const target = path.join(out, name);
  const tag = `${process.pid}-${randomBytes(6).toString('hex')}`;
  const temporary = path.join(out, `.${name}.tmp-${tag}`);
  await fsp.mkdir(temporary);
  try {
    // writeSafetensors fsyncs each file (and renames it into place inside the temporary directory).
    await writeSafetensors(path.join(temporary, MODEL_FILE), toWrite('', state.model), { format: 'pt' });
    await writeSafetensors(path.join(temporary, OPTIMIZER_FILE), [...toWrite('m.', state.optimizer.m), ...toWrite('v.', state.optimizer.v)], {
      format: 'pt',
    });
    const files: Record<string, number> = {};
    for (const f of [MODEL_FILE, OPTIMIZER_FILE]) files[f] = (await fsp.stat(path.join(temporary, f))).size;
    const json = {
      format: CHECKPOINT_FORMAT,
      version: CHECKPOINT_VERSION,
      step: state.step,
      schedule: state.schedule,
      data: state.data,
      rng: state.rng,
      extra: state.extra ?? null,
      files,
    };
    const fh = await fsp.open(path.join(temporary, STATE_FILE), 'wx');
    try {
      await writeAll(fh, Buffer.from(JSON.stringify(json, null, 2) + '\n', 'utf8'), null);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await syncPath(temporary);
    // The commit. A checkpoint of the same step is moved aside first (rename cannot replace a non-empty directory).
    let aside: string | undefined;
    try {
      await fsp.rename(temporary, target);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== 'ENOTEMPTY' && code !== 'EEXIST' && code !== 'EPERM') throw e;
      aside = path.join(out, `.${name}.old-${tag}`);
      await fsp.rename(target, aside);
      await fsp.rename(temporary, target);
    }
    await syncPath(out);
    if (aside) await fsp.rm(aside, { recursive: true, force: true });
  } catch (error) {
    await fsp.rm(temporary, { recursive: true, force: true }).catch(() => undefined);
    throw error;
  }
  if (keep !== undefined) {
    const all = await listCheckpoints(out);
    for (const old of all.slice(0, Math.max(0, all.length - keep))) {
      if (old.dir !== target) await fsp.rm(old.dir, { recursive: true, force: true });
    }
  }
  await removeAbandonedTemporaries(out);
  return target;
}

function processAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Deletes temporary directories left by saves whose process is gone (killed mid-write). */
async function removeAbandonedTemporaries(out: string): Promise<void> {
  let entries: string[];
  try {
    entries = await fsp.readdir(out);
  } catch {
    return;
  }
  for (const e of entries) {
    const m = TEMP_DIR.exec(e);
    if (m && !processAlive(Number(m[2]))) await fsp.rm(path.join(out, e), { recursive: true, force: true }).catch(() => undefined);
  }
}

/** Complete checkpoints in `out`, oldest first (temporary directories are never listed). */
export async function listCheckpoints(out: string): Promise<Array<{ step: number; dir: string }>> {
  let entries: import('node:fs').Dirent[];
  try {
    entries = await fsp.readdir(out, { withFileTypes: true });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
  const found: Array<{ step: number; dir: string }> = [];
  for (const e of entries) {
    const m = STEP_DIR.exec(e.name);
    if (!m || !e.isDirectory()) continue;
    const step = Number(m[1]);
    if (Number.isSafeInteger(step)) found.push({ step, dir: path.join(out, e.name) });
  }
  return found.sort((a, b) => a.step - b.step);
}

/** The directory of the most recent complete checkpoint in `out`, or null when there is none. */
export async function latestCheckpoint(out: string): Promise<string | null> {
  const all = await listCheckpoints(out);
  return all.length ? all[all.length - 1].dir : null;
}

async function readAllTensors(file: string, stripPrefix?: { m: string; v: string }) {
  const reader = await openSafetensors(file);
  try {
    const all = new Map<string, HostTensor>();
    for (const name of reader.names) {
      const info = reader.info(name);
      // An ArrayBuffer of its own (offset 0), so callers can view it as any element type.
      const bytes = new Uint8Array(new ArrayBuffer(info.byteLength));
      await reader.readTensorInto(name, bytes);
      all.set(name, { dtype: info.dtype, shape: info.shape, data: bytes });
    }
    if (!stripPrefix) return { all };
    const m = new Map<string, HostTensor>();
    const v = new Map<string, HostTensor>();
    for (const [name, t] of all) {
      if (name.startsWith(stripPrefix.m)) m.set(name.slice(stripPrefix.m.length), t);
      else if (name.startsWith(stripPrefix.v)) v.set(name.slice(stripPrefix.v.length), t);
      else throw new CheckpointFormatError('optimizer tensor is neither m.* nor v.*', { file, tensor: name });
    }
    return { all, m, v };
  } finally {
    await reader.close();
  }
}

/**
 * Loads a checkpoint directory written by saveCheckpoint. Tensor data comes back as byte views
 * (a Uint8Array owning its ArrayBuffer; view it as the dtype's array type). Malformed → CheckpointFormatError.
 */
export async function loadCheckpoint(dir: string): Promise<TrainingCheckpoint> {
  const stateFile = path.join(dir, STATE_FILE);
  let json: unknown;
  try {
    json = JSON.parse(await fsp.readFile(stateFile, 'utf8'));
  } catch (cause) {
    throw new CheckpointFormatError(`cannot read the trainer state (${(cause as Error).message})`, { file: stateFile, cause });
  }
  if (!isPlainObject(json) || json.format !== CHECKPOINT_FORMAT) throw new CheckpointFormatError(`not a ${CHECKPOINT_FORMAT} state file`, { file: stateFile });
  if (json.version !== CHECKPOINT_VERSION) throw new CheckpointFormatError(`version ${JSON.stringify(json.version)} is not ${CHECKPOINT_VERSION}`, { file: stateFile });
  const step = json.step;
  if (typeof step !== 'number' || !Number.isSafeInteger(step) || step < 0) throw new CheckpointFormatError(`bad step ${JSON.stringify(step)}`, { file: stateFile });
  const files = json.files;
  if (!isPlainObject(files)) throw new CheckpointFormatError('no file list', { file: stateFile });
  for (const f of [MODEL_FILE, OPTIMIZER_FILE]) {
    const file = path.join(dir, f);
    const size = await fsp.stat(file).then(
      (s) => s.size,
      () => -1,
    );
    if (size !== files[f]) throw new CheckpointFormatError(`is ${size < 0 ? 'missing' : `${size} bytes`}, the trainer state says ${JSON.stringify(files[f])}`, { file });
  }
  const model = (await readAllTensors(path.join(dir, MODEL_FILE))).all;
  const opt = await readAllTensors(path.join(dir, OPTIMIZER_FILE), { m: 'm.', v: 'v.' });
  const state: TrainingCheckpoint = {
    step,
    model,
    optimizer: { m: opt.m!, v: opt.v! },
    schedule: (json.schedule ?? null) as JsonValue,
    data: (json.data ?? null) as JsonValue,
    rng: (json.rng ?? null) as JsonValue,
    extra: (json.extra ?? null) as JsonValue,
  };
  try {
    checkState(state);
  } catch (cause) {
    throw new CheckpointFormatError((cause as Error).message, { file: path.join(dir, OPTIMIZER_FILE), cause });
  }
  return state;
}

/**
 * Our own safetensors reader and writer (format: 8-byte little-endian header length N, N bytes of JSON
 * header, then the data section; each header entry gives dtype, shape and [begin, end) data offsets
 * relative to the data section; an optional "__metadata__" maps strings to strings).
 *
 * Reading validates the whole header before any tensor memory is allocated (DESIGN.md §8) and then reads
 * tensors with positional reads, so files and shards over 4 GiB work and no file is ever read whole.
 * Writing goes through a temporary file that is fsynced and renamed, so a failed write leaves nothing.
 */

import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { CheckpointFormatError, InvalidArgumentError } from '../errors';
import { DTYPE_BYTES, Dtype, byteLengthOf, isDtype } from './dtype';
import { bytesOf, readAt, writeAll, writeFileAtomically } from './file-io';
import { compareUtf8, isPlainObject, isSafeNonNegativeInteger } from './json-values';

/** The reference implementation's bound on the header; anything larger is refused before allocating it. */
export const MAX_HEADER_BYTES = 100_000_000;
const METADATA_KEY = '__metadata__';
export const SINGLE_FILE_NAME = 'model.safetensors';
export const INDEX_FILE_NAME = 'model.safetensors.index.json';
/** transformers' default max_shard_size ("5GB" = 5·10^9 bytes). */
export const DEFAULT_MAX_SHARD_BYTES = 5_000_000_000;

export interface TensorInfo {
  name: string;
  dtype: Dtype;
  shape: number[];
  byteLength: number;
  /** The file holding the tensor. */
  file: string;
  /** Absolute byte offset of the tensor's data in `file`. */
  offset: number;
}

/** What both a single safetensors file and a (possibly sharded) checkpoint directory offer. */
export interface TensorReader extends AsyncDisposable {
  /** Tensor names, sorted. */
  readonly names: readonly string[];
  /** The `__metadata__` of the file (for a sharded checkpoint: of its first shard). */
  readonly metadata: Readonly<Record<string, string>>;
  has(name: string): boolean;
  /** Throws CheckpointFormatError when there is no such tensor. */
  info(name: string): TensorInfo;
  /** Reads a tensor's bytes into a new Buffer. */
  readTensor(name: string): Promise<Buffer>;
  /** Reads a tensor's bytes into `target`, which must be exactly byteLength long. */
  readTensorInto(name: string, target: Uint8Array): Promise<void>;
  close(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------------------
// Header parsing and validation (pure: takes the bytes, returns tensor infos or throws).

interface ParsedHeader {
  tensors: Map<string, TensorInfo>;
  metadata: Record<string, string>;
}

/**
 * Validates a header (already known to be `headerLength` bytes of a file `fileSize` bytes long) and
 * returns its tensors with absolute offsets. Every error names the file, the tensor where there is one,
 * and the byte offset in the file.
 */
function parseHeader(file: string, headerBytes: Uint8Array, fileSize: number): ParsedHeader {
  const dataStart = 8 + headerBytes.byteLength;
  const dataSize = fileSize - dataStart;
  const headerError = (message: string, cause?: unknown) => new CheckpointFormatError(message, { file, offset: 8, cause });

  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(headerBytes);
  } catch (cause) {
    throw headerError('header is not valid UTF-8', cause);
  }
  let header: unknown;
  try {
    header = JSON.parse(text);
  } catch (cause) {
    throw headerError(`header is not valid JSON (${(cause as Error).message})`, cause);
  }
  if (!isPlainObject(header)) throw headerError(`header must be a JSON object, got ${Array.isArray(header) ? 'an array' : typeof header}`);

  const metadata: Record<string, string> = {};
  const tensors = new Map<string, TensorInfo>();
  for (const [name, entry] of Object.entries(header)) {
    if (name === METADATA_KEY) {
      if (!isPlainObject(entry)) throw headerError('__metadata__ must be an object of strings');
      for (const [key, value] of Object.entries(entry)) {
        if (typeof value !== 'string') throw headerError(`__metadata__.${key} must be a string, got ${JSON.stringify(value)}`);
        metadata[key] = value;
      }
      continue;
    }
    const tensorError = (message: string, offset = 8) => new CheckpointFormatError(message, { file, tensor: name, offset });
    if (!isPlainObject(entry)) throw tensorError('header entry must be an object with dtype, shape and data_offsets');
    const { dtype, shape, data_offsets: dataOffsets } = entry;
    if (typeof dtype !== 'string') throw tensorError(`dtype must be a string, got ${JSON.stringify(dtype)}`);
    if (!isDtype(dtype)) throw tensorError(`unsupported dtype ${dtype} (supported: ${Object.keys(DTYPE_BYTES).join(', ')})`);
    if (!Array.isArray(shape) || !shape.every(isSafeNonNegativeInteger)) {
      throw tensorError(`shape must be an array of non-negative integers, got ${JSON.stringify(shape)}`);
    }
    if (!Array.isArray(dataOffsets) || dataOffsets.length !== 2 || !dataOffsets.every(isSafeNonNegativeInteger)) {
      throw tensorError(`data_offsets must be [begin, end] non-negative integers, got ${JSON.stringify(dataOffsets)}`);
    }
    const [begin, end] = dataOffsets as [number, number];
    if (begin > end) throw tensorError(`data_offsets [${begin}, ${end}] end before they begin`, dataStart + begin);
    if (end > dataSize) {
      throw tensorError(`data_offsets [${begin}, ${end}] run past the data section (${dataSize} bytes)`, dataStart + end);
    }
    const byteLength = byteLengthOf(dtype, shape as number[]);
    if (!Number.isSafeInteger(byteLength) || byteLength !== end - begin) {
      throw tensorError(
        `${dtype} ${JSON.stringify(shape)} needs ${byteLength} bytes but data_offsets [${begin}, ${end}] hold ${end - begin}`,
        dataStart + begin,
      );
    }
    tensors.set(name, { name, dtype, shape: shape as number[], byteLength, file, offset: dataStart + begin });
  }

  // No two (non-empty) tensors may share bytes.
  const byOffset = [...tensors.values()].filter((t) => t.byteLength > 0).sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < byOffset.length; i++) {
    const previous = byOffset[i - 1];
    const current = byOffset[i];
    if (current.offset < previous.offset + previous.byteLength) {
      throw new CheckpointFormatError(`data overlaps tensor ${previous.name}`, { file, tensor: current.name, offset: current.offset });
    }
  }
  return { tensors, metadata };
}

// ---------------------------------------------------------------------------------------------------------
// Reading one file.

class SafetensorsFile implements TensorReader {
  readonly names: readonly string[];
  private closed = false;

  constructor(
    readonly file: string,
    private readonly handle: fsp.FileHandle,
    private readonly tensors: Map<string, TensorInfo>,
    readonly metadata: Readonly<Record<string, string>>,
  ) {
    this.names = [...tensors.keys()].sort();
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  info(name: string): TensorInfo {
    const info = this.tensors.get(name);
    if (!info) throw new CheckpointFormatError('no such tensor', { file: this.file, tensor: name });
    return info;
  }

  async readTensor(name: string): Promise<Buffer> {
    const info = this.info(name);
    const buffer = Buffer.allocUnsafe(info.byteLength);
    await this.readInfoInto(info, buffer);
    return buffer;
  }

  async readTensorInto(name: string, target: Uint8Array): Promise<void> {
    const info = this.info(name);
    if (target.byteLength !== info.byteLength) {
      throw new InvalidArgumentError('target', `tensor ${name} is ${info.byteLength} bytes, target is ${target.byteLength}`);
    }
    await this.readInfoInto(info, target);
  }

  private async readInfoInto(info: TensorInfo, target: Uint8Array): Promise<void> {
    if (this.closed) throw new InvalidArgumentError('reader', `${this.file} is closed`);
    const bytesRead = await readAt(this.handle, target, info.offset);
    if (bytesRead !== info.byteLength) {
      throw new CheckpointFormatError(`file ends after ${bytesRead} of the tensor's ${info.byteLength} bytes (truncated or changed since opened)`, {
        file: this.file,
        tensor: info.name,
        offset: info.offset + bytesRead,
      });
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.handle.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** Opens one .safetensors file and validates its header; tensor data is read on demand. */
export async function openSafetensors(file: string): Promise<TensorReader & { readonly file: string }> {
  let handle: fsp.FileHandle;
  try {
    handle = await fsp.open(file, 'r');
  } catch (cause) {
    throw new CheckpointFormatError(`cannot open (${(cause as Error).message})`, { file, cause });
  }
  try {
    const fileSize = (await handle.stat()).size;
    if (fileSize < 8) throw new CheckpointFormatError(`file is ${fileSize} bytes, shorter than the 8-byte header length`, { file, offset: 0 });
    const lengthBytes = new Uint8Array(8);
    await readAt(handle, lengthBytes, 0);
    const headerLength = new DataView(lengthBytes.buffer).getBigUint64(0, true);
    if (headerLength > BigInt(MAX_HEADER_BYTES)) {
      throw new CheckpointFormatError(`header length ${headerLength} exceeds the ${MAX_HEADER_BYTES}-byte limit`, { file, offset: 0 });
    }
    if (headerLength > BigInt(fileSize - 8)) {
      throw new CheckpointFormatError(`header length ${headerLength} is larger than the ${fileSize - 8} bytes after it`, { file, offset: 0 });
    }
    const headerBytes = new Uint8Array(Number(headerLength));
    const got = await readAt(handle, headerBytes, 8);
    if (got !== headerBytes.byteLength) throw new CheckpointFormatError('file shrank while reading the header', { file, offset: 8 + got });
    const { tensors, metadata } = parseHeader(file, headerBytes, fileSize);
    return new SafetensorsFile(file, handle, tensors, metadata);
  } catch (error) {
    await handle.close().catch(() => undefined);
    throw error;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Reading a checkpoint directory (model.safetensors, or shards listed by model.safetensors.index.json).

class ShardedCheckpoint implements TensorReader {
  readonly names: readonly string[];
  readonly metadata: Readonly<Record<string, string>>;

  constructor(
    readonly file: string,
    private readonly shardOf: Map<string, TensorReader>,
    private readonly shards: TensorReader[],
    readonly indexMetadata: Readonly<Record<string, unknown>>,
  ) {
    this.names = [...shardOf.keys()].sort();
    this.metadata = shards[0]?.metadata ?? {};
  }

  has(name: string): boolean {
    return this.shardOf.has(name);
  }

  info(name: string): TensorInfo {
    return this.shardFor(name).info(name);
  }

  readTensor(name: string): Promise<Buffer> {
    return this.shardFor(name).readTensor(name);
  }

  readTensorInto(name: string, target: Uint8Array): Promise<void> {
    return this.shardFor(name).readTensorInto(name, target);
  }

  private shardFor(name: string): TensorReader {
    const shard = this.shardOf.get(name);
    if (!shard) throw new CheckpointFormatError('no such tensor in the weight map', { file: this.file, tensor: name });
    return shard;
  }

  async close(): Promise<void> {
    await Promise.all(this.shards.map((shard) => shard.close()));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

async function exists(file: string): Promise<boolean> {
  return fsp.stat(file).then(
    (s) => s.isFile(),
    () => false,
  );
}

/**
 * Opens a Hugging Face checkpoint directory: `model.safetensors.index.json` (sharded; it wins, as in
 * transformers) or `model.safetensors`. Every shard is opened and validated, and every tensor of the
 * weight map must be in the shard it is mapped to, before this returns.
 */
export async function openCheckpoint(dir: string): Promise<TensorReader & { readonly file: string }> {
  const indexFile = path.join(dir, INDEX_FILE_NAME);
  if (await exists(indexFile)) return openShardedCheckpoint(dir, indexFile);
  const singleFile = path.join(dir, SINGLE_FILE_NAME);
  if (await exists(singleFile)) return openSafetensors(singleFile);
  throw new CheckpointFormatError(`neither ${SINGLE_FILE_NAME} nor ${INDEX_FILE_NAME} found`, { file: dir });
}

async function openShardedCheckpoint(dir: string, indexFile: string): Promise<ShardedCheckpoint> {
  const indexError = (message: string, tensor?: string, cause?: unknown) => new CheckpointFormatError(message, { file: indexFile, tensor, cause });
  let index: unknown;
  try {
    index = JSON.parse(await fsp.readFile(indexFile, 'utf8'));
  } catch (cause) {
    throw indexError(`cannot read the index as JSON (${(cause as Error).message})`, undefined, cause);
  }
  if (!isPlainObject(index) || !isPlainObject(index.weight_map)) throw indexError('index must be an object with a weight_map object');
  const indexMetadata = index.metadata === undefined ? {} : index.metadata;
  if (!isPlainObject(indexMetadata)) throw indexError('index metadata must be an object');

  const tensorsByShard = new Map<string, string[]>();
  for (const [tensor, shardName] of Object.entries(index.weight_map)) {
    // Shards are plain file names next to the index; anything else could point outside the checkpoint.
    if (typeof shardName !== 'string' || shardName === '' || shardName !== path.basename(shardName) || shardName === '..' || shardName.includes('\\')) {
      throw indexError(`weight_map entry must be a shard file name in the same directory, got ${JSON.stringify(shardName)}`, tensor);
    }
    const list = tensorsByShard.get(shardName) ?? [];
    list.push(tensor);
    tensorsByShard.set(shardName, list);
  }
  if (tensorsByShard.size === 0) throw indexError('weight_map is empty');

  const shards: TensorReader[] = [];
  const shardOf = new Map<string, TensorReader>();
  try {
    for (const shardName of [...tensorsByShard.keys()].sort()) {
      const shardFile = path.join(dir, shardName);
      if (!(await exists(shardFile))) throw new CheckpointFormatError(`shard listed by ${INDEX_FILE_NAME} is missing`, { file: shardFile });
      const shard = await openSafetensors(shardFile);
      shards.push(shard);
      for (const tensor of tensorsByShard.get(shardName)!) {
        if (!shard.has(tensor)) throw new CheckpointFormatError(`tensor mapped to this shard by ${INDEX_FILE_NAME} is not in it`, { file: shardFile, tensor });
        shardOf.set(tensor, shard);
      }
    }
  } catch (error) {
    await Promise.all(shards.map((shard) => shard.close().catch(() => undefined)));
    throw error;
  }
  return new ShardedCheckpoint(indexFile, shardOf, shards, indexMetadata);
}

/** An expected tensor: its name, shape, and optionally the dtypes it may have. */
export interface TensorSpec {
  name: string;
  shape: number[];
  dtypes?: readonly Dtype[];
}

/**
 * Checks that every expected tensor is present with the expected shape (and dtype, where given).
 * Returns the names the reader holds that were not expected (callers decide whether they matter).
 */
export function verifyTensors(reader: TensorReader & { readonly file?: string }, expected: readonly TensorSpec[]): { unexpected: string[] } {
  const file = reader.file ?? '(checkpoint)';
  for (const spec of expected) {
    if (!reader.has(spec.name)) throw new CheckpointFormatError('expected tensor is missing', { file, tensor: spec.name });
    const info = reader.info(spec.name);
    if (info.shape.length !== spec.shape.length || info.shape.some((dim, i) => dim !== spec.shape[i])) {
      throw new CheckpointFormatError(`shape ${JSON.stringify(info.shape)} differs from the expected ${JSON.stringify(spec.shape)}`, {
        file: info.file,
        tensor: spec.name,
        offset: info.offset,
      });
    }
    if (spec.dtypes && !spec.dtypes.includes(info.dtype)) {
      throw new CheckpointFormatError(`dtype ${info.dtype} is not one of ${spec.dtypes.join(', ')}`, { file: info.file, tensor: spec.name, offset: info.offset });
    }
  }
  const expectedNames = new Set(expected.map((spec) => spec.name));
  return { unexpected: reader.names.filter((name) => !expectedNames.has(name)) };
}

// ---------------------------------------------------------------------------------------------------------
// Writing.

export interface TensorToWrite {
  name: string;
  dtype: Dtype;
  shape: readonly number[];
  /** Little-endian element bytes; any typed array view is taken as its bytes. */
  data: ArrayBufferView;
}

export type TensorsToWrite = Iterable<TensorToWrite> | ReadonlyMap<string, Omit<TensorToWrite, 'name'>>;

/** The safetensors library's Dtype ordering (its enum order); data is laid out by this descending, then by name. */
const DTYPE_LAYOUT_RANK: Readonly<Record<Dtype, number>> = { F16: 0, BF16: 1, I32: 2, F32: 3, I64: 4 };

/** Normalises and checks the tensors to write; throws InvalidArgumentError before any file is touched. */
function checkTensorsToWrite(tensors: TensorsToWrite): Array<TensorToWrite & { bytes: Uint8Array }> {
  const list: TensorToWrite[] = isReadonlyMap(tensors) ? [...tensors].map(([name, t]) => ({ name, ...t })) : [...tensors];
  const seen = new Set<string>();
  return list.map((tensor) => {
    const { name, dtype, shape, data } = tensor;
    if (typeof name !== 'string' || name === '' || name === METADATA_KEY) throw new InvalidArgumentError('tensors', `invalid tensor name ${JSON.stringify(name)}`);
    if (seen.has(name)) throw new InvalidArgumentError('tensors', `tensor ${name} is given twice`);
    seen.add(name);
    if (!isDtype(dtype)) throw new InvalidArgumentError('tensors', `tensor ${name}: unsupported dtype ${String(dtype)}`);
    if (!Array.isArray(shape) || !shape.every(isSafeNonNegativeInteger)) {
      throw new InvalidArgumentError('tensors', `tensor ${name}: shape must be non-negative integers, got ${JSON.stringify(shape)}`);
    }
    if (!ArrayBuffer.isView(data)) throw new InvalidArgumentError('tensors', `tensor ${name}: data must be a typed array`);
    const expectedBytes = byteLengthOf(dtype, shape);
    if (data.byteLength !== expectedBytes) {
      throw new InvalidArgumentError('tensors', `tensor ${name}: ${dtype} ${JSON.stringify(shape)} needs ${expectedBytes} bytes, data has ${data.byteLength}`);
    }
    return { name, dtype, shape: [...shape], data, bytes: bytesOf(data) };
  });
}

function isReadonlyMap(value: TensorsToWrite): value is ReadonlyMap<string, Omit<TensorToWrite, 'name'>> {
  return value instanceof Map;
}

function checkMetadata(metadata: Record<string, string> | undefined): void {
  if (metadata === undefined) return;
  if (!isPlainObject(metadata)) throw new InvalidArgumentError('metadata', 'must be an object of strings');
  for (const [key, value] of Object.entries(metadata)) {
    if (typeof value !== 'string') throw new InvalidArgumentError('metadata', `${key} must be a string`);
  }
}

/**
 * Writes one safetensors file the way the safetensors library lays it out: tensors ordered by dtype
 * (widest first, so every tensor is aligned to its element size) then by name, `__metadata__` first in
 * the compact JSON header, the header padded with spaces to a multiple of 8 bytes. Tensor data is
 * streamed from the caller's buffers (never concatenated). Written atomically (temp name, fsync, rename);
 * invalid input is rejected before any file is created.
 */
export async function writeSafetensors(file: string, tensors: TensorsToWrite, metadata?: Record<string, string>): Promise<void> {
  const checked = checkTensorsToWrite(tensors);
  checkMetadata(metadata);
  await writeCheckedSafetensors(file, checked, metadata);
}

async function writeCheckedSafetensors(file: string, tensors: Array<TensorToWrite & { bytes: Uint8Array }>, metadata: Record<string, string> | undefined): Promise<void> {
  const ordered = [...tensors].sort((a, b) => DTYPE_LAYOUT_RANK[b.dtype] - DTYPE_LAYOUT_RANK[a.dtype] || compareUtf8(a.name, b.name));
  // Built as text, not as an object: JS objects put integer-like keys first, which would reorder entries.
  const entries: string[] = [];
  if (metadata !== undefined) entries.push(`${JSON.stringify(METADATA_KEY)}:${JSON.stringify(metadata)}`);
  let offset = 0;
  for (const tensor of ordered) {
    const entry = { dtype: tensor.dtype, shape: tensor.shape, data_offsets: [offset, offset + tensor.bytes.byteLength] };
    entries.push(`${JSON.stringify(tensor.name)}:${JSON.stringify(entry)}`);
    offset += tensor.bytes.byteLength;
  }
  const json = Buffer.from(`{${entries.join(',')}}`, 'utf8');
  const padded = Buffer.alloc(8 + Math.ceil(json.byteLength / 8) * 8, 0x20);
  padded.writeBigUInt64LE(BigInt(padded.byteLength - 8), 0);
  json.copy(padded, 8);

  await writeFileAtomically(file, async (fh) => {
    await writeAll(fh, padded, null);
    for (const tensor of ordered) await writeAll(fh, tensor.bytes, null);
  });
}

export interface WriteCheckpointOptions {
  /** Largest shard, in bytes (transformers' max_shard_size); a tensor larger than this gets a shard of its own. */
  maxShardBytes?: number;
  /** `__metadata__` of every file; transformers writes {format: 'pt'}, which is the default. */
  metadata?: Record<string, string>;
}

/** model-00001-of-00003.safetensors, as transformers names shards. */
export function shardFileName(index: number, count: number): string {
  const pad = (n: number) => String(n).padStart(5, '0');
  return `model-${pad(index)}-of-${pad(count)}.safetensors`;
}

const CHECKPOINT_FILE_PATTERN = /^model(-\d{5}-of-\d{5})?\.safetensors$/;

/**
 * Writes a Hugging Face-layout checkpoint into `dir` (created if needed): `model.safetensors` when
 * everything fits in one shard, else `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`
 * (metadata.total_size and weight_map, JSON with sorted keys and two-space indent, as transformers writes it).
 * Tensors are grouped into shards greedily in the order given. Each file is written atomically; the index
 * last; then weight files of an earlier, different layout in `dir` are removed so that the directory
 * cannot be read as a mixture.
 */
export async function writeCheckpoint(dir: string, tensors: TensorsToWrite, options: WriteCheckpointOptions = {}): Promise<{ files: string[] }> {
  const maxShardBytes = options.maxShardBytes ?? DEFAULT_MAX_SHARD_BYTES;
  if (!(Number.isSafeInteger(maxShardBytes) && maxShardBytes > 0)) throw new InvalidArgumentError('maxShardBytes', `must be a positive integer, got ${maxShardBytes}`);
  const metadata = options.metadata ?? { format: 'pt' };
  checkMetadata(metadata);
  const checked = checkTensorsToWrite(tensors);

  const shards: Array<typeof checked> = [];
  let currentBytes = 0;
  for (const tensor of checked) {
    const size = tensor.bytes.byteLength;
    if (shards.length === 0 || (currentBytes + size > maxShardBytes && currentBytes > 0)) {
      shards.push([]);
      currentBytes = 0;
    }
    shards[shards.length - 1].push(tensor);
    currentBytes += size;
  }
  if (shards.length === 0) shards.push([]);

  await fsp.mkdir(dir, { recursive: true });
  const written: string[] = [];
  if (shards.length === 1) {
    await writeCheckedSafetensors(path.join(dir, SINGLE_FILE_NAME), shards[0], metadata);
    written.push(SINGLE_FILE_NAME);
  } else {
    const weightMap: Record<string, string> = {};
    let totalSize = 0;
    for (let i = 0; i < shards.length; i++) {
      const name = shardFileName(i + 1, shards.length);
      await writeCheckedSafetensors(path.join(dir, name), shards[i], metadata);
      written.push(name);
      for (const tensor of shards[i]) {
        weightMap[tensor.name] = name;
        totalSize += tensor.bytes.byteLength;
      }
    }
    const index = { metadata: { total_size: totalSize }, weight_map: weightMap };
    await writeFileAtomically(path.join(dir, INDEX_FILE_NAME), (fh) => writeAll(fh, Buffer.from(stringifySorted(index) + '\n', 'utf8'), null));
    written.push(INDEX_FILE_NAME);
  }

  const keep = new Set(written);
  for (const entry of await fsp.readdir(dir)) {
    if (!keep.has(entry) && (entry === INDEX_FILE_NAME || CHECKPOINT_FILE_PATTERN.test(entry))) await fsp.rm(path.join(dir, entry), { force: true });
  }
  return { files: written };
}

/** JSON with object keys sorted at every level and a two-space indent (Python's json.dumps(sort_keys=True, indent=2)). */
function stringifySorted(value: unknown, indent = ''): string {
  if (!isPlainObject(value)) return JSON.stringify(value);
  const keys = Object.keys(value).sort(compareUtf8);
  if (keys.length === 0) return '{}';
  const inner = indent + '  ';
  const lines = keys.map((key) => `${inner}${JSON.stringify(key)}: ${stringifySorted(value[key], inner)}`);
  return `{\n${lines.join(',\n')}\n${indent}}`;
}

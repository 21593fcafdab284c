/**
 * Datasets: text files, directories of them, and jsonl (one JSON object per line with a text field) →
 * documents → token ids, cached on disk → fixed-length packed batches, plus a seeded train/validation
 * split by documents.
 *
 * The token cache is keyed by the source files' (path, size, mtime), the tokenizer's content hash and the
 * options that shape documents, so any change to them tokenises again; an unchanged source is read back.
 */

import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { DataError, InvalidArgumentError, throwIfAborted } from '../errors';
import { readAt, writeAll, writeFileAtomically } from './file-io';
import { compareUtf8, isPlainObject } from './json-values';
import { Rng } from './rng';
import type { SpecialTokens, Tokenizer } from './tokenizer';

// ---------------------------------------------------------------------------------------------------------
// Sources and documents.

/** How a text file is cut into documents: whole file, blank-line-separated paragraphs, or non-empty lines. */
export type TextSplit = 'file' | 'paragraph' | 'line';

export interface DatasetOptions {
  /** For text files (default 'file': each file is one document). */
  textSplit?: TextSplit;
  /** The jsonl field holding a document's text (default 'text'). */
  jsonlField?: string;
  /** In directories, only files with these extensions (e.g. ['.txt', '.py']); default all files. Hidden files are always skipped. */
  extensions?: readonly string[];
}

export interface SourceFile {
  path: string;
  size: number;
  mtimeMs: number;
  format: 'text' | 'jsonl';
}

export interface Document {
  text: string;
  file: string;
  /** 1-based line of a jsonl document, or the first line of a paragraph / line document. */
  line?: number;
}

/** A document, a jsonl line, is refused above this: JS strings cannot hold much more, and it is surely a mistake. */
const MAX_DOCUMENT_BYTES = 256 * 1024 * 1024;
const READ_CHUNK_BYTES = 1 << 20;

function formatOf(file: string): SourceFile['format'] {
  return path.extname(file).toLowerCase() === '.jsonl' ? 'jsonl' : 'text';
}

/**
 * The files of a source, in a deterministic order: a file itself, or every file under a directory
 * (recursively, hidden names skipped, symlinked files followed, symlinked directories not, sorted by
 * path bytes). Paths are absolute.
 */
export async function listSourceFiles(source: string, options: DatasetOptions = {}): Promise<SourceFile[]> {
  const root = path.resolve(source);
  let rootStat;
  try {
    rootStat = await fsp.stat(root);
  } catch (cause) {
    throw new DataError(`cannot read the data source (${(cause as Error).message})`, { file: root, cause });
  }
  const describe = (file: string, stat: { size: number; mtimeMs: number }): SourceFile => ({ path: file, size: stat.size, mtimeMs: stat.mtimeMs, format: formatOf(file) });
  if (rootStat.isFile()) return [describe(root, rootStat)];
  if (!rootStat.isDirectory()) throw new DataError('data source is neither a file nor a directory', { file: root });

  const extensions = options.extensions?.map((e) => e.toLowerCase());
  const found: SourceFile[] = [];
  const walk = async (dir: string): Promise<void> => {
    const entries = await fsp.readdir(dir, { withFileTypes: true });
    for (const entry of entries) {
      if (entry.name.startsWith('.')) continue;
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) {
        await walk(full);
        continue;
      }
      if (!entry.isFile() && !entry.isSymbolicLink()) continue;
      const stat = await fsp.stat(full).catch(() => null); // a dangling link is skipped
      if (!stat?.isFile()) continue;
      if (extensions && !extensions.includes(path.extname(entry.name).toLowerCase())) continue;
      found.push(describe(full, stat));
    }
  };
  await walk(root);
  if (found.length === 0) throw new DataError(`no data files found${extensions ? ` with extensions ${extensions.join(', ')}` : ''}`, { file: root });
  return found.sort((a, b) => compareUtf8(a.path, b.path));
}

/** Reads a file in chunks, reporting bytes as they are read; checks the abort signal between chunks. */
async function* readChunks(file: string, signal: AbortSignal | undefined, onBytes: (n: number) => void): AsyncGenerator<Buffer> {
  let fh: fsp.FileHandle;
  try {
    fh = await fsp.open(file, 'r');
  } catch (cause) {
    throw new DataError(`cannot open (${(cause as Error).message})`, { file, cause });
  }
  try {
    let position = 0;
    for (;;) {
      throwIfAborted(signal);
      const chunk = Buffer.allocUnsafe(READ_CHUNK_BYTES);
      const n = await readAt(fh, chunk, position);
      if (n === 0) return;
      position += n;
      onBytes(n);
      yield chunk.subarray(0, n);
      if (n < chunk.byteLength) return;
    }
  } finally {
    await fh.close();
  }
}

/** Splits chunks into lines (without '\n'; a trailing '\r' is kept); lines are 1-based. */
async function* readLines(file: string, chunks: AsyncGenerator<Buffer>): AsyncGenerator<{ bytes: Buffer; line: number }> {
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  let line = 1;
  for await (const chunk of chunks) {
    let start = 0;
    for (let nl = chunk.indexOf(0x0a, start); nl >= 0; nl = chunk.indexOf(0x0a, start)) {
      const piece = chunk.subarray(start, nl);
      const bytes = pending.length === 0 ? piece : Buffer.concat([...pending, piece]);
      pending = [];
      pendingBytes = 0;
      yield { bytes, line: line++ };
      start = nl + 1;
    }
    if (start < chunk.byteLength) {
      pending.push(chunk.subarray(start));
      pendingBytes += chunk.byteLength - start;
      if (pendingBytes > MAX_DOCUMENT_BYTES) throw new DataError(`line is longer than ${MAX_DOCUMENT_BYTES} bytes`, { file, line });
    }
  }
  if (pendingBytes > 0) yield { bytes: Buffer.concat(pending), line };
}

function decodeUtf8(bytes: Uint8Array, file: string, line?: number): string {
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch (cause) {
    throw new DataError('not valid UTF-8', { file, line, cause });
  }
}

function stripCr(text: string): string {
  return text.endsWith('\r') ? text.slice(0, -1) : text;
}

/**
 * The documents of the given files, in order. Empty documents are skipped. jsonl lines that are blank
 * are skipped; a line that is not a JSON object with a string text field is a DataError naming file and line.
 */
export async function* readDocuments(
  files: readonly SourceFile[],
  options: DatasetOptions & { signal?: AbortSignal; onBytes?: (n: number) => void } = {},
): AsyncGenerator<Document> {
  const textSplit = options.textSplit ?? 'file';
  const field = options.jsonlField ?? 'text';
  const onBytes = options.onBytes ?? (() => undefined);
  for (const source of files) {
    const file = source.path;
    const chunks = readChunks(file, options.signal, onBytes);
    if (source.format === 'jsonl') {
      for await (const { bytes, line } of readLines(file, chunks)) {
        const text = decodeUtf8(bytes, file, line);
        if (text.trim() === '') continue;
        let record: unknown;
        try {
          record = JSON.parse(text);
        } catch (cause) {
          throw new DataError(`not valid JSON (${(cause as Error).message})`, { file, line, cause });
        }
        if (!isPlainObject(record)) throw new DataError('each line must be a JSON object', { file, line });
        const value = record[field];
        if (typeof value !== 'string') throw new DataError(`field "${field}" must be a string, got ${value === undefined ? 'nothing' : JSON.stringify(value).slice(0, 40)}`, { file, line });
        if (value !== '') yield { text: value, file, line };
      }
    } else if (textSplit === 'file') {
      if (source.size > MAX_DOCUMENT_BYTES) {
        throw new DataError(`a ${source.size}-byte file is too large for one document; use textSplit 'paragraph' or 'line', or jsonl`, { file });
      }
      const parts: Buffer[] = [];
      for await (const chunk of chunks) parts.push(chunk);
      const text = decodeUtf8(Buffer.concat(parts), file);
      if (text !== '') yield { text, file };
    } else {
      let paragraph: string[] = [];
      let paragraphLine = 0;
      for await (const { bytes, line } of readLines(file, chunks)) {
        const text = stripCr(decodeUtf8(bytes, file, line));
        if (textSplit === 'line') {
          if (text.trim() !== '') yield { text, file, line };
        } else if (text.trim() === '') {
          if (paragraph.length > 0) yield { text: paragraph.join('\n'), file, line: paragraphLine };
          paragraph = [];
        } else {
          if (paragraph.length === 0) paragraphLine = line;
          paragraph.push(text);
        }
      }
      if (paragraph.length > 0) yield { text: paragraph.join('\n'), file, line: paragraphLine };
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tokenised datasets and their cache.

/** All documents' token ids back to back; document d is tokens[docOffsets[d] .. docOffsets[d + 1]). */
export interface TokenizedDataset {
  tokens: Uint32Array;
  /** numDocs + 1 offsets, from 0 to numTokens (Float64Array: exact past 2^32 tokens). */
  docOffsets: Float64Array;
  numDocs: number;
  numTokens: number;
}

export interface TokenizeProgress {
  done: number;
  total: number;
  unit: 'bytes';
}

export interface TokenizeDatasetOptions extends DatasetOptions {
  /** Where `<key>.tokens` files live (created if needed). */
  cacheDir: string;
  signal?: AbortSignal;
  onProgress?: (progress: TokenizeProgress) => void;
}

/** What tokenising needs of a tokenizer. Documents are stored without BOS/EOS; packing adds them. */
export type DatasetTokenizer = Pick<Tokenizer, 'encode' | 'contentHash'>;

const CACHE_MAGIC = 'TCALTOKS';
const CACHE_VERSION = 1;
const CACHE_HEADER_BYTES = 64;
const TOKEN_FLUSH_COUNT = 1 << 20;
const PROGRESS_STEP_BYTES = 1 << 18;

/** The cache key: sha256 over the files' (path, size, mtime, format), the tokenizer hash and the document options. */
export function datasetCacheKey(files: readonly SourceFile[], tokenizerHash: string, options: DatasetOptions = {}): string {
  const description = {
    cache: CACHE_VERSION,
    files: files.map((f) => [f.path, f.size, f.mtimeMs, f.format]),
    tokenizer: tokenizerHash,
    textSplit: options.textSplit ?? 'file',
    jsonlField: options.jsonlField ?? 'text',
  };
  return createHash('sha256').update(JSON.stringify(description)).digest('hex');
}

/**
 * Tokenises a source (file or directory) into a TokenizedDataset, through the cache: when
 * `<cacheDir>/<key>.tokens` exists and is intact it is read back; otherwise the documents are tokenised
 * and streamed into a new cache file (temp name, fsync, rename; removed again on error or abort).
 * Progress is reported in source bytes.
 */
export async function tokenizeDataset(
  source: string,
  tokenizer: DatasetTokenizer,
  options: TokenizeDatasetOptions,
): Promise<TokenizedDataset & { cacheFile: string; fromCache: boolean }> {
  throwIfAborted(options.signal);
  const files = await listSourceFiles(source, options);
  const key = datasetCacheKey(files, tokenizer.contentHash, options);
  await fsp.mkdir(options.cacheDir, { recursive: true });
  const cacheFile = path.join(options.cacheDir, `${key}.tokens`);

  const total = files.reduce((sum, f) => sum + f.size, 0);
  const cached = await readTokenCache(cacheFile, key).catch(() => null); // missing, stale or corrupt: build it again
  if (cached) {
    options.onProgress?.({ done: total, total, unit: 'bytes' });
    return { ...cached, cacheFile, fromCache: true };
  }

  let bytesRead = 0;
  let reported = -Infinity;
  const report = (force: boolean) => {
    if (options.onProgress && (force || bytesRead - reported >= PROGRESS_STEP_BYTES)) {
      reported = bytesRead;
      options.onProgress({ done: bytesRead, total, unit: 'bytes' });
    }
  };
  await writeFileAtomically(cacheFile, async (fh) => {
    const buffer = new Uint32Array(TOKEN_FLUSH_COUNT);
    let buffered = 0;
    let written = 0; // tokens on disk
    const docOffsets: number[] = [0];
    const flush = async () => {
      await writeAll(fh, new Uint8Array(buffer.buffer, 0, buffered * 4), CACHE_HEADER_BYTES + written * 4);
      written += buffered;
      buffered = 0;
    };
    const documents = readDocuments(files, { ...options, onBytes: (n) => (bytesRead += n) });
    for await (const document of documents) {
      throwIfAborted(options.signal);
      const ids = tokenizer.encode(document.text, { addSpecialTokens: false });
      for (const id of ids) {
        if (buffered === buffer.length) await flush();
        buffer[buffered++] = id;
      }
      if (ids.length > 0) docOffsets.push(written + buffered);
      report(false);
    }
    await flush();
    const offsets = Buffer.alloc(docOffsets.length * 8);
    docOffsets.forEach((offset, i) => offsets.writeBigUInt64LE(BigInt(offset), i * 8));
    await writeAll(fh, offsets, CACHE_HEADER_BYTES + written * 4);
    await writeAll(fh, cacheHeader(written, docOffsets.length - 1, key), 0);
  });
  report(true);
  const dataset = await readTokenCache(cacheFile, key);
  return { ...dataset, cacheFile, fromCache: false };
}

function cacheHeader(numTokens: number, numDocs: number, key: string): Buffer {
  const header = Buffer.alloc(CACHE_HEADER_BYTES);
  header.write(CACHE_MAGIC, 0, 'latin1');
  header.writeUInt32LE(CACHE_VERSION, 8);
  header.writeUInt32LE(CACHE_HEADER_BYTES, 12);
  header.writeBigUInt64LE(BigInt(numTokens), 16);
  header.writeBigUInt64LE(BigInt(numDocs), 24);
  Buffer.from(key, 'hex').copy(header, 32);
  return header;
}

/**
 * Reads a token cache file: a 64-byte header (magic "TCALTOKS", u32 version, u32 header size, u64 token
 * count, u64 document count, 32-byte sha256 key), the token ids as little-endian u32, then numDocs + 1
 * document offsets as u64. Everything is checked against the file size before allocating.
 *
 * Node has no mmap, so the ids are read once, with positional reads, straight into one Uint32Array
 * (4 bytes per token; 200M tokens are 800 MB); callers wanting less resident memory can read windows of
 * the same layout with readAt.
 */
export async function readTokenCache(file: string, expectedKey?: string): Promise<TokenizedDataset> {
  const corrupt = (message: string) => new DataError(`token cache: ${message}`, { file });
  let fh: fsp.FileHandle;
  try {
    fh = await fsp.open(file, 'r');
  } catch (cause) {
    throw new DataError(`cannot open the token cache (${(cause as Error).message})`, { file, cause });
  }
  try {
    const size = (await fh.stat()).size;
    const header = Buffer.alloc(CACHE_HEADER_BYTES);
    if ((await readAt(fh, header, 0)) !== CACHE_HEADER_BYTES) throw corrupt('shorter than its header');
    if (header.toString('latin1', 0, 8) !== CACHE_MAGIC) throw corrupt('bad magic');
    if (header.readUInt32LE(8) !== CACHE_VERSION || header.readUInt32LE(12) !== CACHE_HEADER_BYTES) throw corrupt('unknown version');
    const numTokens = Number(header.readBigUInt64LE(16));
    const numDocs = Number(header.readBigUInt64LE(24));
    if (expectedKey !== undefined && header.subarray(32, 64).toString('hex') !== expectedKey) throw corrupt('key does not match');
    const expectedSize = CACHE_HEADER_BYTES + numTokens * 4 + (numDocs + 1) * 8;
    if (!Number.isSafeInteger(expectedSize) || expectedSize !== size) throw corrupt(`${size} bytes, its header implies ${expectedSize}`);

    const tokens = new Uint32Array(numTokens);
    const offsetBytes = Buffer.alloc((numDocs + 1) * 8);
    if (
      (await readAt(fh, new Uint8Array(tokens.buffer), CACHE_HEADER_BYTES)) !== tokens.byteLength ||
      (await readAt(fh, offsetBytes, CACHE_HEADER_BYTES + numTokens * 4)) !== offsetBytes.byteLength
    ) {
      throw corrupt('file shrank while being read');
    }
    const docOffsets = new Float64Array(numDocs + 1);
    for (let d = 0; d <= numDocs; d++) {
      docOffsets[d] = Number(offsetBytes.readBigUInt64LE(d * 8));
      if (d > 0 && docOffsets[d] <= docOffsets[d - 1]) throw corrupt(`document ${d - 1} is empty or out of order`);
    }
    if (docOffsets[0] !== 0 || docOffsets[numDocs] !== numTokens) throw corrupt('document offsets do not span the tokens');
    return { tokens, docOffsets, numDocs, numTokens };
  } finally {
    await fh.close();
  }
}

// ---------------------------------------------------------------------------------------------------------
// Splitting and packing.

/**
 * A deterministic train / validation split by documents: a seeded shuffle of 0..numDocs−1, the first
 * round(validFraction · numDocs) to validation (at least one when validFraction > 0 and there are two or
 * more documents, never all of them). Both lists come back in ascending order.
 */
export function splitDocuments(numDocs: number, options: { validFraction: number; seed: number }): { train: Uint32Array; valid: Uint32Array } {
  const { validFraction, seed } = options;
  if (!Number.isSafeInteger(numDocs) || numDocs < 0) throw new InvalidArgumentError('numDocs', `must be a non-negative integer, got ${numDocs}`);
  if (!(validFraction >= 0 && validFraction < 1)) throw new InvalidArgumentError('validFraction', `must be in [0, 1), got ${validFraction}`);
  let numValid = Math.round(validFraction * numDocs);
  if (validFraction > 0 && numDocs >= 2) numValid = Math.min(Math.max(numValid, 1), numDocs - 1);
  const order = new Rng(seed).shuffle(Uint32Array.from({ length: numDocs }, (_, i) => i));
  return { valid: order.slice(0, numValid).sort(), train: order.slice(numValid).sort() };
}

export interface PackOptions {
  seqLen: number;
  /**
   * 'concat': documents back to back, cut into rows of seqLen (a document may continue on the next row);
   * 'pad': each document starts a row, the rest of the row is padding (long documents take several rows).
   */
  mode: 'concat' | 'pad';
  /** concat: keep document boundaries as segments in cuSeqlens (default true); false packs rows as plain sequences. */
  keepBoundaries?: boolean;
  /** Rows per batch (default 1); the last batch may have fewer. */
  batchSize?: number;
  /** BOS / EOS added around every document, as the tokenizer's configuration says (a Tokenizer will do). */
  specialTokens?: SpecialTokens;
  /** The id written into padding (default 0). Padding is recognised by attentionMask, never by this id. */
  padId?: number;
  /** Which documents, in which order (e.g. one side of splitDocuments); default all, in order. */
  docs?: ArrayLike<number>;
  /** concat: drop a final partial row instead of padding it (default false). */
  dropRemainder?: boolean;
}

export interface PackedBatch {
  rows: number;
  seqLen: number;
  /** rows × seqLen ids, row-major. */
  inputIds: Int32Array;
  /** 1 for a real token, 0 for padding. */
  attentionMask: Uint8Array;
  /**
   * Segment starts over the flattened rows × seqLen tokens, then the end (rows × seqLen): varlen
   * cu_seqlens. Segments never cross a row or (with keepBoundaries) a document boundary; every row start
   * is a segment start, and a row's padding is a segment of its own.
   */
  cuSeqlens: Int32Array;
  /** Real (unpadded) tokens in the batch. */
  numTokens: number;
}

/**
 * Next-token targets of a packed batch: targets[i] = the id at i + 1 when i + 1 is a real token of the same
 * segment, else −1 (the last token of a segment and padding are not scored).
 */
export function nextTokenTargets(batch: Pick<PackedBatch, 'inputIds' | 'attentionMask' | 'cuSeqlens'>): Int32Array {
  const targets = new Int32Array(batch.inputIds.length).fill(-1);
  const cu = batch.cuSeqlens;
  for (let s = 0; s + 1 < cu.length; s++) {
    for (let i = cu[s]; i + 1 < cu[s + 1]; i++) if (batch.attentionMask[i + 1]) targets[i] = batch.inputIds[i + 1];
  }
  return targets;
}

/** The same batches as iteratePackedBatches, all at once. */
export function packSequences(data: Pick<TokenizedDataset, 'tokens' | 'docOffsets'>, options: PackOptions): PackedBatch[] {
  return [...iteratePackedBatches(data, options)];
}

/** Packs documents into fixed-length rows and batches them (see PackOptions / PackedBatch). */
export function* iteratePackedBatches(data: Pick<TokenizedDataset, 'tokens' | 'docOffsets'>, options: PackOptions): Generator<PackedBatch> {
  const { seqLen, mode } = options;
  const batchSize = options.batchSize ?? 1;
  const padId = options.padId ?? 0;
  const keepBoundaries = options.keepBoundaries ?? true;
  const numDocs = data.docOffsets.length - 1;
  if (!Number.isSafeInteger(seqLen) || seqLen <= 0) throw new InvalidArgumentError('seqLen', `must be a positive integer, got ${seqLen}`);
  if (!Number.isSafeInteger(batchSize) || batchSize <= 0) throw new InvalidArgumentError('batchSize', `must be a positive integer, got ${batchSize}`);
  if (batchSize * seqLen > 0x7fffffff) throw new InvalidArgumentError('batchSize', 'batchSize × seqLen must fit cu_seqlens (int32)');
  if (!Number.isInteger(padId) || padId < 0 || padId > 0x7fffffff) throw new InvalidArgumentError('padId', `must be a non-negative int32, got ${padId}`);
  if (mode !== 'concat' && mode !== 'pad') throw new InvalidArgumentError('mode', `must be 'concat' or 'pad', got ${String(mode)}`);
  if (numDocs < 0) throw new InvalidArgumentError('data', 'docOffsets must hold at least one offset');

  const specials = options.specialTokens;
  const bos = specials?.addBos ? specials.bosId : null;
  const eos = specials?.addEos ? specials.eosId : null;
  const docs = options.docs ?? { length: numDocs };
  const docAt = options.docs ? (i: number) => options.docs![i] : (i: number) => i;

  const rowTokens = batchSize * seqLen;
  let inputIds = new Int32Array(rowTokens);
  let attentionMask = new Uint8Array(rowTokens);
  let segmentStarts: number[] = [];
  let rows = 0; // complete rows in the current batch
  let column = 0; // tokens in the current row

  const takeBatch = (): PackedBatch => {
    const used = rows * seqLen;
    const cuSeqlens = Int32Array.from([...segmentStarts, used]);
    const mask = attentionMask.subarray(0, used);
    const batch: PackedBatch = {
      rows,
      seqLen,
      inputIds: inputIds.subarray(0, used),
      attentionMask: mask,
      cuSeqlens,
      numTokens: mask.reduce((sum, m) => sum + m, 0),
    };
    inputIds = new Int32Array(rowTokens);
    attentionMask = new Uint8Array(rowTokens);
    segmentStarts = [];
    rows = 0;
    return batch;
  };
  /** Ends the current row, padding what is left of it; returns a full batch when this row completed one. */
  const endRow = (): PackedBatch | null => {
    const base = rows * seqLen;
    if (column < seqLen) {
      inputIds.fill(padId, base + column, base + seqLen);
      segmentStarts.push(base + column);
    }
    rows++;
    column = 0;
    return rows === batchSize ? takeBatch() : null;
  };
  /** Appends one token (a document starting if `startsDocument`), ending the row when it fills up. */
  const push = (id: number, startsDocument: boolean): PackedBatch | null => {
    const base = rows * seqLen;
    if (column === 0 || (startsDocument && keepBoundaries)) segmentStarts.push(base + column);
    inputIds[base + column] = id;
    attentionMask[base + column] = 1;
    column++;
    return column === seqLen ? endRow() : null;
  };

  for (let i = 0; i < docs.length; i++) {
    const doc = docAt(i);
    if (!Number.isInteger(doc) || doc < 0 || doc >= numDocs) throw new InvalidArgumentError('docs', `document ${doc} is not in 0..${numDocs - 1}`);
    const begin = data.docOffsets[doc];
    const end = data.docOffsets[doc + 1];
    if (begin === end && bos === null && eos === null) continue;
    if (mode === 'pad' && column > 0) {
      const batch = endRow();
      if (batch) yield batch;
    }
    let first = true;
    const emit = (id: number) => {
      const batch = push(id, first);
      first = false;
      return batch;
    };
    let batch: PackedBatch | null;
    if (bos !== null && (batch = emit(bos))) yield batch;
    for (let t = begin; t < end; t++) if ((batch = emit(data.tokens[t]))) yield batch;
    if (eos !== null && (batch = emit(eos))) yield batch;
  }
  if (column > 0 && !(mode === 'concat' && options.dropRemainder)) {
    const batch = endRow();
    if (batch) yield batch;
  }
  if (column > 0) {
    // The remainder was dropped: forget the segments it started.
    const kept = rows * seqLen;
    segmentStarts = segmentStarts.filter((start) => start < kept);
    column = 0;
  }
  if (rows > 0) yield takeBatch();
}

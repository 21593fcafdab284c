/**
 * Small file helpers shared by the readers and writers in lib/io: positional reads and writes that loop
 * over short transfers, and atomic writes (temporary name in the same directory, fsync, rename), so that
 * nothing half-written is ever left under the target name (DESIGN.md §8).
 */

import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';

/** One read/write syscall moves at most this much: Node refuses lengths above 2 GiB − 1 per call. */
const MAX_TRANSFER_BYTES = 1 << 30;

/**
 * Fills `target` from `fh` starting at byte `position`. Returns the number of bytes read, which is less
 * than target.byteLength only when the file ends first (callers turn that into their own typed error).
 * Positions are Numbers: exact up to 2^53, so files over 4 GiB are fine.
 */
export async function readAt(fh: fsp.FileHandle, target: Uint8Array, position: number): Promise<number> {
  let done = 0;
  while (done < target.byteLength) {
    const length = Math.min(target.byteLength - done, MAX_TRANSFER_BYTES);
    const { bytesRead } = await fh.read(target, done, length, position + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return done;
}

/** Writes all of `data` at `position` (or at the current file position when null), looping over short writes. */
export async function writeAll(fh: fsp.FileHandle, data: Uint8Array, position: number | null): Promise<void> {
  let done = 0;
  while (done < data.byteLength) {
    const length = Math.min(data.byteLength - done, MAX_TRANSFER_BYTES);
    const { bytesWritten } = await fh.write(data, done, length, position === null ? null : position + done);
    if (bytesWritten === 0) throw new Error(`write made no progress at byte ${done} of ${data.byteLength}`);
    done += bytesWritten;
  }
}

/** A byte view of any typed array / DataView, without copying. */
export function bytesOf(view: ArrayBufferView): Uint8Array {
  return view instanceof Uint8Array ? view : new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
}

/** The temporary name used for `target` while it is written: hidden, same directory (so rename is atomic), unique. */
export function temporaryPathFor(target: string): string {
  return path.join(path.dirname(target), `.${path.basename(target)}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`);
}

/**
 * Writes `target` atomically: `write` receives a handle on a fresh temporary file in the same directory;
 * on success the file is fsynced, closed and renamed over `target` (then the directory is fsynced, where
 * the platform allows, so the rename itself survives a crash). On any failure the temporary file is
 * removed and `target` is left as it was.
 */
export async function writeFileAtomically(target: string, write: (fh: fsp.FileHandle) => Promise<void>): Promise<void> {
  const temporary = temporaryPathFor(target);
  const fh = await fsp.open(temporary, 'wx');
  let closed = false;
  try {
    await write(fh);
    await fh.sync();
    await fh.close();
    closed = true;
    await fsp.rename(temporary, target);
  } catch (error) {
    if (!closed) await fh.close().catch(() => undefined);
    await fsp.rm(temporary, { force: true }).catch(() => undefined);
    throw error;
  }
  await syncDirectory(path.dirname(target));
}

/** fsync of a directory: makes a rename durable on Linux; not possible on every platform, so best effort. */
async function syncDirectory(dir: string): Promise<void> {
  let handle: fsp.FileHandle | undefined;
  try {
    handle = await fsp.open(dir, 'r');
    await handle.sync();
  } catch {
    // Windows cannot open directories; some file systems refuse fsync on them. The data itself is synced.
  } finally {
    await handle?.close().catch(() => undefined);
  }
}

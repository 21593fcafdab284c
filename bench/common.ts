/** Shared benchmark plumbing: timing on the device, result tables and JSON under bench/results/. */
import * as fs from 'fs';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { synchronize } from '../lib/runtime';

/**
 * Median milliseconds of `fn` on `device`: warm up, then time batches of back-to-back launches between two
 * synchronisations (so host overhead overlaps device work, as in real use) and take the median batch.
 */
export async function timeDevice(
  fn: () => Promise<unknown>,
  device: string,
  { warmup = 5, batches = 7, perBatch = 10 }: { warmup?: number; batches?: number; perBatch?: number } = {},
): Promise<number> {
  for (let i = 0; i < warmup; i++) await fn();
  await synchronize(device);
  const times: number[] = [];
  for (let b = 0; b < batches; b++) {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < perBatch; i++) await fn();
    await synchronize(device);
    times.push(Number(process.hrtime.bigint() - t0) / 1e6 / perBatch);
  }
  times.sort((x, y) => x - y);
  return times[Math.floor(times.length / 2)];
}

/**
 * Host-side cost of `calls` calls of fn (each awaited, the device not synchronised in between) per call, beside the
 * wall time per call until the device has finished them: where the first nears the second, a row times the host's
 * dispatch rather than the kernels.
 */
export async function hostDispatch(fn: () => Promise<unknown>, device: string, calls = 20): Promise<{ hostMs: number; wallMs: number }> {
  await synchronize(device);
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < calls; i++) await fn();
  const t1 = process.hrtime.bigint();
  await synchronize(device);
  const t2 = process.hrtime.bigint();
  return { hostMs: Number(t1 - t0) / 1e6 / calls, wallMs: Number(t2 - t0) / 1e6 / calls };
}

/** Runs a Python peer script (torch / fla) with a JSON argument; parses one JSON object per output line. */
export function runPythonPeer<T>(script: string, arg: unknown): { rows: T[]; error?: string } {
  const r = spawnSync('python3', [script, JSON.stringify(arg)], { encoding: 'utf8', maxBuffer: 64 << 20 });
  if (r.error || r.status !== 0) return { rows: [], error: (r.error?.message ?? '') + (r.stderr ?? '').slice(-2000) };
  const rows = r.stdout
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as T);
  return { rows };
}

export function printTable(rows: Record<string, string | number>[]): void {
  if (rows.length === 0) return;
  const cols = Object.keys(rows[0]);
  const fmt = (v: string | number): string => (typeof v === 'number' ? (Math.abs(v) >= 100 ? v.toFixed(1) : v.toFixed(3)) : v);
  const width = cols.map((c) => Math.max(c.length, ...rows.map((r) => fmt(r[c] ?? '').length)));
  const line = (cells: string[]): string => cells.map((c, i) => c.padStart(width[i])).join('  ');
  console.log(line(cols));
  for (const r of rows) console.log(line(cols.map((c) => fmt(r[c] ?? ''))));
}

/** Writes bench/results/<name>-<date>.json (atomically) and returns the path. */
export function writeResults(name: string, data: unknown): string {
  const dir = path.resolve(__dirname, '..', '..', 'bench', 'results');
  const alt = path.resolve(__dirname, 'results');
  const target = fs.existsSync(path.resolve(__dirname, '..', '..', 'bench')) ? dir : alt;
  fs.mkdirSync(target, { recursive: true });
  const file = path.join(target, `${name}-${new Date().toISOString().slice(0, 10)}.json`);
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, JSON.stringify(data, null, 2) + '\n');
  fs.renameSync(tmp, file);
  return file;
}

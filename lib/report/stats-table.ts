/** The per-head summary of Taylor statistics as a plain-text table (one row per (layer, head)). */
import type { HeadSummary } from '../calibrate/statistics';

export const HEAD_TABLE_COLUMNS = ['layer', 'head', 'kv', 'mean Δ', 'std Δ', 'entropy', 'sink', 'local', 'γ₀', 'half-life', 'expl.var'] as const;

function cells(r: HeadSummary): string[] {
  const f = (x: number, digits: number): string => (Number.isFinite(x) ? x.toFixed(digits) : x > 0 ? 'inf' : 'n/a');
  return [
    String(r.layer),
    String(r.head),
    String(r.kvHead),
    f(r.meanDistance, 1),
    f(r.distanceStd, 1),
    f(r.entropy, 3),
    f(r.sinkMass, 3),
    f(r.localMass, 3),
    f(r.gamma0, 5),
    f(r.halfLife, 1),
    f(r.explainedVariance, 3),
  ];
}

/** A header line, then one line per summary row; columns right-aligned, separated by two spaces. */
export function formatHeadTable(rows: readonly HeadSummary[]): string {
  const body = rows.map(cells);
  const header = [...HEAD_TABLE_COLUMNS] as string[];
  const width = header.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (c: string[]): string => c.map((x, i) => x.padStart(width[i])).join('  ');
  return [line(header), ...body.map(line)].join('\n') + '\n';
}

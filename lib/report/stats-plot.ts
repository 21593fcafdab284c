/**
 * Plots of Taylor statistics (Vega-Lite specs, rendered to SVG by Vega):
 *   - distance profiles: the log-binned attention-distance histogram per head (mass per bin, averaged over
 *     tokens), one line per head, one panel per layer;
 *   - heatmaps layer × head of the mean attention entropy and of the mean distance E_A[Δ].
 *
 * Rendering runs Vega headless (renderer 'none', no canvas) in a child Node process: vega and vega-lite are
 * ES modules with top-level await, which a CommonJS caller (this package, jest) cannot require(). PNG would
 * need the native `canvas` package, so only SVG is written.
 */
import { spawn } from 'node:child_process';
import { pathToFileURL } from 'node:url';
import { NotCompiledError, throwIfAborted, AbortError } from '../errors';
import { writeFileAtomically, writeAll } from '../io/file-io';
import { summarizeHeads, type HeadSummary, type TaylorStats } from '../calibrate/statistics';

/** A Vega-Lite specification (JSON); kept loose so callers need not import vega-lite's types. */
export type VegaLiteSpec = Record<string, unknown>;

/** The distance range of histogram bin b (Δ = 0, then [2^(b−1), 2^b), the last open-ended). */
export function distanceBinLabel(b: number, bins: number): string {
  if (b === 0) return '0';
  const lo = 2 ** (b - 1);
  if (b === bins - 1) return `≥${lo}`;
  const hi = 2 ** b - 1;
  return lo === hi ? `${lo}` : `${lo}–${hi}`;
}

export interface StatsPlotOptions {
  title?: string;
  /** Panels per row of the distance profiles (default 4). */
  columns?: number;
  /** The summary rows if already computed (default summarizeHeads(stats)). */
  summary?: HeadSummary[];
}

/** One Vega-Lite spec holding the distance profiles and the layer × head heatmaps. */
export function statsPlotSpec(stats: TaylorStats, options: StatsPlotOptions = {}): VegaLiteSpec {
  const { bins } = stats.meta;
  const summary = options.summary ?? summarizeHeads(stats);
  // Bins whose lower edge no sequence reaches hold no mass; leave them out.
  const longest = stats.sequenceLengths.reduce((m, [len]) => Math.max(m, len), 1);
  let shownBins = 1;
  while (shownBins < bins && 2 ** (shownBins - 1) < longest) shownBins++;
  const profile: Array<Record<string, number | string>> = [];
  for (const l of stats.layers) {
    const n = Math.max(l.tokens, 1);
    l.heads.forEach((h, head) => {
      for (let b = 0; b < shownBins; b++) {
        profile.push({ layer: l.layer, head, bin: b, distance: distanceBinLabel(b, bins), mass: h.histogram[b] / n });
      }
    });
  }
  const heads = summary.map((r) => ({
    layer: r.layer,
    head: r.head,
    entropy: r.entropy,
    meanDistance: r.meanDistance,
    sinkMass: r.sinkMass,
    localMass: r.localMass,
    gamma0: r.gamma0,
    halfLife: Number.isFinite(r.halfLife) ? r.halfLife : null,
    explainedVariance: r.explainedVariance,
  }));
  const heatmap = (field: string, title: string, scale: Record<string, unknown> = {}): VegaLiteSpec => ({
    title,
    width: { step: 14 },
    height: { step: 14 },
    mark: { type: 'rect', tooltip: true },
    encoding: {
      x: { field: 'head', type: 'ordinal', title: 'head' },
      y: { field: 'layer', type: 'ordinal', title: 'layer' },
      color: { field, type: 'quantitative', title, scale: { scheme: 'viridis', ...scale } },
      tooltip: [
        { field: 'layer', type: 'ordinal' },
        { field: 'head', type: 'ordinal' },
        { field: 'entropy', type: 'quantitative', format: '.3f' },
        { field: 'meanDistance', type: 'quantitative', format: '.1f' },
        { field: 'sinkMass', type: 'quantitative', format: '.3f' },
        { field: 'localMass', type: 'quantitative', format: '.3f' },
        { field: 'gamma0', type: 'quantitative', format: '.5f' },
        { field: 'halfLife', type: 'quantitative', format: '.1f' },
        { field: 'explainedVariance', type: 'quantitative', format: '.3f' },
      ],
    },
  });
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title: options.title ?? `Taylor statistics: ${stats.meta.architecture}, ${stats.tokens} tokens, ${stats.sequences} sequences`,
    background: 'white',
    resolve: { scale: { color: 'independent' } },
    vconcat: [
      {
        title: 'Attention distance profile per head (mean mass per log-spaced distance bin Δ = t − s)',
        data: { values: profile },
        facet: { field: 'layer', type: 'ordinal', title: 'layer' },
        columns: options.columns ?? 4,
        spec: {
          width: 200,
          height: 130,
          mark: { type: 'line', point: false, strokeWidth: 1.2 },
          encoding: {
            x: { field: 'distance', type: 'ordinal', sort: { field: 'bin' }, title: 'distance Δ (tokens)', axis: { labelAngle: -45 } },
            y: { field: 'mass', type: 'quantitative', title: 'attention mass' },
            color: { field: 'head', type: 'ordinal', scale: { scheme: 'viridis' }, legend: { columns: 2, symbolLimit: 64 } },
            detail: { field: 'head', type: 'ordinal' },
          },
        },
        resolve: { scale: { y: 'independent' } },
      },
      {
        data: { values: heads },
        hconcat: [heatmap('entropy', 'mean entropy (nats)'), heatmap('meanDistance', 'mean distance E_A[Δ]', { type: 'symlog' })],
        resolve: { scale: { color: 'independent' } },
      },
    ],
  };
}

/** Where vega and vega-lite's ES module entries are (file URLs). */
function moduleUrls(): { vega: string; vegaLite: string } {
  try {
    return { vega: pathToFileURL(require.resolve('vega')).href, vegaLite: pathToFileURL(require.resolve('vega-lite')).href };
  } catch (cause) {
    throw new NotCompiledError('plots need the vega and vega-lite packages (npm install vega vega-lite)', { cause });
  }
}

// Runs in the child: reads {spec, vega, vegaLite} as JSON on stdin, writes the SVG on stdout.
const RENDER_SCRIPT = `
const chunks = [];
for await (const c of process.stdin) chunks.push(c);
const { spec, vega, vegaLite } = JSON.parse(Buffer.concat(chunks).toString('utf8'));
const vg = await import(vega);
const vl = await import(vegaLite);
const view = new vg.View(vg.parse(vl.compile(spec).spec), { renderer: 'none' });
const svg = await view.toSVG();
view.finalize();
process.stdout.write(svg);
`;

/** Renders a Vega-Lite spec to an SVG string (headless Vega in a child Node process). */
export async function renderVegaLiteSvg(spec: VegaLiteSpec, options: { signal?: AbortSignal } = {}): Promise<string> {
  throwIfAborted(options.signal);
  const urls = moduleUrls();
  return new Promise<string>((resolve, reject) => {
    const child = spawn(process.execPath, ['--input-type=module', '-e', RENDER_SCRIPT], { stdio: ['pipe', 'pipe', 'pipe'], signal: options.signal });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (c: Buffer) => out.push(c));
    child.stderr.on('data', (c: Buffer) => err.push(c));
    child.on('error', (e) => {
      if (options.signal?.aborted) reject(new AbortError('the operation was aborted', { cause: e }));
      else reject(e);
    });
    child.on('close', (code) => {
      if (code === 0) resolve(Buffer.concat(out).toString('utf8'));
      else if (!options.signal?.aborted) reject(new Error(`vega rendering failed (exit ${code}): ${Buffer.concat(err).toString('utf8').slice(-2000)}`));
    });
    child.stdin.on('error', () => undefined); // a failed child is reported by 'close'
    child.stdin.end(JSON.stringify({ spec, vega: urls.vega, vegaLite: urls.vegaLite }));
  });
}

/** Writes `svg` to `file` atomically (temporary name, fsync, rename). */
export async function writeSvg(file: string, svg: string): Promise<void> {
  const bytes = Buffer.from(svg, 'utf8');
  await writeFileAtomically(file, (fh) => writeAll(fh, bytes, null));
}

/** statsPlotSpec → SVG → `file`; returns the SVG. */
export async function writeStatsPlot(file: string, stats: TaylorStats, options: StatsPlotOptions & { signal?: AbortSignal } = {}): Promise<string> {
  const svg = await renderVegaLiteSvg(statsPlotSpec(stats, options), { signal: options.signal });
  await writeSvg(file, svg);
  return svg;
}

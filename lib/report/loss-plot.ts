/**
 * The training loss curve of `tcal pretrain` (and later distillation): training loss per step and validation
 * loss per evaluation against tokens seen, with the unigram baseline as a rule; a Vega-Lite spec rendered to SVG.
 */
import { renderVegaLiteSvg, writeSvg, type VegaLiteSpec } from './stats-plot';

/** One line of a training log (log.jsonl). */
export type LossLogEntry =
  | { kind: 'train'; step: number; tokens: number; loss: number; lr: number; gradNorm: number; skipped: boolean; ms: number }
  | { kind: 'valid'; step: number; tokens: number; loss: number; ppl: number };

export function lossPlotSpec(log: readonly LossLogEntry[], options: { unigramLoss?: number; title?: string } = {}): VegaLiteSpec {
  const values = log.map((e) => ({ tokens: e.tokens, step: e.step, loss: e.loss, series: e.kind === 'train' ? 'train' : 'validation' }));
  const layers: VegaLiteSpec[] = [
    {
      mark: { type: 'line', point: false, clip: true },
      encoding: {
        x: { field: 'tokens', type: 'quantitative', title: 'tokens' },
        y: { field: 'loss', type: 'quantitative', title: 'cross-entropy (nats)', scale: { zero: false } },
        color: { field: 'series', type: 'nominal', title: null },
      },
    },
  ];
  if (options.unigramLoss !== undefined && Number.isFinite(options.unigramLoss)) {
    layers.push({
      data: { values: [{ loss: options.unigramLoss, label: 'unigram' }] },
      mark: { type: 'rule', strokeDash: [4, 4], color: 'gray' },
      encoding: { y: { field: 'loss', type: 'quantitative' } },
    });
  }
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title: options.title ?? 'training loss',
    width: 560,
    height: 320,
    data: { values },
    layer: layers,
  };
}

/** Renders the log to `file` (SVG, written atomically). */
export async function writeLossPlot(file: string, log: readonly LossLogEntry[], options: { unigramLoss?: number; title?: string; signal?: AbortSignal } = {}): Promise<void> {
  await writeSvg(file, await renderVegaLiteSvg(lossPlotSpec(log, options), { signal: options.signal }));
}

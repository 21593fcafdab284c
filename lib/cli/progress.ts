/** Progress bars for the CLI (cli-progress), quiet when stderr is not a terminal unless forced. */
import { SingleBar, Presets } from 'cli-progress';

export interface Bar {
  update(done: number, total?: number, detail?: string): void;
  stop(): void;
}

export function progressBar(label: string, total: number, options: { enabled?: boolean } = {}): Bar {
  const enabled = options.enabled ?? Boolean(process.stderr.isTTY);
  if (!enabled) return { update: () => undefined, stop: () => undefined };
  const bar = new SingleBar(
    {
      format: `${label.padEnd(12)} [{bar}] {percentage}% | {value}/{total} {detail}`,
      stream: process.stderr,
      hideCursor: true,
      clearOnComplete: false,
    },
    Presets.shades_classic,
  );
  bar.start(total, 0, { detail: '' });
  return {
    update(done, newTotal, detail) {
      if (newTotal !== undefined) bar.setTotal(newTotal);
      bar.update(done, { detail: detail ?? '' });
    },
    stop() {
      bar.stop();
    },
  };
}

/** What a long CLI command gets: an AbortSignal tied to Ctrl-C and an onProgress that draws one bar per stage. */
export interface CliRun {
  signal: AbortSignal;
  onProgress: (p: { stage: string; done: number; total: number }) => void;
  /** Closes the bars (before printing results). */
  stopBars: () => void;
}

/** Runs `fn` with progress bars per stage and SIGINT → abort; bars and the handler are cleaned up after. */
export async function withCliProgress<T>(fn: (run: CliRun) => Promise<T>): Promise<T> {
  const bars = new Map<string, Bar>();
  const controller = new AbortController();
  const onSigint = (): void => controller.abort();
  process.once('SIGINT', onSigint);
  const stopBars = (): void => {
    for (const b of bars.values()) b.stop();
    bars.clear();
  };
  try {
    return await fn({
      signal: controller.signal,
      onProgress: (p) => {
        let bar = bars.get(p.stage);
        if (!bar) bars.set(p.stage, (bar = progressBar(p.stage, p.total)));
        bar.update(p.done, p.total);
      },
      stopBars,
    });
  } finally {
    process.removeListener('SIGINT', onSigint);
    stopBars();
  }
}

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

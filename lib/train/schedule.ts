/**
 * Learning-rate schedules (DESIGN.md §5.5): linear warmup then cosine decay to a floor, or linear warmup then
 * constant. A schedule is a pure function of the step, so its checkpointed state is just its (JSON) config
 * plus the step count. Steps count from 1 (the step being taken), as in adamwStep.
 */
import { InvalidArgumentError } from '../errors';

export type LrSchedule =
  | {
      kind: 'cosine';
      /** Steps of linear warmup from peak/warmupSteps up to the peak (0: none). */
      warmupSteps: number;
      /** The step at which the cosine reaches its floor; later steps stay there. */
      totalSteps: number;
      /** Floor as a fraction of the peak lr (default 0.1). */
      minLrFraction?: number;
    }
  | { kind: 'constant'; warmupSteps?: number };

function checkCount(value: unknown, key: string): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0)
    throw new InvalidArgumentError(key, `must be a non-negative integer, got ${JSON.stringify(value)}`);
  return value;
}

/** Validates a schedule (e.g. one read back from a checkpoint) and returns it with defaults filled in. */
export function checkSchedule(s: unknown): LrSchedule {
  if (typeof s !== 'object' || s === null) throw new InvalidArgumentError('schedule', 'expected an object');
  const o = s as Record<string, unknown>;
  if (o.kind === 'constant') return { kind: 'constant', warmupSteps: checkCount(o.warmupSteps ?? 0, 'schedule.warmupSteps') };
  if (o.kind !== 'cosine') throw new InvalidArgumentError('schedule.kind', `expected 'cosine' or 'constant', got ${JSON.stringify(o.kind)}`);
  const warmupSteps = checkCount(o.warmupSteps ?? 0, 'schedule.warmupSteps');
  const totalSteps = checkCount(o.totalSteps, 'schedule.totalSteps');
  if (totalSteps < 1) throw new InvalidArgumentError('schedule.totalSteps', 'must be ≥ 1');
  if (warmupSteps > totalSteps) throw new InvalidArgumentError('schedule.warmupSteps', `${warmupSteps} exceeds totalSteps ${totalSteps}`);
  const minLrFraction = o.minLrFraction ?? 0.1;
  if (typeof minLrFraction !== 'number' || !(minLrFraction >= 0 && minLrFraction <= 1))
    throw new InvalidArgumentError('schedule.minLrFraction', `must be in [0, 1], got ${JSON.stringify(minLrFraction)}`);
  return { kind: 'cosine', warmupSteps, totalSteps, minLrFraction };
}

/** The multiplier of the peak lr at `step` (1-based): in (0, 1]. */
export function lrFactor(schedule: LrSchedule, step: number): number {
  if (!Number.isSafeInteger(step) || step < 1) throw new InvalidArgumentError('step', `must be an integer ≥ 1, got ${step}`);
  const s = checkSchedule(schedule);
  const warmup = s.warmupSteps ?? 0;
  if (step <= warmup) return step / warmup;
  if (s.kind === 'constant') return 1;
  const floor = s.minLrFraction ?? 0.1;
  const span = s.totalSteps - warmup;
  const progress = span <= 0 ? 1 : Math.min(1, (step - warmup) / span);
  return floor + (1 - floor) * 0.5 * (1 + Math.cos(Math.PI * progress));
}

/** peakLr · lrFactor(schedule, step). */
export function lrAt(schedule: LrSchedule, peakLr: number, step: number): number {
  return peakLr * lrFactor(schedule, step);
}

export interface BatchShape {
  /** Sequences per micro-batch. */
  batchSize: number;
  /** Tokens per sequence. */
  seqLen: number;
  /** Micro-batches per optimizer step (gradient accumulation); default 1. */
  accumulation?: number;
}

/** Tokens one optimizer step consumes. */
export function tokensPerStep(shape: BatchShape): number {
  const { batchSize, seqLen } = shape;
  const accumulation = shape.accumulation ?? 1;
  for (const [k, v] of [['batchSize', batchSize], ['seqLen', seqLen], ['accumulation', accumulation]] as const)
    if (!Number.isSafeInteger(v) || v < 1) throw new InvalidArgumentError(k, `must be a positive integer, got ${v}`);
  return batchSize * seqLen * accumulation;
}

/** Optimizer steps needed to consume a token budget: ceil(tokens / tokensPerStep), at least 1. */
export function stepsForTokens(tokens: number, shape: BatchShape): number {
  if (!(Number.isFinite(tokens) && tokens > 0)) throw new InvalidArgumentError('tokens', `must be a positive number, got ${tokens}`);
  return Math.max(1, Math.ceil(tokens / tokensPerStep(shape)));
}

/** Parses a token budget such as 200M, 1.5B, 50k or 12345 (k = 10^3, M = 10^6, B / G = 10^9). */
export function parseTokenCount(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kKmMbBgG]?)\s*$/.exec(text);
  if (!m) throw new InvalidArgumentError('tokens', `expected a count like 200M, 1.5B or 50000, got ${JSON.stringify(text)}`);
  const mult = { '': 1, k: 1e3, m: 1e6, b: 1e9, g: 1e9 }[m[2].toLowerCase() as '' | 'k' | 'm' | 'b' | 'g'];
  const n = Math.round(Number(m[1]) * mult);
  if (!(n > 0) || !Number.isSafeInteger(n)) throw new InvalidArgumentError('tokens', `out of range: ${JSON.stringify(text)}`);
  return n;
}

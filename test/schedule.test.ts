/** Learning-rate schedules and the token-budget helpers. */
import { InvalidArgumentError } from '../lib';
import { checkSchedule, lrAt, lrFactor, parseTokenCount, stepsForTokens, tokensPerStep, type LrSchedule } from '../lib/train/schedule';

describe('lr schedules', () => {
  const cosine: LrSchedule = { kind: 'cosine', warmupSteps: 10, totalSteps: 110, minLrFraction: 0.1 };

  test('cosine: linear warmup to the peak, half-cosine down to the floor, then flat', () => {
    expect(lrFactor(cosine, 1)).toBeCloseTo(0.1, 12);
    expect(lrFactor(cosine, 5)).toBeCloseTo(0.5, 12);
    expect(lrFactor(cosine, 10)).toBe(1);
    // Half way through the decay: the midpoint between peak and floor.
    expect(lrFactor(cosine, 60)).toBeCloseTo(0.55, 12);
    expect(lrFactor(cosine, 110)).toBeCloseTo(0.1, 12);
    expect(lrFactor(cosine, 5000)).toBeCloseTo(0.1, 12);
    // Monotone non-increasing after warmup, never below the floor.
    let prev = Infinity;
    for (let s = 10; s <= 200; s++) {
      const x = lrFactor(cosine, s);
      expect(x).toBeLessThanOrEqual(prev + 1e-15);
      expect(x).toBeGreaterThanOrEqual(0.1 - 1e-15);
      prev = x;
    }
    expect(lrAt(cosine, 3e-4, 60)).toBeCloseTo(3e-4 * 0.55, 15);
  });

  test('cosine without warmup starts at the peak; the default floor is 0.1', () => {
    const s: LrSchedule = { kind: 'cosine', warmupSteps: 0, totalSteps: 100 };
    expect(lrFactor(s, 1)).toBeCloseTo(0.1 + 0.9 * 0.5 * (1 + Math.cos(Math.PI / 100)), 12);
    expect(lrFactor(s, 100)).toBeCloseTo(0.1, 12);
    expect(lrFactor({ ...s, minLrFraction: 0 }, 100)).toBeCloseTo(0, 12);
  });

  test('constant, with and without warmup', () => {
    expect(lrFactor({ kind: 'constant' }, 1)).toBe(1);
    expect(lrFactor({ kind: 'constant' }, 1e6)).toBe(1);
    const w: LrSchedule = { kind: 'constant', warmupSteps: 4 };
    expect([1, 2, 3, 4, 5, 100].map((s) => lrFactor(w, s))).toEqual([0.25, 0.5, 0.75, 1, 1, 1]);
  });

  test('a schedule survives a JSON round trip (its checkpoint state) and bad ones are refused', () => {
    expect(checkSchedule(JSON.parse(JSON.stringify(cosine)))).toEqual(cosine);
    expect(checkSchedule({ kind: 'constant' })).toEqual({ kind: 'constant', warmupSteps: 0 });
    expect(() => checkSchedule({ kind: 'linear' })).toThrow(InvalidArgumentError);
    expect(() => checkSchedule({ kind: 'cosine', warmupSteps: 20, totalSteps: 10 })).toThrow(/warmupSteps/);
    expect(() => checkSchedule({ kind: 'cosine', totalSteps: 10, minLrFraction: 2 })).toThrow(/minLrFraction/);
    expect(() => lrFactor(cosine, 0)).toThrow(/step/);
  });
});

describe('token budgets', () => {
  test('steps for a budget round up; tokens per step include accumulation', () => {
    expect(tokensPerStep({ batchSize: 8, seqLen: 2048 })).toBe(16384);
    expect(tokensPerStep({ batchSize: 8, seqLen: 2048, accumulation: 4 })).toBe(65536);
    expect(stepsForTokens(200e6, { batchSize: 8, seqLen: 2048, accumulation: 4 })).toBe(Math.ceil(200e6 / 65536));
    expect(stepsForTokens(65536, { batchSize: 8, seqLen: 2048, accumulation: 4 })).toBe(1);
    expect(stepsForTokens(65537, { batchSize: 8, seqLen: 2048, accumulation: 4 })).toBe(2);
    expect(stepsForTokens(1, { batchSize: 8, seqLen: 2048 })).toBe(1);
    expect(() => stepsForTokens(0, { batchSize: 1, seqLen: 1 })).toThrow(InvalidArgumentError);
    expect(() => tokensPerStep({ batchSize: 1.5, seqLen: 1 })).toThrow(/batchSize/);
  });

  test('token counts parse with k / M / B suffixes', () => {
    expect(parseTokenCount('200M')).toBe(200_000_000);
    expect(parseTokenCount('1.5B')).toBe(1_500_000_000);
    expect(parseTokenCount('50k')).toBe(50_000);
    expect(parseTokenCount(' 12345 ')).toBe(12345);
    expect(() => parseTokenCount('ten')).toThrow(InvalidArgumentError);
    expect(() => parseTokenCount('-5M')).toThrow(InvalidArgumentError);
  });
});

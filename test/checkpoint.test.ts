/**
 * Training checkpoints: bit-exact round trips, keep-N, and crash safety — a child process saving
 * checkpoints in a loop is SIGKILLed at random moments, and whatever latestCheckpoint then returns must load
 * and hold the state of exactly its step.
 */
import { spawn } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { CheckpointFormatError, InvalidArgumentError } from '../lib';
import {
  latestCheckpoint,
  listCheckpoints,
  loadCheckpoint,
  saveCheckpoint,
  type HostTensor,
  type TrainingCheckpoint,
} from '../lib/train/checkpoint';
import { rng, tsChildPrelude } from './helpers';

jest.setTimeout(120_000);

let root: string;
beforeAll(async () => {
  root = await fsp.mkdtemp(path.join(os.tmpdir(), 'tcal-ckpt-'));
});
afterAll(async () => {
  await fsp.rm(root, { recursive: true, force: true });
});

function bytes(t: HostTensor): Buffer {
  return Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength);
}

function randomState(step: number, seed: number): TrainingCheckpoint {
  const r = rng(seed);
  const w = new Float32Array(3000).map(() => r() * 2 - 1);
  // Values that a lossy path would change: NaN payloads, −0, infinities, subnormals.
  const u = new Uint32Array(w.buffer);
  u[0] = 0x7fc01234;
  u[1] = 0x80000000;
  u[2] = 0x7f800000;
  u[3] = 0x00000001;
  const e = new Uint16Array(777).map(() => Math.floor(r() * 65536));
  const ids = new BigInt64Array(5).map((_, i) => BigInt(i) * 0x123456789n - 7n);
  const moment = (n: number) => new Float32Array(n).map(() => r());
  return {
    step,
    model: new Map<string, HostTensor>([
      ['layers.0.w', { dtype: 'F32', shape: [30, 100], data: w }],
      ['embed', { dtype: 'BF16', shape: [777], data: e }],
      ['positions', { dtype: 'I64', shape: [5], data: ids }],
      ['scalar', { dtype: 'F32', shape: [], data: new Float32Array([r()]) }],
    ]),
    optimizer: {
      m: new Map<string, HostTensor>([
        ['layers.0.w', { dtype: 'F32', shape: [30, 100], data: moment(3000) }],
        ['scalar', { dtype: 'F32', shape: [], data: moment(1) }],
      ]),
      v: new Map<string, HostTensor>([
        ['layers.0.w', { dtype: 'F32', shape: [30, 100], data: moment(3000) }],
        ['scalar', { dtype: 'F32', shape: [], data: moment(1) }],
      ]),
    },
    schedule: { kind: 'cosine', warmupSteps: 10, totalSteps: 1000, minLrFraction: 0.1 },
    data: { epoch: 2, document: 12345, offset: 678 },
    rng: { seed: 42, state: 2 ** 32 - 5 },
    extra: { lossEma: 3.25, note: 'ünïcode' },
  };
}

function expectSame(a: TrainingCheckpoint, b: TrainingCheckpoint): void {
  expect(a.step).toBe(b.step);
  for (const [x, y] of [
    [a.model, b.model],
    [a.optimizer.m, b.optimizer.m],
    [a.optimizer.v, b.optimizer.v],
  ] as const) {
    expect([...x.keys()].sort()).toEqual([...y.keys()].sort());
    for (const [name, t] of x) {
      const u = y.get(name)!;
      expect(u.dtype).toBe(t.dtype);
      expect(u.shape).toEqual(t.shape);
      expect(bytes(u).equals(bytes(t))).toBe(true);
    }
  }
  expect(a.schedule).toEqual(b.schedule);
  expect(a.data).toEqual(b.data);
  expect(a.rng).toEqual(b.rng);
  expect(a.extra).toEqual(b.extra);
}

test('round trip is bit-exact (NaN payloads, −0, Inf, subnormals, bf16 bits, i64, scalars)', async () => {
  const out = path.join(root, 'roundtrip');
  const state = randomState(17, 1);
  const dir = await saveCheckpoint(out, state);
  expect(dir).toBe(path.join(out, 'step-17'));
  expect(await latestCheckpoint(out)).toBe(dir);
  const back = await loadCheckpoint(dir);
  expectSame(back, state);
  // Loaded tensors own their buffers: viewable as their element type.
  const w = back.model.get('layers.0.w')!;
  expect(new Float32Array(w.data.buffer)[5]).toBe((state.model.get('layers.0.w')!.data as Float32Array)[5]);
  // Saving the same step again replaces it.
  const again = randomState(17, 2);
  await saveCheckpoint(out, again);
  expectSame(await loadCheckpoint(dir), again);
  expect((await fsp.readdir(out)).sort()).toEqual(['step-17']);
});

test('keep-N keeps the most recent checkpoints by step; latestCheckpoint ignores temporaries and strays', async () => {
  const out = path.join(root, 'keep');
  for (const step of [1, 2, 10, 3, 11]) await saveCheckpoint(out, randomState(step, step), { keep: 3 });
  // Kept by step number, not by the order of saving: 3, 10, 11.
  expect((await listCheckpoints(out)).map((c) => c.step)).toEqual([3, 10, 11]);
  // A half-written temporary directory of a higher step, and names that are not checkpoints.
  await fsp.mkdir(path.join(out, '.step-99.tmp-1234567-abcdef'));
  await fsp.writeFile(path.join(out, '.step-99.tmp-1234567-abcdef', 'model.safetensors'), 'partial');
  await fsp.writeFile(path.join(out, 'step-50'), 'a file, not a directory');
  await fsp.mkdir(path.join(out, 'step-0x1'));
  expect(await latestCheckpoint(out)).toBe(path.join(out, 'step-11'));
  expect(await latestCheckpoint(path.join(root, 'nothing-here'))).toBeNull();
  await expect(saveCheckpoint(out, randomState(12, 3), { keep: 0 })).rejects.toThrow(InvalidArgumentError);
});

test('a damaged checkpoint fails to load with CheckpointFormatError', async () => {
  const out = path.join(root, 'damaged');
  const dir = await saveCheckpoint(out, randomState(5, 5));
  const file = path.join(dir, 'optimizer.safetensors');
  const full = await fsp.readFile(file);
  await fsp.writeFile(file, full.subarray(0, full.length - 10));
  await expect(loadCheckpoint(dir)).rejects.toThrow(CheckpointFormatError);
  await fsp.rm(path.join(dir, 'trainer_state.json'));
  await expect(loadCheckpoint(dir)).rejects.toThrow(CheckpointFormatError);
});

test('optimizer state must match the model', async () => {
  const s = randomState(1, 9);
  (s.optimizer.m as Map<string, HostTensor>).set('missing', { dtype: 'F32', shape: [1], data: new Float32Array(1) });
  await expect(saveCheckpoint(path.join(root, 'bad'), s)).rejects.toThrow(/missing/);
});

// ---- crash safety ----

/** The state saved at `step` by the child below: every value is a function of (step, index). */
function stateForStep(step: number) {
  const n = 1 << 19; // 2 MiB per f32 tensor; 6 MiB per checkpoint
  const fill = (k: number) => {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i += 1) a[i] = step * 1000 + k + (i % 997);
    return a;
  };
  return {
    step,
    model: new Map([['w', { dtype: 'F32' as const, shape: [n], data: fill(0) }]]),
    optimizer: {
      m: new Map([['w', { dtype: 'F32' as const, shape: [n], data: fill(1) }]]),
      v: new Map([['w', { dtype: 'F32' as const, shape: [n], data: fill(2) }]]),
    },
    schedule: { kind: 'constant' },
    data: { offset: step * 4096 },
    rng: { state: step * 7 },
  };
}

/** A child that registers a TypeScript loader (transpile only) and saves checkpoints from `first` on, forever. */
function childScript(out: string, first: number): string {
  const checkpointPath = path.resolve(__dirname, '../lib/train/checkpoint.ts');
  return `${tsChildPrelude()}
const { saveCheckpoint } = require(${JSON.stringify(checkpointPath)});
const stateForStep = ${stateForStep.toString()};
(async () => {
  for (let step = ${first}; ; step++) {
    process.stdout.write('begin ' + step + '\\n');
    await saveCheckpoint(${JSON.stringify(out)}, stateForStep(step), { keep: 2 });
    process.stdout.write('saved ' + step + '\\n');
  }
})().catch((e) => { console.error(e); process.exit(3); });
`;
}

/** Starts the child, lets it complete `afterSaves` saves, then SIGKILLs it `delayMs` after its next save begins. */
function runAndKill(out: string, first: number, afterSaves: number, delayMs: number): Promise<{ saved: number; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['-e', childScript(out, first)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let saved = 0;
    let stdout = '';
    let stderr = '';
    let armed = false;
    child.stdout.on('data', (d: Buffer) => {
      stdout += d.toString();
      const lines = stdout.split('\n');
      stdout = lines.pop()!;
      for (const line of lines) {
        if (line.startsWith('saved')) saved++;
        if (line.startsWith('begin') && saved >= afterSaves && !armed) {
          armed = true;
          setTimeout(() => child.kill('SIGKILL'), delayMs);
        }
      }
    });
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      if (signal !== 'SIGKILL') reject(new Error(`child exited with ${code}/${signal}: ${stderr}`));
      else resolve({ saved, stderr });
    });
  });
}

test('SIGKILL at random moments while saving never leaves a latest checkpoint that fails to load', async () => {
  const out = path.join(root, 'killed');
  const r = rng(2024);
  let sawTemporary = false;
  for (let run = 0; run < 5; run++) {
    const latest = await latestCheckpoint(out);
    const first = latest ? Number(path.basename(latest).slice('step-'.length)) + 1 : 1;
    // Kill anywhere from the start of a save to well past its end.
    await runAndKill(out, first, run % 2, Math.floor(r() * 60));
    // A kill within the first milliseconds can land before the save created `out`: nothing to inspect then.
    const entries = await fsp.readdir(out).catch((e: NodeJS.ErrnoException) => (e.code === 'ENOENT' ? [] : Promise.reject(e)));
    sawTemporary ||= entries.some((e) => e.startsWith('.'));
    const dir = await latestCheckpoint(out);
    if (run % 2 === 1) expect(dir).not.toBeNull(); // at least one save completed in this run
    if (dir === null) continue;
    const ck = await loadCheckpoint(dir);
    const want = stateForStep(ck.step);
    expect(path.basename(dir)).toBe(`step-${ck.step}`);
    expect(ck.data).toEqual(want.data);
    expect(ck.rng).toEqual(want.rng);
    for (const [got, exp] of [
      [ck.model.get('w')!, want.model.get('w')!],
      [ck.optimizer.m.get('w')!, want.optimizer.m.get('w')!],
      [ck.optimizer.v.get('w')!, want.optimizer.v.get('w')!],
    ]) {
      expect(bytes(got).equals(Buffer.from(exp.data.buffer))).toBe(true);
    }
    // keep: 2. Older checkpoints are pruned only after the new one is complete, so a kill between the
    // rename and the pruning can leave one extra; the next completed save prunes it (asserted below).
    expect((await listCheckpoints(out)).length).toBeLessThanOrEqual(3);
  }
  // A later save by a live process removes what killed ones left behind.
  const latest = (await latestCheckpoint(out))!;
  const next = Number(path.basename(latest).slice('step-'.length)) + 1;
  await saveCheckpoint(out, stateForStep(next), { keep: 2 });
  expect((await fsp.readdir(out)).filter((e) => e.startsWith('.'))).toEqual([]);
  expect((await listCheckpoints(out)).length).toBeLessThanOrEqual(2);
  // Not asserted (timing-dependent), but reported when no kill landed mid-write.
  if (!sawTemporary) console.warn('checkpoint kill test: no kill landed inside a save this time');
});

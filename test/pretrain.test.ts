/**
 * `pretrain` end to end on the CPU: a small teacher on a slice of the corpus sample with the shipped tokenizer —
 * log, loss plot, checkpoints and the exported Hugging Face directory (which Teacher.load reads back with the same
 * validation loss); and a SIGKILL at a random step followed by `resume` reproduces the uninterrupted loss curve
 * bit for bit.
 */
import { spawn } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Teacher } from '../lib/model/teacher';
import { listCheckpoints, loadCheckpoint } from '../lib/train/checkpoint';
import { pretrain, type PretrainOptions } from '../lib/train/pretrain';
import type { LossLogEntry } from '../lib/report/loss-plot';
import { evaluatePerplexity } from '../lib/eval';
import { buildProgram } from '../lib/cli/main';
import { rng, tsChildPrelude } from './helpers';

const ROOT = path.resolve(__dirname, '..');
let dir: string;
let corpus: string;

beforeAll(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'tcal-pretrain-'));
  corpus = path.join(dir, 'corpus.txt');
  const text = await fsp.readFile(path.join(ROOT, 'data/corpus/python-stdlib-sample.txt'), 'utf8');
  await fsp.writeFile(corpus, text.slice(0, 60_000));
});

afterAll(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});

function options(out: string, over: Partial<PretrainOptions> = {}): PretrainOptions {
  return {
    data: corpus,
    tokenizer: path.join(ROOT, 'data/tokenizer'),
    out,
    model: { family: 'llama', hiddenSize: 32, numLayers: 2, numHeads: 2, numKvHeads: 1, intermediateSize: 64 },
    seqLen: 32,
    batchSize: 4,
    steps: 24,
    lr: 1e-2,
    warmupSteps: 2,
    evalEvery: 8,
    evalTokens: 512,
    saveEvery: 4,
    keep: 2,
    seed: 1,
    validFraction: 0.1,
    device: 'cpu',
    cacheDir: path.join(dir, 'cache'),
    ...over,
  };
}

async function readLog(out: string): Promise<LossLogEntry[]> {
  return (await fsp.readFile(path.join(out, 'log.jsonl'), 'utf8'))
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as LossLogEntry);
}

describe('pretrain (CPU)', () => {
  let reference: LossLogEntry[];

  test('trains, logs, plots, checkpoints and exports a model transformers-style', async () => {
    const out = path.join(dir, 'run');
    const progress: number[] = [];
    const r = await pretrain({ ...options(out), exportDtype: 'F32', onProgress: (p) => p.stage === 'train' && progress.push(p.done) });
    reference = await readLog(out);
    const train = reference.filter((e) => e.kind === 'train');
    expect(train.map((e) => e.step)).toEqual(Array.from({ length: 24 }, (_, i) => i + 1));
    expect(reference.filter((e) => e.kind === 'valid').map((e) => e.step)).toEqual([8, 16, 24]);
    expect(progress[progress.length - 1]).toBe(24);
    expect(train[23].loss).toBeLessThan(train[0].loss - 1);
    // 24 steps of 128 tokens: far below uniform (4096), not yet below the unigram model.
    const uniform = Math.exp(train[0].loss);
    expect(r.validPerplexity).toBeLessThan(uniform / 4);
    expect(r.unigramPerplexity).toBeLessThan(uniform);
    expect(await fsp.readFile(path.join(out, 'loss.svg'), 'utf8')).toMatch(/^<svg/);
    expect((await listCheckpoints(path.join(out, 'checkpoints'))).map((c) => c.step)).toEqual([20, 24]);
    // The export: transformers' layout, read back by our loader with the same validation loss.
    const files = await fsp.readdir(r.modelDir!);
    expect(files).toEqual(expect.arrayContaining(['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']));
    const config = JSON.parse(await fsp.readFile(path.join(r.modelDir!, 'config.json'), 'utf8'));
    expect(config).toMatchObject({ architectures: ['LlamaForCausalLM'], model_type: 'llama', num_key_value_heads: 1, vocab_size: 4096 });
    const teacher = await Teacher.load(r.modelDir!, { device: 'cpu', dtype: 'f32' });
    expect(teacher.config.numLayers).toBe(2);
    teacher.dispose();
    const ev = await evaluatePerplexity({ model: r.modelDir!, data: corpus, seqLen: 32, batchSize: 4, maxTokens: 256, device: 'cpu', cacheDir: path.join(dir, 'cache') });
    expect(ev.perplexity).toBeLessThan(uniform / 4);
  });

  test('a SIGKILL at a random step, then resume: the same loss curve, bit for bit', async () => {
    const out = path.join(dir, 'killed');
    const killAfter = 3 + Math.floor(rng(Date.now() % 1000)() * 18); // a step in 3..20
    const script = `${tsChildPrelude()}
const { pretrain } = require(${JSON.stringify(path.join(ROOT, 'lib/train/pretrain.ts'))});
pretrain({ ...${JSON.stringify(options(out))}, onLog: (e) => { if (e.kind === 'train') process.stdout.write('step ' + e.step + '\\n'); } })
  .catch((e) => { console.error(e); process.exit(3); });
`;
    const killedAt = await new Promise<number>((resolve, reject) => {
      const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      let last = 0;
      child.stdout.on('data', (d: Buffer) => {
        stdout += d.toString();
        const m = stdout.match(/step (\d+)\n/g);
        last = m ? parseInt(m[m.length - 1].slice(5), 10) : 0;
        if (last >= killAfter) child.kill('SIGKILL');
      });
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      child.on('error', reject);
      child.on('close', (code, signal) => (signal === 'SIGKILL' ? resolve(last) : reject(new Error(`child ended with ${code}: ${stderr}`))));
    });
    expect(killedAt).toBeGreaterThanOrEqual(killAfter);
    // Every checkpoint left behind is complete.
    for (const c of await listCheckpoints(path.join(out, 'checkpoints'))) await expect(loadCheckpoint(c.dir)).resolves.toBeDefined();
    await pretrain({ ...options(out), resume: true, exportDtype: 'F32' });
    const resumed = await readLog(out);
    expect(resumed).toHaveLength(reference.length);
    for (const [i, e] of resumed.entries()) {
      expect({ ...e, ms: 0 }).toEqual({ ...reference[i], ms: 0 });
    }
  });
});

describe('tcal pretrain (CLI, CPU)', () => {
  test('a preset with overrides trains, prints JSON and exports; a bad preset is refused by name', async () => {
    const out = path.join(dir, 'cli');
    let printed = '';
    const write = jest.spyOn(process.stdout, 'write').mockImplementation((c: string | Uint8Array) => {
      printed += c.toString();
      return true;
    });
    try {
      await buildProgram().exitOverride().parseAsync(
        ['pretrain', '--preset', 'qwen3-qknorm', '--data', corpus, '--tokenizer', path.join(ROOT, 'data/tokenizer'), '--out', out,
          '--hidden', '32', '--layers', '1', '--heads', '2', '--kv-heads', '1', '--intermediate', '32', '--seq-len', '32', '--batch', '2',
          '--steps', '3', '--eval-tokens', '64', '--backend', 'cpu', '--cache-dir', path.join(dir, 'cache'), '--json'],
        { from: 'user' },
      );
    } finally {
      write.mockRestore();
    }
    const r = JSON.parse(printed);
    expect(r).toMatchObject({ steps: 3, preset: 'qwen3-qknorm', backend: 'cpu' });
    const config = JSON.parse(await fsp.readFile(path.join(out, 'model', 'config.json'), 'utf8'));
    expect(config).toMatchObject({ architectures: ['Qwen3ForCausalLM'], hidden_size: 32, num_hidden_layers: 1, num_key_value_heads: 1 });
    await expect(
      buildProgram().exitOverride().parseAsync(['pretrain', '--preset', 'nope', '--data', corpus, '--tokenizer', 'x', '--out', out], { from: 'user' }),
    ).rejects.toMatchObject({ argument: 'preset' });
  });
});

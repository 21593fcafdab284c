/**
 * `tcal eval` end to end on the CPU: a transformers-written model with a real byte-level BPE tokenizer.json,
 * a jsonl dataset, perplexity = exp(mean next-token loss inside each document), checked against the
 * teacher's own logits, and the CLI's output.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { evaluatePerplexity } from '../lib/eval';
import { buildProgram } from '../lib/cli/main';
import { Teacher } from '../lib/model/teacher';
import { loadTokenizer } from '../lib/io/tokenizer';
import { writeTinyTokenizer } from './helpers/tiny-tokenizer';

const FIXTURE = path.join(__dirname, 'fixtures', 'hf', 'llama-gqa-llama3-sharded');
const DOCS = ['the cat sat on the mat', 'héllo there, in the garden', 'a'];

let dir: string;
beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tcal-eval-'));
  fs.cpSync(FIXTURE, path.join(dir, 'model'), { recursive: true });
  await writeTinyTokenizer(path.join(dir, 'model'));
  fs.writeFileSync(path.join(dir, 'data.jsonl'), DOCS.map((text) => JSON.stringify({ text })).join('\n') + '\n');
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

test('perplexity equals exp of the mean in-document next-token loss', async () => {
  const r = await evaluatePerplexity({
    model: path.join(dir, 'model'),
    data: path.join(dir, 'data.jsonl'),
    seqLen: 64, // every document fits one row, so packing only concatenates them
    batchSize: 2,
    device: 'cpu',
    cacheDir: path.join(dir, 'cache'),
  });
  // Direct: each document alone, next-token CE from the teacher's logits.
  const tok = await loadTokenizer(path.join(dir, 'model'));
  const teacher = await Teacher.load(path.join(dir, 'model'), { device: 'cpu' });
  let sum = 0;
  let count = 0;
  try {
    for (const text of DOCS) {
      const ids = Int32Array.from(tok.encode(text, { addSpecialTokens: true }));
      const logits = await (await teacher.logits(ids, [1, ids.length])).toFloat32();
      const V = teacher.config.vocabSize;
      for (let i = 0; i + 1 < ids.length; i++) {
        const l = logits.subarray(i * V, (i + 1) * V);
        const m = Math.max(...l);
        sum += m + Math.log(l.reduce((s, x) => s + Math.exp(x - m), 0)) - l[ids[i + 1]];
        count++;
      }
    }
  } finally {
    teacher.dispose();
  }
  expect(r.tokens).toBe(count);
  expect(r.documents).toBe(DOCS.length);
  expect(Math.abs(r.meanLoss - sum / count)).toBeLessThan(1e-4);
  expect(r.perplexity).toBeCloseTo(Math.exp(sum / count), 3);
});

test('the CLI prints the perplexity as JSON', async () => {
  const chunks: string[] = [];
  const write = jest.spyOn(process.stdout, 'write').mockImplementation((c: string | Uint8Array) => {
    chunks.push(String(c));
    return true;
  });
  try {
    await buildProgram().parseAsync(
      ['eval', '--model', path.join(dir, 'model'), '--data', path.join(dir, 'data.jsonl'), '--seq-len', '16', '--backend', 'cpu', '--json'],
      { from: 'user' },
    );
  } finally {
    write.mockRestore();
  }
  const out = JSON.parse(chunks.join(''));
  expect(out.backend).toBe('cpu');
  expect(out.perplexity).toBeGreaterThan(1);
  expect(out.tokens).toBeGreaterThan(20);
});

test('a missing data file is a typed error', async () => {
  await expect(
    evaluatePerplexity({ model: path.join(dir, 'model'), data: path.join(dir, 'nope.jsonl'), device: 'cpu', cacheDir: path.join(dir, 'cache') }),
  ).rejects.toMatchObject({ code: 'DATA' });
});

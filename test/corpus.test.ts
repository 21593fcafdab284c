/**
 * The shipped corpus sample (data/corpus) and, once it has been trained on the GPU host, the tokenizer
 * (data/tokenizer): the files lib/io/tokenizer.ts will read must give the documented BOS/EOS policy.
 */
import { existsSync, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { loadTokenizer } from '../lib/io/tokenizer';

const corpusDir = path.join(__dirname, '..', 'data', 'corpus');
const tokenizerDir = path.join(__dirname, '..', 'data', 'tokenizer');

test('the corpus sample is a few MB of stdlib sources, with a header per file and the PSF licence', async () => {
  const text = await fsp.readFile(path.join(corpusDir, 'python-stdlib-sample.txt'), 'utf8');
  expect(text.length).toBeGreaterThan(1_000_000);
  expect(Buffer.byteLength(text)).toBeLessThanOrEqual(3_000_000);
  const headers = text.match(/^# ===== file: Lib\/[^ ]+\.py \(CPython [\d.]+\) =====$/gm) ?? [];
  expect(headers.length).toBeGreaterThan(50);
  expect(text.startsWith(headers[0]!)).toBe(true);
  const names = headers.map((h) => h.split(' ')[3]);
  expect([...names].sort((a, b) => (Buffer.compare(Buffer.from(a), Buffer.from(b))))).toEqual(names);
  const licence = await fsp.readFile(path.join(corpusDir, 'LICENSE-PSF.txt'), 'utf8');
  expect(licence).toMatch(/PYTHON SOFTWARE FOUNDATION LICENSE/);
  expect(existsSync(path.join(corpusDir, 'make_sample.sh'))).toBe(true);
});

const trained = existsSync(path.join(tokenizerDir, 'tokenizer.json'));
(trained ? test : test.skip)('the trained tokenizer: vocab 4096, <|bos|> text <|eos|>, byte-exact round trip', async () => {
  const tok = await loadTokenizer(tokenizerDir);
  expect(tok.vocabSize).toBe(4096);
  expect([tok.bosId, tok.eosId, tok.tokenToId('<|pad|>')]).toEqual([0, 1, 2]);
  expect(tok.addBos && tok.addEos).toBe(true);
  const text = (await fsp.readFile(path.join(corpusDir, 'python-stdlib-sample.txt'), 'utf8')).slice(100_000, 120_000);
  const ids = tok.encode(text);
  expect(tok.decode(ids)).toBe(text);
  expect(ids.length).toBeLessThan(text.length / 2); // BPE merges do compress code
  const wrapped = tok.encode('x = 1\n', { addSpecialTokens: true });
  expect(wrapped[0]).toBe(0);
  expect(wrapped[wrapped.length - 1]).toBe(1);
  expect(tok.decode(wrapped, { skipSpecialTokens: true })).toBe('x = 1\n');
});

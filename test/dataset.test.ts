import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { AbortError, DataError, InvalidArgumentError } from '../lib/errors';
import {
  Document,
  PackedBatch,
  SourceFile,
  TokenizedDataset,
  datasetCacheKey,
  listSourceFiles,
  packSequences,
  readDocuments,
  readTokenCache,
  splitDocuments,
  tokenizeDataset,
} from '../lib/io/dataset';
import { Rng } from '../lib/io/rng';
import { Tokenizer, loadTokenizer } from '../lib/io/tokenizer';
import { TINY_BOS, TINY_BOS_ID, TINY_EOS, TINY_EOS_ID, writeTinyTokenizer } from './helpers/tiny-tokenizer';

let root: string;
let count = 0;
let tokenizer: Tokenizer;
beforeAll(async () => {
  root = await fsp.mkdtemp(path.join(os.tmpdir(), 'tcal-dataset-'));
  const tokenizerDir = path.join(root, 'tokenizer');
  await writeTinyTokenizer(tokenizerDir, { tokenizerConfig: { bos_token: TINY_BOS, eos_token: TINY_EOS, add_bos_token: true, add_eos_token: true } });
  tokenizer = await loadTokenizer(tokenizerDir);
});
afterAll(async () => {
  await fsp.rm(root, { recursive: true, force: true });
});
const fresh = (name = 'x') => path.join(root, `${count++}-${name}`);

async function writeFiles(dir: string, files: Record<string, string | Buffer>): Promise<void> {
  for (const [name, content] of Object.entries(files)) {
    await fsp.mkdir(path.dirname(path.join(dir, name)), { recursive: true });
    await fsp.writeFile(path.join(dir, name), content);
  }
}

async function collect(files: SourceFile[], options: Parameters<typeof readDocuments>[1] = {}): Promise<Document[]> {
  const out: Document[] = [];
  for await (const doc of readDocuments(files, options)) out.push(doc);
  return out;
}

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => {
      throw new Error('expected a rejection');
    },
    (e: unknown) => e,
  );
}

describe('sources and documents', () => {
  test('a directory is listed recursively, sorted by path bytes, hidden names skipped, extensions filtered', async () => {
    const dir = fresh('tree');
    await writeFiles(dir, {
      'b.txt': 'b',
      'a/z.txt': 'z',
      'a/B.py': 'B',
      'A.txt': 'A',
      '.hidden.txt': 'no',
      '.git/config': 'no',
      'c/d/e.jsonl': '{"text": "e"}\n',
      'notes.md': 'md',
    });
    const files = await listSourceFiles(dir);
    expect(files.map((f) => path.relative(dir, f.path))).toEqual(['A.txt', 'a/B.py', 'a/z.txt', 'b.txt', 'c/d/e.jsonl', 'notes.md']);
    expect(files.find((f) => f.path.endsWith('e.jsonl'))!.format).toBe('jsonl');
    expect(files.every((f) => path.isAbsolute(f.path) && f.size > 0 && f.mtimeMs > 0)).toBe(true);
    const filtered = await listSourceFiles(dir, { extensions: ['.TXT', '.jsonl'] });
    expect(filtered.map((f) => path.basename(f.path))).toEqual(['A.txt', 'z.txt', 'b.txt', 'e.jsonl']);
    await expect(listSourceFiles(dir, { extensions: ['.rs'] })).rejects.toBeInstanceOf(DataError);
    await expect(listSourceFiles(path.join(dir, 'nope'))).rejects.toMatchObject({ code: 'DATA', file: path.join(dir, 'nope') });
  });

  test('text files: whole file, paragraphs or lines', async () => {
    const dir = fresh('text');
    await writeFiles(dir, { 'one.txt': 'first para\nstill first\r\n\n\n second para \n\nthird', 'empty.txt': '' });
    const files = await listSourceFiles(dir);
    expect((await collect(files)).map((d) => d.text)).toEqual(['first para\nstill first\r\n\n\n second para \n\nthird']);
    const paragraphs = await collect(files, { textSplit: 'paragraph' });
    expect(paragraphs.map((d) => [d.text, d.line])).toEqual([
      ['first para\nstill first', 1],
      [' second para ', 5],
      ['third', 7],
    ]);
    const lines = await collect(files, { textSplit: 'line' });
    expect(lines.map((d) => d.text)).toEqual(['first para', 'still first', ' second para ', 'third']);
  });

  test('jsonl: documents from the text field (or another), blank lines skipped, across chunk boundaries', async () => {
    const dir = fresh('jsonl');
    const long = 'x'.repeat(3 * 1024 * 1024 + 17); // longer than a read chunk
    await writeFiles(dir, {
      'data.jsonl': [JSON.stringify({ text: 'héllo', id: 1 }), '', '   ', JSON.stringify({ text: long }), JSON.stringify({ text: '' }), JSON.stringify({ text: 'last', body: 'B' })].join('\n'),
    });
    const files = await listSourceFiles(dir);
    const docs = await collect(files);
    expect(docs.map((d) => [d.text.length, d.line])).toEqual([
      [5, 1],
      [long.length, 4],
      [4, 6],
    ]);
    expect(docs[0].text).toBe('héllo');
    await writeFiles(dir, { 'data.jsonl': `${JSON.stringify({ body: 'one' })}\n${JSON.stringify({ body: 'two' })}\n` });
    expect((await collect(await listSourceFiles(dir), { jsonlField: 'body' })).map((d) => d.text)).toEqual(['one', 'two']);
  });

  test.each<[string, string, number, RegExp]>([
    ['bad JSON', '{"text": "ok"}\n{"text": "unterminated\n', 2, /not valid JSON/],
    ['not an object', '{"text": "ok"}\n\n["text"]\n', 3, /JSON object/],
    ['missing text', '{"text": "ok"}\n{"content": "x"}\n', 2, /"text" must be a string/],
    ['text not a string', '{"text": 5}\n', 1, /"text" must be a string/],
  ])('jsonl with %s → DataError with file and line', async (_label, content, line, message) => {
    const file = path.join(fresh('badjsonl'), 'bad.jsonl');
    await writeFiles(path.dirname(file), { 'bad.jsonl': content });
    const error = await rejection(collect(await listSourceFiles(file)));
    expect(error).toBeInstanceOf(DataError);
    expect(error).toMatchObject({ file, line, message: expect.stringMatching(message) });
  });

  test('invalid UTF-8 → DataError naming file (and line)', async () => {
    const dir = fresh('utf8');
    await writeFiles(dir, { 'bad.txt': Buffer.from([0x61, 0xff, 0x62]), 'bad.jsonl': Buffer.concat([Buffer.from('{"text": "a"}\n{"text": "'), Buffer.from([0xc3]), Buffer.from('"}\n')]) });
    const [jsonl, text] = await listSourceFiles(dir);
    expect(await rejection(collect([text]))).toMatchObject({ code: 'DATA', file: text.path, message: expect.stringMatching(/UTF-8/) });
    expect(await rejection(collect([jsonl]))).toMatchObject({ code: 'DATA', file: jsonl.path, line: 2 });
  });
});

describe('tokenizeDataset and its cache', () => {
  async function corpus(): Promise<string> {
    const dir = fresh('corpus');
    await writeFiles(dir, {
      'a.txt': 'the cat sat on the mat',
      'b/c.txt': 'café — naïve ünïcödé 日本語',
      'b/d.jsonl': `${JSON.stringify({ text: 'in the beginning' })}\n${JSON.stringify({ text: 'there was text' })}\n`,
    });
    return dir;
  }

  test('tokenises every document in order, and the cache is reused while nothing changes', async () => {
    const source = await corpus();
    const cacheDir = fresh('cache');
    const progress: Array<{ done: number; total: number }> = [];
    const first = await tokenizeDataset(source, tokenizer, { cacheDir, onProgress: (p) => progress.push(p) });
    expect(first.fromCache).toBe(false);
    const texts = (await collect(await listSourceFiles(source))).map((d) => d.text);
    expect(first.numDocs).toBe(4);
    for (let d = 0; d < texts.length; d++) {
      const ids = Array.from(first.tokens.subarray(first.docOffsets[d], first.docOffsets[d + 1]));
      expect(ids).toEqual(tokenizer.encode(texts[d]));
      expect(tokenizer.decode(ids)).toBe(texts[d]);
    }
    expect(first.numTokens).toBe(first.docOffsets[4]);
    const total = (await listSourceFiles(source)).reduce((s, f) => s + f.size, 0);
    expect(progress[progress.length - 1]).toEqual({ done: total, total, unit: 'bytes' });
    expect(progress.every((p, i) => i === 0 || p.done >= progress[i - 1].done)).toBe(true);
    expect(path.basename(first.cacheFile)).toMatch(/^[0-9a-f]{64}\.tokens$/);
    expect(await fsp.readdir(cacheDir)).toEqual([path.basename(first.cacheFile)]);

    const second = await tokenizeDataset(source, tokenizer, { cacheDir });
    expect(second.fromCache).toBe(true);
    expect(second.cacheFile).toBe(first.cacheFile);
    expect(second.tokens).toEqual(first.tokens);
    expect(second.docOffsets).toEqual(first.docOffsets);
  });

  test('touching a source, adding a file, another tokenizer or other document options change the key', async () => {
    const source = await corpus();
    const cacheDir = fresh('cache');
    const first = await tokenizeDataset(source, tokenizer, { cacheDir });

    const touched = path.join(source, 'a.txt');
    const later = new Date(Date.now() + 60_000);
    await fsp.utimes(touched, later, later);
    const afterTouch = await tokenizeDataset(source, tokenizer, { cacheDir });
    expect(afterTouch.fromCache).toBe(false);
    expect(afterTouch.cacheFile).not.toBe(first.cacheFile);

    await fsp.writeFile(path.join(source, 'z.txt'), 'another');
    const afterAdd = await tokenizeDataset(source, tokenizer, { cacheDir });
    expect(afterAdd.fromCache).toBe(false);
    expect(afterAdd.numDocs).toBe(first.numDocs + 1);

    const other = await tokenizeDataset(source, { encode: (t) => Array.from(Buffer.from(t)), contentHash: 'bytes' }, { cacheDir });
    expect(other.fromCache).toBe(false);
    const documents = await collect(await listSourceFiles(source));
    expect(other.numTokens).toBe(documents.reduce((sum, d) => sum + Buffer.byteLength(d.text), 0));

    const split = await tokenizeDataset(source, tokenizer, { cacheDir, textSplit: 'line' });
    expect(split.fromCache).toBe(false);
    const files = await listSourceFiles(source);
    expect(datasetCacheKey(files, tokenizer.contentHash)).not.toBe(datasetCacheKey(files, tokenizer.contentHash, { jsonlField: 'body' }));
    expect(datasetCacheKey(files, tokenizer.contentHash)).toBe(datasetCacheKey([...files], tokenizer.contentHash, { textSplit: 'file' }));
  });

  test('a corrupt cache file is rebuilt, not trusted', async () => {
    const source = await corpus();
    const cacheDir = fresh('cache');
    const first = await tokenizeDataset(source, tokenizer, { cacheDir });
    const bytes = await fsp.readFile(first.cacheFile);
    await fsp.writeFile(first.cacheFile, bytes.subarray(0, bytes.byteLength - 4));
    await expect(readTokenCache(first.cacheFile)).rejects.toBeInstanceOf(DataError);
    const again = await tokenizeDataset(source, tokenizer, { cacheDir });
    expect(again.fromCache).toBe(false);
    expect(again.tokens).toEqual(first.tokens);
    await expect(readTokenCache(first.cacheFile, '00'.repeat(32))).rejects.toThrow(/key/);
  });

  test('an abort stops tokenising with AbortError and leaves no cache or temporary file', async () => {
    const dir = fresh('big');
    const lines = Array.from({ length: 4000 }, (_, i) => JSON.stringify({ text: `document ${i} ${'the text '.repeat(60)}` }));
    await writeFiles(dir, { 'big.jsonl': lines.join('\n') });
    const cacheDir = fresh('cache');
    const controller = new AbortController();
    const error = await rejection(
      tokenizeDataset(dir, tokenizer, {
        cacheDir,
        signal: controller.signal,
        onProgress: (p) => {
          if (p.done > 0 && p.done < p.total) controller.abort();
        },
      }),
    );
    expect(error).toBeInstanceOf(AbortError);
    expect(await fsp.readdir(cacheDir)).toEqual([]);
    const aborted = new AbortController();
    aborted.abort();
    await expect(tokenizeDataset(dir, tokenizer, { cacheDir, signal: aborted.signal })).rejects.toBeInstanceOf(AbortError);
  });

  test('a malformed jsonl line fails tokenising with DataError and leaves no cache', async () => {
    const dir = fresh('badcorpus');
    await writeFiles(dir, { 'x.jsonl': '{"text": "fine"}\n{oops}\n' });
    const cacheDir = fresh('cache');
    expect(await rejection(tokenizeDataset(dir, tokenizer, { cacheDir }))).toMatchObject({ code: 'DATA', line: 2 });
    expect(await fsp.readdir(cacheDir)).toEqual([]);
  });
});

describe('splitDocuments', () => {
  test('deterministic in the seed, disjoint, covering, sorted, of the asked size', () => {
    const a = splitDocuments(1000, { validFraction: 0.1, seed: 42 });
    const b = splitDocuments(1000, { validFraction: 0.1, seed: 42 });
    const c = splitDocuments(1000, { validFraction: 0.1, seed: 43 });
    expect(a).toEqual(b);
    expect(a.valid).not.toEqual(c.valid);
    expect(a.valid).toHaveLength(100);
    expect(a.train).toHaveLength(900);
    const all = new Set([...a.valid, ...a.train]);
    expect(all.size).toBe(1000);
    expect([...a.valid]).toEqual([...a.valid].sort((x, y) => x - y));
    expect([...a.train]).toEqual([...a.train].sort((x, y) => x - y));
    // Not just the first or last documents.
    expect(Math.min(...a.valid)).toBeLessThan(100);
    expect(Math.max(...a.valid)).toBeGreaterThan(900);
  });

  test('small corpora keep at least one document on each side', () => {
    expect(splitDocuments(2, { validFraction: 0.01, seed: 1 }).valid).toHaveLength(1);
    expect(splitDocuments(3, { validFraction: 0.9, seed: 1 }).train).toHaveLength(1);
    expect(splitDocuments(1, { validFraction: 0.5, seed: 1 })).toEqual({ valid: new Uint32Array([0]), train: new Uint32Array([]) });
    expect(splitDocuments(10, { validFraction: 0, seed: 1 }).valid).toHaveLength(0);
    expect(() => splitDocuments(10, { validFraction: 1, seed: 1 })).toThrow(InvalidArgumentError);
  });
});

describe('Rng', () => {
  test('the same seed gives the same sequence; integers are in range and roughly uniform', () => {
    const a = new Rng(123);
    const b = new Rng(123);
    const seqA = Array.from({ length: 5 }, () => a.nextUint32());
    expect(seqA).toEqual(Array.from({ length: 5 }, () => b.nextUint32()));
    expect(seqA).not.toEqual(Array.from({ length: 5 }, () => new Rng(124).nextUint32()));
    expect(new Rng(2 ** 40).nextUint32()).not.toBe(new Rng(0).nextUint32());
    const rng = new Rng(9);
    const counts = new Array(7).fill(0);
    for (let i = 0; i < 70000; i++) counts[rng.nextInt(7)]++;
    for (const c of counts) expect(Math.abs(c - 10000)).toBeLessThan(500);
    const floats = Array.from({ length: 1000 }, () => rng.nextFloat());
    expect(floats.every((f) => f >= 0 && f < 1)).toBe(true);
  });
});

describe('packSequences', () => {
  /** Documents [1,2,3], [4,5], [6,7,8,9,10], [11]. */
  const data: Pick<TokenizedDataset, 'tokens' | 'docOffsets'> = {
    tokens: Uint32Array.from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
    docOffsets: Float64Array.from([0, 3, 5, 10, 11]),
  };
  const B = TINY_BOS_ID;
  const E = TINY_EOS_ID;
  const rowsOf = (batch: PackedBatch) => Array.from({ length: batch.rows }, (_, r) => Array.from(batch.inputIds.subarray(r * batch.seqLen, (r + 1) * batch.seqLen)));

  test('concat keeps document boundaries as cu_seqlens segments, documents continuing across rows', () => {
    const batches = packSequences(data, { seqLen: 4, mode: 'concat', batchSize: 2 });
    expect(batches.map(rowsOf)).toEqual([
      [
        [1, 2, 3, 4],
        [5, 6, 7, 8],
      ],
      [[9, 10, 11, 0]],
    ]);
    expect(Array.from(batches[0].cuSeqlens)).toEqual([0, 3, 4, 5, 8]);
    expect(Array.from(batches[1].cuSeqlens)).toEqual([0, 2, 3, 4]);
    expect(Array.from(batches[1].attentionMask)).toEqual([1, 1, 1, 0]);
    expect(batches.map((b) => b.numTokens)).toEqual([8, 3]);
  });

  test('concat without boundaries: one segment per row; dropRemainder drops the partial row', () => {
    const [batch] = packSequences(data, { seqLen: 5, mode: 'concat', batchSize: 4, keepBoundaries: false, dropRemainder: true });
    expect(rowsOf(batch)).toEqual([
      [1, 2, 3, 4, 5],
      [6, 7, 8, 9, 10],
    ]);
    expect(Array.from(batch.cuSeqlens)).toEqual([0, 5, 10]);
    expect(batch.attentionMask.every((m) => m === 1)).toBe(true);
    const dropped = packSequences(data, { seqLen: 4, mode: 'concat', batchSize: 8, dropRemainder: true });
    expect(dropped).toHaveLength(1);
    expect(Array.from(dropped[0].cuSeqlens)).toEqual([0, 3, 4, 5, 8]);
  });

  test('BOS / EOS go around every document as the tokenizer says', () => {
    const [batch] = packSequences(data, { seqLen: 6, mode: 'concat', batchSize: 8, specialTokens: tokenizer, padId: 99 });
    expect(rowsOf(batch)).toEqual([
      [B, 1, 2, 3, E, B],
      [4, 5, E, B, 6, 7],
      [8, 9, 10, E, B, 11],
      [E, 99, 99, 99, 99, 99],
    ]);
    expect(Array.from(batch.cuSeqlens)).toEqual([0, 5, 6, 9, 12, 16, 18, 19, 24]);
    const bosOnly = packSequences(data, { seqLen: 16, mode: 'concat', specialTokens: { bosId: B, eosId: E, addBos: true, addEos: false } });
    expect(rowsOf(bosOnly[0])[0]).toEqual([B, 1, 2, 3, B, 4, 5, B, 6, 7, 8, 9, 10, B, 11, 0]);
  });

  test('pad mode: one document per row, padding masked and its own segment, long documents over several rows', () => {
    const batches = packSequences(data, { seqLen: 4, mode: 'pad', batchSize: 3, padId: 7 });
    expect(batches.map(rowsOf)).toEqual([
      [
        [1, 2, 3, 7],
        [4, 5, 7, 7],
        [6, 7, 8, 9],
      ],
      [
        [10, 7, 7, 7],
        [11, 7, 7, 7],
      ],
    ]);
    expect(Array.from(batches[0].attentionMask)).toEqual([1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1]);
    expect(Array.from(batches[0].cuSeqlens)).toEqual([0, 3, 4, 6, 8, 12]);
    expect(Array.from(batches[1].cuSeqlens)).toEqual([0, 1, 4, 5, 8]);
  });

  test('docs selects and orders documents (e.g. one side of a split)', () => {
    const [batch] = packSequences(data, { seqLen: 3, mode: 'pad', batchSize: 4, docs: [3, 1] });
    expect(rowsOf(batch)).toEqual([
      [11, 0, 0],
      [4, 5, 0],
    ]);
    expect(() => packSequences(data, { seqLen: 3, mode: 'pad', docs: [4] })).toThrow(InvalidArgumentError);
  });

  test('invariants hold on random corpora: every token once, in order; segments within rows and documents', () => {
    const rng = new Rng(5);
    for (let trial = 0; trial < 30; trial++) {
      const numDocs = 1 + rng.nextInt(20);
      const lengths = Array.from({ length: numDocs }, () => 1 + rng.nextInt(30));
      const offsets = [0];
      lengths.forEach((l) => offsets.push(offsets[offsets.length - 1] + l));
      const tokens = Uint32Array.from({ length: offsets[numDocs] }, (_, i) => i + 1);
      const seqLen = 1 + rng.nextInt(16);
      const mode = rng.nextInt(2) === 0 ? 'concat' : 'pad';
      const batches = packSequences({ tokens, docOffsets: Float64Array.from(offsets) }, { seqLen, mode, batchSize: 1 + rng.nextInt(5) });
      const seen: number[] = [];
      for (const batch of batches) {
        expect(batch.inputIds.length).toBe(batch.rows * seqLen);
        const cu = Array.from(batch.cuSeqlens);
        expect(cu[0]).toBe(0);
        expect(cu[cu.length - 1]).toBe(batch.rows * seqLen);
        for (let r = 0; r < batch.rows; r++) expect(cu).toContain(r * seqLen);
        for (let s = 0; s + 1 < cu.length; s++) {
          expect(cu[s + 1]).toBeGreaterThan(cu[s]);
          expect(Math.floor(cu[s] / seqLen)).toBe(Math.floor((cu[s + 1] - 1) / seqLen)); // inside one row
          const ids = Array.from(batch.inputIds.subarray(cu[s], cu[s + 1]));
          const mask = Array.from(batch.attentionMask.subarray(cu[s], cu[s + 1]));
          expect(new Set(mask).size).toBe(1); // all real or all padding
          if (mask[0] === 1) {
            const docsOf = new Set(ids.map((id) => offsets.findIndex((o, d) => id - 1 >= o && id - 1 < offsets[d + 1])));
            expect(docsOf.size).toBe(1); // inside one document
          }
        }
        batch.inputIds.forEach((id, i) => batch.attentionMask[i] && seen.push(id));
      }
      expect(seen).toEqual(Array.from(tokens));
    }
  });

  test('bad options are refused', () => {
    expect(() => packSequences(data, { seqLen: 0, mode: 'concat' })).toThrow(InvalidArgumentError);
    expect(() => packSequences(data, { seqLen: 4, mode: 'concat', batchSize: 1.5 })).toThrow(InvalidArgumentError);
    expect(() => packSequences(data, { seqLen: 4, mode: 'other' as 'pad' })).toThrow(InvalidArgumentError);
    expect(() => packSequences(data, { seqLen: 4, mode: 'pad', padId: -1 })).toThrow(InvalidArgumentError);
  });
});

import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { TokenizerError } from '../lib/errors';
import { loadTokenizer } from '../lib/io/tokenizer';
import { TINY_BOS, TINY_BOS_ID, TINY_EOS, TINY_EOS_ID, TINY_MERGES, TINY_VOCAB_SIZE, byteLevel, tinyTokenizerJson, writeTinyTokenizer } from './helpers/tiny-tokenizer';

let root: string;
let dirCount = 0;
beforeAll(async () => {
  root = await fsp.mkdtemp(path.join(os.tmpdir(), 'tcal-tokenizer-'));
});
afterAll(async () => {
  await fsp.rm(root, { recursive: true, force: true });
});
const freshDir = () => path.join(root, `t${dirCount++}`);

async function expectTokenizerError(promise: Promise<unknown>, file: string, message?: RegExp): Promise<TokenizerError> {
  const error = await promise.then(
    () => null,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(TokenizerError);
  const tokenizerError = error as TokenizerError;
  expect(tokenizerError.code).toBe('TOKENIZER');
  expect(tokenizerError.file).toBe(file);
  if (message) expect(tokenizerError.message).toMatch(message);
  return tokenizerError;
}

describe('byte-level BPE tokenizer', () => {
  test('round-trips arbitrary UTF-8 text exactly, including non-ASCII', async () => {
    const dir = freshDir();
    await writeTinyTokenizer(dir);
    const tokenizer = await loadTokenizer(dir);
    const texts = [
      'the cat sat on the mat.',
      '  leading and trailing spaces  \n\ttabs\r\nCRLF',
      'café résumé naïve — “quotes” … 1,234.5',
      '日本語のテキスト、中文文本，한국어 텍스트',
      'emoji 👩‍👩‍👧 🇫🇷 and combining e\u0301 and zero-width\u200bjoiner',
      'punctuation ,.;:!? ( [ { } ] ) don\'t won\'t',
      '\u0000 control \u0007 chars \uFFFD replacement',
    ];
    for (const text of texts) {
      const ids = tokenizer.encode(text);
      expect(ids.every((id) => Number.isInteger(id) && id >= 0 && id < tokenizer.vocabSize)).toBe(true);
      expect(tokenizer.decode(ids)).toBe(text);
    }
    // Random code points from every plane (no lone surrogates), deterministic.
    let seed = 12345;
    const nextRandom = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32);
    for (let trial = 0; trial < 50; trial++) {
      let text = '';
      for (let i = 0; i < 40; i++) {
        let cp = Math.floor(nextRandom() * 0x10ffff);
        if (cp >= 0xd800 && cp <= 0xdfff) cp = 0x20;
        text += String.fromCodePoint(cp);
      }
      expect(tokenizer.decode(tokenizer.encode(text))).toBe(text);
    }
  });

  test('applies the merges (including one across the two bytes of é)', async () => {
    const dir = freshDir();
    await writeTinyTokenizer(dir);
    const tokenizer = await loadTokenizer(dir);
    const idOf = (token: string) => tokenizer.tokenToId(token)!;
    expect(tokenizer.encode(' the')).toEqual([idOf(byteLevel(' the'))]);
    expect(tokenizer.encode('in')).toEqual([idOf('in')]);
    expect(tokenizer.encode('é')).toEqual([idOf(byteLevel('é'))]);
    expect(idOf(byteLevel('é'))).toBe(256 + TINY_MERGES.length - 1);
    // Without a merge, every byte is its own token: 'x' is byte 0x78.
    expect(tokenizer.encode('xq')).toEqual([0x78, 0x71]);
    expect(tokenizer.idToToken(idOf(byteLevel(' the')))).toBe(byteLevel(' the'));
    expect(tokenizer.vocabSize).toBe(TINY_VOCAB_SIZE);
  });

  test('without tokenizer_config.json, special tokens follow the ByteLevel post-processor: none added', async () => {
    const dir = freshDir();
    await writeTinyTokenizer(dir);
    const tokenizer = await loadTokenizer(dir);
    expect(tokenizer.addBos).toBe(false);
    expect(tokenizer.addEos).toBe(false);
    expect(tokenizer.bosId).toBeNull();
    expect(tokenizer.encode('hi', { addSpecialTokens: true })).toEqual(tokenizer.encode('hi'));
  });

  test('a TemplateProcessing post-processor that prepends BOS is detected', async () => {
    const dir = freshDir();
    await writeTinyTokenizer(dir, { postProcessor: 'template-bos' });
    const tokenizer = await loadTokenizer(dir);
    expect(tokenizer.addBos).toBe(true);
    expect(tokenizer.bosId).toBe(TINY_BOS_ID);
    expect(tokenizer.addEos).toBe(false);
    const plain = tokenizer.encode('hello there');
    expect(tokenizer.encode('hello there', { addSpecialTokens: true })).toEqual([TINY_BOS_ID, ...plain]);
  });

  test('tokenizer_config.json add_bos_token / add_eos_token win over the post-processor', async () => {
    const dir = freshDir();
    await writeTinyTokenizer(dir, {
      postProcessor: 'template-bos',
      tokenizerConfig: { bos_token: TINY_BOS, eos_token: { content: TINY_EOS, __type: 'AddedToken' }, add_bos_token: false, add_eos_token: true, chat_template: '{{ nonsense }}' },
    });
    const tokenizer = await loadTokenizer(dir);
    expect(tokenizer).toMatchObject({ bosId: TINY_BOS_ID, eosId: TINY_EOS_ID, addBos: false, addEos: true });
    const plain = tokenizer.encode('hello');
    expect(tokenizer.encode('hello', { addSpecialTokens: true })).toEqual([...plain, TINY_EOS_ID]);
  });

  test('special tokens in text are single tokens and can be skipped when decoding', async () => {
    const dir = freshDir();
    await writeTinyTokenizer(dir, { tokenizerConfig: { bos_token: TINY_BOS, eos_token: TINY_EOS } });
    const tokenizer = await loadTokenizer(dir);
    const ids = tokenizer.encode(`a${TINY_EOS}b`);
    expect(ids).toEqual([0x61, TINY_EOS_ID, 0x62]);
    expect(tokenizer.decode(ids)).toBe(`a${TINY_EOS}b`);
    expect(tokenizer.decode(ids, { skipSpecialTokens: true })).toBe('ab');
    expect(tokenizer.decode([])).toBe('');
  });

  test('contentHash covers tokenizer.json and tokenizer_config.json', async () => {
    const a = freshDir();
    const b = freshDir();
    const c = freshDir();
    await writeTinyTokenizer(a);
    await writeTinyTokenizer(b);
    await writeTinyTokenizer(c, { tokenizerConfig: { add_bos_token: false } });
    const [ta, tb, tc] = await Promise.all([loadTokenizer(a), loadTokenizer(b), loadTokenizer(c)]);
    expect(ta.contentHash).toMatch(/^[0-9a-f]{64}$/);
    expect(ta.contentHash).toBe(tb.contentHash);
    expect(tc.contentHash).not.toBe(ta.contentHash);
  });

  test('decode refuses ids outside the vocabulary', async () => {
    const dir = freshDir();
    await writeTinyTokenizer(dir);
    const tokenizer = await loadTokenizer(dir);
    expect(() => tokenizer.decode([TINY_VOCAB_SIZE])).toThrow(TokenizerError);
    expect(() => tokenizer.decode([-1])).toThrow(TokenizerError);
  });
});

describe('malformed tokenizer directories give TokenizerError naming the file', () => {
  test('missing tokenizer.json', async () => {
    const dir = freshDir();
    await fsp.mkdir(dir);
    await expectTokenizerError(loadTokenizer(dir), path.join(dir, 'tokenizer.json'), /cannot read/);
  });

  test('tokenizer.json is not JSON', async () => {
    const dir = freshDir();
    await fsp.mkdir(dir);
    await fsp.writeFile(path.join(dir, 'tokenizer.json'), '{"model": ');
    await expectTokenizerError(loadTokenizer(dir), path.join(dir, 'tokenizer.json'), /not valid JSON/);
  });

  test('tokenizer.json without a model', async () => {
    const dir = freshDir();
    await fsp.mkdir(dir);
    await fsp.writeFile(path.join(dir, 'tokenizer.json'), JSON.stringify({ added_tokens: [] }));
    await expectTokenizerError(loadTokenizer(dir), path.join(dir, 'tokenizer.json'), /model/);
  });

  test('tokenizer.json with an unknown model type', async () => {
    const dir = freshDir();
    await fsp.mkdir(dir);
    const json = tinyTokenizerJson();
    (json.model as Record<string, unknown>).type = 'NoSuchModel';
    delete (json.model as Record<string, unknown>).vocab;
    await fsp.writeFile(path.join(dir, 'tokenizer.json'), JSON.stringify(json));
    await expectTokenizerError(loadTokenizer(dir), path.join(dir, 'tokenizer.json'), /cannot build/);
  });

  test('tokenizer_config.json is not JSON', async () => {
    const dir = freshDir();
    await writeTinyTokenizer(dir);
    await fsp.writeFile(path.join(dir, 'tokenizer_config.json'), 'not json');
    await expectTokenizerError(loadTokenizer(dir), path.join(dir, 'tokenizer_config.json'), /not valid JSON/);
  });

  test('a bos_token that is not in the vocabulary', async () => {
    const dir = freshDir();
    await writeTinyTokenizer(dir, { tokenizerConfig: { bos_token: '<s>', add_bos_token: true } });
    await expectTokenizerError(loadTokenizer(dir), path.join(dir, 'tokenizer_config.json'), /<s>/);
  });

  test('add_bos_token without any BOS token', async () => {
    const dir = freshDir();
    await writeTinyTokenizer(dir, { tokenizerConfig: { add_bos_token: true } });
    await expectTokenizerError(loadTokenizer(dir), path.join(dir, 'tokenizer_config.json'), /bos_token/);
  });

  test('add_eos_token of the wrong type', async () => {
    const dir = freshDir();
    await writeTinyTokenizer(dir, { tokenizerConfig: { add_eos_token: 'yes' } });
    await expectTokenizerError(loadTokenizer(dir), path.join(dir, 'tokenizer_config.json'), /add_eos_token/);
  });
});

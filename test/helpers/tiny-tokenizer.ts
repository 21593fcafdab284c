/**
 * A tiny but real byte-level BPE tokenizer (GPT-2 style byte ↔ unicode mapping, all 256 bytes in the
 * vocabulary, a handful of merges, two special tokens), written as Hugging Face tokenizer.json files
 * for tests. Every UTF-8 text can be encoded and decoded back exactly.
 */

import { promises as fsp } from 'node:fs';
import * as path from 'node:path';

/** GPT-2's reversible byte → printable character map used by byte-level BPE. */
export function bytesToUnicode(): string[] {
  const printable: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) printable.push(b);
  for (let b = 0xa1; b <= 0xac; b++) printable.push(b);
  for (let b = 0xae; b <= 0xff; b++) printable.push(b);
  const map: string[] = new Array(256);
  for (const b of printable) map[b] = String.fromCodePoint(b);
  let next = 0;
  for (let b = 0; b < 256; b++) if (map[b] === undefined) map[b] = String.fromCodePoint(256 + next++);
  return map;
}

const BYTE_CHARS = bytesToUnicode();
/** Byte-level form of a UTF-8 string (what the BPE model sees). */
export function byteLevel(text: string): string {
  return Array.from(Buffer.from(text, 'utf8'), (b) => BYTE_CHARS[b]).join('');
}

/** Merges, in rank order, written in byte-level form. "é" is two bytes, merged into one token. */
export const TINY_MERGES: Array<[string, string]> = [
  [byteLevel(' '), 't'],
  ['h', 'e'],
  [byteLevel(' t'), 'he'],
  ['i', 'n'],
  [byteLevel(' '), 'a'],
  ['e', 'r'],
  [byteLevel('é').slice(0, 1), byteLevel('é').slice(1)],
];

export const TINY_BOS = '<|bos|>';
export const TINY_EOS = '<|eos|>';

export interface TinyTokenizerFiles {
  /** What tokenizer.json's post-processor adds: nothing (ByteLevel) or BOS (TemplateProcessing). */
  postProcessor?: 'byte-level' | 'template-bos';
  /** tokenizer_config.json contents; undefined writes no such file. */
  tokenizerConfig?: Record<string, unknown>;
}

/** The tokenizer.json object: ids 0..255 are the bytes, then the merges, then BOS and EOS. */
export function tinyTokenizerJson(postProcessor: TinyTokenizerFiles['postProcessor'] = 'byte-level'): Record<string, unknown> {
  const vocab: Record<string, number> = {};
  BYTE_CHARS.forEach((char, byte) => (vocab[char] = byte));
  for (const [a, b] of TINY_MERGES) vocab[a + b] = Object.keys(vocab).length;
  const bosId = Object.keys(vocab).length;
  const special = (id: number, content: string) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
  const byteLevelSection = (type: string) => ({ type, add_prefix_space: false, trim_offsets: true, use_regex: true });
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: [special(bosId, TINY_BOS), special(bosId + 1, TINY_EOS)],
    normalizer: null,
    pre_tokenizer: byteLevelSection('ByteLevel'),
    post_processor:
      postProcessor === 'template-bos'
        ? {
            type: 'TemplateProcessing',
            single: [{ SpecialToken: { id: TINY_BOS, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
            pair: [{ SpecialToken: { id: TINY_BOS, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }, { Sequence: { id: 'B', type_id: 1 } }],
            special_tokens: { [TINY_BOS]: { id: TINY_BOS, ids: [bosId], tokens: [TINY_BOS] } },
          }
        : byteLevelSection('ByteLevel'),
    decoder: byteLevelSection('ByteLevel'),
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges: TINY_MERGES.map(([a, b]) => [a, b]),
    },
  };
}

export const TINY_VOCAB_SIZE = 256 + TINY_MERGES.length + 2;
export const TINY_BOS_ID = 256 + TINY_MERGES.length;
export const TINY_EOS_ID = TINY_BOS_ID + 1;

/** Writes tokenizer.json (and tokenizer_config.json when given) into `dir`. */
export async function writeTinyTokenizer(dir: string, files: TinyTokenizerFiles = {}): Promise<void> {
  await fsp.mkdir(dir, { recursive: true });
  await fsp.writeFile(path.join(dir, 'tokenizer.json'), JSON.stringify(tinyTokenizerJson(files.postProcessor)));
  if (files.tokenizerConfig) await fsp.writeFile(path.join(dir, 'tokenizer_config.json'), JSON.stringify(files.tokenizerConfig));
}

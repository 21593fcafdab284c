/**
 * Loads a Hugging Face tokenizer directory (tokenizer.json, plus tokenizer_config.json when present)
 * offline through @huggingface/tokenizers (pure JS; nothing is fetched).
 *
 * Special tokens are decided here, once, so that every caller adds BOS/EOS the same way:
 * tokenizer_config.json's add_bos_token / add_eos_token win where given (transformers rebuilds the
 * post-processor from them); otherwise we do what tokenizer.json's post-processor does, found by
 * encoding a probe text with and without special tokens. The chat template is ignored.
 */

import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';
import { TokenizerError } from '../errors';
import { JsonObject as Json, isPlainObject } from './json-values';

export interface EncodeOptions {
  /** Add BOS / EOS as this tokenizer's configuration says (default false: the raw text's tokens only). */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  skipSpecialTokens?: boolean;
}

/** The special-token policy, on its own, for code that inserts BOS/EOS itself (dataset packing). */
export interface SpecialTokens {
  bosId: number | null;
  eosId: number | null;
  /** Whether encoding with special tokens prepends bosId. */
  addBos: boolean;
  /** Whether encoding with special tokens appends eosId. */
  addEos: boolean;
}

export interface Tokenizer extends SpecialTokens {
  encode(text: string, options?: EncodeOptions): number[];
  decode(ids: readonly number[], options?: DecodeOptions): string;
  /** Number of ids (largest id + 1, added tokens included), as len(tokenizer) in transformers. */
  readonly vocabSize: number;
  tokenToId(token: string): number | undefined;
  idToToken(id: number): string | undefined;
  /** sha256 of tokenizer.json and tokenizer_config.json: changes whenever tokenization could. */
  readonly contentHash: string;
  /** The directory it was loaded from. */
  readonly dir: string;
}

async function readJson(file: string, required: boolean): Promise<{ json: Json; bytes: Buffer } | null> {
  let bytes: Buffer;
  try {
    bytes = await fsp.readFile(file);
  } catch (cause) {
    if (!required && (cause as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new TokenizerError(`cannot read (${(cause as Error).message})`, { file, cause });
  }
  let json: unknown;
  try {
    json = JSON.parse(bytes.toString('utf8'));
  } catch (cause) {
    throw new TokenizerError(`not valid JSON (${(cause as Error).message})`, { file, cause });
  }
  if (!isPlainObject(json)) throw new TokenizerError('must be a JSON object', { file });
  return { json, bytes };
}

/** A special token in tokenizer_config.json is a string or, in older files, an AddedToken object {content}. */
function specialTokenContent(value: unknown, key: string, file: string): string | null {
  if (value === undefined || value === null) return null;
  if (typeof value === 'string') return value;
  if (isPlainObject(value) && typeof value.content === 'string') return value.content;
  throw new TokenizerError(`${key} must be a string or {content: string}, got ${JSON.stringify(value)}`, { file });
}

function optionalBoolean(json: Json, key: string, file: string): boolean | undefined {
  const value = json[key];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'boolean') throw new TokenizerError(`${key} must be true or false, got ${JSON.stringify(value)}`, { file });
  return value;
}

/** Loads `<dir>/tokenizer.json` (+ `<dir>/tokenizer_config.json`). Malformed or missing files → TokenizerError naming the file. */
export async function loadTokenizer(dir: string): Promise<Tokenizer> {
  const tokenizerFile = path.join(dir, 'tokenizer.json');
  const configFile = path.join(dir, 'tokenizer_config.json');
  const tokenizerJson = (await readJson(tokenizerFile, true))!;
  const configJson = await readJson(configFile, false);
  const config = configJson?.json ?? {};

  const model = tokenizerJson.json.model;
  if (!isPlainObject(model)) throw new TokenizerError('has no "model" object', { file: tokenizerFile });
  const addedTokens = tokenizerJson.json.added_tokens ?? [];
  if (!Array.isArray(addedTokens)) throw new TokenizerError('"added_tokens" must be a list', { file: tokenizerFile });

  let hf: HfTokenizer;
  try {
    // The library wants every section present; tokenizer.json may leave unused ones out.
    const normalised = { normalizer: null, pre_tokenizer: null, post_processor: null, decoder: null, ...tokenizerJson.json, added_tokens: addedTokens };
    // It reads only a few tokenizer_config keys (special tokens, clean-up, lowercasing); the chat template is unused.
    const { chat_template: _ignored, ...libraryConfig } = config;
    hf = new HfTokenizer(normalised, libraryConfig);
  } catch (cause) {
    throw new TokenizerError(`cannot build the tokenizer (${(cause as Error).message})`, { file: tokenizerFile, cause });
  }

  const idOf = (token: string | null, key: string): number | null => {
    if (token === null) return null;
    const id = hf.token_to_id(token);
    if (id === undefined) throw new TokenizerError(`${key} ${JSON.stringify(token)} is not in the vocabulary of ${tokenizerFile}`, { file: configFile });
    return id;
  };
  let bosId = idOf(specialTokenContent(config.bos_token, 'bos_token', configFile), 'bos_token');
  let eosId = idOf(specialTokenContent(config.eos_token, 'eos_token', configFile), 'eos_token');

  // What tokenizer.json's post-processor adds around a single sequence.
  const probe = 'a';
  let plain: number[];
  let withSpecial: number[];
  try {
    plain = hf.encode(probe, { add_special_tokens: false }).ids;
    withSpecial = hf.encode(probe, { add_special_tokens: true }).ids;
  } catch (cause) {
    throw new TokenizerError(`cannot encode a probe text (${(cause as Error).message})`, { file: tokenizerFile, cause });
  }
  const start = withSpecial.findIndex((_, i) => plain.every((id, k) => withSpecial[i + k] === id));
  const prefix = start < 0 ? [] : withSpecial.slice(0, start);
  const suffix = start < 0 ? [] : withSpecial.slice(start + plain.length);
  if (prefix.length > 1 || suffix.length > 1) {
    throw new TokenizerError(`its post-processor adds ${prefix.length} tokens before and ${suffix.length} after a text; only a single BOS / EOS is supported`, {
      file: tokenizerFile,
    });
  }
  const addBosConfig = optionalBoolean(config, 'add_bos_token', configFile);
  const addEosConfig = optionalBoolean(config, 'add_eos_token', configFile);
  bosId ??= prefix.length === 1 ? prefix[0] : null;
  eosId ??= suffix.length === 1 ? suffix[0] : null;
  const addBos = addBosConfig ?? prefix.length === 1;
  const addEos = addEosConfig ?? suffix.length === 1;
  if (addBos && bosId === null) throw new TokenizerError('add_bos_token is true but no bos_token is defined', { file: configFile });
  if (addEos && eosId === null) throw new TokenizerError('add_eos_token is true but no eos_token is defined', { file: configFile });

  let vocabSize = 0;
  for (const id of hf.get_vocab(true).values()) vocabSize = Math.max(vocabSize, id + 1);

  // Byte-level decoding must give back the exact text; the library's default clean-up (removing spaces
  // before punctuation) would not, so it is applied only when tokenizer_config.json asks for it.
  const cleanUpSpaces = optionalBoolean(config, 'clean_up_tokenization_spaces', configFile) ?? false;

  const hash = createHash('sha256').update(tokenizerJson.bytes);
  if (configJson) hash.update('\0tokenizer_config.json\0').update(configJson.bytes);
  const contentHash = hash.digest('hex');

  return {
    dir,
    vocabSize,
    bosId,
    eosId,
    addBos,
    addEos,
    contentHash,
    encode(text: string, options: EncodeOptions = {}): number[] {
      if (typeof text !== 'string') throw new TokenizerError(`encode expects a string, got ${typeof text}`, { file: tokenizerFile });
      const ids = hf.encode(text, { add_special_tokens: false }).ids;
      for (const id of ids) {
        // An unknown piece with no unk token comes back as undefined: refuse rather than emit garbage ids.
        if (id === undefined) throw new TokenizerError('text contains a piece with no token and the model has no unk_token', { file: tokenizerFile });
      }
      if (!options.addSpecialTokens) return ids;
      if (addBos) ids.unshift(bosId!);
      if (addEos) ids.push(eosId!);
      return ids;
    },
    decode(ids: readonly number[], options: DecodeOptions = {}): string {
      if (ids.length === 0) return '';
      for (const id of ids) {
        if (!Number.isInteger(id) || id < 0 || id >= vocabSize) throw new TokenizerError(`cannot decode id ${id} (vocabulary has ${vocabSize})`, { file: tokenizerFile });
      }
      return hf.decode([...ids], { skip_special_tokens: options.skipSpecialTokens ?? false, clean_up_tokenization_spaces: cleanUpSpaces });
    },
    tokenToId: (token: string) => hf.token_to_id(token),
    idToToken: (id: number) => hf.id_to_token(id),
  };
}

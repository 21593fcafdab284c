/**
 * Trains teachers from presets (lib/train/presets.ts) one after another and records validation perplexity, the
 * unigram baseline, tokens, parameters and wall time: the tiny teacher and the four testbed teachers.
 * Usage (GPU host, from the repo root): node dist/bench/teachers.js --data DIR_OR_FILE --out DIR [--presets a,b]
 *   [--extensions .py] [--tokens-scale 0.5] [--tokenizer data/tokenizer]   → table, bench/results/teachers-<date>.json, each run in DIR/<preset>.
 */
import * as fs from 'fs';
import * as path from 'path';
import { loadTokenizer } from '../lib/io/tokenizer';
import { Teacher } from '../lib/model/teacher';
import { initBackend, cudaDevices } from '../lib';
import { pretrain } from '../lib/train/pretrain';
import { PRETRAIN_PRESETS, pretrainPreset } from '../lib/train/presets';
import { printTable, runPythonPeer, writeResults } from './common';

function option(name: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

/**
 * Loads the exported directory with transformers (bench/peers/hf_load_check.py) and scores 4 rows of 128 corpus
 * tokens there and with our Teacher (f32): the two mean losses must agree.
 */
async function transformersCheck(dir: string, device: string): Promise<Record<string, unknown>> {
  const tokenizer = await loadTokenizer(dir);
  const text = await fs.promises.readFile(path.resolve('data/corpus/python-stdlib-sample.txt'), 'utf8');
  const all = tokenizer.encode(text.slice(200_000, 260_000), { addSpecialTokens: false });
  const rowsIds = Array.from({ length: 4 }, (_, r) => Array.from(all.slice(r * 128, (r + 1) * 128)));
  const peer = runPythonPeer<Record<string, unknown>>(path.resolve('bench/peers/hf_load_check.py'), { dir, ids: rowsIds });
  if (peer.error || peer.rows.length === 0) return { error: peer.error ?? 'no output' };
  const teacher = await Teacher.load(dir, { device, dtype: 'f32' });
  try {
    const ids = Int32Array.from(rowsIds.flat());
    const targets = Int32Array.from(ids, (_, i) => (i % 128 === 127 ? -1 : ids[i + 1]));
    const ours = await teacher.loss(ids, targets, [4, 128]);
    const mean = ours.sum / ours.count;
    const theirs = peer.rows[0].mean_loss as number;
    return { ...peer.rows[0], ours_mean_loss: mean, rel_diff: Math.abs(mean - theirs) / Math.abs(theirs) };
  } finally {
    teacher.dispose();
  }
}

async function main(): Promise<void> {
  const { device, backend } = initBackend({ backend: 'auto' });
  const data = option('data');
  const out = option('out');
  if (!data || !out) throw new Error('usage: teachers.js --data PATH --out DIR [--presets a,b] [--extensions .py] [--tokens-scale x]');
  const presets = (option('presets') ?? Object.keys(PRETRAIN_PRESETS).join(',')).split(',');
  const extensions = option('extensions')?.split(',');
  const scale = Number(option('tokens-scale') ?? 1);
  const rows: Record<string, string | number>[] = [];
  const results: Record<string, unknown>[] = [];
  for (const name of presets) {
    const p = pretrainPreset(name);
    const tokens = Math.round(p.tokens * scale);
    const r = await pretrain({
      data,
      extensions,
      tokenizer: option('tokenizer') ?? 'data/tokenizer',
      out: path.join(out, name),
      model: p.model,
      seqLen: p.seqLen,
      batchSize: p.batchSize,
      tokens,
      lr: p.lr,
      warmupSteps: Math.max(1, Math.round(p.warmupSteps * Math.min(scale, 1))),
      device,
      evalTokens: 262144,
      onLog: (e) => {
        if (e.kind === 'valid') console.log(`${name} step ${e.step}: valid loss ${e.loss.toFixed(4)} ppl ${e.ppl.toFixed(2)}`);
      },
    });
    const check = r.modelDir && backend === 'cuda' ? await transformersCheck(r.modelDir, device) : undefined;
    if (check) console.log(`${name}: transformers ${JSON.stringify(check)}`);
    rows.push({ preset: name, params: `${(r.parameters / 1e6).toFixed(1)}M`, tokens: r.tokens, seconds: r.seconds, 'tokens/s': r.tokensPerSecond, 'valid ppl': r.validPerplexity, 'unigram ppl': r.unigramPerplexity });
    results.push({ preset: name, description: p.description, model: p.model, seqLen: p.seqLen, batchSize: p.batchSize, lr: p.lr, ...r, transformers: check });
  }
  printTable(rows);
  console.log(`wrote ${writeResults(`teachers-${presets.join('+')}`, { device: backend === 'cuda' ? cudaDevices()[0] : 'cpu', data, extensions, results })}`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});

/**
 * `tcal stats` end to end on the CPU: a transformers-written GQA Llama fixture with a real byte-level BPE
 * tokenizer.json and a jsonl dataset. The saved statistics equal a direct collectTaylorStats over the same
 * packed batches; the SVG holds one distance-profile line per (layer, head) and one heatmap cell per
 * (layer, head); the table has one row per (layer, head); bad inputs are typed errors.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { buildProgram } from '../lib/cli/main';
import { Teacher } from '../lib/model/teacher';
import { loadTokenizer } from '../lib/io/tokenizer';
import { tokenizeDataset, iteratePackedBatches } from '../lib/io/dataset';
import { collectTaylorStats, loadTaylorStats, type TaylorStats } from '../lib/calibrate/statistics';
import { calibrationBatches, parseLayerList } from '../lib/calibrate/collect';
import { HEAD_TABLE_COLUMNS } from '../lib/report/stats-table';
import { writeTinyTokenizer } from './helpers/tiny-tokenizer';

const FIXTURE = path.join(__dirname, 'fixtures', 'hf', 'llama-gqa-llama3-sharded');
const DOCS = [
  'the cat sat on the mat and looked at the garden',
  'héllo there, in the garden the rain fell on the leaves',
  'a',
  'in the beginning there was a tiny teacher with two layers',
  'the heads attend near and far; some look at the first token only',
  'another line of text, then the end',
];
const SEQ_LEN = 32;
const BATCH = 2;

let dir: string;
let model: string;
let dataFile: string;
let cacheDir: string;

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tcal-stats-'));
  model = path.join(dir, 'model');
  fs.cpSync(FIXTURE, model, { recursive: true });
  await writeTinyTokenizer(model);
  dataFile = path.join(dir, 'data.jsonl');
  fs.writeFileSync(dataFile, DOCS.map((text) => JSON.stringify({ text })).join('\n') + '\n');
  cacheDir = path.join(dir, 'cache');
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** Runs `tcal <args>` in process; returns what it printed on stdout. */
async function tcal(args: string[]): Promise<string> {
  const chunks: string[] = [];
  const write = jest.spyOn(process.stdout, 'write').mockImplementation((c: string | Uint8Array) => {
    chunks.push(String(c));
    return true;
  });
  try {
    await buildProgram().exitOverride().parseAsync(args, { from: 'user' });
  } finally {
    write.mockRestore();
  }
  return chunks.join('');
}

/** Every number of the statistics in a fixed order. */
function flatten(s: TaylorStats): number[] {
  const out: number[] = [s.tokens, s.sequences, ...s.sequenceLengths.flat()];
  for (const l of s.layers) {
    out.push(l.layer, l.tokens, ...l.inputSum, ...l.inputOuter);
    for (const h of l.heads) {
      out.push(h.distance, h.distanceSq, h.entropy, h.sink, h.local);
      for (const a of [h.histogram, h.phi, h.contextSum, h.contextSq, h.scanCross, h.scanSq]) out.push(...a);
    }
    for (const h of l.kvHeads) for (const a of [h.keySum, h.keyOuter, h.valueSum, h.valueOuter]) out.push(...a);
  }
  return out;
}

/** The <g class="mark-TYPE role-mark NAME"> groups of a Vega SVG, each with the number of its direct items. */
function markGroups(svg: string, type: string): number[] {
  const re = new RegExp(`<g class="mark-${type} role-mark[^"]*"[^>]*>((?:<path[^>]*/>|<path[^>]*></path>)*)`, 'g');
  return [...svg.matchAll(re)].map((m) => (m[1].match(/<path/g) ?? []).length);
}

test('tcal stats saves the statistics of the packed batches, an SVG plot and a per-head summary', async () => {
  const out = path.join(dir, 'out');
  const printed = await tcal([
    'stats', '--teacher', model, '--data', dataFile, '--out', out, '--seq-len', String(SEQ_LEN), '--batch', String(BATCH),
    '--backend', 'cpu', '--cache-dir', cacheDir, '--json',
  ]);
  const result = JSON.parse(printed);
  const saved = await loadTaylorStats(out);

  // Direct: the same batches (documents back to back with BOS / EOS as the tokenizer adds them, rows of
  // SEQ_LEN, boundaries kept) through collectTaylorStats on the same teacher.
  const tokenizer = await loadTokenizer(model);
  const data = await tokenizeDataset(dataFile, tokenizer, { cacheDir: path.join(dir, 'cache-direct') });
  const batches = [...iteratePackedBatches(data, { seqLen: SEQ_LEN, mode: 'concat', keepBoundaries: true, batchSize: BATCH, specialTokens: tokenizer })];
  expect(batches.length).toBeGreaterThan(2);
  const teacher = await Teacher.load(model, { device: 'cpu', dtype: 'f32' });
  let direct: TaylorStats;
  try {
    direct = await collectTaylorStats(teacher, batches);
  } finally {
    teacher.dispose();
  }
  const { numLayers: L, numHeads: H } = direct.meta;
  expect(saved.meta).toEqual(direct.meta);
  expect(saved.layers.map((l) => l.layer)).toEqual([0, 1]);
  expect(saved.tokens).toBe(batches.reduce((s, b) => s + b.numTokens, 0));
  expect(flatten(saved)).toEqual(flatten(direct));

  expect(result.backend).toBe('cpu');
  expect(result.out).toBe(out);
  expect(result.tokens).toBe(direct.tokens);
  expect(result.batches).toBe(batches.length);
  expect(result.heads).toHaveLength(L * H);
  expect(result.heads.map((r: { layer: number; head: number }) => `${r.layer}/${r.head}`)).toEqual(
    Array.from({ length: L * H }, (_, i) => `${Math.floor(i / H)}/${i % H}`),
  );
  for (const r of result.heads) {
    expect(r.entropy).toBeGreaterThan(0);
    expect(r.sinkMass).toBeGreaterThan(0);
    expect(r.explainedVariance).toBeGreaterThanOrEqual(0);
    expect(r.explainedVariance).toBeLessThanOrEqual(1 + 1e-9);
  }

  // The plot: an SVG document with one distance-profile line per (layer, head) — Vega draws each series as a
  // line-mark group of one path — and two layer × head heatmaps of one rect each per (layer, head).
  const svg = fs.readFileSync(result.files.plot, 'utf8');
  expect(svg.trimStart().startsWith('<svg')).toBe(true);
  expect(svg.trimEnd().endsWith('</svg>')).toBe(true);
  expect(svg).toContain('xmlns="http://www.w3.org/2000/svg"');
  expect(markGroups(svg, 'line')).toEqual(Array(L * H).fill(1));
  expect(markGroups(svg, 'rect')).toEqual([L * H, L * H]);
  // No temporary files are left behind.
  expect(fs.readdirSync(out).sort()).toEqual(['taylor-stats.json', 'taylor-stats.safetensors', 'taylor-stats.svg']);
});

test('the table has one row per (layer, head); --layers and --max-tokens; the default output directory', async () => {
  const printed = await tcal([
    'stats', '--teacher', model, '--data', dataFile, '--seq-len', String(SEQ_LEN), '--batch', String(BATCH), '--layers', '1',
    '--max-tokens', '40', '--backend', 'cpu', '--cache-dir', cacheDir,
  ]);
  const lines = printed.split('\n');
  expect(lines[0].trim().split(/\s{2,}/)).toEqual([...HEAD_TABLE_COLUMNS]);
  const rows = lines.slice(1).filter((l) => /^\s*\d+\s+\d+\s+\d+\s/.test(l));
  const H = 4;
  expect(rows).toHaveLength(H);
  rows.forEach((row, i) => {
    const cells = row.trim().split(/\s+/);
    expect(cells).toHaveLength(HEAD_TABLE_COLUMNS.length);
    expect(cells.slice(0, 3)).toEqual(['1', String(i), String(Math.floor(i / 2))]);
  });
  const saved = await loadTaylorStats(path.join(model, 'taylor-stats'));
  expect(saved.layers.map((l) => l.layer)).toEqual([1]);
  // Whole rows until the budget is reached: at least 40 tokens, less than one more row.
  expect(saved.tokens).toBeGreaterThanOrEqual(40);
  expect(saved.tokens).toBeLessThan(40 + SEQ_LEN);
  expect(fs.existsSync(path.join(model, 'taylor-stats', 'taylor-stats.svg'))).toBe(true);
});

test('calibrationBatches stops at the first row boundary past maxTokens and keeps segments whole', () => {
  const docOffsets = Float64Array.from([0, 5, 50, 53, 100]);
  const data = { tokens: Uint32Array.from({ length: 100 }, (_, i) => i), docOffsets };
  const all = [...calibrationBatches(data, { seqLen: 8, batchSize: 3 })];
  expect(all.reduce((s, b) => s + b.numTokens, 0)).toBe(100);
  const some = [...calibrationBatches(data, { seqLen: 8, batchSize: 3, maxTokens: 30 })];
  const rows = some.reduce((s, b) => s + b.rows, 0);
  expect(rows).toBe(4); // rows of 8 real tokens: the 4th reaches 32 ≥ 30
  const last = some[some.length - 1];
  expect(last.rows).toBe(1);
  expect(last.cuSeqlens[last.cuSeqlens.length - 1]).toBe(8);
  expect(Array.from(last.inputIds)).toEqual([24, 25, 26, 27, 28, 29, 30, 31]);
  expect(parseLayerList('0-2,5')).toEqual([0, 1, 2, 5]);
});

test('bad inputs are typed errors and write nothing', async () => {
  const out = path.join(dir, 'bad');
  const base = ['stats', '--teacher', model, '--seq-len', '16', '--backend', 'cpu', '--cache-dir', cacheDir, '--out', out];
  await expect(tcal([...base, '--data', path.join(dir, 'missing.jsonl')])).rejects.toMatchObject({ code: 'DATA' });
  await expect(tcal([...base, '--data', dataFile, '--layers', '0,2'])).rejects.toMatchObject({ code: 'INVALID_ARGUMENT', argument: 'layers' });
  await expect(tcal([...base, '--data', dataFile, '--layers', 'first'])).rejects.toMatchObject({ code: 'INVALID_ARGUMENT', argument: 'layers' });
  await expect(tcal([...base, '--data', dataFile, '--batch', '0'])).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
  await expect(tcal(['stats', '--teacher', path.join(dir, 'no-model'), '--data', dataFile, '--backend', 'cpu', '--out', out])).rejects.toMatchObject({
    code: 'CONFIG',
  });
  expect(fs.existsSync(out)).toBe(false);
});

/**
 * Parity of our teacher forward with Hugging Face transformers on tiny models it wrote itself
 * (test/fixtures/hf, made by test/fixtures/make_hf_fixtures.py on the GPU host): fp32 on the CPU ≤ 1e-4
 * relative, bf16 on CUDA ≤ 2e-2. Also: per-layer residual streams, hooks, packed varlen = batched, typed errors.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { Teacher, type LayerActivations } from '../lib/model/teacher';
import { openSafetensors, writeCheckpoint } from '../lib/io/safetensors';
import { toFloat32 } from '../lib/io/dtype';
import { testDevices } from './helpers';

const FIXTURES = path.join(__dirname, 'fixtures', 'hf');
const manifest = JSON.parse(fs.readFileSync(path.join(FIXTURES, 'manifest.json'), 'utf8')) as {
  fixtures: { name: string }[];
};
const names = manifest.fixtures.map((f) => f.name);

interface Reference {
  ids: Int32Array;
  shape: [number, number];
  tensors: Map<string, Float32Array>;
}

/** The fixture's reference tensors, read once and the file closed. */
async function reference(name: string): Promise<Reference & { read(t: string): Promise<Float32Array> }> {
  const r = await openSafetensors(path.join(FIXTURES, name, 'ref_logits.safetensors'));
  try {
    const info = r.info('input_ids');
    const raw = await r.readTensor('input_ids');
    const ids64 = new BigInt64Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength));
    const tensors = new Map<string, Float32Array>();
    for (const n of r.names) if (n !== 'input_ids') tensors.set(n, toFloat32(r.info(n).dtype, await r.readTensor(n)));
    const read = async (t: string): Promise<Float32Array> => {
      const v = tensors.get(t);
      if (!v) throw new Error(`no reference tensor ${t}`);
      return v;
    };
    return { ids: Int32Array.from(ids64, Number), shape: [info.shape[0], info.shape[1]], tensors, read };
  } finally {
    await r.close();
  }
}

/** max |a − b| / max |b|: the measure the fixtures script and DESIGN §4 use. */
function maxRel(a: Float32Array, b: Float32Array): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    if (!Number.isFinite(a[i])) return Infinity;
    num = Math.max(num, Math.abs(a[i] - b[i]));
    den = Math.max(den, Math.abs(b[i]));
  }
  return num / den;
}

describe.each(testDevices())('teacher forward on %s', (device) => {
  const dtype = device === 'cpu' ? 'f32' : 'bf16';
  const tol = device === 'cpu' ? 1e-4 : 2e-2;

  test.each(names)('%s: logits and per-layer residual streams match transformers', async (name) => {
    const ref = await reference(name);
    const teacher = await Teacher.load(path.join(FIXTURES, name), { device, dtype });
    try {
      const logits = await (await teacher.logits(ref.ids, ref.shape)).toFloat32();
      expect(maxRel(logits, await ref.read('logits'))).toBeLessThan(tol);
      for (let l = 0; l < teacher.config.numLayers; l++) {
        const h = await (await teacher.hidden(ref.ids, ref.shape, { stopAfterLayer: l })).toFloat32();
        expect(maxRel(h, await ref.read(`layer_outputs.${l}`))).toBeLessThan(tol);
      }
    } finally {
      teacher.dispose();
    }
  });

  test('hooks see every layer; packed varlen equals the batch; loss is the mean CE', async () => {
    const name = names[0];
    const ref = await reference(name);
    const teacher = await Teacher.load(path.join(FIXTURES, name), { device, dtype });
    try {
      const seen: number[] = [];
      const c = teacher.config;
      const [B, T] = ref.shape;
      const batched = await (await teacher.logits(ref.ids, ref.shape, {
        onLayer: (a: LayerActivations) => {
          seen.push(a.layer);
          expect(a.q.shape).toEqual([B, T, c.numHeads, c.headDim]);
          expect(a.k.shape).toEqual([B, T, c.numKvHeads, c.headDim]);
          expect(a.context.shape).toEqual([B, T, c.numHeads, c.headDim]);
          expect(a.output.shape).toEqual([B, T, c.hiddenSize]);
        },
      })).toFloat32();
      expect(seen).toEqual(Array.from({ length: c.numLayers }, (_, i) => i));
      const packed = await (await teacher.logits(ref.ids, [1, B * T], { cuSeqlens: Int32Array.from([0, T, 2 * T]) })).toFloat32();
      expect(maxRel(packed, batched)).toBeLessThan(device === 'cpu' ? 1e-6 : 1e-2);
      const targets = Int32Array.from(ref.ids, (_, i) => ((i + 1) % T === 0 ? -1 : ref.ids[i + 1]));
      const { sum, count } = await teacher.loss(ref.ids, targets, ref.shape, { chunkRows: 7 });
      expect(count).toBe(B * (T - 1));
      let want = 0;
      const V = c.vocabSize;
      for (let i = 0; i < B * T; i++) {
        if (targets[i] < 0) continue;
        const row = batched.subarray(i * V, (i + 1) * V);
        const m = Math.max(...row);
        want += m + Math.log(row.reduce((s, x) => s + Math.exp(x - m), 0)) - row[targets[i]];
      }
      expect(Math.abs(sum - want) / want).toBeLessThan(1e-4);
      await expect(teacher.logits(Int32Array.from([0, c.vocabSize]), [1, 2])).rejects.toMatchObject({ argument: 'ids' });
    } finally {
      teacher.dispose();
    }
  });
});

test('a checkpoint missing a tensor is refused before loading, naming the tensor', async () => {
  const name = 'qwen2-tied-qkv-bias';
  const src = await openSafetensors(path.join(FIXTURES, name, 'model.safetensors'));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tcal-teacher-'));
  try {
    const dropped = 'model.layers.1.mlp.up_proj.weight';
    const tensors = [];
    for (const n of src.names) {
      if (n === dropped) continue;
      const info = src.info(n);
      tensors.push({ name: n, dtype: info.dtype, shape: info.shape, data: await src.readTensor(n) });
    }
    await writeCheckpoint(dir, tensors);
    fs.copyFileSync(path.join(FIXTURES, name, 'config.json'), path.join(dir, 'config.json'));
    await expect(Teacher.load(dir, { device: 'cpu' })).rejects.toMatchObject({ name: 'CheckpointFormatError', tensor: dropped });
  } finally {
    await src.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { CheckpointFormatError, InvalidArgumentError } from '../lib/errors';
import {
  Dtype,
  bf16BitsToFloat32,
  f16BitsToFloat32,
  float32ToBf16Bits,
  float32ToF16Bits,
  fromFloat32,
  toFloat32,
} from '../lib/io/dtype';
import {
  INDEX_FILE_NAME,
  MAX_HEADER_BYTES,
  TensorReader,
  TensorToWrite,
  openCheckpoint,
  openSafetensors,
  verifyTensors,
  writeCheckpoint,
  writeSafetensors,
} from '../lib/io/safetensors';
import { Rng } from '../lib/io/rng';

let root: string;
let count = 0;
beforeAll(async () => {
  root = await fsp.mkdtemp(path.join(os.tmpdir(), 'tcal-safetensors-'));
});
afterAll(async () => {
  await fsp.rm(root, { recursive: true, force: true });
});
const fresh = (name = 'x') => path.join(root, `${count++}-${name}`);

/** Deterministic bytes for a tensor. */
function patternBytes(length: number, seed: number): Uint8Array {
  const rng = new Rng(seed);
  return Uint8Array.from({ length }, () => rng.nextUint32() & 0xff);
}

function tensor(name: string, dtype: Dtype, shape: number[], seed = 1): TensorToWrite {
  const size = { F32: 4, F16: 2, BF16: 2, I32: 4, I64: 8 }[dtype];
  return { name, dtype, shape, data: patternBytes(size * shape.reduce((a, b) => a * b, 1), seed) };
}

/** A raw safetensors file: header text (not padded), data, and optionally a forged header length. */
async function writeRaw(file: string, header: string, data: Uint8Array = new Uint8Array(0), headerLength?: bigint): Promise<void> {
  const json = Buffer.from(header, 'utf8');
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(headerLength ?? BigInt(json.byteLength));
  await fsp.writeFile(file, Buffer.concat([length, json, data]));
}

async function expectFormatError(promise: Promise<unknown>, expected: { file: string; tensor?: string; offset?: number; message?: RegExp }): Promise<CheckpointFormatError> {
  const error = await promise.then(
    (value) => value,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(CheckpointFormatError);
  const formatError = error as CheckpointFormatError;
  expect(formatError.code).toBe('CHECKPOINT_FORMAT');
  expect(formatError.file).toBe(expected.file);
  if ('tensor' in expected) expect(formatError.tensor).toBe(expected.tensor);
  if ('offset' in expected) expect(formatError.offset).toBe(expected.offset);
  if (expected.message) expect(formatError.message).toMatch(expected.message);
  return formatError;
}

async function readAll(reader: TensorReader): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  for (const name of reader.names) out.set(name, await reader.readTensor(name));
  return out;
}

describe('dtype conversions', () => {
  test('bf16: round to nearest even, NaN and infinities', () => {
    expect(float32ToBf16Bits(1)).toBe(0x3f80);
    expect(float32ToBf16Bits(1 + 2 ** -8)).toBe(0x3f80); // tie, even stays down
    expect(float32ToBf16Bits(1 + 3 * 2 ** -8)).toBe(0x3f82); // tie, odd goes up to even
    expect(float32ToBf16Bits(1 + 2 ** -8 + 2 ** -20)).toBe(0x3f81); // just above the tie
    expect(float32ToBf16Bits(-2)).toBe(0xc000);
    expect(float32ToBf16Bits(-0)).toBe(0x8000);
    expect(float32ToBf16Bits(Infinity)).toBe(0x7f80);
    expect(float32ToBf16Bits(-Infinity)).toBe(0xff80);
    expect(float32ToBf16Bits(NaN)).toBe(0x7fc0);
    expect(float32ToBf16Bits(3.4028234663852886e38)).toBe(0x7f80); // float32 max rounds up to infinity
    expect(float32ToBf16Bits(2 ** -133)).toBe(0x0001); // float32 subnormal keeps its top bits
    const mismatches: number[] = [];
    for (let bits = 0; bits < 65536; bits++) {
      const value = bf16BitsToFloat32(bits);
      if (!Number.isNaN(value) && float32ToBf16Bits(value) !== bits) mismatches.push(bits);
    }
    expect(mismatches).toEqual([]);
  });

  test('f16: every finite half survives f16 → f32 → f16; NaN stays NaN', () => {
    const mismatches: number[] = [];
    for (let bits = 0; bits < 65536; bits++) {
      const value = f16BitsToFloat32(bits);
      const back = float32ToF16Bits(value);
      const isNaN16 = (bits & 0x7c00) === 0x7c00 && (bits & 0x3ff) !== 0;
      const ok = isNaN16 ? Number.isNaN(value) && (back & 0x7c00) === 0x7c00 && (back & 0x3ff) !== 0 : back === bits;
      if (!ok) mismatches.push(bits);
    }
    expect(mismatches).toEqual([]);
    expect(f16BitsToFloat32(0x7bff)).toBe(65504);
    expect(f16BitsToFloat32(0x0001)).toBe(2 ** -24);
    expect(f16BitsToFloat32(0x0400)).toBe(2 ** -14);
    expect(Object.is(f16BitsToFloat32(0x8000), -0)).toBe(true);
  });

  test('f16: rounding to nearest even at every tie, overflow to infinity, underflow to zero', () => {
    expect(float32ToF16Bits(65519)).toBe(0x7bff);
    expect(float32ToF16Bits(65520)).toBe(0x7c00); // tie between max and the next step: even is infinity
    expect(float32ToF16Bits(1e9)).toBe(0x7c00);
    expect(float32ToF16Bits(-1e9)).toBe(0xfc00);
    expect(float32ToF16Bits(2 ** -25)).toBe(0x0000); // tie between 0 and the smallest subnormal
    expect(float32ToF16Bits(-(2 ** -25))).toBe(0x8000);
    expect(float32ToF16Bits(1.5 * 2 ** -25)).toBe(0x0001);
    expect(float32ToF16Bits(2 ** -26)).toBe(0x0000);
    expect(float32ToF16Bits(1 + 2 ** -11)).toBe(0x3c00);
    expect(float32ToF16Bits(1 + 3 * 2 ** -11)).toBe(0x3c02);
    // Every midpoint between neighbouring positive halves goes to the even one.
    const mismatches: number[] = [];
    for (let bits = 0; bits < 0x7bff; bits++) {
      const mid = (f16BitsToFloat32(bits) + f16BitsToFloat32(bits + 1)) / 2;
      const even = bits % 2 === 0 ? bits : bits + 1;
      if (Math.fround(mid) !== mid || float32ToF16Bits(mid) !== even || float32ToF16Bits(-mid) !== (even | 0x8000)) mismatches.push(bits);
      // Just off the midpoint goes to the nearer side whatever the parity.
      const step = 2 ** (Math.floor(Math.log2(mid)) - 23);
      if (float32ToF16Bits(mid - step) !== bits || float32ToF16Bits(mid + step) !== bits + 1) mismatches.push(-bits);
    }
    expect(mismatches).toEqual([]);
  });

  test('f16: random float32 values go to the nearest half', () => {
    const rng = new Rng(7);
    const worse: number[] = [];
    for (let i = 0; i < 20000; i++) {
      const x = Math.fround((rng.nextFloat() * 2 - 1) * 2 ** (rng.nextInt(44) - 28));
      const bits = float32ToF16Bits(x);
      const value = f16BitsToFloat32(bits);
      if (Math.abs(x) >= 65520) {
        if (value !== Math.sign(x) * Infinity) worse.push(x);
        continue;
      }
      const magnitude = bits & 0x7fff;
      const neighbours = [magnitude - 1, magnitude + 1].filter((m) => m >= 0 && m <= 0x7bff).map((m) => f16BitsToFloat32(m | (bits & 0x8000)));
      if (neighbours.some((other) => Math.abs(x - other) < Math.abs(x - value))) worse.push(x);
    }
    expect(worse).toEqual([]);
  });

  test('toFloat32 / fromFloat32 round-trip all float dtypes, also from unaligned bytes', () => {
    const values = Float32Array.from([0, -0, 1, -1.5, 3.140625, 65504, -(2 ** -24), Infinity, -Infinity, 1024.5]);
    for (const dtype of ['F32', 'F16', 'BF16'] as const) {
      const bytes = fromFloat32(dtype, values);
      expect(bytes.byteLength).toBe(values.length * (dtype === 'F32' ? 4 : 2));
      const unaligned = new Uint8Array(bytes.byteLength + 1).subarray(1);
      unaligned.set(bytes);
      const back = toFloat32(dtype, unaligned);
      const expected = dtype === 'F32' ? values : values.map((v) => (dtype === 'F16' ? f16BitsToFloat32(float32ToF16Bits(v)) : bf16BitsToFloat32(float32ToBf16Bits(v))));
      expect(Array.from(back)).toEqual(Array.from(expected));
    }
    expect(toFloat32('BF16', fromFloat32('BF16', Float32Array.of(1 + 2 ** -8)))[0]).toBe(1);
    expect(() => toFloat32('I32', new Uint8Array(4))).toThrow(InvalidArgumentError);
    expect(() => toFloat32('F16', new Uint8Array(3))).toThrow(InvalidArgumentError);
  });
});

describe('safetensors round trip', () => {
  const allDtypes = (): TensorToWrite[] => [
    tensor('model.f32', 'F32', [3, 5], 1),
    tensor('model.f16', 'F16', [7], 2),
    tensor('model.bf16', 'BF16', [2, 3, 2], 3),
    tensor('model.i32', 'I32', [4], 4),
    tensor('model.i64', 'I64', [3, 1], 5),
    tensor('scalar', 'F32', [], 6),
    tensor('empty', 'F16', [0, 4], 7),
  ];

  test('every dtype, scalars and empty tensors, with metadata', async () => {
    const file = fresh('all.safetensors');
    const tensors = allDtypes();
    await writeSafetensors(file, tensors, { format: 'pt', note: 'hello' });
    await using reader = await openSafetensors(file);
    expect([...reader.names]).toEqual(tensors.map((t) => t.name).sort());
    expect(reader.metadata).toEqual({ format: 'pt', note: 'hello' });
    for (const t of tensors) {
      const info = reader.info(t.name);
      expect(info).toMatchObject({ name: t.name, dtype: t.dtype, shape: t.shape, byteLength: t.data.byteLength, file });
      expect(new Uint8Array(await reader.readTensor(t.name))).toEqual(t.data);
      const target = new Uint8Array(t.data.byteLength);
      await reader.readTensorInto(t.name, target);
      expect(target).toEqual(t.data);
    }
    await expect(reader.readTensorInto('model.f32', new Uint8Array(3))).rejects.toThrow(InvalidArgumentError);
    expect(() => reader.info('nope')).toThrow(CheckpointFormatError);
  });

  test('the layout is the safetensors library one: padded header, metadata first, widest dtype first then by name', async () => {
    const file = fresh('layout.safetensors');
    await writeSafetensors(file, [tensor('b', 'F16', [1]), tensor('a', 'F16', [1]), tensor('z', 'I64', [1]), tensor('c', 'F32', [1]), tensor('d', 'BF16', [1]), tensor('e', 'I32', [1])], {
      format: 'pt',
    });
    const bytes = await fsp.readFile(file);
    const headerLength = Number(bytes.readBigUInt64LE(0));
    expect(headerLength % 8).toBe(0);
    const headerText = bytes.subarray(8, 8 + headerLength).toString('utf8');
    expect(headerText.trimEnd().length).toBeGreaterThan(headerLength - 8);
    expect(headerText.trimEnd()).toBe(
      '{"__metadata__":{"format":"pt"},' +
        '"z":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},' +
        '"c":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},' +
        '"e":{"dtype":"I32","shape":[1],"data_offsets":[12,16]},' +
        '"d":{"dtype":"BF16","shape":[1],"data_offsets":[16,18]},' +
        '"a":{"dtype":"F16","shape":[1],"data_offsets":[18,20]},' +
        '"b":{"dtype":"F16","shape":[1],"data_offsets":[20,22]}}',
    );
    expect(bytes.byteLength).toBe(8 + headerLength + 22);
  });

  test('a Map of tensors and no metadata', async () => {
    const file = fresh('map.safetensors');
    const a = tensor('a', 'F32', [2]);
    await writeSafetensors(file, new Map([['a', { dtype: a.dtype, shape: a.shape, data: a.data }]]));
    await using reader = await openSafetensors(file);
    expect(reader.metadata).toEqual({});
    expect(new Uint8Array(await reader.readTensor('a'))).toEqual(a.data);
    const headerText = (await fsp.readFile(file)).toString('utf8');
    expect(headerText).not.toContain('__metadata__');
  });

  test('typed-array data is written as its bytes', async () => {
    const file = fresh('typed.safetensors');
    const values = Float32Array.of(1, 2, 3);
    await writeSafetensors(file, [{ name: 'v', dtype: 'F32', shape: [3], data: values }]);
    await using reader = await openSafetensors(file);
    expect(Array.from(toFloat32('F32', await reader.readTensor('v')))).toEqual([1, 2, 3]);
  });

  test('sharded checkpoint directory: shards, index (sorted, total_size) and read-back of every dtype', async () => {
    const dir = fresh('sharded');
    const tensors = [...allDtypes(), tensor('big', 'F32', [64], 9), tensor('model.layers.0.w', 'BF16', [10, 3], 10)];
    const { files } = await writeCheckpoint(dir, tensors, { maxShardBytes: 100 });
    expect(files.length).toBeGreaterThan(2);
    expect(files[files.length - 1]).toBe(INDEX_FILE_NAME);
    const shardNames = files.slice(0, -1);
    shardNames.forEach((name, i) => expect(name).toBe(`model-${String(i + 1).padStart(5, '0')}-of-${String(shardNames.length).padStart(5, '0')}.safetensors`));
    expect((await fsp.readdir(dir)).sort()).toEqual([...files].sort());

    const indexText = await fsp.readFile(path.join(dir, INDEX_FILE_NAME), 'utf8');
    const index = JSON.parse(indexText);
    expect(index.metadata.total_size).toBe(tensors.reduce((sum, t) => sum + t.data.byteLength, 0));
    expect(Object.keys(index.weight_map)).toEqual(tensors.map((t) => t.name).sort());
    expect(indexText.startsWith('{\n  "metadata": {\n    "total_size": ')).toBe(true);
    expect(indexText.endsWith('}\n')).toBe(true);

    await using checkpoint = await openCheckpoint(dir);
    expect(checkpoint.file).toBe(path.join(dir, INDEX_FILE_NAME));
    expect(checkpoint.metadata).toEqual({ format: 'pt' });
    expect([...checkpoint.names]).toEqual(tensors.map((t) => t.name).sort());
    const read = await readAll(checkpoint);
    for (const t of tensors) {
      expect(new Uint8Array(read.get(t.name)!)).toEqual(t.data);
      expect(path.basename(checkpoint.info(t.name).file)).toBe(index.weight_map[t.name]);
    }
  });

  test('a single-file checkpoint replaces an earlier sharded layout (and vice versa)', async () => {
    const dir = fresh('relayout');
    const tensors = [tensor('a', 'F32', [16], 1), tensor('b', 'F32', [16], 2)];
    await writeCheckpoint(dir, tensors, { maxShardBytes: 64 });
    expect((await fsp.readdir(dir)).sort()).toEqual(['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', INDEX_FILE_NAME].sort());
    await fsp.writeFile(path.join(dir, 'config.json'), '{}');
    await writeCheckpoint(dir, tensors);
    expect((await fsp.readdir(dir)).sort()).toEqual(['config.json', 'model.safetensors']);
    {
      await using checkpoint = await openCheckpoint(dir);
      expect(checkpoint.file).toBe(path.join(dir, 'model.safetensors'));
      expect(new Uint8Array(await checkpoint.readTensor('b'))).toEqual(tensors[1].data);
    }
    await writeCheckpoint(dir, tensors, { maxShardBytes: 64 });
    expect(await fsp.readdir(dir)).not.toContain('model.safetensors');
  });

  test('offsets past 4 GiB are read with positional reads (sparse file)', async () => {
    const file = fresh('huge.safetensors');
    const begin = 5 * 2 ** 30 + 3;
    const payload = patternBytes(16, 42);
    const header = JSON.stringify({ far: { dtype: 'F32', shape: [4], data_offsets: [begin, begin + 16] } });
    await writeRaw(file, header);
    const headerBytes = 8 + Buffer.byteLength(header);
    const handle = await fsp.open(file, 'r+');
    try {
      await handle.write(payload, 0, 16, headerBytes + begin); // leaves a hole: no real 5 GiB written
    } finally {
      await handle.close();
    }
    await using reader = await openSafetensors(file);
    expect(reader.info('far').offset).toBe(headerBytes + begin);
    expect(new Uint8Array(await reader.readTensor('far'))).toEqual(payload);
  });

  test('verifyTensors names a missing tensor or a wrong shape / dtype, and returns the unexpected ones', async () => {
    const file = fresh('verify.safetensors');
    await writeSafetensors(file, [tensor('w', 'F32', [2, 3]), tensor('extra', 'F16', [1])]);
    await using reader = await openSafetensors(file);
    expect(verifyTensors(reader, [{ name: 'w', shape: [2, 3] }])).toEqual({ unexpected: ['extra'] });
    expect(() => verifyTensors(reader, [{ name: 'missing', shape: [1] }])).toThrow(expect.objectContaining({ tensor: 'missing', file }));
    expect(() => verifyTensors(reader, [{ name: 'w', shape: [3, 2] }])).toThrow(expect.objectContaining({ tensor: 'w', message: expect.stringMatching(/shape/) }));
    expect(() => verifyTensors(reader, [{ name: 'w', shape: [2, 3], dtypes: ['BF16'] }])).toThrow(expect.objectContaining({ tensor: 'w', message: expect.stringMatching(/dtype/) }));
  });
});

describe('malformed safetensors files give CheckpointFormatError with file, tensor and offset', () => {
  const goodEntry = { dtype: 'F32', shape: [2], data_offsets: [0, 8] };

  test('a file shorter than the header length field', async () => {
    const file = fresh('short.safetensors');
    await fsp.writeFile(file, Buffer.from([1, 2, 3]));
    await expectFormatError(openSafetensors(file), { file, offset: 0, message: /shorter than the 8-byte/ });
  });

  test('a header length larger than the file', async () => {
    const file = fresh('long-header.safetensors');
    await writeRaw(file, '{}', new Uint8Array(0), 1000n);
    await expectFormatError(openSafetensors(file), { file, offset: 0, message: /larger than the 2 bytes/ });
  });

  test('a header length over 100 MB is refused before allocating', async () => {
    const file = fresh('huge-header.safetensors');
    await writeRaw(file, '{}', new Uint8Array(0), BigInt(MAX_HEADER_BYTES + 1));
    await expectFormatError(openSafetensors(file), { file, offset: 0, message: /exceeds the 100000000-byte limit/ });
    await writeRaw(file, '{}', new Uint8Array(0), 0xffffffffffffffffn);
    await expectFormatError(openSafetensors(file), { file, offset: 0, message: /limit/ });
  });

  test('a truncated data section', async () => {
    const file = fresh('truncated.safetensors');
    await writeSafetensors(file, [tensor('a', 'F32', [4]), tensor('b', 'F32', [4])]);
    const stat = await fsp.stat(file);
    await fsp.truncate(file, stat.size - 3);
    const headerLength = Number((await fsp.readFile(file)).readBigUInt64LE(0));
    await expectFormatError(openSafetensors(file), { file, tensor: 'b', offset: 8 + headerLength + 32, message: /past the data section/ });
  });

  test('a header that is not JSON, or not UTF-8', async () => {
    const file = fresh('bad-json.safetensors');
    await writeRaw(file, '{"a": {"dtype": "F32", ');
    await expectFormatError(openSafetensors(file), { file, offset: 8, message: /not valid JSON/ });
    const bytes = Buffer.concat([Buffer.alloc(8), Buffer.from([0x7b, 0xff, 0xfe, 0x7d])]);
    bytes.writeBigUInt64LE(4n);
    await fsp.writeFile(file, bytes);
    await expectFormatError(openSafetensors(file), { file, offset: 8, message: /UTF-8/ });
  });

  test('a header that is not an object', async () => {
    for (const header of ['[1, 2]', '42', 'null', '"text"']) {
      const file = fresh('not-object.safetensors');
      await writeRaw(file, header);
      await expectFormatError(openSafetensors(file), { file, offset: 8, message: /must be a JSON object/ });
    }
  });

  test('an unknown or unsupported dtype', async () => {
    const file = fresh('dtype.safetensors');
    await writeRaw(file, JSON.stringify({ ok: goodEntry, weird: { dtype: 'F64', shape: [1], data_offsets: [8, 16] } }), new Uint8Array(16));
    const error = await expectFormatError(openSafetensors(file), { file, tensor: 'weird', message: /unsupported dtype F64/ });
    expect(error.message).toContain('weird');
  });

  test('malformed entries: missing fields, bad shapes, bad offsets, bad metadata', async () => {
    const cases: Array<[Record<string, unknown>, string, RegExp]> = [
      [{ t: { shape: [2], data_offsets: [0, 8] } }, 't', /dtype must be a string/],
      [{ t: { dtype: 'F32', data_offsets: [0, 8] } }, 't', /shape/],
      [{ t: { dtype: 'F32', shape: [-2], data_offsets: [0, 8] } }, 't', /shape/],
      [{ t: { dtype: 'F32', shape: [2.5], data_offsets: [0, 8] } }, 't', /shape/],
      [{ t: { dtype: 'F32', shape: [2], data_offsets: [0] } }, 't', /data_offsets/],
      [{ t: { dtype: 'F32', shape: [2], data_offsets: ['0', 8] } }, 't', /data_offsets/],
      [{ t: { dtype: 'F32', shape: [2], data_offsets: [8, 0] } }, 't', /end before/],
      [{ t: 'F32' }, 't', /must be an object/],
    ];
    for (const [header, tensorName, message] of cases) {
      const file = fresh('entry.safetensors');
      await writeRaw(file, JSON.stringify(header), new Uint8Array(8));
      await expectFormatError(openSafetensors(file), { file, tensor: tensorName, message });
    }
    const file = fresh('metadata.safetensors');
    await writeRaw(file, JSON.stringify({ __metadata__: { format: 1 }, t: goodEntry }), new Uint8Array(8));
    await expectFormatError(openSafetensors(file), { file, offset: 8, message: /__metadata__\.format must be a string/ });
  });

  test('offsets outside the data section', async () => {
    const file = fresh('range.safetensors');
    await writeRaw(file, JSON.stringify({ a: goodEntry, b: { dtype: 'F32', shape: [2], data_offsets: [8, 16] } }), new Uint8Array(12));
    const dataStart = 8 + Buffer.byteLength(JSON.stringify({ a: goodEntry, b: { dtype: 'F32', shape: [2], data_offsets: [8, 16] } }));
    await expectFormatError(openSafetensors(file), { file, tensor: 'b', offset: dataStart + 16, message: /run past the data section \(12 bytes\)/ });
  });

  test('overlapping tensors', async () => {
    const file = fresh('overlap.safetensors');
    const header = JSON.stringify({ a: { dtype: 'F32', shape: [3], data_offsets: [0, 12] }, b: { dtype: 'F32', shape: [2], data_offsets: [8, 16] } });
    await writeRaw(file, header, new Uint8Array(16));
    await expectFormatError(openSafetensors(file), { file, tensor: 'b', offset: 8 + Buffer.byteLength(header) + 8, message: /overlaps tensor a/ });
  });

  test('a byte length that does not match dtype × shape', async () => {
    const file = fresh('length.safetensors');
    const header = JSON.stringify({ a: { dtype: 'BF16', shape: [3], data_offsets: [0, 8] } });
    await writeRaw(file, header, new Uint8Array(8));
    await expectFormatError(openSafetensors(file), { file, tensor: 'a', offset: 8 + Buffer.byteLength(header), message: /needs 6 bytes/ });
  });

  test('a missing file', async () => {
    const file = fresh('absent.safetensors');
    await expectFormatError(openSafetensors(file), { file, message: /cannot open/ });
  });

  test('random corruption of a valid header never crashes: it opens or throws CheckpointFormatError', async () => {
    const file = fresh('good.safetensors');
    await writeSafetensors(file, [tensor('alpha', 'F32', [3, 2]), tensor('beta', 'BF16', [5]), tensor('gamma', 'I64', [2])], { format: 'pt' });
    const original = await fsp.readFile(file);
    const headerEnd = 8 + Number(original.readBigUInt64LE(0));
    const rng = new Rng(2024);
    const corrupted = fresh('corrupt.safetensors');
    let opened = 0;
    for (let trial = 0; trial < 300; trial++) {
      const bytes = Buffer.from(original);
      const flips = 1 + rng.nextInt(3);
      for (let f = 0; f < flips; f++) bytes[rng.nextInt(headerEnd)] = rng.nextUint32() & 0xff;
      await fsp.writeFile(corrupted, bytes);
      try {
        const reader = await openSafetensors(corrupted);
        for (const name of reader.names) await reader.readTensor(name);
        await reader.close();
        opened++;
      } catch (error) {
        expect(error).toBeInstanceOf(CheckpointFormatError);
      }
    }
    expect(opened).toBeLessThan(300);
  });
});

describe('malformed checkpoint directories', () => {
  test('an index naming a tensor its shard does not hold', async () => {
    const dir = fresh('index-missing-tensor');
    await writeCheckpoint(dir, [tensor('a', 'F32', [16]), tensor('b', 'F32', [16])], { maxShardBytes: 64 });
    const indexFile = path.join(dir, INDEX_FILE_NAME);
    const index = JSON.parse(await fsp.readFile(indexFile, 'utf8'));
    index.weight_map.ghost = 'model-00002-of-00002.safetensors';
    await fsp.writeFile(indexFile, JSON.stringify(index));
    await expectFormatError(openCheckpoint(dir), { file: path.join(dir, 'model-00002-of-00002.safetensors'), tensor: 'ghost', message: /not in it/ });
  });

  test('an index naming a shard that does not exist', async () => {
    const dir = fresh('index-missing-shard');
    await writeCheckpoint(dir, [tensor('a', 'F32', [16]), tensor('b', 'F32', [16])], { maxShardBytes: 64 });
    await fsp.rm(path.join(dir, 'model-00001-of-00002.safetensors'));
    await expectFormatError(openCheckpoint(dir), { file: path.join(dir, 'model-00001-of-00002.safetensors'), message: /missing/ });
  });

  test('an index that is not JSON, has no weight_map, or points outside the directory', async () => {
    const dir = fresh('index-bad');
    await fsp.mkdir(dir);
    const indexFile = path.join(dir, INDEX_FILE_NAME);
    await fsp.writeFile(indexFile, '{"weight_map": {');
    await expectFormatError(openCheckpoint(dir), { file: indexFile, message: /JSON/ });
    await fsp.writeFile(indexFile, JSON.stringify({ metadata: {} }));
    await expectFormatError(openCheckpoint(dir), { file: indexFile, message: /weight_map/ });
    await fsp.writeFile(indexFile, JSON.stringify({ weight_map: { a: '../elsewhere.safetensors' } }));
    await expectFormatError(openCheckpoint(dir), { file: indexFile, tensor: 'a', message: /same directory/ });
  });

  test('a shard that is itself malformed', async () => {
    const dir = fresh('index-bad-shard');
    await writeCheckpoint(dir, [tensor('a', 'F32', [16]), tensor('b', 'F32', [16])], { maxShardBytes: 64 });
    const shard = path.join(dir, 'model-00002-of-00002.safetensors');
    await fsp.writeFile(shard, Buffer.from([9, 9]));
    await expectFormatError(openCheckpoint(dir), { file: shard, offset: 0 });
  });

  test('a directory with no weights', async () => {
    const dir = fresh('empty');
    await fsp.mkdir(dir);
    await expectFormatError(openCheckpoint(dir), { file: dir, message: /neither/ });
  });
});

describe('the writer leaves nothing behind when it fails', () => {
  test('data whose length does not match its shape is rejected before any file is created', async () => {
    const dir = fresh('reject');
    await fsp.mkdir(dir);
    const target = path.join(dir, 'out.safetensors');
    const bad = [tensor('good', 'F32', [4]), { name: 'bad', dtype: 'F32' as const, shape: [3], data: new Uint8Array(8) }];
    await expect(writeSafetensors(target, bad)).rejects.toThrow(InvalidArgumentError);
    await expect(writeCheckpoint(dir, bad, { maxShardBytes: 8 })).rejects.toThrow(/needs 12 bytes, data has 8/);
    expect(await fsp.readdir(dir)).toEqual([]);
  });

  test('other invalid input is rejected too: duplicate names, bad dtype, bad shape, bad metadata', async () => {
    const dir = fresh('reject-more');
    await fsp.mkdir(dir);
    const target = path.join(dir, 'out.safetensors');
    const invalid: unknown[][] = [
      [[tensor('a', 'F32', [1]), tensor('a', 'F32', [1])]],
      [[{ ...tensor('a', 'F32', [1]), dtype: 'F64' }]],
      [[{ ...tensor('a', 'F32', [1]), shape: [-1] }]],
      [[{ ...tensor('a', 'F32', [1]), name: '__metadata__' }]],
      [[tensor('a', 'F32', [1])], { format: 1 }],
    ];
    for (const [tensors, metadata] of invalid) {
      await expect(writeSafetensors(target, tensors as TensorToWrite[], metadata as Record<string, string>)).rejects.toThrow(InvalidArgumentError);
    }
    expect(await fsp.readdir(dir)).toEqual([]);
  });

  test('a failure after the temporary file was written removes it and keeps the old target', async () => {
    const dir = fresh('rename-fails');
    await fsp.mkdir(dir);
    const target = path.join(dir, 'out.safetensors');
    await fsp.mkdir(target); // rename onto a non-empty directory fails
    await fsp.writeFile(path.join(target, 'keep'), 'x');
    await expect(writeSafetensors(target, [tensor('a', 'F32', [4])])).rejects.toThrow();
    expect(await fsp.readdir(dir)).toEqual(['out.safetensors']);
    expect(await fsp.readdir(target)).toEqual(['keep']);
  });

  test('overwriting an existing file replaces it whole', async () => {
    const file = fresh('overwrite.safetensors');
    await writeSafetensors(file, [tensor('old', 'F32', [100])]);
    await writeSafetensors(file, [tensor('new', 'F16', [2])]);
    await using reader = await openSafetensors(file);
    expect([...reader.names]).toEqual(['new']);
    expect(await fsp.readdir(path.dirname(file))).not.toEqual(expect.arrayContaining([expect.stringMatching(/\.tmp-/)]));
  });
});

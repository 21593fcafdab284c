/** Tensor lifetime, host transfers, zero-copy wrapping, scopes, the backend choice and the stale-binary check. */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { Tensor, scope, keep, initBackend, add, InvalidArgumentError, memoryStats } from '../lib';
import { native, translateNativeError, checkFresh } from '../lib/native';
import { randn, testDevices, cudaEnabled } from './helpers';

describe.each(testDevices())('tensors on %s', (device) => {
  test('round-trips every dtype through the device', async () => {
    const f = randn(24, 1);
    const t32 = await Tensor.fromArray(f, [2, 3, 4], { device });
    expect(t32.shape).toEqual([2, 3, 4]);
    expect(t32.device).toBe(device === 'cpu' ? 'cpu' : 'cuda:0');
    expect(Array.from(await t32.toFloat32())).toEqual(Array.from(f));
    const f64 = Float64Array.from(f, (v) => v * Math.PI);
    expect(Array.from((await (await Tensor.fromArray(f64, [24], { device })).toArray()) as Float64Array)).toEqual(
      Array.from(f64),
    );
    const i32 = Int32Array.from({ length: 24 }, (_, i) => i * 7919 - 50000);
    expect(Array.from((await (await Tensor.fromArray(i32, [24], { device })).toArray()) as Int32Array)).toEqual(
      Array.from(i32),
    );
    const i64 = BigInt64Array.from({ length: 5 }, (_, i) => BigInt(i) * 10n ** 15n);
    expect(Array.from((await (await Tensor.fromArray(i64, [5], { device })).toArray()) as BigInt64Array)).toEqual(
      Array.from(i64),
    );
  });

  test('to() copies across devices and view() shares memory', async () => {
    const t = await Tensor.fromArray(randn(12, 2), [3, 4], { device });
    const c = await t.to('cpu');
    expect(Array.from(await c.toFloat32())).toEqual(Array.from(await t.toFloat32()));
    const v = t.view([12]);
    expect(v.native.sameStorage(t.native)).toBe(true);
    expect(() => t.view([5])).toThrow(InvalidArgumentError);
  });

  test('scope disposes what it created but not what it returns', async () => {
    let inner: Tensor | undefined;
    let keptByHand: Tensor | undefined;
    const out = await scope(async () => {
      const a = await Tensor.fromArray(randn(8, 3), [8], { device });
      inner = await add(a, a);
      keptByHand = keep(await add(a, inner));
      return { result: await add(inner, inner) };
    });
    expect(inner!.disposed).toBe(true);
    expect(out.result.disposed).toBe(false);
    expect(keptByHand!.disposed).toBe(false);
    await expect(
      scope(async () => {
        inner = Tensor.empty([4], { device });
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    expect(inner!.disposed).toBe(true);
  });

  test('a disposed tensor is a typed error, and dispose is idempotent', async () => {
    const t = Tensor.empty([3], { device });
    t.dispose();
    t.dispose();
    expect(t.disposed).toBe(true);
    await expect(t.toArray()).rejects.toMatchObject({ code: 'INVALID_ARGUMENT', argument: 'tensor' });
  });
});

describe('host memory', () => {
  test('wrap() is zero-copy on the CPU', async () => {
    const data = randn(16, 4);
    const t = Tensor.wrap(data, [4, 4]);
    data[5] = 42;
    expect((await t.toFloat32())[5]).toBe(42);
    await add(t, t, t);
    expect(data[5]).toBe(84);
  });

  test('mismatched data and shapes are rejected before anything is allocated', async () => {
    await expect(Tensor.fromArray(randn(5, 1), [2, 3])).rejects.toMatchObject({ argument: 'data' });
    expect(() => Tensor.empty([2, -1])).toThrow(InvalidArgumentError);
    expect(() => Tensor.empty([2], { dtype: 'f8' as never })).toThrow(/dtype/);
    expect(() => Tensor.empty([2], { device: 'tpu' })).toThrow(/device/);
  });
});

describe('backend', () => {
  test('auto picks CUDA when it answers and otherwise says why not', () => {
    const info = initBackend({ backend: 'auto' });
    if (native().cudaDeviceCount().count > 0) expect(info.backend).toBe('cuda');
    else {
      expect(info.backend).toBe('cpu');
      expect(info.reason).toMatch(/falling back to CPU: .+/);
    }
    expect(initBackend({ backend: 'cpu' }).device).toBe('cpu');
    initBackend();
  });

  test('cuda without a device is a typed error', () => {
    if (native().cudaDeviceCount().count > 0) return;
    expect(() => initBackend({ backend: 'cuda' })).toThrow(expect.objectContaining({ code: expect.stringMatching(/CUDA|NOT_COMPILED/) }));
    initBackend();
  });

  test('native error objects become typed errors', () => {
    const oom = translateNativeError(Object.assign(new Error('x'), { tcalKind: 'OutOfMemory', requested: 10, free: 3, device: 'cuda:0' }));
    expect(oom).toMatchObject({ name: 'OutOfMemoryError', requested: 10, free: 3 });
    const cu = translateNativeError(Object.assign(new Error('y'), { tcalKind: 'Cuda', cudaName: 'cudaErrorInvalidValue', number: 1, op: 'k' }));
    expect(cu).toMatchObject({ name: 'CudaError', cudaName: 'cudaErrorInvalidValue', number: 1, op: 'k' });
  });
});

describe('kernel switches', () => {
  test('setKernelSwitch sets and clears TCAL_* switches in the C environment and refuses other names with a typed error', async () => {
    // The C environment is what a child process inherits: spawn one to read it back.
    const { execFileSync } = await import('child_process');
    const read = () => execFileSync('sh', ['-c', 'printf %s "${TCAL_TEST_SWITCH-unset}"']).toString();
    native().setKernelSwitch('TCAL_TEST_SWITCH', 'lean');
    expect(read()).toBe('lean');
    native().setKernelSwitch('TCAL_TEST_SWITCH', null);
    expect(read()).toBe('unset');
    for (const bad of ['PATH', 'TCAL_A=B', ''])
      expect(() => native().setKernelSwitch(bad, 'x')).toThrow(expect.objectContaining({ name: 'InvalidArgumentError', argument: 'name' }));
  });
});

describe('stale binary', () => {
  test('a binary built from other sources is refused with NativeBindingError', () => {
    const root = path.resolve(__dirname, '..');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tcal-stale-'));
    try {
      fs.cpSync(path.join(root, 'native'), path.join(dir, 'native'), { recursive: true });
      const built = native().sourceHash;
      expect(() => checkFresh(dir, 'tcal.node', built)).not.toThrow();
      fs.appendFileSync(path.join(dir, 'native', 'core', 'error.h'), '\n// edited\n');
      expect(() => checkFresh(dir, 'tcal.node', built)).toThrow(
        expect.objectContaining({ name: 'NativeBindingError', message: expect.stringMatching(/stale/) }),
      );
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

(cudaEnabled() ? describe : describe.skip)('CUDA errors', () => {
  test('an allocation larger than the card is an OutOfMemoryError and the process carries on', async () => {
    const huge = 2 ** 40; // 1 TiB of f32 elements × 4
    let err: unknown;
    try {
      Tensor.empty([huge], { device: 'cuda:0' });
    } catch (e) {
      err = e;
    }
    expect(err).toMatchObject({ name: 'OutOfMemoryError', code: 'OUT_OF_MEMORY', requested: huge * 4 });
    expect((err as { free: number }).free).toBeGreaterThan(0);
    const t = await Tensor.fromArray(randn(1024, 1), [1024], { device: 'cuda:0' });
    expect((await add(t, t).then((r) => r.toFloat32()))[3]).toBeCloseTo(2 * (await t.toFloat32())[3], 5);
  });

  test('a nonexistent device is a CudaError naming the CUDA error', () => {
    expect(() => Tensor.empty([4], { device: 'cuda:99' })).toThrow(
      expect.objectContaining({ name: 'CudaError', cudaName: 'cudaErrorInvalidDevice', op: 'cudaSetDevice' }),
    );
  });

  test('the caching allocator reuses freed blocks', async () => {
    const before = memoryStats('cuda:0');
    for (let i = 0; i < 20; i++) Tensor.empty([1 << 20], { device: 'cuda:0' }).dispose();
    const after = memoryStats('cuda:0');
    expect(after.cacheHits - before.cacheHits).toBeGreaterThanOrEqual(19);
    expect(after.allocCalls - before.allocCalls).toBeLessThanOrEqual(1);
  });
});

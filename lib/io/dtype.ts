/**
 * Tensor element types of the checkpoints we read and write, and host-side conversions between the
 * 16-bit float formats and float32.
 *
 * All byte buffers are little-endian (the safetensors convention). We view them through host typed
 * arrays, which is only right on a little-endian host; every platform Node supports for this project is.
 */

import { endianness } from 'node:os';
import { InvalidArgumentError } from '../errors';

export type Dtype = 'F32' | 'F16' | 'BF16' | 'I32' | 'I64';
export type FloatDtype = 'F32' | 'F16' | 'BF16';

export const DTYPE_BYTES: Readonly<Record<Dtype, number>> = { F32: 4, F16: 2, BF16: 2, I32: 4, I64: 8 };

export function isDtype(value: unknown): value is Dtype {
  return typeof value === 'string' && Object.prototype.hasOwnProperty.call(DTYPE_BYTES, value);
}

/** Bytes of a tensor of this dtype and shape (may exceed 2^53 for absurd shapes: callers check Number.isSafeInteger). */
export function byteLengthOf(dtype: Dtype, shape: readonly number[]): number {
  return shape.reduce((product, dim) => product * dim, DTYPE_BYTES[dtype]);
}

export function isFloatDtype(value: unknown): value is FloatDtype {
  return value === 'F32' || value === 'F16' || value === 'BF16';
}

if (endianness() !== 'LE') {
  throw new Error('taylor-calibrate needs a little-endian host: safetensors data is little-endian');
}

// Scratch views to move between a float32 value and its bit pattern.
const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

function float32Bits(value: number): number {
  scratchF32[0] = value;
  return scratchU32[0];
}

function float32FromBits(bits: number): number {
  scratchU32[0] = bits;
  return scratchF32[0];
}

/** bfloat16 bits of a float32 value, rounded to nearest, ties to even; NaN becomes the quiet NaN 0x7FC0 (as torch). */
export function float32ToBf16Bits(value: number): number {
  const bits = float32Bits(value);
  if ((bits & 0x7fffffff) > 0x7f800000) return 0x7fc0;
  // Adding 0x7FFF plus the lowest kept bit rounds the dropped 16 bits to nearest-even; a carry into the
  // exponent is the correct result (up to infinity).
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

/** float32 value of bfloat16 bits (exact: bf16 is the top half of a float32). */
export function bf16BitsToFloat32(bits: number): number {
  return float32FromBits((bits & 0xffff) << 16);
}

/**
 * IEEE binary16 bits of a float32 value, rounded to nearest, ties to even: overflow gives ±infinity,
 * tiny values give subnormals or ±0, NaN stays NaN (quiet, sign and top payload bits kept).
 */
export function float32ToF16Bits(value: number): number {
  const bits = float32Bits(value);
  const sign = (bits >>> 16) & 0x8000;
  const exponent = (bits >>> 23) & 0xff;
  const mantissa = bits & 0x7fffff;
  if (exponent === 0xff) return mantissa === 0 ? sign | 0x7c00 : sign | 0x7e00 | (mantissa >>> 13);
  const halfExponent = exponent - 127 + 15;
  if (halfExponent >= 0x1f) return sign | 0x7c00;
  if (halfExponent <= 0) {
    // Subnormal half (or zero). Below 2^-25 everything rounds to zero (2^-25 itself is a tie, to even 0).
    if (halfExponent < -10) return sign;
    const full = mantissa | 0x800000; // 24-bit significand with the implicit one
    const shift = 14 - halfExponent; // 14..24: from float32 significand units to 2^-24 units
    return sign | roundShiftRightEven(full, shift);
  }
  // Normal half: keep 10 mantissa bits, round the 13 dropped ones; a carry may roll into the exponent
  // (and up to 0x7C00, infinity), which is the right answer.
  return sign | roundAddEven((halfExponent << 10) | (mantissa >>> 13), mantissa & 0x1fff, 0x1000);
}

function roundShiftRightEven(value: number, shift: number): number {
  const half = 1 << (shift - 1);
  return roundAddEven(value >>> shift, value & ((1 << shift) - 1), half);
}

function roundAddEven(kept: number, dropped: number, half: number): number {
  return dropped > half || (dropped === half && (kept & 1) === 1) ? kept + 1 : kept;
}

/** float32 value of IEEE binary16 bits (exact). */
export function f16BitsToFloat32(bits: number): number {
  const sign = (bits & 0x8000) << 16;
  const exponent = (bits >>> 10) & 0x1f;
  const mantissa = bits & 0x3ff;
  if (exponent === 0) {
    const magnitude = mantissa * 2 ** -24; // zero or subnormal, exact in float32
    return sign ? -magnitude : magnitude;
  }
  if (exponent === 0x1f) return float32FromBits((sign | 0x7f800000 | (mantissa << 13)) >>> 0);
  return float32FromBits((sign | ((exponent - 15 + 127) << 23) | (mantissa << 13)) >>> 0);
}

let f16Table: Float32Array | undefined;

/** All 65536 binary16 → float32 values, built once on first use (256 KiB). */
function f16ToFloat32Table(): Float32Array {
  if (!f16Table) {
    f16Table = new Float32Array(65536);
    for (let bits = 0; bits < 65536; bits++) f16Table[bits] = f16BitsToFloat32(bits);
  }
  return f16Table;
}

/** A Uint16Array over `bytes`, copying only when the bytes are not 2-byte aligned. */
function uint16View(bytes: Uint8Array): Uint16Array {
  if (bytes.byteOffset % 2 === 0) return new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
  return new Uint16Array(bytes.slice().buffer);
}

function checkLength(dtype: Dtype, bytes: Uint8Array): void {
  if (bytes.byteLength % DTYPE_BYTES[dtype] !== 0) {
    throw new InvalidArgumentError('bytes', `${bytes.byteLength} bytes is not a whole number of ${dtype} elements`);
  }
}

function requireFloatDtype(dtype: Dtype): asserts dtype is FloatDtype {
  if (!isFloatDtype(dtype)) throw new InvalidArgumentError('dtype', `${dtype} is not a floating-point dtype`);
}

/** Decodes little-endian F32 / F16 / BF16 bytes into a new Float32Array. */
export function toFloat32(dtype: Dtype, bytes: Uint8Array): Float32Array {
  requireFloatDtype(dtype);
  checkLength(dtype, bytes);
  if (dtype === 'F32') {
    const out = new Float32Array(bytes.byteLength / 4);
    new Uint8Array(out.buffer).set(bytes);
    return out;
  }
  const halves = uint16View(bytes);
  const out = new Float32Array(halves.length);
  if (dtype === 'BF16') {
    const outBits = new Uint32Array(out.buffer);
    for (let i = 0; i < halves.length; i++) outBits[i] = halves[i] << 16;
  } else {
    const table = f16ToFloat32Table();
    for (let i = 0; i < halves.length; i++) out[i] = table[halves[i]];
  }
  return out;
}

/** Encodes float32 values as little-endian F32 / F16 / BF16 bytes (round to nearest even). */
export function fromFloat32(dtype: Dtype, values: Float32Array): Uint8Array {
  requireFloatDtype(dtype);
  if (dtype === 'F32') return new Uint8Array(values.slice().buffer);
  const out = new Uint16Array(values.length);
  const encode = dtype === 'BF16' ? float32ToBf16Bits : float32ToF16Bits;
  for (let i = 0; i < values.length; i++) out[i] = encode(values[i]);
  return new Uint8Array(out.buffer);
}

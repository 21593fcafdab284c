/**
 * The Taylor attention-moment reduction (DESIGN.md §5.1 Pass 1) for one teacher layer and one batch.
 *
 * Given post-RoPE q [B,T,H,D], k and v [B,T,HKV,D] (GQA: query head h reads KV head h / (H/HKV)), the RoPE
 * inverse frequencies θ [D/2] (rotate-half pairing: dim j rotates with j + D/2) and the γ₀-scan decays, it
 * forms every query token's causal attention row A_t· (scale D^-1/2 unless given) and ADDS, in f64, into the
 * caller's accumulators (all sums over included tokens; Δ = t − s, positions restart per sequence):
 *   count [1]                  tokens
 *   attention [H,5]            Σ E_A[Δ], Σ E_A[Δ²], Σ entropy −Σ_s A ln A, Σ mass on the sequence's first
 *                              token (sink), Σ mass on Δ < 16 (local)             (columns: ATTENTION_COLUMNS)
 *   histogram [H,bins]         Σ mass with Δ = 0, Δ ∈ [1,2), [2,4), …, [2^(bins−2), ∞)
 *   phi [H,D/2,2]              Σ Re / Im of φ_j = E_A[exp(iθ_j Δ)]
 *   contextSum, contextSq [H,D]   Σ o, Σ o² of the context o_t = Σ_s A_ts v_s (the caller's `context` when
 *                                 given: the teacher's own A·V, which its forward has already formed)
 *   scanCross, scanSq [H,K0,D]    γ₀ scan: y_t = γ_k y_{t−1} + v_t per sequence, ŷ = y / rms(y) (ε 1e-6):
 *                                 Σ ŷ∘o, Σ ŷ²
 *   keySum [HKV,D], keyOuter [HKV,D,D]      Σ k̄, Σ k̄k̄ᵀ of the pre-RoPE keys k̄ = R_{−pos} k
 *   valueSum [HKV,D], valueOuter [HKV,D,D]  Σ v, Σ vvᵀ
 *   inputSum [Dx], inputOuter [Dx,Dx]       Σ x, Σ xxᵀ of the layer input x [B,T,Dx] (when x is given)
 * Zero the accumulators once (createMomentAccumulators) and stream batches through: every field is a sum,
 * so batches and devices combine by addition. Varlen: `cuSeqlens` (i32 [N+1], B = 1) packs N sequences;
 * `include` (i32 [N] of 0/1) leaves sequences (padding) out; tokens past the last offset count nowhere.
 *
 * Algorithms (CPU): 'stream' (default) — the online-softmax formulation over key blocks that the CUDA kernel
 * follows (native/cpu/moments.h spells it out); 'materialize' — the oracle, each attention row formed
 * explicitly. Both run in f64. CUDA (head dim ≤ 256): bf16 / f16 inputs with `context` given run the
 * attention statistics as a flash-style tensor-core pass (QKᵀ in bf16/f16, φ as an fp16 P·[cos θσ | sin θσ]
 * product; native/cuda/moments_tc.cu) and never form A·V (with `lse` it needs no online softmax either);
 * f32 inputs, or no context, run a CUDA-core pass in fp32 that forms o itself (much slower). Sums in f64 in
 * a fixed order. `taylorMomentsOnDevice(device)` says whether the reduction runs where the tensors are. Diagnostics (environment, CUDA):
 * TCAL_MOMENTS_PROFILE=1 prints each call's phase times to stderr; TCAL_MOMENTS_KERNEL=bk32 picks 32-key tiles
 * for the D = 128 tensor-core pass (default 64; bench/NOTES.md "Taylor attention-moment reduction" has both).
 */
import { native, type NativeTensor } from '../native';
import { Tensor } from '../tensor';

/** Columns of the `attention` accumulator. */
export const ATTENTION_COLUMNS = ['distance', 'distanceSq', 'entropy', 'sink', 'local'] as const;

/** Number of distance-histogram bins (Δ = 0, then powers of two, the last open-ended). */
export function momentBins(): number {
  return native().taylorMomentsBins;
}

/** Local mass counts keys with Δ below this. */
export function momentLocalWindow(): number {
  return native().taylorMomentsLocalWindow;
}

/** Whether the reduction runs on `device` (the CPU always; CUDA once its kernel exists). */
export function taylorMomentsOnDevice(device: string): boolean {
  return device === 'cpu' || native().taylorMomentsCuda;
}

/** K₀ decays γ = exp(−r), r log-spaced in [rMin, rMax] (DESIGN §5.1: 48 in [1e-4, 3]), slowest first. */
export function scanDecays(count = 48, rMin = 1e-4, rMax = 3): Float64Array {
  const out = new Float64Array(count);
  for (let i = 0; i < count; i++) {
    const r = count === 1 ? rMin : rMin * Math.pow(rMax / rMin, i / (count - 1));
    out[i] = Math.exp(-r);
  }
  return out;
}

export interface MomentAccumulators {
  count: Tensor;
  attention: Tensor;
  histogram: Tensor;
  phi: Tensor;
  contextSum: Tensor;
  contextSq: Tensor;
  scanCross: Tensor;
  scanSq: Tensor;
  keySum: Tensor;
  keyOuter: Tensor;
  valueSum: Tensor;
  valueOuter: Tensor;
  inputSum?: Tensor;
  inputOuter?: Tensor;
}

export interface MomentShape {
  heads: number;
  kvHeads: number;
  headDim: number;
  /** K₀, the number of scan decays. */
  decays: number;
  /** Dx, the layer input's width; omit for no input moments. */
  inputDim?: number;
}

/** Accumulator shapes, by field. */
export function momentAccumulatorShapes(s: MomentShape): Record<keyof MomentAccumulators, number[] | undefined> {
  const { heads: H, kvHeads: HKV, headDim: D, decays: K0, inputDim: Dx } = s;
  return {
    count: [1],
    attention: [H, ATTENTION_COLUMNS.length],
    histogram: [H, momentBins()],
    phi: [H, D / 2, 2],
    contextSum: [H, D],
    contextSq: [H, D],
    scanCross: [H, K0, D],
    scanSq: [H, K0, D],
    keySum: [HKV, D],
    keyOuter: [HKV, D, D],
    valueSum: [HKV, D],
    valueOuter: [HKV, D, D],
    inputSum: Dx === undefined ? undefined : [Dx],
    inputOuter: Dx === undefined ? undefined : [Dx, Dx],
  };
}

/** Zeroed f64 accumulators on `device`. */
export async function createMomentAccumulators(s: MomentShape, device: string): Promise<MomentAccumulators> {
  const out: Partial<Record<keyof MomentAccumulators, Tensor>> = {};
  for (const [name, shape] of Object.entries(momentAccumulatorShapes(s))) {
    if (shape) out[name as keyof MomentAccumulators] = await Tensor.zeros(shape, { dtype: 'f64', device });
  }
  return out as MomentAccumulators;
}

/** Releases every accumulator tensor. */
export function disposeMomentAccumulators(acc: MomentAccumulators): void {
  for (const t of Object.values(acc)) (t as Tensor | undefined)?.dispose();
}

/** The accumulators' values on the host. */
export async function readMomentAccumulators(acc: MomentAccumulators): Promise<Partial<Record<keyof MomentAccumulators, Float64Array>>> {
  const out: Partial<Record<keyof MomentAccumulators, Float64Array>> = {};
  for (const [name, t] of Object.entries(acc)) {
    if (t) out[name as keyof MomentAccumulators] = (await (t as Tensor).toArray()) as Float64Array;
  }
  return out;
}

export interface TaylorMomentsOptions {
  /** Score scale; default D^-1/2. */
  scale?: number;
  /** Varlen: i32 [N+1] offsets (B = 1), on the CPU or q's device. */
  cuSeqlens?: Tensor;
  /** i32 [N] of 0 / 1: which sequences count (default all). */
  include?: Tensor;
  /** The layer's normalised attention input [B,T,Dx]: adds Σx and Σxxᵀ (acc.inputSum / inputOuter needed). */
  x?: Tensor;
  /**
   * The teacher's per-head context A·V [B,T,H,D] (any floating dtype; f64 on the CPU only), as its forward
   * produced it: the context moments and the γ₀ scan use it, and on CUDA it lets the fast tensor-core pass
   * run (which does not form A·V). Omitted: the reduction forms o itself.
   */
  context?: Tensor;
  /**
   * The teacher attention's log-sum-exp, f32 [B,H,T] on q's device: attentionForward(q, k, v, {returnLse: true})
   * of the same q, k and scale (for varlen [1,H,N]). On CUDA the tensor-core pass then knows every probability
   * up front and skips the online softmax (faster); each row is still normalised by its own sum, so an lse
   * off by a per-row constant changes nothing but the range of the intermediate values. The CPU ignores it.
   */
  lse?: Tensor;
  algorithm?: 'stream' | 'materialize';
}

/**
 * Adds one batch's moments into `acc` (see the file comment). `invFreq` [D/2] and `decays` [K0] are f32 or
 * f64 tensors on the CPU or q's device.
 */
export async function taylorMoments(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  invFreq: Tensor,
  decays: Tensor,
  acc: MomentAccumulators,
  options: TaylorMomentsOptions = {},
): Promise<void> {
  const accNative: Record<string, NativeTensor> = {};
  for (const [name, t] of Object.entries(acc)) if (t) accNative[name] = (t as Tensor).native;
  await native().taylorMoments(q.native, k.native, v.native, invFreq.native, decays.native, accNative, {
    scale: options.scale,
    cuSeqlens: options.cuSeqlens?.native,
    include: options.include?.native,
    x: options.x?.native,
    context: options.context?.native,
    lse: options.lse?.native,
    algorithm: options.algorithm,
  });
}

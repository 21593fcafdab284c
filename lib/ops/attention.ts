/**
 * Causal softmax attention forward (the teacher's attention, DESIGN.md §4), GQA-aware:
 *   o_t = Σ_{s ≤ t} softmax_s(scale · q_t·k_s) v_s,   lse_t = ln Σ_{s ≤ t} exp(scale · q_t·k_s).
 * Layouts: q [B,T,H,D]; k, v [B,T,HKV,D] (post-RoPE) with H a multiple of HKV (query head h reads KV head
 * h / (H/HKV)); D ∈ {64, 128, 256}. o [B,T,H,D] in q's dtype; lse [B,H,T] f32 (natural log).
 * Varlen packs N sequences into B = 1 with `cuSeqlens` (i32 [N+1] offsets): attention never crosses a
 * boundary; tokens past the last offset belong to no sequence (o = 0, lse = −inf there).
 * CUDA: bf16 / f16 on the tensor cores (fp32 accumulation), f32 on CUDA cores in fp32. CPU: the reference
 * (fp64 scores and accumulation) for bf16, f16, f32 and f64.
 */
import { native } from '../native';
import { Tensor } from '../tensor';

export interface AttentionOptions {
  /** Score scale; default D^-1/2. Must be positive. */
  scale?: number;
  /** Varlen: i32 [N+1] offsets of N sequences packed into B = 1 (on the CPU or q's device). */
  cuSeqlens?: Tensor;
  /** Also return lse [B,H,T] f32: the result becomes {o, lse}. */
  returnLse?: boolean;
  /** Preallocated outputs (written entirely): a tensor for o, or {o, lse} (a given lse is always written). */
  out?: Tensor | { o?: Tensor; lse?: Tensor };
}

export interface AttentionWithLse {
  o: Tensor;
  /** [B,H,T] f32, natural-log logsumexp of the scaled scores. */
  lse: Tensor;
}

/** o [B,T,H,D] in q's dtype; with `returnLse: true`, {o, lse}. */
export function attentionForward(
  q: Tensor, k: Tensor, v: Tensor, options: AttentionOptions & { returnLse: true },
): Promise<AttentionWithLse>;
export function attentionForward(
  q: Tensor, k: Tensor, v: Tensor, options?: AttentionOptions & { returnLse?: false },
): Promise<Tensor>;
export function attentionForward(
  q: Tensor, k: Tensor, v: Tensor, options?: AttentionOptions,
): Promise<Tensor | AttentionWithLse>;
export async function attentionForward(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  options: AttentionOptions = {},
): Promise<Tensor | AttentionWithLse> {
  const { out, cuSeqlens, returnLse, scale } = options;
  const outO = out instanceof Tensor ? out : out?.o;
  const outLse = out instanceof Tensor ? undefined : out?.lse;
  const r = await native().attentionForward(q.native, k.native, v.native, {
    scale,
    returnLse: returnLse === true,
    cuSeqlens: cuSeqlens?.native,
    out: out === undefined ? undefined : { o: outO?.native, lse: outLse?.native },
  });
  // Caller-given outputs come back as second handles on the same memory: drop those handles.
  if (outO) r.o.dispose();
  if (outLse) r.lse?.dispose();
  const o = outO ?? new Tensor(r.o);
  if (returnLse !== true) {
    if (!outLse) r.lse?.dispose();
    return o;
  }
  return { o, lse: outLse ?? new Tensor(r.lse!) };
}

export interface AttentionBackwardOptions {
  /** The forward's score scale; default D^-1/2. */
  scale?: number;
  /** The forward's varlen offsets (i32 [N+1]); tokens past the last one get zero gradients. */
  cuSeqlens?: Tensor;
  /** Preallocated gradients (each written entirely). */
  out?: { dq?: Tensor; dk?: Tensor; dv?: Tensor };
}

export interface AttentionGrads {
  /** [B,T,H,D] like q. */
  dq: Tensor;
  /** [B,T,HKV,D] like k, summed over the query heads of each KV head. */
  dk: Tensor;
  /** [B,T,HKV,D] like v, summed over the query heads of each KV head. */
  dv: Tensor;
}

/**
 * Gradients of attentionForward given its o and lse (`returnLse: true`) and dO = ∂loss/∂o [B,T,H,D]; q, k, v,
 * o and dO share one dtype, which the gradients take. CUDA: FlashAttention-2-style, deterministic (no atomics);
 * bf16 / f16 on the tensor cores with fp32 accumulation, f32 on CUDA cores. CPU: fp64 reference.
 */
export async function attentionBackward(
  q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dO: Tensor, options: AttentionBackwardOptions = {},
): Promise<AttentionGrads> {
  const { out, cuSeqlens, scale } = options;
  const r = await native().attentionBackward(q.native, k.native, v.native, o.native, lse.native, dO.native, {
    scale,
    cuSeqlens: cuSeqlens?.native,
    out: out === undefined ? undefined : { dq: out.dq?.native, dk: out.dk?.native, dv: out.dv?.native },
  });
  // Caller-given outputs come back as second handles on the same memory: drop those handles.
  const pick = (given: Tensor | undefined, h: typeof r.dq): Tensor => {
    if (given) {
      h.dispose();
      return given;
    }
    return new Tensor(h);
  };
  return { dq: pick(out?.dq, r.dq), dk: pick(out?.dk, r.dk), dv: pick(out?.dv, r.dv) };
}

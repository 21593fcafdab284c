/**
 * Gated DeltaNet (DESIGN.md §3), fla-compatible layouts. Per (sequence, value head) the state S ∈ R^{K×V}
 * (fp32) evolves token by token:
 *   q ← q·scale (default K^-1/2; with `l2norm`, q and k are first divided by sqrt(Σx² + 1e-6));
 *   S ← exp(g)·S   — `g` is a LOG decay (g ≤ 0), not a decay factor;
 *   ν = β(v − Sᵀk);  S ← S + kνᵀ;  o = Sᵀq.
 * Layouts: q, k [B,T,H,K]; v [B,T,HV,V] with HV a multiple of H (value head i reads key head i/(HV/H));
 * g, beta [B,T,HV] f32; states [N,HV,K,V] f32. Varlen packs N sequences into B = 1 with `cuSeqlens`
 * (i32, N+1 offsets); tokens past the last offset belong to no sequence (o = 0 there, gradients 0).
 * With `gates`, `g` and `beta` carry the raw a and b: g = −exp(A_log)·softplus(a + dt_bias), β = sigmoid(b).
 * CUDA takes f32 / bf16 / f16 q, k, v with K, V ∈ {64, 128, 256}; the CPU takes any size and dtype and offers
 * the fp64 reference (`precision: 'f64'`).
 */
import { InvalidArgumentError } from '../errors';
import { native, type DType, type GdnNativeOptions } from '../native';
import { Tensor } from '../tensor';

export interface GdnInputs {
  q: Tensor;
  k: Tensor;
  v: Tensor;
  /** Log decay per token and value head (≤ 0), or the raw `a` when `gates` is given. f32 [B,T,HV]. */
  g: Tensor;
  /** Write strength in [0, 1], or the raw `b` when `gates` is given. f32 [B,T,HV]. */
  beta: Tensor;
}

/** In-kernel gates: g = −exp(aLog)·softplus(a + dtBias), β = sigmoid(b); both f32 [HV]. */
export interface GdnGates {
  aLog: Tensor;
  dtBias: Tensor;
}

export interface GdnOptions {
  /** Query scale; default K^-1/2. */
  scale?: number;
  /** L2-normalise q and k inside the kernel (x / sqrt(Σx² + 1e-6)). */
  l2norm?: boolean;
  /** Initial state [N,HV,K,V] f32 (zeros when absent). */
  initialState?: Tensor;
  /** Varlen: i32 [N+1] offsets of N sequences packed into B = 1. */
  cuSeqlens?: Tensor;
  gates?: GdnGates;
  /** CPU only: the chunked algorithm (default) or the token-by-token recurrence. */
  algorithm?: 'chunk' | 'recurrent';
  /** CPU only: 'f64' computes in double precision (the reference). */
  precision?: 'f32' | 'f64';
  /**
   * Dtype of o (and of dq, dk, dv in the backward): the input dtype (default) or 'f32'. The CUDA backward
   * writes gradients in the input dtype only.
   */
  outDtype?: DType;
}

/**
 * What a training forward keeps for its backward (`saveForBackward`), so that gdnBackward skips recomputing it.
 * Belongs to the inputs it was made from: pass it only with the same q, k, v, g, beta and options.
 */
export interface GdnSaved {
  /**
   * The state at the start of every chunk of 64 tokens of every sequence (chunks in sequence order),
   * [chunks, HV, K, V]: f32, or bf16 where the tensor-core forward and backward run (bf16 / f16 inputs, K 64 or
   * 128, V a multiple of 64).
   */
  chunkStates: Tensor;
  /**
   * With `saveForBackward: 'full'` where the tensor-core forward runs (bf16 / f16, K 64 or 128, V a multiple of 64,
   * o in the input dtype), what the backward's prep would compute, so that gdnBackward skips it: A = (I + M)⁻¹ and
   * QKG = scale·Q̂K̂ᵀ ⊙ Γ (lower blocks; 16-bit [chunks, HV, 64, 64]), the gate vectors times the row factors
   * e·sq, −βe·rk, d·rk (sq = scale/‖q‖, rk = 1/‖k‖; scale and 1 without `l2norm`; f32 [chunks, HV, 3, 64]) and
   * e_L (f32 [chunks, HV]), with `l2norm` the norm factors 1/‖q‖, 1/‖k‖ (f32 [2, B·T, H]). The backward reads
   * q and k themselves. ≈ 0.15 GB beside the states' 0.27 at B8·T4096·H16·D128.
   */
  A?: Tensor;
  QKG?: Tensor;
  gates?: Tensor;
  gateEnds?: Tensor;
  norms?: Tensor;
}

const HANDOVER = ['A', 'QKG', 'gates', 'gateEnds', 'norms'] as const;

export interface GdnForwardOptions extends GdnOptions {
  /** Also return the final state [N,HV,K,V] f32. */
  outputFinalState?: boolean;
  /**
   * Also return `saved` for gdnBackward (CUDA; it costs the states' memory: 268 MB in bf16 at B8·T4096·H16·D128).
   * The CPU returns nothing to save: its backward recomputes. 'full' (or `true` with TCAL_GDN_SAVE=full in the
   * environment): also the backward prep's outputs (GdnSaved.A …), where the tensor-core paths run.
   */
  saveForBackward?: boolean | 'full';
  /** Preallocated outputs (written entirely). */
  out?: { o?: Tensor; finalState?: Tensor };
}

export interface GdnForwardResult {
  o: Tensor;
  finalState?: Tensor;
  /** With `saveForBackward` on CUDA. */
  saved?: GdnSaved;
}

export interface GdnBackwardOptions extends GdnOptions {
  /** Gradient of the loss with respect to the final state [N,HV,K,V] f32. */
  dFinalState?: Tensor;
  /** The forward's `saved` (same inputs): the backward then skips its forward recompute (checked: dtype, shape, chunks). */
  saved?: GdnSaved;
  out?: Partial<Record<'dq' | 'dk' | 'dv' | 'dg' | 'dbeta' | 'dh0' | 'dALog' | 'dDtBias', Tensor>>;
}

export interface GdnGradients {
  dq: Tensor;
  dk: Tensor;
  dv: Tensor;
  /** d g (log decay), or d a when the gates are fused. f32 [B,T,HV]. */
  dg: Tensor;
  /** d β, or d b when the gates are fused. f32 [B,T,HV]. */
  dbeta: Tensor;
  /** With an initial state: its gradient [N,HV,K,V] f32. */
  dInitialState?: Tensor;
  /** Fused gates: gradients of aLog and dtBias, f32 [HV]. */
  dALog?: Tensor;
  dDtBias?: Tensor;
}

export interface GdnDecodeOptions {
  scale?: number;
  l2norm?: boolean;
  gates?: GdnGates;
  /** Preallocated o (shape and dtype of v). */
  out?: Tensor;
}

function nativeOptions(inputs: GdnInputs, o: GdnOptions): GdnNativeOptions {
  if (!inputs || !(inputs.q instanceof Tensor)) throw new InvalidArgumentError('inputs', 'expected {q, k, v, g, beta} tensors');
  return {
    scale: o.scale,
    l2norm: o.l2norm ?? false,
    initialState: o.initialState?.native ?? null,
    cuSeqlens: o.cuSeqlens?.native ?? null,
    aLog: o.gates?.aLog.native ?? null,
    dtBias: o.gates?.dtBias.native ?? null,
    algorithm: o.algorithm,
    precision: o.precision,
    outDtype: o.outDtype,
  };
}

function outs(o?: Record<string, Tensor | undefined>): Record<string, import('../native').NativeTensor | undefined> {
  const r: Record<string, import('../native').NativeTensor | undefined> = {};
  for (const [k, v] of Object.entries(o ?? {})) r[k] = v?.native;
  return r;
}

function savedOf(states: import('../native').NativeTensor, h: import('../native').GdnNativeHandover | null): GdnSaved {
  const saved: GdnSaved = { chunkStates: new Tensor(states) };
  if (h) for (const name of HANDOVER) if (h[name]) saved[name] = new Tensor(h[name]!);
  return saved;
}

/** Chunked GDN forward: o [B,T,HV,V] (input dtype) and optionally the final state. */
export async function gdnForward(inputs: GdnInputs, options: GdnForwardOptions = {}): Promise<GdnForwardResult> {
  const { q, k, v, g, beta } = inputs;
  const r = await native().gdnForward(q.native, k.native, v.native, g.native, beta.native, {
    ...nativeOptions(inputs, options),
    outputFinalState: options.outputFinalState ?? false,
    saveForBackward: options.saveForBackward === true && process.env.TCAL_GDN_SAVE === 'full' ? 'full' : (options.saveForBackward ?? false),
    out: outs(options.out),
  });
  const pick = (given: Tensor | undefined, h: import('../native').NativeTensor): Tensor => given ?? new Tensor(h);
  return {
    o: pick(options.out?.o, r.o),
    ...(r.finalState ? { finalState: pick(options.out?.finalState, r.finalState) } : {}),
    ...(r.chunkStates ? { saved: savedOf(r.chunkStates, r.handover) } : {}),
  };
}

function nativeOf(t: Tensor | undefined, name: string): import('../native').NativeTensor {
  if (!(t instanceof Tensor)) throw new InvalidArgumentError(name, "expected a Tensor: the forward's hand-over comes whole (saveForBackward 'full')");
  return t.native;
}

/** GDN backward from dO (and optionally d finalState): gradients for every input that has one. */
export async function gdnBackward(inputs: GdnInputs, dO: Tensor, options: GdnBackwardOptions = {}): Promise<GdnGradients> {
  const { q, k, v, g, beta } = inputs;
  if (!(dO instanceof Tensor)) throw new InvalidArgumentError('dO', 'expected a Tensor');
  const saved = options.saved;
  if (saved !== undefined && !(saved && saved.chunkStates instanceof Tensor))
    throw new InvalidArgumentError('saved', "expected the forward's `saved` ({ chunkStates: Tensor })");
  const r = await native().gdnBackward(q.native, k.native, v.native, g.native, beta.native, dO.native, {
    ...nativeOptions(inputs, options),
    dFinalState: options.dFinalState?.native ?? null,
    chunkStates: saved?.chunkStates.native ?? null,
    handover: HANDOVER.some((n) => saved?.[n] !== undefined)
      ? {
          A: nativeOf(saved!.A, 'saved.A'),
          QKG: nativeOf(saved!.QKG, 'saved.QKG'),
          gates: nativeOf(saved!.gates, 'saved.gates'),
          gateEnds: nativeOf(saved!.gateEnds, 'saved.gateEnds'),
          norms: saved!.norms === undefined ? null : nativeOf(saved!.norms, 'saved.norms'),
        }
      : null,
    out: outs(options.out),
  });
  const given = options.out ?? {};
  const wrap = (name: keyof NonNullable<GdnBackwardOptions['out']>, h: import('../native').NativeTensor | null) =>
    h ? (given[name] ?? new Tensor(h)) : undefined;
  const res: GdnGradients = {
    dq: wrap('dq', r.dq)!,
    dk: wrap('dk', r.dk)!,
    dv: wrap('dv', r.dv)!,
    dg: wrap('dg', r.dg)!,
    dbeta: wrap('dbeta', r.dbeta)!,
  };
  if (r.dh0) res.dInitialState = wrap('dh0', r.dh0);
  if (r.dALog) res.dALog = wrap('dALog', r.dALog);
  if (r.dDtBias) res.dDtBias = wrap('dDtBias', r.dDtBias);
  return res;
}

/**
 * One recurrent step for a batch of N sequences: q, k [N,H,K] (or [N,1,H,K]), v [N,HV,V], g, beta [N,HV];
 * `state` [N,HV,K,V] f32 is updated in place. Returns o [N,HV,V].
 */
export async function gdnDecodeStep(inputs: GdnInputs, state: Tensor, options: GdnDecodeOptions = {}): Promise<Tensor> {
  const { q, k, v, g, beta } = inputs;
  if (!(state instanceof Tensor)) throw new InvalidArgumentError('state', 'expected a Tensor');
  const h = await native().gdnDecodeStep(q.native, k.native, v.native, g.native, beta.native, state.native, {
    scale: options.scale,
    l2norm: options.l2norm ?? false,
    aLog: options.gates?.aLog.native ?? null,
    dtBias: options.gates?.dtBias.native ?? null,
    out: options.out?.native ?? null,
  });
  return options.out ?? new Tensor(h);
}

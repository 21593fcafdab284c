/**
 * One Llama-family decoder layer (DESIGN.md §4), forward and backward, llm.c style: the forward optionally
 * returns what its backward needs (`saved`), the backward walks the same steps in reverse. The teacher's
 * inference and `tcal pretrain` both run this code.
 *
 *   x = rmsNorm(h_in)            q, k, v = x·W_{q,k,v}ᵀ (+ b)   [Qwen3: per-head rmsNorm of q, k]
 *   q, k = rope(q, k)            c = attention(q, k, v)         h = h_in + c·W_oᵀ (+ b)
 *   x2 = rmsNorm(h)              out = h + (silu(x2·W_gᵀ) ⊙ x2·W_uᵀ)·W_dᵀ
 */
import type { TeacherConfig } from '../io/hf-config';
import { InvalidArgumentError } from '../errors';
import { add } from '../ops/elementwise';
import { attentionBackward, attentionForward } from '../ops/attention';
import { rmsNorm, rope, swiglu } from '../ops/layers';
import { rmsNormBackward, ropeBackward, swigluBackward } from '../ops/layers-backward';
import { Tensor, scope } from '../tensor';
import { linearBackward, linearForward } from './linear';

/** Parameters by their Hugging Face name (e.g. `model.layers.3.self_attn.q_proj.weight`). */
export type WeightLookup = (name: string) => Tensor | undefined;

/** Token layout shared by every layer of one forward: rows B·T flattened, documents by cu_seqlens. */
export interface TokenLayout {
  B: number;
  T: number;
  /** RoPE positions (restart at each document), i32 [1, B·T]. */
  positions: Tensor;
  /** Document boundaries over the B·T tokens, i32 [N+1]. */
  cuSeqlens: Tensor;
  /** RoPE inverse frequencies, f32 [headDim/2]. */
  invFreq: Tensor;
}

/** What a layer hook receives (see Teacher's ForwardOptions.onLayer). */
export interface LayerActivations {
  layer: number;
  /** The attention input after input_layernorm, [B, T, hidden]. */
  input: Tensor;
  /** Post-RoPE queries [B, T, H, headDim] (after q_norm for Qwen3). */
  q: Tensor;
  /** Post-RoPE keys [B, T, HKV, headDim]. */
  k: Tensor;
  /** Values [B, T, HKV, headDim]. */
  v: Tensor;
  /** Per-head attention context A·V before o_proj, [B, T, H, headDim]. */
  context: Tensor;
  /** The attention's row log-sum-exp of the scaled scores, f32 [1, H, B·T] (attentionForward's lse, varlen). */
  lse: Tensor;
  /** The attention block's output after o_proj (before the residual), [B, T, hidden]. */
  output: Tensor;
}

/** Activations the backward needs (all [B·T, ...] rows). */
export interface DecoderLayerSaved {
  hIn: Tensor;
  x: Tensor;
  /** Pre-norm q, k (Qwen3 only: the q_norm / k_norm backward reads them). */
  qRaw?: Tensor;
  kRaw?: Tensor;
  q: Tensor;
  k: Tensor;
  v: Tensor;
  context: Tensor;
  lse: Tensor;
  h: Tensor;
  x2: Tensor;
  gate: Tensor;
  up: Tensor;
  act: Tensor;
}

/** The named tensor of a weight or gradient lookup, or an InvalidArgumentError naming what is missing. */
export function lookupOrThrow(lookup: WeightLookup | GradLookup, name: string, what: 'weights' | 'grads' = 'weights'): Tensor {
  const t = lookup(name);
  if (!t) throw new InvalidArgumentError(what, what === 'weights' ? `missing ${name}` : `missing gradient buffer for ${name}`);
  return t;
}

const need = (w: WeightLookup, name: string): Tensor => lookupOrThrow(w, name);

/**
 * The layer's output h_out [B·T, hidden] for h_in [B·T, hidden]; with `save`, also what the backward needs.
 * `onLayer` sees the attention activations (tensors valid during the call only).
 */
export async function decoderLayerForward(
  c: TeacherConfig,
  l: number,
  w: WeightLookup,
  hIn: Tensor,
  t: TokenLayout,
  options: { save?: boolean; onLayer?: (acts: LayerActivations) => void | Promise<void> } = {},
): Promise<{ out: Tensor; saved?: DecoderLayerSaved }> {
  const p = `model.layers.${l}`;
  const N = t.B * t.T;
  const hd = c.headDim;
  const save = options.save === true;
  return scope(async () => {
    const x = await rmsNorm(hIn, need(w, `${p}.input_layernorm.weight`), c.rmsNormEps);
    const proj = (name: string) => linearForward(x, need(w, `${p}.self_attn.${name}.weight`), w(`${p}.self_attn.${name}.bias`));
    const qRaw = (await proj('q_proj')).view([1, N, c.numHeads, hd]);
    const kRaw = (await proj('k_proj')).view([1, N, c.numKvHeads, hd]);
    const v = (await proj('v_proj')).view([1, N, c.numKvHeads, hd]);
    let q = qRaw;
    let k = kRaw;
    if (c.qkNorm) {
      // Out of place when saving: the norm's backward needs its input.
      q = await rmsNorm(qRaw, need(w, `${p}.self_attn.q_norm.weight`), c.rmsNormEps, save ? undefined : qRaw);
      k = await rmsNorm(kRaw, need(w, `${p}.self_attn.k_norm.weight`), c.rmsNormEps, save ? undefined : kRaw);
    }
    q = await rope(q, t.positions, t.invFreq, q);
    k = await rope(k, t.positions, t.invFreq, k);
    const { o: context, lse } = await attentionForward(q, k, v, { cuSeqlens: t.cuSeqlens, returnLse: true });
    const ctx2 = context.view([N, c.numHeads * hd]);
    const o = await linearForward(ctx2, need(w, `${p}.self_attn.o_proj.weight`), w(`${p}.self_attn.o_proj.bias`));
    if (options.onLayer) {
      await options.onLayer({
        layer: l,
        input: x.view([t.B, t.T, c.hiddenSize]),
        q: q.view([t.B, t.T, c.numHeads, hd]),
        k: k.view([t.B, t.T, c.numKvHeads, hd]),
        v: v.view([t.B, t.T, c.numKvHeads, hd]),
        context: context.view([t.B, t.T, c.numHeads, hd]),
        lse,
        output: o.view([t.B, t.T, c.hiddenSize]),
      });
    }
    const h = await add(hIn, o, o);
    const x2 = await rmsNorm(h, need(w, `${p}.post_attention_layernorm.weight`), c.rmsNormEps);
    const gate = await linearForward(x2, need(w, `${p}.mlp.gate_proj.weight`), w(`${p}.mlp.gate_proj.bias`));
    const up = await linearForward(x2, need(w, `${p}.mlp.up_proj.weight`), w(`${p}.mlp.up_proj.bias`));
    const act = await swiglu(gate, up, save ? undefined : gate);
    const d = await linearForward(act, need(w, `${p}.mlp.down_proj.weight`), w(`${p}.mlp.down_proj.bias`));
    if (!save) return { out: await add(h, d, h) };
    const out = await add(h, d, d);
    const saved: DecoderLayerSaved = {
      hIn, x, q, k, v, context: ctx2, lse, h, x2, gate, up, act,
      ...(c.qkNorm ? { qRaw, kRaw } : {}),
    };
    return { out, saved };
  });
}

/** Gradient accumulators (f32) by parameter name; every parameter of the layer must have one. */
export type GradLookup = (name: string) => Tensor | undefined;

function linearGrads(g: GradLookup, w: WeightLookup, name: string): { dw: Tensor; db?: Tensor } {
  const dw = lookupOrThrow(g, `${name}.weight`, 'grads');
  const db = w(`${name}.bias`) ? lookupOrThrow(g, `${name}.bias`, 'grads') : undefined;
  return { dw, db };
}

/**
 * Accumulates the layer's parameter gradients into `grads` and returns d h_in [B·T, hidden] for
 * d h_out `dOut` [B·T, hidden].
 */
export async function decoderLayerBackward(
  c: TeacherConfig,
  l: number,
  w: WeightLookup,
  g: GradLookup,
  s: DecoderLayerSaved,
  dOut: Tensor,
  t: TokenLayout,
): Promise<Tensor> {
  const p = `model.layers.${l}`;
  const N = t.B * t.T;
  const hd = c.headDim;
  const normGrad = async (x: Tensor, name: string, dy: Tensor): Promise<Tensor> => {
    const dw = lookupOrThrow(g, `${name}.weight`, 'grads');
    const r = await rmsNormBackward(x, need(w, `${name}.weight`), dy, c.rmsNormEps);
    await add(dw, r.dw, dw);
    return r.dx;
  };
  return scope(async () => {
    // MLP block: out = h + down(swiglu(gate(x2), up(x2))), x2 = norm(h).
    const mlp = (name: string) => `${p}.mlp.${name}`;
    const dAct = (await linearBackward(s.act, need(w, `${mlp('down_proj')}.weight`), dOut, linearGrads(g, w, mlp('down_proj'))))!;
    const { dGate, dUp } = await swigluBackward(s.gate, s.up, dAct);
    const dx2 = (await linearBackward(s.x2, need(w, `${mlp('gate_proj')}.weight`), dGate, linearGrads(g, w, mlp('gate_proj'))))!;
    await linearBackward(s.x2, need(w, `${mlp('up_proj')}.weight`), dUp, linearGrads(g, w, mlp('up_proj')), { dxInto: dx2 });
    const dh = await normGrad(s.h, `${p}.post_attention_layernorm`, dx2);
    await add(dh, dOut, dh);
    // Attention block: h = h_in + o_proj(attention(rope(q), rope(k), v)).
    const att = (name: string) => `${p}.self_attn.${name}`;
    const dCtx = (await linearBackward(s.context, need(w, `${att('o_proj')}.weight`), dh, linearGrads(g, w, att('o_proj'))))!;
    const { dq, dk, dv } = await attentionBackward(s.q, s.k, s.v, s.context.view(s.q.shape), s.lse, dCtx.view(s.q.shape), {
      cuSeqlens: t.cuSeqlens,
    });
    let dqRaw = await ropeBackward(dq, t.positions, t.invFreq, dq);
    let dkRaw = await ropeBackward(dk, t.positions, t.invFreq, dk);
    if (c.qkNorm) {
      dqRaw = await normGrad(s.qRaw!, att('q_norm'), dqRaw);
      dkRaw = await normGrad(s.kRaw!, att('k_norm'), dkRaw);
    }
    const dx = (await linearBackward(s.x, need(w, `${att('q_proj')}.weight`), dqRaw.view([N, c.numHeads * hd]), linearGrads(g, w, att('q_proj'))))!;
    for (const [name, d] of [['k_proj', dkRaw], ['v_proj', dv]] as const) {
      await linearBackward(s.x, need(w, `${att(name)}.weight`), d.view([N, c.numKvHeads * hd]), linearGrads(g, w, att(name)), { dxInto: dx });
    }
    const dhIn = await normGrad(s.hIn, `${p}.input_layernorm`, dx);
    return add(dhIn, dh, dhIn);
  });
}

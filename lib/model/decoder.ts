/**
 * The whole Llama-family decoder over named weights, forward and backward (DESIGN.md §4, §5.5):
 * embedding → layers (lib/model/decoder-layer.ts) → final RMSNorm → LM head with a chunked cross-entropy that
 * never holds the logits of more than `chunkRows` tokens. The teacher's inference and `tcal pretrain` share it.
 */
import type { TeacherConfig } from '../io/hf-config';
import { InvalidArgumentError, throwIfAborted } from '../errors';
import { add, cast } from '../ops/elementwise';
import { matmul } from '../ops/matmul';
import { sum } from '../ops/reduce';
import { crossEntropy, embedding, rmsNorm } from '../ops/layers';
import { crossEntropyForwardBackward, embeddingBackward, rmsNormBackward } from '../ops/layers-backward';
import { Tensor, scope } from '../tensor';
import {
  decoderLayerBackward,
  decoderLayerForward,
  lookupOrThrow,
  type DecoderLayerSaved,
  type GradLookup,
  type LayerActivations,
  type TokenLayout,
  type WeightLookup,
} from './decoder-layer';

/** A batch of B rows of T tokens, flattened; documents by cu_seqlens; targets < 0 are not scored. */
export interface TokenBatch {
  ids: Int32Array;
  /** The id that should follow each position (negative: not scored). */
  targets: Int32Array;
  cuSeqlens: Int32Array;
  B: number;
  T: number;
}

/** Positions of a batch whose target is scored (≥ 0). */
export function scoredTokens(b: Pick<TokenBatch, 'targets'>): number {
  let n = 0;
  for (const t of b.targets) if (t >= 0) n++;
  return n;
}

export interface DecoderForwardOptions {
  onLayer?: (acts: LayerActivations) => void | Promise<void>;
  /** Run only layers [0, stopAfterLayer] and return their output un-normalised. */
  stopAfterLayer?: number;
  signal?: AbortSignal;
}

export function lmHeadWeight(c: TeacherConfig, w: WeightLookup): Tensor {
  return lookupOrThrow(w, c.tieWordEmbeddings ? 'model.embed_tokens.weight' : 'lm_head.weight');
}

const needWeight = (w: WeightLookup, name: string): Tensor => lookupOrThrow(w, name);
const needGrad = (g: GradLookup, name: string): Tensor => lookupOrThrow(g, name, 'grads');

/** Checks ids and boundaries, and puts ids, RoPE positions and cu_seqlens on the device. */
export async function tokenLayout(
  c: TeacherConfig,
  ids: Int32Array,
  [B, T]: [number, number],
  cuSeqlens: Int32Array | undefined,
  invFreq: Tensor,
  device: string,
): Promise<{ layout: TokenLayout; idsT: Tensor }> {
  const N = B * T;
  if (ids.length !== N) throw new InvalidArgumentError('ids', `${ids.length} ids for shape [${B}, ${T}]`);
  for (let i = 0; i < N; i++) {
    if (ids[i] < 0 || ids[i] >= c.vocabSize) {
      throw new InvalidArgumentError('ids', `token id ${ids[i]} at ${i} is outside the vocabulary (${c.vocabSize})`);
    }
  }
  const cu = cuSeqlens ?? Int32Array.from({ length: B + 1 }, (_, i) => i * T);
  checkBoundaries(cu, N);
  const dev = { device };
  const idsT = await Tensor.fromArray(ids, [N], dev);
  const positions = await Tensor.fromArray(positionsFrom(cu, N), [1, N], dev);
  const cuT = await Tensor.fromArray(cu, [cu.length], dev);
  return { layout: { B, T, positions, cuSeqlens: cuT, invFreq }, idsT };
}

/** Final normalised hidden states [B·T, hidden] (or layer stopAfterLayer's output). */
export async function decoderHidden(
  c: TeacherConfig,
  w: WeightLookup,
  idsT: Tensor,
  layout: TokenLayout,
  options: DecoderForwardOptions = {},
): Promise<Tensor> {
  return scope(async () => {
    let h = await embedding(needWeight(w, 'model.embed_tokens.weight'), idsT);
    const last = Math.min(options.stopAfterLayer ?? c.numLayers - 1, c.numLayers - 1);
    for (let l = 0; l <= last; l++) {
      throwIfAborted(options.signal);
      h = (await decoderLayerForward(c, l, w, h, layout, { onLayer: options.onLayer })).out;
    }
    if (options.stopAfterLayer !== undefined) return h;
    return rmsNorm(h, needWeight(w, 'model.norm.weight'), c.rmsNormEps);
  });
}

/**
 * Summed next-token cross-entropy (nats, f32 on the device) of hidden rows hF [N, hidden], `chunkRows` rows of
 * logits at a time. With `grad`, also dLoss/dhF into grad.dh [N, hidden] (hF's dtype) and dLoss/dW accumulated
 * into grad.dw (f32), for the loss scaled by grad.scale.
 */
export async function lmHeadLoss(
  hF: Tensor,
  head: Tensor,
  targets: Tensor,
  options: { chunkRows?: number; grad?: { dh: Tensor; dw: Tensor; scale: number } } = {},
): Promise<Tensor> {
  const N = hF.shape[0];
  const chunk = options.chunkRows ?? 2048;
  let total: Tensor | undefined;
  for (let r0 = 0; r0 < N; r0 += chunk) {
    const r1 = Math.min(N, r0 + chunk);
    const part = await scope(async () => {
      const rows = hF.rows(r0, r1);
      const logits = await matmul(rows, head, { transB: true, outDtype: hF.dtype === 'f64' ? 'f64' : 'f32' });
      const t = targets.rows(r0, r1);
      const g = options.grad;
      if (!g) return (await sum(await crossEntropy(logits, t))).view([1]);
      // Logits become dLogits in place; the GEMMs read them in the weights' dtype.
      const { loss } = await crossEntropyForwardBackward(logits, t, g.scale, { dLogits: logits });
      const dl = head.dtype === logits.dtype ? logits : await cast(logits, head.dtype);
      await matmul(dl, head, { c: g.dh.rows(r0, r1) });
      await matmul(dl, rows, { transA: true, c: g.dw, beta: 1 });
      return (await sum(loss)).view([1]);
    });
    total = total ? await add(total, part, total) : part;
  }
  return total ?? Tensor.zeros([1], { device: hF.device });
}

export interface ForwardBackwardOptions {
  /** Multiplies the summed loss before differentiation (e.g. 1 / scored tokens of the whole step). */
  lossScale: number;
  chunkRows?: number;
  /** Keep only each layer's input and recompute the layer in the backward (less memory, ~1/3 more work). */
  recompute?: boolean;
  signal?: AbortSignal;
}

/**
 * One forward and backward of the summed next-token cross-entropy of `batch`: parameter gradients are
 * accumulated (added) into `g` (f32 buffers by parameter name). Returns the summed loss (unscaled) and the count
 * of scored tokens.
 */
export async function decoderForwardBackward(
  c: TeacherConfig,
  w: WeightLookup,
  g: GradLookup,
  invFreq: Tensor,
  device: string,
  batch: TokenBatch,
  options: ForwardBackwardOptions,
): Promise<{ lossSum: number; count: number }> {
  const N = batch.B * batch.T;
  if (batch.targets.length !== N) throw new InvalidArgumentError('targets', `${batch.targets.length} targets for ${N} tokens`);
  let count = 0;
  for (let i = 0; i < N; i++) {
    if (batch.targets[i] >= c.vocabSize) throw new InvalidArgumentError('targets', `target ${batch.targets[i]} at ${i} is outside the vocabulary`);
    if (batch.targets[i] >= 0) count++;
  }
  return scope(async () => {
    const { layout, idsT } = await tokenLayout(c, batch.ids, [batch.B, batch.T], batch.cuSeqlens, invFreq, device);
    const targets = await Tensor.fromArray(batch.targets, [N], { device });
    // Forward, keeping what each layer's backward needs (or only its input, with recompute).
    const inputs: Tensor[] = [];
    const saved: Array<DecoderLayerSaved | undefined> = [];
    let h = await embedding(needWeight(w, 'model.embed_tokens.weight'), idsT);
    for (let l = 0; l < c.numLayers; l++) {
      throwIfAborted(options.signal);
      inputs.push(h);
      const r = await decoderLayerForward(c, l, w, h, layout, { save: !options.recompute });
      saved.push(r.saved);
      h = r.out;
    }
    const normW = needWeight(w, 'model.norm.weight');
    const hF = await rmsNorm(h, normW, c.rmsNormEps);
    const head = lmHeadWeight(c, w);
    const headName = c.tieWordEmbeddings ? 'model.embed_tokens.weight' : 'lm_head.weight';
    const dHF = Tensor.empty(hF.shape, { device, dtype: hF.dtype });
    const lossT = await lmHeadLoss(hF, head, targets, {
      chunkRows: options.chunkRows,
      grad: { dh: dHF, dw: needGrad(g, headName), scale: options.lossScale },
    });
    // Backward, layer by layer in reverse.
    const fn = await rmsNormBackward(h, normW, dHF, c.rmsNormEps);
    await add(needGrad(g, 'model.norm.weight'), fn.dw, needGrad(g, 'model.norm.weight'));
    let dh = fn.dx;
    for (let l = c.numLayers - 1; l >= 0; l--) {
      throwIfAborted(options.signal);
      dh = await scope(async () => {
        const s = saved[l] ?? (await decoderLayerForward(c, l, w, inputs[l], layout, { save: true })).saved!;
        const dIn = await decoderLayerBackward(c, l, w, g, s, dh, layout);
        // Free this layer's activations now, not at the end of the step.
        for (const t of Object.values(s)) (t as Tensor | undefined)?.dispose();
        inputs[l].dispose();
        saved[l] = undefined;
        return dIn;
      });
    }
    const dEmb = await embeddingBackward(idsT, dh, c.vocabSize);
    const ge = needGrad(g, 'model.embed_tokens.weight');
    await add(ge, dEmb, ge);
    const lossSum = Number((await lossT.toArray())[0]);
    return { lossSum, count };
  });
}

function checkBoundaries(cu: Int32Array, N: number): void {
  if (cu.length < 2 || cu[0] !== 0 || cu[cu.length - 1] !== N) {
    throw new InvalidArgumentError('cuSeqlens', `must start at 0 and end at ${N}`);
  }
  for (let i = 1; i < cu.length; i++) {
    if (cu[i] < cu[i - 1]) throw new InvalidArgumentError('cuSeqlens', `decreases at entry ${i}`);
  }
}

/** RoPE positions restart at every boundary. */
function positionsFrom(cu: Int32Array, N: number): Int32Array {
  const pos = new Int32Array(N);
  for (let s = 0; s + 1 < cu.length; s++) for (let i = cu[s]; i < cu[s + 1]; i++) pos[i] = i - cu[s];
  return pos;
}

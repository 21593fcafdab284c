/**
 * The hybrid student's Gated DeltaNet layer (DESIGN.md §3), llm.c style: an explicit forward that returns what
 * its backward needs, and an explicit backward that accumulates f32 parameter gradients (no autograd).
 *
 *   q = act(conv(W_q x)),  k = act(conv(W_k x)),  v = act(conv(W_v x))      act ∈ {identity, silu}, conv optional
 *   β = σ(W_b x + b_b),  g = −exp(A_log)·softplus(W_a x + dt_bias)          (fused into the GDN op)
 *   o = GDN(q, k, v, g, β)  with in-kernel q/k L2 norm and scale K^-1/2
 *   y = W_o [RMSNorm_head(o)·w ⊙ SiLU(W_g x + b_g)]                         (RMSNorm over each head's V channels)
 *
 * Heads HV = H (the teacher's query heads), K = V = headDim. Parameter names follow fla's GatedDeltaNet
 * (q_proj, k_proj, v_proj, a_proj, b_proj, g_proj, o_proj, A_log, dt_bias, o_norm, q/k/v_conv1d); b_proj and
 * g_proj carry biases. Projections are in the compute dtype; A_log and dt_bias stay f32 (f64 in an f64 layer),
 * the dtype the GDN op's fused gates take. Varlen: with cuSeqlens (B = 1) the conv and the recurrence restart at
 * every document boundary.
 */
import { InvalidArgumentError } from '../errors';
import type { DType } from '../native';
import { Tensor, keep, scope } from '../tensor';
import { add, cast, fill, randomFill } from '../ops/elementwise';
import { sum } from '../ops/reduce';
import { gdnBackward, gdnForward, type GdnInputs, type GdnOptions, type GdnSaved } from '../ops/gdn';
import { causalConv1d, causalConv1dBackward, gatedRmsNorm, gatedRmsNormBackward, silu, siluBackward } from '../ops/gdn-layer-ops';
import { linearBackward, linearForward } from './linear';

export interface GdnLayerConfig {
  /** Model width (the layer's input and output size). */
  hidden: number;
  /** Heads (HV = H). */
  heads: number;
  /** K = V per head. */
  headDim: number;
  /** Activation of q, k, v after the projection (and conv): identity (default; converted layers) or SiLU (fla). */
  act?: 'identity' | 'silu';
  /** Short causal depthwise convolution on q, k, v (fla's ShortConvolution); off by default. */
  conv?: boolean;
  /** The conv's kernel size (default 4). */
  convSize?: number;
  /** o_norm epsilon (default 1e-5, fla's). */
  eps?: number;
}

/** One q / k / v branch of the forward: the projection, the conv's output, the activation's output. */
interface Branch {
  /** W x [rows, C] (kept only with the conv: its input). */
  lin?: Tensor;
  /** conv(W x) or W x [rows, C] (kept only with SiLU: its input). */
  pre?: Tensor;
  /** act(pre) [B, T, H, D]: the GDN op's input. */
  out: Tensor;
}

/** What backward needs from forward (activations in the compute dtype; a, b in the gates' dtype). */
export interface GdnLayerSaved {
  shape: [number, number];
  x: Tensor;
  q: Branch;
  k: Branch;
  v: Branch;
  a: Tensor;
  b: Tensor;
  /** GDN output [B·T·H, V]. */
  o: Tensor;
  /** W_g x + b_g [B·T·H, V]. */
  gate: Tensor;
  /** The gated norm's output [B·T, H·V]: W_o's input. */
  n: Tensor;
  aLog: Tensor;
  dtBias: Tensor;
  cuSeqlens?: Tensor;
  /** The GDN op's chunk-start states (CUDA): its backward skips the forward recompute. */
  gdn?: GdnSaved;
}

const BRANCHES = ['q', 'k', 'v'] as const;
type BranchName = (typeof BRANCHES)[number];

export class GdnLayer {
  readonly config: Required<GdnLayerConfig>;

  /** A layer over `params` (names and shapes as parameterShapes(); checked here). */
  constructor(config: GdnLayerConfig, readonly params: Map<string, Tensor>) {
    this.config = resolveConfig(config);
    const shapes = GdnLayer.parameterShapes(this.config);
    const dtype = params.get('o_proj.weight')?.dtype;
    for (const [name, shape] of shapes) {
      const t = params.get(name);
      if (!t) throw new InvalidArgumentError('params', `missing ${name}`);
      if (t.shape.join(',') !== shape.join(','))
        throw new InvalidArgumentError('params', `${name} has shape [${t.shape}], expected [${shape}]`);
      if (!isGateParam(name) && t.dtype !== dtype)
        throw new InvalidArgumentError('params', `${name} is ${t.dtype}, the projections are ${dtype}`);
    }
    for (const name of params.keys())
      if (!shapes.has(name)) throw new InvalidArgumentError('params', `unexpected parameter ${name}`);
  }

  /** Every parameter's name and shape (fla's GatedDeltaNet names; conv weights [C, 1, W] like nn.Conv1d). */
  static parameterShapes(config: GdnLayerConfig): Map<string, number[]> {
    const c = resolveConfig(config);
    const hd = c.heads * c.headDim;
    const m = new Map<string, number[]>([
      ['q_proj.weight', [hd, c.hidden]],
      ['k_proj.weight', [hd, c.hidden]],
      ['v_proj.weight', [hd, c.hidden]],
      ['a_proj.weight', [c.heads, c.hidden]],
      ['b_proj.weight', [c.heads, c.hidden]],
      ['b_proj.bias', [c.heads]],
      ['g_proj.weight', [hd, c.hidden]],
      ['g_proj.bias', [hd]],
      ['o_proj.weight', [c.hidden, hd]],
      ['A_log', [c.heads]],
      ['dt_bias', [c.heads]],
      ['o_norm.weight', [c.headDim]],
    ]);
    if (c.conv) for (const b of BRANCHES) m.set(`${b}_conv1d.weight`, [hd, 1, c.convSize]);
    return m;
  }

  /**
   * A seeded random layer: projections Normal(0, 0.02) (biases 0), conv taps Normal(0, 0.5/√W), o_norm 1,
   * A_log = log(Uniform(1, 16)) and dt_bias = softplus⁻¹(Uniform(1e-3, 0.1)) as fla initialises them.
   */
  static async random(config: GdnLayerConfig, options: { device?: string; dtype?: DType; seed?: number } = {}): Promise<GdnLayer> {
    const device = options.device ?? 'cpu';
    const dtype = options.dtype ?? 'f32';
    const gateDtype: DType = dtype === 'f64' ? 'f64' : 'f32';
    const c = resolveConfig(config);
    const params = new Map<string, Tensor>();
    let seed = options.seed ?? 0;
    try {
      for (const [name, shape] of GdnLayer.parameterShapes(c)) {
        const n = shape.reduce((a, b) => a * b, 1);
        let t: Tensor;
        if (name === 'A_log' || name === 'dt_bias') {
          const host = new Float64Array(n);
          const u = await uniforms(n, seed++);
          for (let i = 0; i < n; i++) {
            if (name === 'A_log') host[i] = Math.log(1 + 15 * u[i]);
            else {
              const dt = Math.exp(Math.log(1e-3) + u[i] * (Math.log(0.1) - Math.log(1e-3)));
              host[i] = dt + Math.log(-Math.expm1(-dt)); // softplus⁻¹(dt)
            }
          }
          t = await Tensor.fromArray(gateDtype === 'f64' ? host : Float32Array.from(host), shape, { device, dtype: gateDtype });
        } else {
          t = Tensor.empty(shape, { device, dtype });
          if (name === 'o_norm.weight') await fill(t, 1);
          else if (name.endsWith('.bias')) await fill(t, 0);
          else await randomFill(t, { kind: 'normal', std: name.includes('conv1d') ? 0.5 / Math.sqrt(c.convSize) : 0.02 }, seed++);
        }
        params.set(name, keep(t));
      }
      return new GdnLayer(c, params);
    } catch (e) {
      for (const t of params.values()) t.dispose();
      throw e;
    }
  }

  /** Zeroed gradient accumulators named like the parameters: f32 (f64 for an f64 layer). */
  async createGradients(): Promise<Map<string, Tensor>> {
    const grads = new Map<string, Tensor>();
    for (const [name, p] of this.params) {
      const dtype: DType = p.dtype === 'f64' ? 'f64' : 'f32';
      grads.set(name, keep(await Tensor.zeros(p.shape, { device: p.device, dtype })));
    }
    return grads;
  }

  dispose(): void {
    for (const t of this.params.values()) t.dispose();
  }

  private p(name: string): Tensor {
    return this.params.get(name)!;
  }

  /** y [B, T, hidden] for x [B, T, hidden]; `saved` holds what backward needs (dispose it, or let a scope). */
  async forward(x: Tensor, options: { cuSeqlens?: Tensor } = {}): Promise<{ y: Tensor; saved: GdnLayerSaved }> {
    const c = this.config;
    if (x.shape.length !== 3 || x.shape[2] !== c.hidden)
      throw new InvalidArgumentError('x', `expected [B, T, ${c.hidden}], got [${x.shape}]`);
    const dtype = this.p('o_proj.weight').dtype;
    if (x.dtype !== dtype) throw new InvalidArgumentError('x', `dtype ${x.dtype} differs from the parameters' ${dtype}`);
    const [B, T] = x.shape;
    const H = c.heads, D = c.headDim;
    const gateDtype: DType = dtype === 'f64' ? 'f64' : 'f32';
    return scope(async () => {
      const branch = async (name: BranchName): Promise<Branch> => {
        const lin = await linearForward(x, this.p(`${name}_proj.weight`));
        const pre = c.conv
          ? (await causalConv1d(lin.view([B, T, H * D]), this.p(`${name}_conv1d.weight`), { cuSeqlens: options.cuSeqlens })).view(lin.shape)
          : lin;
        const out = (c.act === 'silu' ? await silu(pre) : pre).view([B, T, H, D]);
        return { lin: c.conv ? lin : undefined, pre: c.act === 'silu' ? pre : undefined, out };
      };
      const q = await branch('q');
      const k = await branch('k');
      const v = await branch('v');
      const a = await toDtype(await linearForward(x, this.p('a_proj.weight')), gateDtype);
      const b = await toDtype(await linearForward(x, this.p('b_proj.weight'), this.p('b_proj.bias')), gateDtype);
      const aLog = await toDtype(this.p('A_log'), gateDtype);
      const dtBias = await toDtype(this.p('dt_bias'), gateDtype);

      // 'full': the chunk states plus the backward prep's outputs, so the backward skips its prep (H200 session 9
      // run 3, B8·T4096·H16·D128: f+b 2.316 ms against 2.634 with the states alone, for 145 MB more per layer).
      const { o, saved: gdn } = await gdnForward(gdnInputs(q, k, v, a, b, [B, T, H]), {
        ...gdnOptions(dtype, aLog, dtBias, options.cuSeqlens), saveForBackward: 'full',
      });
      const gate = await linearForward(x, this.p('g_proj.weight'), this.p('g_proj.bias'));
      const n = await gatedRmsNorm(o.view([B * T * H, D]), this.p('o_norm.weight'), gate.view([B * T * H, D]), c.eps);
      const y = (await linearForward(n.view([B * T, H * D]), this.p('o_proj.weight'))).view([B, T, c.hidden]);
      const saved: GdnLayerSaved = {
        shape: [B, T], x, q, k, v, a, b, aLog, dtBias, cuSeqlens: options.cuSeqlens, gdn,
        o: o.view([B * T * H, D]), gate: gate.view([B * T * H, D]), n: n.view([B * T, H * D]),
      };
      return { y, saved };
    });
  }

  /** dx [B, T, hidden] for dy [B, T, hidden]; every parameter's gradient is added to `grads` (named like params). */
  async backward(saved: GdnLayerSaved, dy: Tensor, grads: Map<string, Tensor>): Promise<Tensor> {
    const c = this.config;
    const [B, T] = saved.shape;
    const H = c.heads, D = c.headDim;
    const g = (name: string): Tensor => {
      const t = grads.get(name);
      if (!t) throw new InvalidArgumentError('grads', `missing ${name}`);
      return t;
    };
    const dtype = saved.x.dtype;
    return scope(async () => {
      // y = W_o n
      const dn = (await linearBackward(saved.n, this.p('o_proj.weight'), dy.view([B * T, c.hidden]), { dw: g('o_proj.weight') }))!;
      // n = rmsnorm(o)·w ⊙ silu(gate)
      const { dx: dO, dGate } = await gatedRmsNormBackward(saved.o, this.p('o_norm.weight'), saved.gate, dn.view(saved.o.shape), c.eps, {
        accumulate: true, out: { dw: g('o_norm.weight') },
      });
      const dx = (await linearBackward(saved.x, this.p('g_proj.weight'), dGate, { dw: g('g_proj.weight'), db: g('g_proj.bias') }))!;
      // o = GDN(q, k, v, a, b)
      const gr = await gdnBackward(
        gdnInputs(saved.q, saved.k, saved.v, saved.a, saved.b, [B, T, H]),
        dO.view([B, T, H, D]),
        { ...gdnOptions(dtype, saved.aLog, saved.dtBias, saved.cuSeqlens), saved: saved.gdn },
      );
      await addInto(g('A_log'), gr.dALog!);
      await addInto(g('dt_bias'), gr.dDtBias!);
      const da = await toDtype(gr.dg, dtype);
      const db = await toDtype(gr.dbeta, dtype);
      await linearBackward(saved.x, this.p('a_proj.weight'), da, { dw: g('a_proj.weight') }, { dxInto: dx });
      await linearBackward(saved.x, this.p('b_proj.weight'), db, { dw: g('b_proj.weight') }, { dxInto: dx });
      await addBiasGrad(g('b_proj.bias'), gr.dbeta); // the f32 d b, before rounding
      // q, k, v = act(conv(W x))
      const dOut: Record<BranchName, Tensor> = { q: gr.dq, k: gr.dk, v: gr.dv };
      for (const name of BRANCHES) {
        const br = saved[name];
        let d = dOut[name].view([B * T, H * D]);
        if (c.act === 'silu') d = await siluBackward(br.pre!, d, d);
        if (c.conv) {
          const w = this.p(`${name}_conv1d.weight`);
          const r = await causalConv1dBackward(br.lin!.view([B, T, H * D]), w, d.view([B, T, H * D]), {
            cuSeqlens: saved.cuSeqlens, accumulate: true, out: { dw: g(`${name}_conv1d.weight`) },
          });
          d = r.dx.view([B * T, H * D]);
        }
        await linearBackward(saved.x, this.p(`${name}_proj.weight`), d, { dw: g(`${name}_proj.weight`) }, { dxInto: dx });
      }
      return dx.view([B, T, c.hidden]);
    });
  }
}

function resolveConfig(c: GdnLayerConfig): Required<GdnLayerConfig> {
  const r: Required<GdnLayerConfig> = {
    hidden: c.hidden, heads: c.heads, headDim: c.headDim,
    act: c.act ?? 'identity', conv: c.conv ?? false, convSize: c.convSize ?? 4, eps: c.eps ?? 1e-5,
  };
  for (const key of ['hidden', 'heads', 'headDim', 'convSize'] as const)
    if (!Number.isInteger(r[key]) || r[key] < 1) throw new InvalidArgumentError(key, `expected a positive integer, got ${r[key]}`);
  if (r.act !== 'identity' && r.act !== 'silu') throw new InvalidArgumentError('act', `expected 'identity' or 'silu', got '${r.act}'`);
  if (!(r.eps >= 0) || !Number.isFinite(r.eps)) throw new InvalidArgumentError('eps', 'must be finite and ≥ 0');
  return r;
}

const isGateParam = (name: string) => name === 'A_log' || name === 'dt_bias';

function gdnInputs(q: Branch, k: Branch, v: Branch, a: Tensor, b: Tensor, gateShape: number[]): GdnInputs {
  return { q: q.out, k: k.out, v: v.out, g: a.view(gateShape), beta: b.view(gateShape) };
}

function gdnOptions(dtype: DType, aLog: Tensor, dtBias: Tensor, cuSeqlens?: Tensor): GdnOptions {
  return { l2norm: true, gates: { aLog, dtBias }, cuSeqlens, ...(dtype === 'f64' ? { precision: 'f64' as const } : {}) };
}

/** t itself when it already has `dtype`, else a cast copy. */
async function toDtype(t: Tensor, dtype: DType): Promise<Tensor> {
  return t.dtype === dtype ? t : cast(t, dtype);
}

/** acc += t (t cast to acc's dtype first when they differ). */
async function addInto(acc: Tensor, t: Tensor): Promise<void> {
  await add(acc, await toDtype(t, acc.dtype), acc);
}

/** db += Σ_rows dy for an f32 dy (b_proj's bias takes the GDN's f32 d b, before its rounding to the compute dtype). */
async function addBiasGrad(acc: Tensor, dy: Tensor): Promise<void> {
  await addInto(acc, await sum(dy.view([dy.numel / acc.numel, acc.numel]), { axis: 0 }));
}

/** n Uniform(0, 1) draws (the seeded device generator, on the host). */
async function uniforms(n: number, seed: number): Promise<Float64Array> {
  return scope(async () => {
    const t = await randomFill(Tensor.empty([n], { device: 'cpu', dtype: 'f64' }), { kind: 'uniform' }, seed);
    return (await t.toArray()) as Float64Array;
  });
}

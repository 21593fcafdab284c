"""Peer for bench/attention.ts: torch.nn.functional.scaled_dot_product_attention (causal, GQA) on the same GPU,
same shapes, bf16, through the FlashAttention backend.

Run on the GPU host by the benchmark itself:  python3 bench/peers/torch_sdpa.py '<json>'
The argument is {"shapes": [{"name", "B", "T", "H", "HKV", "D"}], "check": {"B", "T", "H", "HKV", "D"},
"dump": "<dir>"}. Each shape prints one JSON line {"name", "ms", "tflops", "gqa", "bwd_ms", "bwd_tflops",
"bwd_gqa"}; "gqa" says whether the flash backend took enable_gqa or K/V had to be repeated per query head. The
backward is o.backward(dO) of the same call (dO ~ N(0, 1)), FLOPs counted as 2.5× the forward's. For "check",
q/k/v ([B,T,H|HKV,D], bf16 bits), SDPA's o ([B,T,H,D]), a dO and SDPA's dq/dk/dv (dk/dv [B,T,HKV,D], summed
over each group) are written as raw little-endian files into "dump" so the benchmark can run our kernels on
identical inputs.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel


def sdpa(q, k, v, gqa_native):
    """q [B,T,H,D], k/v [B,T,HKV,D] (our layout) → o [B,H,T,D] view order of SDPA."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if gqa_native:
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    rep = q.shape[2] // k.shape[2]
    return F.scaled_dot_product_attention(
        qt, kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1), is_causal=True)


def pick_mode(q, k, v):
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa(q, k, v, True)
        torch.cuda.synchronize()
        return True, None
    except Exception as e:  # noqa: BLE001 - report why and fall back
        return False, str(e).splitlines()[0][:300]


def backward_ms(q, k, v, native):
    """Median ms of SDPA's backward alone (the forward graph is built once and retained)."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = sdpa(q, k, v, native)
    g = torch.randn_like(o)
    return triton.testing.do_bench(lambda: o.backward(g, retain_graph=True), warmup=20, rep=500,
                                   grad_to_none=[q, k, v], return_mode="median")


def inputs(s, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: torch.randn(s["B"], s["T"], h, s["D"], device="cuda", dtype=torch.bfloat16, generator=g)
    return mk(s["H"]), mk(s["HKV"]), mk(s["HKV"])


def main() -> None:
    arg = json.loads(sys.argv[1])
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name()}), flush=True)
    for s in arg["shapes"]:
        q, k, v = inputs(s, 1)
        native, why = pick_mode(q, k, v)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ms = triton.testing.do_bench(lambda: sdpa(q, k, v, native), warmup=100, rep=500, return_mode="median")
        flops = 4 * s["B"] * s["H"] * s["T"] ** 2 * s["D"] / 2
        try:
            bwd_native = native
            bms = backward_ms(q, k, v, native)
        except Exception:  # noqa: BLE001 - flash backward without GQA support: repeat K/V
            bwd_native = False
            bms = backward_ms(q, k, v, False)
        print(json.dumps({"name": s["name"], "ms": ms, "tflops": flops / ms / 1e9,
                          "gqa": "enable_gqa" if native else "repeated K/V", "why": why,
                          "bwd_ms": bms, "bwd_tflops": 2.5 * flops / bms / 1e9,
                          "bwd_gqa": "enable_gqa" if bwd_native else "repeated K/V"}), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    c = arg.get("check")
    if c:
        q, k, v = inputs(c, 7)
        native, _ = pick_mode(q, k, v)
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = sdpa(qg, kg, vg, native).transpose(1, 2).contiguous()
        do = torch.randn(o.shape, device="cuda", dtype=torch.bfloat16,
                         generator=torch.Generator(device="cuda").manual_seed(8))
        o.backward(do)
        d = arg["dump"]
        os.makedirs(d, exist_ok=True)
        for name, t in (("q", q), ("k", k), ("v", v), ("o", o.detach()), ("do", do), ("dq", qg.grad),
                        ("dk", kg.grad), ("dv", vg.grad)):
            t.contiguous().view(torch.int16).cpu().numpy().tofile(os.path.join(d, f"{name}.bin"))
        print(json.dumps({"name": "check", "dump": d}), flush=True)


if __name__ == "__main__":
    main()

"""Peer for bench/gdn.ts: fla's Triton chunk_gated_delta_rule on the same GPU, same inputs, same run.

Run on the GPU host by the benchmark itself (fla's `fla/` package copied to .fla/ and on PYTHONPATH):
    python3 bench/peers/fla_gdn.py '<json list of shapes>'
Each shape is {"name", "B", "T", "H", "HV", "K", "V", "dir"}: `dir` holds q.bin, k.bin, v.bin (bf16 words),
g.bin, beta.bin (f32) written by bench/gdn.ts; this writes o.bin (fla's forward output, bf16 words) there.
Prints one JSON object per shape: forward and forward+backward medians (triton.testing.do_bench).
fla's backward refuses Hopper under Triton < 3.7.1 (its issue #640); for timing only, the flag below lets it
run (DESIGN.md §6) — its gradients are never used as a reference.
"""
import json
import os
import sys

import numpy as np
import torch
import triton.testing


def load(path, dtype, shape):
    if dtype == "bf16":
        a = np.fromfile(path, dtype=np.int16)
        return torch.from_numpy(a).view(torch.bfloat16).reshape(shape).cuda()
    return torch.from_numpy(np.fromfile(path, dtype=np.float32)).reshape(shape).cuda()


def main() -> None:
    shapes = json.loads(sys.argv[1])
    import fla.ops.common.chunk_o as chunk_o

    chunk_o.TRITON_ABOVE_3_7_1 = True
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    for s in shapes:
        B, T, H, HV, K, V, d = s["B"], s["T"], s["H"], s["HV"], s["K"], s["V"], s["dir"]
        q = load(os.path.join(d, "q.bin"), "bf16", (B, T, H, K))
        k = load(os.path.join(d, "k.bin"), "bf16", (B, T, H, K))
        v = load(os.path.join(d, "v.bin"), "bf16", (B, T, HV, V))
        g = load(os.path.join(d, "g.bin"), "f32", (B, T, HV))
        beta = load(os.path.join(d, "beta.bin"), "f32", (B, T, HV))

        def fwd():
            return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]

        with torch.no_grad():
            o = fwd()
        o.contiguous().view(torch.int16).cpu().numpy().tofile(os.path.join(d, "o.bin"))
        with torch.no_grad():
            fwd_ms = triton.testing.do_bench(fwd, warmup=100, rep=500, return_mode="median")
        qg, kg, vg, gg, bg = (x.clone().requires_grad_(True) for x in (q, k, v, g, beta))
        do = torch.randn_like(o)

        def fwd_bwd():
            out = chunk_gated_delta_rule(qg, kg, vg, gg, bg, use_qk_l2norm_in_kernel=True)[0]
            out.backward(do)

        fb_ms = triton.testing.do_bench(fwd_bwd, warmup=100, rep=500, grad_to_none=[qg, kg, vg, gg, bg],
                                        return_mode="median")
        print(json.dumps({"name": s["name"], "fwd_ms": fwd_ms, "fwdbwd_ms": fb_ms}), flush=True)
        del q, k, v, g, beta, qg, kg, vg, gg, bg, o, do
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

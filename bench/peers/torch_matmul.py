"""Peer for bench/matmul.ts: torch.matmul on the same GPU, same shapes, bf16 in / bf16 out.

Run on the GPU host by the benchmark itself:  python3 bench/peers/torch_matmul.py '<json list of shapes>'
Each shape is {"name", "m", "n", "k", "transB"}; prints one JSON object per line.
"""
import json
import sys

import torch
import triton.testing


def main() -> None:
    shapes = json.loads(sys.argv[1])
    torch.manual_seed(0)
    for s in shapes:
        m, n, k = s["m"], s["n"], s["k"]
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) if s["transB"] else torch.randn(
            k, n, device="cuda", dtype=torch.bfloat16)
        fn = (lambda: torch.matmul(a, b.t())) if s["transB"] else (lambda: torch.matmul(a, b))
        ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
        print(json.dumps({"name": s["name"], "ms": ms, "tflops": 2 * m * n * k / ms / 1e9}), flush=True)


if __name__ == "__main__":
    main()

"""Peer for bench/pretrain.ts: training-step throughput of transformers' LlamaForCausalLM on the same GPU and
shapes (SDPA attention, AdamW with global-norm clipping 1.0), in three setups:
  eager-amp       fp32 parameters, torch.autocast(bfloat16) forward/backward (mixed precision, as ours:
                  fp32 masters, bf16 compute), fused AdamW
  eager-bf16      parameters in bfloat16 (no fp32 masters), fused AdamW
  compiled-amp    eager-amp under torch.compile
Run on the GPU host by the benchmark:  python3 bench/peers/torch_llama_train.py '<json>'
The argument is {"model": {LlamaConfig fields}, "B", "T", "steps", "warmup", "setups": [...]}; each setup prints
one JSON line {"setup", "ms", "tokens_per_s", "loss0", "loss_last", "peak_gb"} (or {"setup", "error"}).
"""
import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def run(setup, arg):
    torch.manual_seed(0)
    cfg = LlamaConfig(**arg["model"], attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).cuda()
    if setup == "eager-bf16":
        model = model.to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    step_model = torch.compile(model) if setup.startswith("compiled") else model
    amp = setup.endswith("amp")
    B, T = arg["B"], arg["T"]
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda", generator=g)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    losses = []
    for _ in range(arg["warmup"] + (3 if setup.startswith("compiled") else 0)):
        losses.append(step().item())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(arg["steps"]):
        loss = step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1000 / arg["steps"]
    return {"setup": setup, "ms": ms, "tokens_per_s": B * T / (ms / 1000), "loss0": losses[0],
            "loss_last": loss.item(), "peak_gb": torch.cuda.max_memory_allocated() / 2**30}


def main():
    arg = json.loads(sys.argv[1])
    for setup in arg.get("setups", ["eager-amp", "eager-bf16", "compiled-amp"]):
        try:
            print(json.dumps(run(setup, arg)), flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on with the next setup
            print(json.dumps({"setup": setup, "error": str(e).splitlines()[0][:300] if str(e) else repr(e)}), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

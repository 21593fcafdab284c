"""Loads an exported teacher directory with transformers (AutoModelForCausalLM / AutoTokenizer, fp32) and scores
given token rows: the check that `tcal pretrain`'s export is a model transformers reads.
Run by bench/teachers.ts:  python3 bench/peers/hf_load_check.py '{"dir": ..., "ids": [[...], ...]}'
Prints one JSON line {"architecture", "parameters", "mean_loss", "tokens", "tokenizer_roundtrip"}.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    arg = json.loads(sys.argv[1])
    model = AutoModelForCausalLM.from_pretrained(arg["dir"], torch_dtype=torch.float32).cuda().eval()
    tok = AutoTokenizer.from_pretrained(arg["dir"])
    ids = torch.tensor(arg["ids"], device="cuda")
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="mean")
    text = "def hello(name):\n    return f'hi {name}'\n"
    roundtrip = tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    print(json.dumps({"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
                      "mean_loss": loss.item(), "tokens": int(ids[:, 1:].numel()), "tokenizer_roundtrip": roundtrip}))


if __name__ == "__main__":
    main()

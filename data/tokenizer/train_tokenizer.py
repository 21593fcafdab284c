#!/usr/bin/env python3
"""Trains the byte-level BPE tokenizer of our own teachers (DESIGN.md §7) on the corpus sample.

Run on a host with Hugging Face `tokenizers` (0.23 on the GPU host; no network needed):

    python3 data/tokenizer/train_tokenizer.py            # writes data/tokenizer/tokenizer.json + tokenizer_config.json

Tokenizer: BPE over bytes (the 256-symbol ByteLevel alphabet, so every text encodes; no unknown token),
ByteLevel pre-tokenizer (GPT-2 split regex, no prefix space) and ByteLevel decoder, vocab 4096 including
three special tokens with fixed ids: <|bos|> = 0, <|eos|> = 1, <|pad|> = 2.

BOS / EOS: every document is <|bos|> text <|eos|>. Both files say so, and agree:
  * tokenizer.json's post-processor is TemplateProcessing("<|bos|> $A <|eos|>") (what `tokenizers` and
    transformers' fast tokenizer add when asked for special tokens);
  * tokenizer_config.json has add_bos_token = add_eos_token = true, which lib/io/tokenizer.ts reads first
    (and which transformers' Llama-style tokenizers use to rebuild the same post-processor).
Our dataset packing (lib/io/dataset.ts) takes that policy from the loaded tokenizer and puts BOS/EOS
around every document itself, so documents packed back to back stay delimited. <|pad|> is only ever
written into padding, which attention masks exclude.

The BPE trainer is deterministic for a given corpus and `tokenizers` version; the script prints the
sha256 of what it wrote.
"""
import argparse
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=os.path.join(HERE, "..", "corpus", "python-stdlib-sample.txt"))
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--model-max-length", type=int, default=4096)
    args = ap.parse_args()

    import tokenizers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=SPECIALS,  # ids 0, 1, 2 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([args.corpus], trainer)

    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    if [ids[t] for t in SPECIALS] != [0, 1, 2]:
        sys.exit(f"special token ids are {ids}, expected 0, 1, 2")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A <|eos|>",
        pair="<|bos|> $A <|eos|> <|bos|> $B <|eos|>",
        special_tokens=[("<|bos|>", ids["<|bos|>"]), ("<|eos|>", ids["<|eos|>"])],
    )

    # Checks before writing: the vocabulary is full, every byte round-trips, BOS/EOS are added as documented.
    if tok.get_vocab_size() != args.vocab_size:
        sys.exit(f"vocabulary has {tok.get_vocab_size()} entries, expected {args.vocab_size}")
    probe = "def f(x):\n    return x ** 2  # ünïcode ✓ \t\r\n"
    enc = tok.encode(probe)
    if enc.ids[0] != ids["<|bos|>"] or enc.ids[-1] != ids["<|eos|>"]:
        sys.exit(f"post-processor does not wrap a text in BOS/EOS: {enc.ids[:3]} ... {enc.ids[-3:]}")
    plain = tok.encode(probe, add_special_tokens=False).ids
    if tok.decode(plain) != probe:
        sys.exit(f"decode(encode(x)) != x: {tok.decode(plain)!r}")
    if tok.decode(enc.ids, skip_special_tokens=True) != probe:
        sys.exit("decoding with skip_special_tokens does not give the text back")

    os.makedirs(args.out, exist_ok=True)
    tokenizer_file = os.path.join(args.out, "tokenizer.json")
    tok.save(tokenizer_file, pretty=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "add_bos_token": True,
        "add_eos_token": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": args.model_max_length,
    }
    config_file = os.path.join(args.out, "tokenizer_config.json")
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

    with open(args.corpus, "rb") as f:
        corpus_sha = hashlib.sha256(f.read()).hexdigest()
    n_tokens = len(tok.encode(open(args.corpus, encoding="utf-8").read(), add_special_tokens=False).ids)
    print(f"tokenizers {tokenizers.__version__}; corpus sha256 {corpus_sha}; {n_tokens} tokens "
          f"({os.path.getsize(args.corpus) / n_tokens:.2f} bytes/token)")
    for path in (tokenizer_file, config_file):
        with open(path, "rb") as f:
            print(f"{hashlib.sha256(f.read()).hexdigest()}  {os.path.relpath(path)}")


if __name__ == "__main__":
    main()

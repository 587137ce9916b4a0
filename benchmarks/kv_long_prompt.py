"""Decoding speed after a long prompt with and without a compressed KV cache, in one process: `ar` and `pld`
on the plain cache and on a compressed one, interleaved, warm-up excluded, best of --repeats by wall time.

    python benchmarks/kv_long_prompt.py --model smollm2-135m --prompt-tokens 4000 --max-new-tokens 64 \
        --kv-cache gear --kv-bits 4 --threads 2

The prompt is the first --prompt-tokens tokens of the built-in long text (`leapdecode perplexity`'s: Python's
pydoc topics), fed raw (no chat template). Wall times include the prompt pass. Also prints whether `pld`
equals `ar` on each cache and how many of the compressed cache's `ar` tokens equal the plain cache's.
"""
from __future__ import annotations

import argparse

import torch

from leapdecode import Decoder
from leapdecode.bench.perplexity import builtin_text
from leapdecode.loading import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-tokens", type=int, default=4000)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--kv-cache", default="gear", choices=["gear", "quant"])
    ap.add_argument("--kv-bits", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = load(args.model)
    ids = target.tokenizer(builtin_text()[1])["input_ids"][: args.prompt_tokens]
    compressed = {"kv_cache": args.kv_cache, "kv_bits": args.kv_bits}
    runs = [(m, cache, Decoder(target, m, **options)) for m in ("ar", "pld")
            for cache, options in (("plain", {}), (f"{args.kv_cache}-{args.kv_bits}", compressed))]
    for _, _, decoder in runs:  # warm-up
        decoder.generate(ids[:300], max_new_tokens=8)
    walls: dict[int, list[float]] = {i: [] for i in range(len(runs))}
    tokens: dict[int, list[int]] = {}
    for _ in range(args.repeats):
        for i, (_, _, decoder) in enumerate(runs):
            result = decoder.generate(ids, max_new_tokens=args.max_new_tokens)
            walls[i].append(result.stats.wall_time)
            tokens[i] = list(result.token_ids)
    for i, (method, cache, _) in enumerate(runs):
        wall = min(walls[i])
        print(f"{method:4s} {cache:8s} {len(tokens[i])} tokens in {wall:.2f} s: {len(tokens[i]) / wall:.2f} tokens/s")
    same = sum(a == b for a, b in zip(tokens[0], tokens[1]))
    print(f"pld == ar: plain {tokens[2] == tokens[0]}, compressed {tokens[3] == tokens[1]}; "
          f"compressed ar equals plain ar on {same} of {len(tokens[0])} tokens")


if __name__ == "__main__":
    main()

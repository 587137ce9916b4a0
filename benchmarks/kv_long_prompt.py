"""Decoding speed after a long prompt with and without a compressed KV cache, in one process: `ar` and `pld`
on the plain cache and on compressed ones, interleaved, warm-up excluded, best of --repeats by wall time.

    python benchmarks/kv_long_prompt.py --model smollm2-135m --prompt-tokens 4000 --max-new-tokens 64 \
        --kv-cache gear --kv-bits 4,2 --threads 2

The prompt is the first --prompt-tokens tokens of the built-in long text (`leapdecode perplexity`'s: Python's
pydoc topics), fed raw (no chat template). Wall times include the prompt pass; the prompt pass (prefill) and the
mean time of a decoding step after it (the first step, which compresses the prompt's blocks, included) are
printed apart. Also prints whether `pld` equals `ar` on each cache and how many of each compressed cache's `ar`
tokens equal the plain cache's.
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
    ap.add_argument("--kv-bits", default="4", help="comma-separated bit widths, e.g. 4,2")
    ap.add_argument("--methods", default="ar,pld")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = load(args.model)
    ids = target.tokenizer(builtin_text()[1])["input_ids"][: args.prompt_tokens]
    caches = [("plain", {})] + [(f"{args.kv_cache}-{b}", {"kv_cache": args.kv_cache, "kv_bits": int(b)})
                                for b in args.kv_bits.split(",")]
    runs = [(m, cache, Decoder(target, m, **options)) for m in args.methods.split(",") for cache, options in caches]
    for _, _, decoder in runs:  # warm-up
        decoder.generate(ids[:300], max_new_tokens=8)
    best: dict[int, object] = {}
    for _ in range(args.repeats):
        for i, (_, _, decoder) in enumerate(runs):
            stats = decoder.generate(ids, max_new_tokens=args.max_new_tokens)
            if i not in best or stats.stats.wall_time < best[i].stats.wall_time:
                best[i] = stats
    print(f"{target.name}, {len(ids)}-token prompt, {args.max_new_tokens} new tokens, best of {args.repeats}")
    for i, (method, cache, _) in enumerate(runs):
        result = best[i]
        s = result.stats
        n = len(result.token_ids)
        step = (s.wall_time - s.prefill_time) / max(1, n) * 1000
        plain = next(j for j, r in enumerate(runs) if r[0] == method and r[1] == "plain")
        print(f"{method:4s} {cache:8s} {n} tokens in {s.wall_time:.2f} s: {n / s.wall_time:.2f} tokens/s "
              f"({s.wall_time and best[plain].stats.wall_time / s.wall_time:.2f}x plain), prefill "
              f"{s.prefill_time:.2f} s, {step:.1f} ms a token after it")
    for cache, _ in caches:
        ar = next(i for i, r in enumerate(runs) if r[0] == "ar" and r[1] == cache)
        ref = next(i for i, r in enumerate(runs) if r[0] == "ar" and r[1] == "plain")
        same = sum(a == b for a, b in zip(best[ar].token_ids, best[ref].token_ids))
        others = [f"{r[0]} == ar: {best[i].token_ids == best[ar].token_ids}" for i, r in enumerate(runs)
                  if r[1] == cache and r[0] != "ar"]
        print(f"{cache}: {', '.join(others)}; ar equals plain ar on {same} of {len(best[ref].token_ids)} tokens")


if __name__ == "__main__":
    main()

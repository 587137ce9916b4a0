"""Decoding speed after a long prompt with and without a compressed KV cache, in one process: `ar` and `pld`
on the plain cache and on compressed ones, interleaved, warm-up excluded, best of --repeats by wall time.

    python benchmarks/kv_long_prompt.py --model smollm2-135m --prompt-tokens 4000 --max-new-tokens 64 \
        --kv-cache gear --kv-bits 4,2 --threads 2

The prompt is the first --prompt-tokens tokens of the built-in long text (`leapdecode perplexity`'s: Python's
pydoc topics), fed raw (no chat template). Wall times include the prompt pass. Printed apart: the prompt pass
(prefill), the first step after it (which compresses the prompt's blocks), and the median time a token of the
later steps (a step's time over the tokens it committed). Also prints whether `pld` equals `ar` on each cache
and how many of each compressed cache's `ar` tokens equal the plain cache's.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from leapdecode import Decoder
from leapdecode.bench.perplexity import builtin_text
from leapdecode.loading import load
from leapdecode.step import settings as generation_settings


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
    best: dict[int, tuple] = {}
    for _ in range(args.repeats):
        for i, (_, _, decoder) in enumerate(runs):
            timed = _timed(decoder, ids, args.max_new_tokens)
            if i not in best or timed[0].stats.wall_time < best[i][0].stats.wall_time:
                best[i] = timed
    print(f"{target.name}, {len(ids)}-token prompt, {args.max_new_tokens} new tokens, best of {args.repeats}")
    for i, (method, cache, _) in enumerate(runs):
        result, first, per_token = best[i]
        s = result.stats
        n = len(result.token_ids)
        plain = best[next(j for j, r in enumerate(runs) if r[0] == method and r[1] == "plain")]
        print(f"{method:4s} {cache:8s} {n} tokens in {s.wall_time:.2f} s: {n / s.wall_time:.2f} tokens/s "
              f"({plain[0].stats.wall_time / s.wall_time:.2f}x plain); prefill {s.prefill_time:.2f} s, first step "
              f"{first * 1000:.0f} ms, then {per_token * 1000:.1f} ms a token ({plain[2] / per_token:.2f}x plain)")
    for cache, _ in caches:
        ar = next(i for i, r in enumerate(runs) if r[0] == "ar" and r[1] == cache)
        ref = next(i for i, r in enumerate(runs) if r[0] == "ar" and r[1] == "plain")
        tokens = {i: timed[0].token_ids for i, timed in best.items()}
        same = sum(a == b for a, b in zip(tokens[ar], tokens[ref]))
        others = [f"{r[0]} == ar: {tokens[i] == tokens[ar]}" for i, r in enumerate(runs)
                  if r[1] == cache and r[0] != "ar"]
        print(f"{cache}: {', '.join(others)}; ar equals plain ar on {same} of {len(tokens[ref])} tokens")


def _timed(decoder, ids: list[int], max_new_tokens: int):
    """The result, the first step's seconds (prefill excluded) and the median seconds a token of the others, from
    the engine's steps (`Decoder._commits` yields the sequence after each)."""
    stamps, counts = [], []
    start = time.perf_counter()
    row = None
    for row in decoder._commits(ids, generation_settings(max_new_tokens=max_new_tokens)):
        stamps.append(time.perf_counter())
        counts.append(row.produced)
    result = row.result()
    first = stamps[0] - start - result.stats.prefill_time
    per_token = [(b - a) / max(1, m - k) for a, b, k, m in zip(stamps, stamps[1:], counts, counts[1:])]
    return result, first, statistics.median(per_token) if per_token else 0.0


if __name__ == "__main__":
    main()

"""In-process A/B of the Q6_K layers' two forms on Qwen2.5-Coder-1.5B, compiled: GGUF's 6-bit blocks as they are
(`Int6Linear`, the runtime's choice) against the same layers re-quantized to 8-bit groups (the previous form).
Both models are loaded and compiled in this process; pass costs and `ar`'s time per token are measured
alternately on the suite's first code edits.

    python benchmarks/q6k_ab.py [--rounds 2] [--threads 2]

The first run compiles both graphs (about 20-25 minutes each on a 2-core VM; then read from inductor's cache).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from leapdecode import Decoder
from leapdecode.loading import load, with_compiled_passes
from leapdecode.runtime.pass_cost import pass_cost_ms
from leapdecode.runtime.quantized import Int6Linear, Int8GroupLinear

WIDTHS = (1, 2, 4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    six = load("qwen2.5-coder-1.5b", compile=True)
    eight = load("qwen2.5-coder-1.5b")
    for name, module in list(eight.model.named_modules()):
        if isinstance(module, Int6Linear):
            parent, _, child = name.rpartition(".")
            setattr(eight.model.get_submodule(parent), child, Int8GroupLinear.from_float(module.weight))
    eight = with_compiled_passes(eight)
    suite = Path(__file__).parent / "suite.jsonl"
    questions = [json.loads(line) for line in suite.read_text().splitlines() if line.strip()]
    prompts = [[{"role": "user", "content": q["turns"][0]}] for q in questions if q["category"] == "code_editing"][:3]
    models = {"6-bit": six, "8-bit groups": eight}
    decoders = {label: Decoder(m, "ar") for label, m in models.items()}
    for decoder in decoders.values():  # warm-up
        decoder.generate(prompts[0], max_new_tokens=8)
    per_token = {label: [] for label in models}
    costs = {label: [] for label in models}
    for _ in range(args.rounds):
        for label, model in models.items():
            costs[label].append(pass_cost_ms(model.model, widths=WIDTHS, repeats=3))
            for prompt in prompts:
                out = decoders[label].generate(prompt, max_new_tokens=args.max_new_tokens)
                per_token[label].append(out.stats.wall_time / out.stats.new_tokens)
    for label in models:
        curve = {w: round(statistics.median(c[w] for c in costs[label]), 1) for w in WIDTHS}
        print(f"{label}: ar {1e3 * statistics.median(per_token[label]):.1f} ms a token; pass cost ms {curve}")


if __name__ == "__main__":
    main()

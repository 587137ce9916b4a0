"""The pass-cost curve: how long one target pass of w tokens takes after a context, per width.

It says where speculation can pay on the machine at hand (a w-token pass costing about one 1-token pass is
what makes long drafts and trees worth verifying), and the bench prints it next to its figures.
"""
from __future__ import annotations

import statistics
import time

import torch

from . import compiled
from .attention import PROMPT_PASS
from .cache import GrowingCache

WIDTHS = (1, 2, 4, 8, 16, 32)


@torch.inference_mode()
def pass_cost_ms(model: torch.nn.Module, widths=WIDTHS, context: int = 300, repeats: int = 5,
                 vocab: int | None = None) -> dict[int, float]:
    """Median wall milliseconds of a pass of each width after `context` random tokens (logits for every row,
    as verification needs them); each width warmed up once, widths interleaved across repeats."""
    device = next(model.parameters()).device
    vocab = vocab or model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, context + max(widths)), generator=g).to(device)
    cache = GrowingCache()
    passes = compiled.passes_for(model) or model  # the passes decoding uses
    passes(input_ids=ids[:, :context], cache=cache, use_cache=True, logits_to_keep=1, **{PROMPT_PASS: True})

    def one(width: int) -> float:
        start = time.perf_counter()
        passes(input_ids=ids[:, context:context + width], cache=cache, use_cache=True, logits_to_keep=width)
        seconds = time.perf_counter() - start
        for layer in cache.layers:  # back to the context (a prefix view: the buffer's end moves)
            layer.keys, layer.values = layer.keys[..., :context, :], layer.values[..., :context, :]
        return seconds

    times: dict[int, list[float]] = {w: [] for w in widths}
    for w in widths:
        one(w)
    for _ in range(repeats):
        for w in widths:
            times[w].append(one(w))
    return {w: round(1e3 * statistics.median(t), 2) for w, t in times.items()}


def describe(curve: dict[int, float]) -> str:
    base = curve.get(1)
    return ", ".join(f"{w}: {ms:.1f} ms" + (f" ({ms / base:.2f}x)" if base and w != 1 else "")
                     for w, ms in curve.items())

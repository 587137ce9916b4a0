"""`ffn-skip`: input-adaptive FFN block skipping (lossy).

FFN-SkipLLM (Jaiswal et al. 2024, "FFN-SkipLLM: A Hidden Gem for Autoregressive Decoding with Adaptive
Feed Forward Skipping"). During the prefill and the first `warmup_tokens` decoded tokens every block runs
and the cosine similarity between each FFN block's input (the residual stream entering it) and the
layer's output is measured; a block whose output barely turns the hidden state is "saturated". For the
rest of the generation the saturated FFN blocks are skipped: those above `threshold`, or, without a
threshold, the `fraction` of all FFN blocks with the highest similarity. The first and last layers
always run; attention and the KV cache are untouched (no cache handling needed).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..layer_skip import Action, Gate, check_int, check_range, gated, num_layers


class FFNSkipGate(Gate):
    def __init__(self, layers: int, threshold: float | None = None, fraction: float = 0.25, warmup_tokens: int = 4):
        super().__init__(layers)
        self.threshold, self.fraction, self.warmup_tokens = threshold, fraction, warmup_tokens
        self.similarity: list[list[float]] = [[] for _ in range(layers)]
        self._ffn_in: list[torch.Tensor | None] = [None] * layers
        self.skipped: frozenset[int] | None = None  # decided after the warm-up

    def begin_pass(self, tokens: int) -> None:
        super().begin_pass(tokens)
        if self.skipped is None and self.pass_index > self.warmup_tokens:
            self.skipped = self.decide()

    def decide(self) -> frozenset[int]:
        candidates = range(1, self.layers - 1)
        mean = {i: sum(self.similarity[i]) / len(self.similarity[i]) for i in candidates if self.similarity[i]}
        if self.threshold is not None:
            return frozenset(i for i, s in mean.items() if s >= self.threshold)
        k = min(len(mean), round(self.fraction * self.layers))
        return frozenset(sorted(mean, key=lambda i: -mean[i])[:k])

    def observe_ffn_input(self, layer: int, hidden: torch.Tensor) -> None:
        if self.skipped is None:
            self._ffn_in[layer] = hidden

    def observe_layer_output(self, layer: int, hidden: torch.Tensor) -> None:
        start = self._ffn_in[layer]
        if self.skipped is None and start is not None:
            cos = torch.nn.functional.cosine_similarity(start.float(), hidden.float(), dim=-1)
            self.similarity[layer].append(float(cos.mean()))
            self._ffn_in[layer] = None

    def mlp(self, layer: int) -> Action:
        return Action.SKIP if self.skipped is not None and layer in self.skipped else Action.RUN


def options(opts: dict, layers: int) -> dict:
    threshold = opts.get("threshold")
    if threshold is not None:
        threshold = check_range("ffn-skip threshold", threshold, 0.0, 1.0, low_open=True, high_open=True)
    fraction = check_range("ffn-skip fraction", opts.get("fraction", 0.25), 0.0, 1.0, high_open=True)
    warmup = check_int("ffn-skip warmup_tokens", opts.get("warmup_tokens", 4), 0)
    if layers < 3:
        from ..errors import InvalidSettingError

        raise InvalidSettingError("ffn-skip keeps the first and last layers; the model needs at least 3 layers")
    return {"threshold": threshold, "fraction": fraction, "warmup_tokens": warmup}


@contextmanager
def patch(model, opts: dict):
    layers = num_layers(model)
    with gated(model, FFNSkipGate(layers, **options(opts, layers))) as gate:
        yield gate

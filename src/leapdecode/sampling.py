"""Sampling settings and the one function that turns logits into a distribution.

The same `probs_from_logits` is applied to target and draft logits, so speculative sampling compares
like with like: the promise of a lossless method is "the target's distribution after temperature,
top-k and top-p", and this module defines that distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidSettingError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 means no top-k; top_p 1.0 means no nucleus cut."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise InvalidSettingError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InvalidSettingError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InvalidSettingError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Softmax of `logits` (..., V) after temperature, top-k and top-p; float32, same shape.

    Under greedy settings this returns the one-hot distribution of the argmax.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row of `probs` (..., V) -> (...) int64, using only `generator` for randomness.

    Draws happen on the generator's device (the CPU one of `make_generator`), so a seed gives the same
    tokens whether the model runs on CPU or GPU; the result is on the device of `probs`."""
    flat = probs.reshape(-1, probs.shape[-1])
    where = generator.device if generator is not None else flat.device
    drawn = torch.multinomial(flat.to(where, torch.float32), 1, generator=generator).squeeze(-1)
    return drawn.reshape(probs.shape[:-1]).to(probs.device)


def gumbel_top_k(q: torch.Tensor, k: int, generator: torch.Generator | None) -> list[int]:
    """Up to k distinct tokens drawn from q (V,) without replacement, in draw order (Gumbel-top-k; never a
    token of probability 0). The noise comes from `generator` on its own device, as in `sample`."""
    k = min(k, int((q > 0).sum()))
    where = generator.device if generator is not None else q.device
    u = torch.rand(q.shape, generator=generator, dtype=torch.float32, device=where).clamp_(1e-20, 1.0).to(q.device)
    keys = (q.float().clamp_min(1e-30).log() - (-u.log()).log()).masked_fill(q <= 0, float("-inf"))
    return torch.topk(keys, k).indices.tolist()


def make_generator(seed: int | None) -> torch.Generator:
    """An explicit CPU generator; a `None` seed draws a fresh one from the OS."""
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen

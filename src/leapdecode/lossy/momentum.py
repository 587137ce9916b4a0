"""`momentum`: Momentum Decoding (lossy, one text, one target pass per token).

Lan et al. 2022, "Momentum Decoding: Open-ended Text Generation As Graph Exploration". Generation walks a
directed graph whose nodes are n-gram states: the state after token x_t is the tuple of the last `ngram`
tokens. A loop in the text is a return to a node already in the graph. At each step the candidates are the
target's `top_k` tokens:

* if the most likely candidate leads to a node not yet visited, it is taken (greedy exploration of new
  nodes, so the step is exactly greedy decoding's);
* otherwise every candidate v is scored  s(v) = p(v | x_<t) - R(c(v)),  where c(v) is the number of
  earlier visits of the node v leads to and R the resistance, R(c) = resistance * c ** growth (0 for a new
  node): each return to a node makes the next return harder. The best-scored candidate is taken.

The resistance scale, its growth, the n-gram order, the candidate count and whether the prompt's n-grams
count as visited nodes are options. With `resistance=0` the method is plain greedy decoding.

The rule only rewrites the one row of logits the decoding step verifies (`MomentumRule.__call__`): every
token outside the chosen candidate set is set to -inf and the candidates get their scores, so the step's
greedy verification takes the momentum choice; the KV cache, the prefill and the pass count are those of
plain decoding. It is meant for greedy settings (temperature 0).
"""
from __future__ import annotations

from collections import Counter

import torch

from ..errors import InvalidSettingError

DEFAULTS = {"resistance": 0.5, "growth": 1.0, "ngram": 3, "top_k": 5, "include_prompt": False}


def options(opts: dict) -> dict:
    """Checked momentum options (a missing one takes its default)."""
    out = {**DEFAULTS, **opts}
    if not isinstance(out["resistance"], (int, float)) or out["resistance"] < 0:
        raise InvalidSettingError(f"momentum resistance must be a number >= 0, got {out['resistance']!r}")
    if not isinstance(out["growth"], (int, float)) or out["growth"] <= 0:
        raise InvalidSettingError(f"momentum growth must be a number > 0, got {out['growth']!r}")
    for key in ("ngram", "top_k"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
            raise InvalidSettingError(f"momentum {key} must be an integer >= 1, got {out[key]!r}")
    if not isinstance(out["include_prompt"], bool):
        raise InvalidSettingError(f"momentum include_prompt must be true or false, got {out['include_prompt']!r}")
    return out


class MomentumRule:
    """The graph of visited n-gram states of one sequence and the rule that picks its next token.

    Call it with the sequence's tokens so far (prompt + committed; the last one is the root being fed) and
    the logits (V,) of the next position; it returns the logits whose argmax is the momentum choice."""

    def __init__(self, resistance: float = 0.5, growth: float = 1.0, ngram: int = 3, top_k: int = 5,
                 include_prompt: bool = False):
        self.resistance, self.growth, self.n, self.top_k = float(resistance), float(growth), ngram, top_k
        self.include_prompt = include_prompt
        self.visits: Counter[tuple[int, ...]] = Counter()  # node -> times visited
        self._seen = -1  # tokens already entered into the graph (-1: not started)

    def _observe(self, tokens: list[int], prompt_len: int) -> None:
        """Enter the nodes ending at each token not yet seen (from the prompt's start or its end)."""
        if self._seen < 0:
            self._seen = 0 if self.include_prompt else prompt_len
        first = max(self._seen, self.n - 1, 0 if self.include_prompt else prompt_len)
        for end in range(first, len(tokens)):
            self.visits[tuple(tokens[end - self.n + 1 : end + 1])] += 1
        self._seen = len(tokens)

    def penalty(self, visits: int) -> float:
        """The resistance R(c) against entering a node visited `visits` times."""
        return self.resistance * visits ** self.growth if visits else 0.0

    def __call__(self, tokens: list[int], prompt_len: int, logits: torch.Tensor) -> torch.Tensor:
        self._observe(tokens, prompt_len)
        if self.resistance == 0 or len(tokens) < self.n - 1:
            return logits
        state = tuple(tokens[len(tokens) - self.n + 1 :]) if self.n > 1 else ()
        top = int(torch.argmax(logits))
        if not self.visits[state + (top,)]:
            return logits  # a new node: plain greedy exploration
        k = min(self.top_k, logits.shape[-1])
        probs = torch.softmax(logits.float(), dim=-1)
        p, idx = torch.topk(probs, k)
        scores = [float(p[i]) - self.penalty(self.visits[state + (int(idx[i]),)]) for i in range(k)]
        out = torch.full_like(logits, float("-inf"))
        out[idx] = torch.tensor(scores, dtype=logits.dtype, device=logits.device)
        return out


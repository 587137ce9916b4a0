"""`superposed`: Superposed Decoding, k drafts for about the cost of one decoding pass (lossy).

Shen et al. 2024, "Superposed Decoding: Multiple Generations from a Single Autoregressive Inference Pass".
One sequence is decoded, with one KV cache, but its input at each step is not a token: it is the superposition

    e_t = sum_i  w_i * E[d_i[-1]]          w_i = P(d_i) / sum_j P(d_j)  (the live drafts' probabilities)

of the k drafts' latest token embeddings (E: the model's input embedding table, passed as `inputs_embeds`).
The one distribution p_LM the pass returns is shared by the drafts; its top-k tokens extend every live draft,
giving k^2 candidates, each scored

    log P(d_i + v) = log P(d_i) + log( (1 - ngram_weight) * p_LM(v) + ngram_weight * p_NG(v | d_i) )

where p_NG is an n-gram model (orders 2..`ngram_order`, interpolated over the orders whose context was seen)
built from the prompt and, with `corpus`, from a text file or the shipped Spec-Bench questions
(`corpus=spec-bench`). The n-gram term is what tells the drafts apart and keeps each one coherent with its own
history. The k best candidates become the new drafts. A draft that ends (end token, stop string) keeps its
score and its place and leaves the superposition. Deterministic: no random numbers are drawn.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from ..errors import InvalidSettingError
from ..stats import GenerationResult, GenerationStats
from ..text_stream import TextAssembler

DEFAULTS = {"ngram_weight": 0.3, "ngram_order": 4, "corpus": None}
SPEC_BENCH = Path(__file__).resolve().parents[1] / "data" / "spec_bench" / "question.jsonl"


def options(opts: dict) -> dict:
    out = {**DEFAULTS, **opts}
    w = out["ngram_weight"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < 1:
        raise InvalidSettingError(f"superposed ngram_weight must be in [0, 1), got {w!r}")
    order = out["ngram_order"]
    if isinstance(order, bool) or not isinstance(order, int) or order < 2:
        raise InvalidSettingError(f"superposed ngram_order must be an integer >= 2, got {order!r}")
    corpus = out["corpus"]
    if corpus is not None and corpus != "spec-bench" and not Path(str(corpus)).is_file():
        raise InvalidSettingError(f"superposed corpus must be 'spec-bench' or a text file, got {corpus!r}")
    return out


def corpus_texts(corpus: str | None) -> list[str]:
    """The texts of an n-gram corpus: none, the shipped Spec-Bench question turns, or a text file's lines."""
    if corpus is None:
        return []
    if corpus == "spec-bench":
        with open(SPEC_BENCH, encoding="utf-8") as f:
            return [turn for line in f if line.strip() for turn in json.loads(line)["turns"]]
    return [line for line in Path(corpus).read_text(encoding="utf-8").splitlines() if line.strip()]


class NgramModel:
    """Counts of token n-grams (orders 2..`order`); `prob` interpolates, with equal weights, the maximum
    likelihood estimates of the orders whose context was seen (0 when none was)."""

    def __init__(self, order: int = 4):
        self.order = order
        self.next: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)  # context -> next-token counts

    def add(self, tokens: list[int]) -> "NgramModel":
        for n in range(2, self.order + 1):
            for i in range(len(tokens) - n + 1):
                self.next[tuple(tokens[i : i + n - 1])][tokens[i + n - 1]] += 1
        return self

    def prob(self, history: list[int], token: int) -> float:
        estimates = []
        for n in range(2, self.order + 1):
            if len(history) < n - 1:
                break
            counts = self.next.get(tuple(history[len(history) - n + 1 :]))
            if counts:
                estimates.append(counts[token] / sum(counts.values()))
        return sum(estimates) / len(estimates) if estimates else 0.0


def superposed_generate(lm, prompt_ids: list[int], k: int, *, tokenizer, max_new_tokens: int, stop_ids=(),
                        stop: tuple[str, ...] = (), context_length: int, ngram: NgramModel | None = None,
                        ngram_weight: float = 0.3, method: str = "superposed") -> list[GenerationResult]:
    """k drafts for `prompt_ids` with one forward pass of `lm` (a `CausalLM`, empty cache) per step; each
    draft is a `GenerationResult` (best first). The stats of each count the shared passes and wall time."""
    started = time.perf_counter()
    model = lm.model
    embed = model.get_input_embeddings()
    stop_ids = frozenset(stop_ids)
    limit = min(max_new_tokens, context_length - len(prompt_ids))
    logits = lm.forward(torch.tensor([prompt_ids], dtype=torch.long), logits_to_keep=1)[0, -1]
    prefill_time = time.perf_counter() - started
    drafts: list[list[int]] = [[]]
    scores = [0.0]
    done = [False]
    passes = 0
    for step in range(limit):
        logp = torch.log_softmax(logits.float(), dim=-1)
        top_p, top_v = torch.topk(logp.exp(), k)
        candidates = []  # (score, draft index, token or None)
        for i, draft in enumerate(drafts):
            if done[i]:
                candidates.append((scores[i], i, None))
                continue
            history = prompt_ids + draft
            for p_lm, v in zip(top_p.tolist(), top_v.tolist()):
                p_ng = ngram.prob(history, v) if ngram is not None and ngram_weight else 0.0
                p = (1 - ngram_weight) * p_lm + ngram_weight * p_ng
                if p > 0:
                    candidates.append((scores[i] + math.log(p), i, v))
        candidates.sort(key=lambda c: -c[0])
        kept = candidates[:k]
        drafts = [drafts[i] + ([] if v is None else [v]) for _, i, v in kept]
        scores = [s for s, _, _ in kept]
        done = [v is None or v in stop_ids or _stopped(tokenizer, d, stop)
                for (_, _, v), d in zip(kept, drafts)]
        live = [i for i in range(len(drafts)) if not done[i]]
        if not live or step + 1 >= limit:
            break
        weights = torch.softmax(torch.tensor([scores[i] for i in live]), dim=0)
        last = torch.tensor([drafts[i][-1] for i in live], dtype=torch.long, device=lm.device)
        vectors = embed(last)  # (live, H)
        mixed = (weights.to(vectors.device, vectors.dtype).unsqueeze(1) * vectors).sum(0)
        out = model(inputs_embeds=mixed.view(1, 1, -1), cache=lm.cache, use_cache=True, logits_to_keep=1)
        passes += 1
        logits = out.logits[0, -1]
    wall = time.perf_counter() - started
    results = []
    for draft, finished in zip(drafts, done):
        text = TextAssembler(tokenizer, stop)
        taken = text.push(draft)
        ids = draft[:taken]
        reason = ("stop_string" if text.stopped else "eos" if ids and ids[-1] in stop_ids
                  else "max_new_tokens" if limit == max_new_tokens else "context")
        stats = GenerationStats(method=method, prompt_tokens=len(prompt_ids), new_tokens=len(ids),
                                target_forward_passes=passes, accept_lengths=[1] * passes,
                                prefill_time=prefill_time, wall_time=wall, stop_reason=reason)
        results.append(GenerationResult(text=text.text, token_ids=ids, prompt_ids=list(prompt_ids), stats=stats))
    return results


def _stopped(tokenizer, draft: list[int], stop: tuple[str, ...]) -> bool:
    if not stop:
        return False
    text = tokenizer.decode(draft[-32:], skip_special_tokens=True)
    return any(s in text for s in stop)

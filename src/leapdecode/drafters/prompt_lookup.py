"""`pld`: prompt lookup decoding (lossless through verification).

Input-guided aggressive decoding (Sun et al., "Lossless Acceleration for Seq2seq Generation with
Aggressive Decoding", 2022) and prompt lookup decoding (Saxena, 2023): when the output copies the input,
the tokens that followed the last n-gram's earlier occurrence are a cheap, often right, draft. The match
is searched in the prompt and in the output so far, longest n-gram first, most recent occurrence first
(`occurrence="recent"`), or the earliest occurrence first (`occurrence="earliest"`, as transformers' prompt
lookup does: in an edit of a given text that is usually the text itself rather than the output's own repeats),
or the occurrence whose preceding context agrees with the output's for the most tokens (`occurrence="longest"`,
up to `LONGEST_CONTEXT` tokens; ties go to the most recent): a 3-token suffix such as "    return self" occurs
all over a code file, and the longer agreement picks the place the output is copying.

Multi-candidate drafting (method `pld-tree`, `num_branches` > 1): the continuations of several matches
(different occurrences, different n-gram lengths) are merged into one token tree (at most `max_nodes`
nodes) and verified in one pass; the default `num_branches=1` keeps the single chain.
"""
from __future__ import annotations

import numpy as np
import torch

from ..sampling import SamplingParams
from ..tree import DraftTree
from .base import AdaptiveLength, DraftContext, DraftFeedback, Drafter
from .trie import trie_from_sequences


class PromptLookupDrafter(Drafter):
    OCCURRENCES = ("recent", "earliest", "longest")

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, num_draft_tokens: int = 10, adaptive: bool = False,
                 num_branches: int = 1, max_nodes: int = 32, occurrence: str = "recent"):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        if num_branches < 1 or max_nodes < 1:
            raise ValueError(f"num_branches and max_nodes must be >= 1, got {num_branches}, {max_nodes}")
        if occurrence not in self.OCCURRENCES:
            raise ValueError(f"occurrence must be one of {', '.join(self.OCCURRENCES)}, got {occurrence!r}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.occurrence = occurrence
        self.num_branches, self.max_nodes = num_branches, max_nodes
        self.length = AdaptiveLength(num_draft_tokens, high=max(num_draft_tokens, 32), enabled=adaptive)

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        self.length.reset()

    def propose(self, ctx: DraftContext) -> DraftTree | None:
        budget = min(self.length.value, ctx.max_tokens)
        if budget <= 0:
            return None
        if self.num_branches > 1:
            found = find_continuations(np.asarray(ctx.tokens, dtype=np.int64), self.min_ngram, self.max_ngram,
                                       budget, self.num_branches)
            return trie_from_sequences(found, min(ctx.max_tokens, self.max_nodes))
        tokens = np.asarray(ctx.tokens, dtype=np.int64)
        if self.occurrence == "longest":
            found = find_longest_context(tokens, self.min_ngram, budget)
        else:
            found = find_continuation(tokens, self.min_ngram, self.max_ngram, budget, self.occurrence == "earliest")
        if found is None:
            return None
        draft, matched = found
        # labelled with the match length: a longer match is likelier to go on (the draft cut learns how much);
        # the longest-context lengths (up to 64) in powers of two above 3, so each label gathers statistics
        label = matched if matched <= 3 else 1 << (matched.bit_length() - 1)
        return DraftTree.chain(torch.as_tensor(draft, dtype=torch.long), label=label)

    def update(self, feedback: DraftFeedback) -> None:
        self.length.update(feedback)


def find_continuation(tokens: np.ndarray, min_ngram: int, max_ngram: int,
                      length: int, earliest: bool = False) -> tuple[np.ndarray, int] | None:
    """The `length` tokens (or fewer) that followed the most recent earlier occurrence of the longest
    suffix n-gram (n from max_ngram down to min_ngram), preferring an occurrence with a full-length
    continuation, and that n; with `earliest`, the first occurrence instead; None when nothing matches."""
    total = tokens.shape[0]
    for n in range(min(max_ngram, total - 1), min_ngram - 1, -1):
        suffix = tokens[total - n :]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: total - 1], n)  # starts 0..total-1-n
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size and earliest:
            start = int(hits[0]) + n
            return tokens[start : start + length], n
        if hits.size:
            # most recent occurrence that still has `length` tokens after it, else the earliest one
            full = hits[hits + n + length <= total]
            start = int(full[-1] if full.size else hits[0]) + n
            return tokens[start : start + length], n
    return None


LONGEST_CONTEXT = 64  # how far back `occurrence="longest"` compares contexts


def find_longest_context(tokens: np.ndarray, min_ngram: int, length: int,
                         cap: int = LONGEST_CONTEXT) -> tuple[np.ndarray, int] | None:
    """The `length` tokens (or fewer) that followed the earlier occurrence whose preceding tokens agree with the
    sequence's last tokens for the longest stretch (at least `min_ngram`, compared up to `cap`), the most recent
    of those that has a full-length continuation, else the most recent; and that stretch's length. None when
    the last `min_ngram` tokens occur nowhere earlier."""
    total = tokens.shape[0]
    if total - 1 < min_ngram:
        return None
    ends = np.arange(total - 1)  # a candidate occurrence ends at e (< total - 1), its continuation starts at e + 1
    matched = np.zeros(total - 1, dtype=np.int64)
    alive = ends
    for k in range(min(cap, total - 1)):
        alive = alive[alive - k >= 0]
        alive = alive[tokens[alive - k] == tokens[total - 1 - k]]
        if not alive.size:
            break
        matched[alive] = k + 1
    best = int(matched.max())
    if best < min_ngram:
        return None
    hits = np.flatnonzero(matched == best)
    full = hits[hits + 1 + length <= total]
    start = int(full[-1] if full.size else hits[-1]) + 1
    return tokens[start : start + length], best


def find_continuations(tokens: np.ndarray, min_ngram: int, max_ngram: int, length: int, count: int) -> list[list[int]]:
    """Up to `count` distinct continuations (each up to `length` tokens) of earlier occurrences of the suffix
    n-grams: longest n first, then most recent occurrence first."""
    total = tokens.shape[0]
    found: list[list[int]] = []
    for n in range(min(max_ngram, total - 1), min_ngram - 1, -1):
        suffix = tokens[total - n :]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: total - 1], n)
        for hit in np.flatnonzero((windows == suffix).all(axis=1))[::-1]:
            cont = tokens[hit + n : hit + n + length].tolist()
            if cont and not any(f[: len(cont)] == cont for f in found):
                found.append(cont)
                if len(found) >= count:
                    return found
    return found

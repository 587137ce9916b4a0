"""`specreason`: step-level speculation between a small and a big model (lossy).

Pan et al. 2025, "SpecReason: Fast and Accurate Inference-Time Compute via Speculative Reasoning". A small
model (the draft model) writes the next reasoning step; the big model (the target) scores that step in one
forward pass; the step is kept when its score clears a threshold, otherwise the big model writes the step
itself. The steps are text, so the two models need not share a tokenizer.

One step:

1. The small model decodes (greedy, or sampled with the request's settings) until a step boundary:
   `boundary=newline` ends a step with the first token that completes a line, `boundary=sentence` also at
   a sentence end (`.`, `!` or `?` followed by white space; the token that shows the white space is not
   part of the step). A boundary only counts once the step has some non-blank text; a step never exceeds
   `max_step_tokens` tokens (nor the tokens left to the answer).
2. The big model reads root + step + the scoring prompt (`score_prompt`, a 0-9 rating request appended
   after the step) in ONE pass. The score is read from the logits of the ten digit tokens at the last
   position: `score=expected` (the default) is the expected digit under the softmax over those ten logits,
   sum_d d * p(d); `score=argmax` is the most likely digit. The step is kept when score >= `threshold`
   (so `threshold=0` keeps every step and `threshold=10` none). The step's own KV entries, computed in that
   pass, stay in the big model's cache when it is kept; the scoring prompt's entries are dropped.
3. A rejected step is written by the big model. With `reuse` (greedy, same tokenizer) the scoring pass
   already holds the big model's next-token logits after every prefix of the rejected step, so the step's
   tokens are verified exactly as in token-level speculative decoding (its longest prefix that matches the
   big model's greedy choices, plus the big model's own next token) at no extra pass; the big model then
   decodes on, one token per pass, to the step boundary.
4. The final answer is the big model's: when the small model ends its text (an end token), that last step
   is not taken, and the big model writes from there to its own end token (or the token limit).

Exact point: with `threshold=10` no step is kept and every token is the big model's greedy choice after the
text so far, so the output is the big model's own greedy output (tested, with and without `reuse`); with
`threshold=0` every small step is kept and, until the small model ends, the output is the small model's
greedy output.

Two tokenizers: the prompt is decoded with the target's tokenizer (special tokens kept as text) and
encoded with the draft's; each step crosses as the text it adds (a difference of cumulative decodes), so
token seams may fall differently from encoding the whole text at once. With the same tokenizer, ids cross
unchanged. Stats: `SpecReasonStats` records steps accepted and rejected and each step's score.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch

from ..errors import InvalidSettingError
from ..lm import CausalLM
from ..sampling import SamplingParams, make_generator, probs_from_logits, sample
from ..stats import GenerationResult, GenerationStats
from ..text_stream import TextAssembler

SCORE_PROMPT = ("\n\n[Judge the last step above. Is it correct and useful for solving the problem? Rate it on a "
                "scale from 0 (wrong or useless) to 9 (correct and useful).]\nScore:")
DEFAULTS = {"threshold": 7.0, "boundary": "newline", "max_step_tokens": 64, "score": "expected", "reuse": True,
            "score_prompt": SCORE_PROMPT}
BOUNDARIES = {"newline": re.compile(r"\n"), "sentence": re.compile(r"\n|[.!?](?=\s)")}


def options(opts: dict) -> dict:
    """Checked specreason options (a missing one takes its default)."""
    out = {**DEFAULTS, **opts}
    t = out["threshold"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 10:
        raise InvalidSettingError(f"specreason threshold must be a number in [0, 10], got {t!r}")
    if out["boundary"] not in BOUNDARIES:
        raise InvalidSettingError(f"specreason boundary must be one of {', '.join(BOUNDARIES)}, got "
                                  f"{out['boundary']!r}")
    m = out["max_step_tokens"]
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise InvalidSettingError(f"specreason max_step_tokens must be an integer >= 1, got {m!r}")
    if out["score"] not in ("expected", "argmax"):
        raise InvalidSettingError(f"specreason score must be expected or argmax, got {out['score']!r}")
    if not isinstance(out["reuse"], bool):
        raise InvalidSettingError(f"specreason reuse must be true or false, got {out['reuse']!r}")
    if not isinstance(out["score_prompt"], str) or not out["score_prompt"].strip():
        raise InvalidSettingError("specreason score_prompt must be a non-empty text")
    return out


@dataclass
class SpecReasonStats(GenerationStats):
    """`GenerationStats` plus the steps: `target_forward_passes` counts the big model's passes (scoring
    passes included), `draft_forward_passes` the small model's, `drafted_tokens` the small steps' tokens
    that were scored; `accept_lengths[i]` the tokens big-model pass i committed (a kept step's length, 0
    for a rejected step without reuse)."""

    steps_accepted: int = 0
    steps_rejected: int = 0
    step_scores: list[float] = field(default_factory=list)
    small_tokens: int = 0  # tokens of the answer that come from kept small-model steps

    def as_dict(self) -> dict:
        return {**super().as_dict(), "steps_accepted": self.steps_accepted, "steps_rejected": self.steps_rejected,
                "step_scores": list(self.step_scores), "small_tokens": self.small_tokens}


@dataclass(frozen=True)
class ScorePrompt:
    """The scoring prompt's token ids (appended after a step) and the ids of the digits 0..9 that may follow
    it; found by encoding the prompt followed by each digit (with a space, else without) and checking that
    the ten encodings share a prefix and differ in exactly one last token."""

    ids: tuple[int, ...]
    digits: tuple[int, ...]

    @classmethod
    def build(cls, tokenizer, text: str) -> "ScorePrompt":
        for sep in (" ", ""):
            encoded = [tokenizer(text + sep + str(d), add_special_tokens=False)["input_ids"] for d in range(10)]
            head = encoded[0][:-1]
            if all(e[:-1] == head for e in encoded) and len({e[-1] for e in encoded}) == 10:
                return cls(tuple(head), tuple(e[-1] for e in encoded))
        raise InvalidSettingError("specreason: the target's tokenizer does not encode each digit 0-9 after the "
                                  "scoring prompt as one token of its own; choose another score_prompt")


def step_score(digit_logits: torch.Tensor, how: str) -> float:
    """The 0-9 score from the ten digit logits (10,): the expected digit or the most likely one."""
    if how == "argmax":
        return float(torch.argmax(digit_logits))
    p = torch.softmax(digit_logits.float(), dim=-1)
    return float((p * torch.arange(10, dtype=p.dtype, device=p.device)).sum())


def step_end(tokenizer, ids: list[int], pattern: re.Pattern) -> int | None:
    """How many of `ids` (a step being written) make the step, if a boundary is complete in them, else None.
    The boundary is searched from the step's first non-blank character on."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    start = len(text) - len(text.lstrip())
    match = pattern.search(text, start) if start < len(text) else None
    if match is None:
        return None
    for k in range(1, len(ids) + 1):  # the fewest tokens whose text reaches the boundary's end
        if len(tokenizer.decode(ids[:k], skip_special_tokens=True)) >= match.end():
            return k
    return len(ids)


class _Model:
    """One model's side: its `CausalLM`, the ids so far (prompt + committed), and the invariant that the
    cache holds every id but the last, which the next pass feeds."""

    def __init__(self, lm: CausalLM, ids: list[int]):
        self.lm, self.ids = lm, list(ids)
        lm.reset()
        if len(ids) > 1:
            lm.forward(torch.tensor([ids[:-1]], dtype=torch.long), logits_to_keep=1, prompt=True)
        self.passes = 0

    def feed(self, extra: list[int] = (), keep: int = 1) -> torch.Tensor:
        """One pass over the ids not yet cached plus `extra`; the logits (keep, V) of the last `keep` positions."""
        pending = self.ids[self.lm.length :] + list(extra)
        assert len(pending) > len(extra), "the cache holds every id but the last"
        logits = self.lm.forward(torch.tensor([pending], dtype=torch.long), logits_to_keep=keep)
        self.passes += 1
        return logits[0]

    def settle(self) -> None:
        """Drop cached entries past the ids (all but the last id stay)."""
        if self.lm.length > len(self.ids) - 1:
            self.lm.crop(len(self.ids) - 1)


def _pick(logits: torch.Tensor, params: SamplingParams, generator) -> int:
    if params.greedy:
        return int(torch.argmax(logits))
    return int(sample(probs_from_logits(logits.unsqueeze(0), params), generator)[0])


def _write(model: _Model, params: SamplingParams, generator, budget: int, stop_ids: frozenset[int], tokenizer,
           pattern: re.Pattern | None, step: list[int] | None = None) -> tuple[list[int], bool]:
    """Decode one step with `model`, one token per pass, after the tokens of `step` (already at the end of
    `model.ids`; their entries need not be cached). Returns the step and whether it ended with an end token.
    `pattern` None: write to the end token or the budget. On return the cache holds all ids but the last."""
    step = list(step or [])
    while len(step) < budget:
        if step and step[-1] in stop_ids:
            break
        if pattern is not None and step and step_end(tokenizer, step, pattern) is not None:
            break
        token = _pick(model.feed()[-1], params, generator)
        step.append(token)
        model.ids.append(token)
    keep = len(step)
    if pattern is not None and step:
        keep = step_end(tokenizer, step, pattern) or keep
    keep = next((i + 1 for i, t in enumerate(step[:keep]) if t in stop_ids), keep)
    if keep < len(step):  # tokens past the boundary (the one that showed it) are not part of the step
        del model.ids[len(model.ids) - (len(step) - keep):]
        step = step[:keep]
    model.settle()
    return step, bool(step) and step[-1] in stop_ids


class _Bridge:
    """Moves text between the two tokenizers (ids unchanged when they are the same)."""

    def __init__(self, target, draft):
        self.same = draft.tokenizer is target.tokenizer or (
            len(draft.tokenizer) == len(target.tokenizer)
            and draft.tokenizer_fingerprint == target.tokenizer_fingerprint)
        self.target_tok, self.draft_tok = target.tokenizer, draft.tokenizer

    def prompt_to_draft(self, ids: list[int]) -> list[int]:
        if self.same:
            return list(ids)
        text = self.target_tok.decode(ids, skip_special_tokens=False)
        return self.draft_tok(text, add_special_tokens=False)["input_ids"]

    @staticmethod
    def _delta(tokenizer, before: list[int], added: list[int]) -> str:
        full = tokenizer.decode(before + added, skip_special_tokens=True)
        head = tokenizer.decode(before, skip_special_tokens=True)
        return full[len(head):] if full.startswith(head) else tokenizer.decode(added, skip_special_tokens=True)

    def to_target(self, draft_before: list[int], step: list[int]) -> list[int]:
        if self.same:
            return list(step)
        text = self._delta(self.draft_tok, draft_before, step)
        return self.target_tok(text, add_special_tokens=False)["input_ids"] if text else []

    def to_draft(self, target_before: list[int], step: list[int]) -> list[int]:
        if self.same:
            return list(step)
        text = self._delta(self.target_tok, target_before, step)
        return self.draft_tok(text, add_special_tokens=False)["input_ids"] if text else []


def specreason_generate(lm: CausalLM, draft_lm: CausalLM, prompt_ids: list[int], *, target, draft,
                        max_new_tokens: int, params: SamplingParams = SamplingParams(), seed: int | None = None,
                        stop: tuple[str, ...] = (), threshold: float = 7.0, boundary: str = "newline",
                        max_step_tokens: int = 64, score: str = "expected", reuse: bool = True,
                        score_prompt: str = SCORE_PROMPT, method: str = "specreason") -> GenerationResult:
    """SpecReason with `target` (the big model, run through `lm`) and `draft` (the small one, `draft_lm`);
    `prompt_ids` in the target's tokenizer. Returns the answer in the target's ids, with `SpecReasonStats`."""
    started = time.perf_counter()
    tok = target.tokenizer
    prompt = ScorePrompt.build(tok, score_prompt)
    pattern = BOUNDARIES[boundary]
    stop_ids, draft_stops = frozenset(target.stop_token_ids), frozenset(draft.stop_token_ids)
    generator = None if params.greedy else make_generator(seed)
    bridge = _Bridge(target, draft)
    reuse = reuse and params.greedy and bridge.same
    limit = min(max_new_tokens, target.context_length - len(prompt_ids) - len(prompt.ids) - 1)
    if limit <= 0:
        raise InvalidSettingError(f"the prompt leaves no room for an answer in {target.name!r}'s context")
    big = _Model(lm, prompt_ids)
    small = _Model(draft_lm, bridge.prompt_to_draft(prompt_ids))
    stats = SpecReasonStats(method=method, prompt_tokens=len(prompt_ids))
    stats.prefill_time = time.perf_counter() - started
    text = TextAssembler(tok, stop)
    out: list[int] = []
    reason = ""

    def commit(tokens: list[int]) -> bool:
        """Add tokens to the answer; True when the answer is finished."""
        nonlocal reason
        tokens = tokens[: limit - len(out)]
        taken = text.push(tokens)
        out.extend(tokens[:taken])
        if text.stopped:
            reason = "stop_string"
        elif out and out[-1] in stop_ids:
            reason = "eos"
        elif len(out) >= limit:
            reason = "max_new_tokens" if limit == max_new_tokens else "context"
        return bool(reason)

    def big_step(taken: list[int], budget: int, pattern_or_none) -> list[int]:
        """The big model writes a step after `taken` (already in its ids); the small model follows."""
        before = big.ids[: len(big.ids) - len(taken)]
        own, _ = _write(big, params, generator, budget, stop_ids, tok, pattern_or_none, step=taken)
        stats.accept_lengths.extend([1] * max(0, len(own) - len(taken)))
        _follow(small, bridge, base_small, step, before, own)
        return own

    finishing = False  # the small model ended its text: the big model writes the final answer
    while not reason:
        left = limit - len(out)
        base_small, step = list(small.ids), []
        if finishing or len(small.ids) + min(max_step_tokens, left) >= draft.context_length:
            commit(big_step([], left, None))
            break
        # 1. the small model's step
        step, ended = _write(small, params, generator, min(max_step_tokens, left), draft_stops,
                             draft.tokenizer, pattern)
        if ended:  # the final answer is the big model's: the small model's last step is not taken
            finishing = True
            continue
        candidate = bridge.to_target(base_small, step)[:left]
        if not candidate:  # no text the big model could score: it writes the step itself
            commit(big_step([], min(max_step_tokens, left), pattern))
            continue
        # 2. the big model scores it in one pass: root + step + scoring prompt
        n = len(candidate)
        logits = big.feed(list(candidate) + list(prompt.ids), keep=n + 1 + len(prompt.ids) if reuse else 1)
        stats.drafted_tokens += n
        value = step_score(logits[-1, list(prompt.digits)], score)
        stats.step_scores.append(value)
        if value >= threshold:  # 3a. kept: the step's entries stay in the big model's cache
            stats.steps_accepted += 1
            stats.small_tokens += n
            stats.accept_lengths.append(n)
            big.ids.extend(candidate)
            big.settle()
            if commit(candidate):
                break
            continue
        # 3b. rejected: the big model writes the step; with `reuse` the rejected tokens are verified exactly
        # from the scoring pass (its longest prefix the big model agrees with, plus the big model's own token)
        stats.steps_rejected += 1
        taken: list[int] = []
        if reuse:
            choices = torch.argmax(logits[: n + 1], dim=-1).tolist()  # after the root and after each step token
            m = 0
            while m < n and candidate[m] == choices[m]:
                m += 1
            taken = list(candidate[:m]) + [choices[m]]
        big.ids.extend(taken)
        big.settle()
        stats.accept_lengths.append(len(taken))
        if commit(big_step(taken, min(max_step_tokens, left), pattern)):
            break
    stats.target_forward_passes = big.passes
    stats.draft_forward_passes = small.passes
    stats.new_tokens = len(out)
    stats.stop_reason = reason or "max_new_tokens"
    stats.wall_time = time.perf_counter() - started
    return GenerationResult(text=text.text, token_ids=out, prompt_ids=list(prompt_ids), stats=stats)


def _follow(small: _Model, bridge: _Bridge, base: list[int], step: list[int], target_before: list[int],
            own: list[int]) -> None:
    """After the big model wrote a step, the small model's ids become `base` + that step (fed with its next
    pass); cached entries of its own rejected `step` stay where they agree with it."""
    new = bridge.to_draft(target_before, own)
    common = 0
    while common < min(len(step), len(new)) and step[common] == new[common]:
        common += 1
    del small.ids[len(base):]
    small.ids.extend(new)
    if small.lm.length > len(base) + common:
        small.lm.crop(len(base) + common)
    small.settle()

"""Step-level speculation (lossy): `specreason`, a small model writes reasoning steps that the big model
scores in one pass each and rewrites when the score is below a threshold (`lossy/specreason.py`). A loop of
its own; the draft model may have another tokenizer (the steps cross as text)."""
from __future__ import annotations

from ..drafters.base import NoDrafter
from ..lm import CausalLM
from ..lossy import specreason
from .spec import LOSSY, MethodBuild, MethodSpec, take_options


def _options(build: MethodBuild) -> dict:
    return specreason.options(take_options(build.options, specreason.DEFAULTS, "specreason"))


def _drafter(build: MethodBuild):
    opts = _options(build)  # checked now, not mid-generation
    specreason.ScorePrompt.build(build.target.tokenizer, opts["score_prompt"])
    return NoDrafter()


def _run(build: MethodBuild, lm, prompt_ids: list[int], settings, n: int) -> list:
    opts = _options(build)
    draft_lm = CausalLM(build.draft.model)
    results = []
    for i in range(n):  # independent answers (seed, seed+1, ... when sampling with a seed)
        seed = None if settings.seed is None else settings.seed + i
        results.append(specreason.specreason_generate(
            lm, draft_lm, prompt_ids, target=build.target, draft=build.draft,
            max_new_tokens=settings.max_new_tokens, params=settings.params, seed=seed, stop=settings.stop, **opts))
    return results


METHODS = (
    MethodSpec("specreason", LOSSY, "step-level speculation: the draft model writes each reasoning step (up to a "
               "newline or sentence end), the target scores it 0-9 in one pass from its digit logits and keeps "
               "it above a threshold, else writes the step itself (the rejected step verified as a token draft); "
               "the final answer is the target's",
               "Pan et al. 2025, SpecReason: Fast and Accurate Inference-Time Compute via Speculative Reasoning",
               _drafter, needs_draft_model=True, same_tokenizer=False, run=_run),
)

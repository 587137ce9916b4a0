"""The core methods: `ar` (the reference), `pld` (prompt lookup) and `draft` (a draft model). All lossless."""
from __future__ import annotations

from ..drafters.base import Drafter, NoDrafter
from ..errors import InvalidSettingError
from .spec import LOSSLESS, MethodBuild, MethodSpec, take_options


def _ar(build: MethodBuild) -> Drafter:
    take_options(build.options, {}, "ar")
    return NoDrafter()


def _pld(build: MethodBuild) -> Drafter:
    from ..drafters.prompt_lookup import PromptLookupDrafter

    # num_branches > 1: several matches merged into one tree (multi-candidate pld; `pld-tree` is that preset)
    opts = take_options(build.options, {"max_ngram": 3, "min_ngram": 1, "num_draft_tokens": 4, "adaptive": True,
                                        "num_branches": 1, "max_nodes": 32, "occurrence": "recent"}, "pld")
    try:
        return PromptLookupDrafter(**opts)
    except ValueError as err:
        raise InvalidSettingError(str(err)) from None


def _draft(build: MethodBuild) -> Drafter:
    from ..drafters.draft_model import DraftModelDrafter

    opts = take_options(build.options, {"num_draft_tokens": 20, "adaptive": False, "confidence_threshold": 0.4,
                                        "draft_vocab": 0, "lookup": 0}, "draft")
    try:
        return DraftModelDrafter(build.draft.model, **opts)
    except ValueError as err:
        raise InvalidSettingError(str(err)) from None


METHODS = (
    MethodSpec("ar", LOSSLESS, "plain autoregressive decoding, one target pass per token (the reference)",
               "-", _ar),
    MethodSpec("pld", LOSSLESS, "prompt lookup: copy the continuation of the last n-gram's earlier occurrence "
               "in the prompt/output as the draft", "Sun et al. 2022, input-guided aggressive decoding; "
               "Saxena 2023, prompt lookup decoding", _pld),
    MethodSpec("draft", LOSSLESS, "a small draft model with the same tokenizer proposes K tokens "
               "(adaptive K, optional BiLD confidence fallback)", "Leviathan et al. 2023; Chen et al. 2023; "
               "Kim et al. 2023 (BiLD)", _draft, needs_draft_model=True),
)

"""Token-tree methods: drafts verified as trees in one target pass (greedy: longest argmax path; sampling:
recursive rejection over siblings, or SpecTr's k-sequential rule for independent drafts). All lossless."""
from __future__ import annotations

from ..drafters.aded import AdedDrafter
from ..drafters.draft_tree import DraftTreeDrafter
from ..drafters.lookahead import LookaheadDrafter
from ..drafters.prompt_lookup import PromptLookupDrafter
from ..drafters.spectr import SpecTrDrafter
from ..drafters.stand import StandDrafter
from ..errors import InvalidSettingError
from .spec import LOSSLESS, MethodBuild, MethodSpec, take_options


def _build(cls, defaults: dict, method: str, *args):
    def make(build: MethodBuild):
        opts = take_options(build.options, defaults, method)
        try:
            return cls(*[a(build) for a in args], **opts)
        except ValueError as err:
            raise InvalidSettingError(str(err)) from None

    return make


def _vocab(build: MethodBuild) -> int:
    return build.target.vocab_size


def _draft_model(build: MethodBuild):
    return build.draft.model



METHODS = (
    MethodSpec(
        "pld-tree", LOSSLESS, "prompt lookup with several n-gram matches merged into one token tree",
        "Sun et al. 2022 (aggressive decoding); Saxena 2023 (prompt lookup); tree verification as in SpecInfer",
        _build(PromptLookupDrafter, {"max_ngram": 3, "min_ngram": 1, "num_draft_tokens": 8, "adaptive": False,
                                     "num_branches": 4, "max_nodes": 24}, "pld-tree")),
    MethodSpec(
        "aded", LOSSLESS, "model-free: a tri-gram matrix updated while decoding proposes a token tree, "
        "balancing exploration (UCB bonus) and exploitation",
        "ADED: Adaptive Draft-Verification for Efficient Large Language Model Decoding (2024)",
        _build(AdedDrafter, {"max_nodes": 16, "max_depth": 8, "max_children": 3, "exploration": 0.5,
                             "temperature": 1.0, "adaptive": True}, "aded", _vocab)),
    MethodSpec(
        "stand", LOSSLESS, "model-free: a logit-based n-gram store of the target's own probabilities, "
        "Gumbel-top-k drafting, tree shape from acceptance statistics",
        "STAND: Accelerated Test-Time Scaling with Model-Free Speculative Sampling (2025)",
        _build(StandDrafter, {"max_nodes": 24, "max_depth": 8, "max_children": 4, "max_ngram": 3, "top_k": 8,
                              "max_contexts": 200_000, "adaptive": True}, "stand", _vocab)),
    MethodSpec(
        "lookahead", LOSSLESS, "model-free: a Jacobi window of guessed tokens rides along with verification; "
        "n-grams from the target's logits on drafted positions fill a pool keyed by first token",
        "Fu et al. 2024 (Lookahead decoding); CEED-VLA (Jacobi decoding)",
        _build(LookaheadDrafter, {"window": 5, "ngram": 4, "max_candidates": 4, "pool_per_key": 8,
                                  "max_nodes": 24, "adaptive": True}, "lookahead")),
    MethodSpec(
        "draft-tree", LOSSLESS, "a draft model grows a token tree where it is unsure (confidence-driven "
        "expansion with a node budget)",
        "SpecInfer (Miao et al. 2024); EAGLE-2 dynamic trees (Li et al. 2024)",
        _build(DraftTreeDrafter, {"max_nodes": 16, "max_depth": 8, "max_children": 4, "min_reach": 0.02,
                                  "adaptive": True}, "draft-tree", _draft_model),
        needs_draft_model=True),
    MethodSpec(
        "spectr", LOSSLESS, "k independent draft sequences from a draft model, verified with SpecTr's exact "
        "k-sequential selection",
        "SpecTr: Fast Speculative Decoding via Optimal Transport (Sun et al. 2023)",
        _build(SpecTrDrafter, {"num_drafts": 3, "num_draft_tokens": 4, "adaptive": True}, "spectr", _draft_model),
        needs_draft_model=True),
)

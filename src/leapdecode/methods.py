"""The method registry: each name maps to its drafter, its verification and its promise."""
from __future__ import annotations

import importlib
import pkgutil
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

from .drafters.base import Drafter, NoDrafter
from .errors import InvalidSettingError

LOSSLESS = "lossless"
LOSSY = "lossy"


@dataclass(frozen=True)
class MethodBuild:
    """What a method needs at build time."""

    target: Any  # LoadedModel
    draft: Any | None  # LoadedModel or None
    options: dict


@dataclass(frozen=True)
class MethodSpec:
    name: str
    promise: str  # LOSSLESS or LOSSY
    description: str
    paper: str
    make_drafter: Callable[[MethodBuild], Drafter]
    needs_draft_model: bool = False
    verification: str = "greedy: longest matching prefix + target token; sampling: exact speculative sampling"
    # For methods that change how the target itself runs (layer skipping, early exit): a context manager
    # entered around each generation, which must restore the model on exit.
    target_patch: Callable[[MethodBuild], AbstractContextManager] | None = None

    def patch_target(self, build: MethodBuild) -> AbstractContextManager:
        return self.target_patch(build) if self.target_patch is not None else nullcontext()


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.promise not in (LOSSLESS, LOSSY):
        raise ValueError(f"promise must be {LOSSLESS!r} or {LOSSY!r}")
    _REGISTRY[spec.name] = spec
    return spec


def _load_catalog() -> None:
    """Import every module of `leapdecode.catalog`; each registers its family of methods."""
    from . import catalog

    for info in pkgutil.iter_modules(catalog.__path__):
        importlib.import_module(f"{catalog.__name__}.{info.name}")


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise InvalidSettingError(f"unknown method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def all_methods() -> list[MethodSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _take(options: dict, allowed: dict[str, Any], method: str) -> dict:
    unknown = set(options) - set(allowed)
    if unknown:
        raise InvalidSettingError(
            f"method {method!r} has no option(s) {', '.join(sorted(unknown))}; its options: {', '.join(sorted(allowed)) or 'none'}"
        )
    return {**allowed, **options}


def _ar(build: MethodBuild) -> Drafter:
    _take(build.options, {}, "ar")
    return NoDrafter()


def _pld(build: MethodBuild) -> Drafter:
    from .drafters.prompt_lookup import PromptLookupDrafter

    # num_branches > 1: several matches merged into one tree (multi-candidate pld; `pld-tree` is that preset)
    opts = _take(build.options, {"max_ngram": 3, "min_ngram": 1, "num_draft_tokens": 4, "adaptive": True,
                                 "num_branches": 1, "max_nodes": 32}, "pld")
    try:
        return PromptLookupDrafter(**opts)
    except ValueError as err:
        raise InvalidSettingError(str(err)) from None


def _draft(build: MethodBuild) -> Drafter:
    from .drafters.draft_model import DraftModelDrafter

    opts = _take(build.options, {"num_draft_tokens": 20, "adaptive": False, "confidence_threshold": 0.4,
                                 "draft_vocab": 0}, "draft")
    try:
        return DraftModelDrafter(build.draft.model, **opts)
    except ValueError as err:
        raise InvalidSettingError(str(err)) from None


register(MethodSpec("ar", LOSSLESS, "plain autoregressive decoding, one target pass per token (the reference)",
                    "-", _ar))
register(MethodSpec("pld", LOSSLESS, "prompt lookup: copy the continuation of the last n-gram's earlier occurrence "
                    "in the prompt/output as the draft", "Sun et al. 2022, input-guided aggressive decoding; "
                    "Saxena 2023, prompt lookup decoding", _pld))
register(MethodSpec("draft", LOSSLESS, "a small draft model with the same tokenizer proposes K tokens "
                    "(adaptive K, optional BiLD confidence fallback)", "Leviathan et al. 2023; Chen et al. 2023; "
                    "Kim et al. 2023 (BiLD)", _draft, needs_draft_model=True))

_load_catalog()

"""What a method is: its name, its promise (lossless or lossy), how its drafter is built, and how it patches
the target. The catalog modules declare `MethodSpec`s with these; `leapdecode.methods` lists them."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

from ..drafters.base import Drafter
from ..errors import InvalidSettingError

LOSSLESS = "lossless"
LOSSY = "lossy"


@dataclass(frozen=True)
class MethodBuild:
    """What a method needs at build time."""

    target: Any  # LoadedModel
    draft: Any | None  # LoadedModel or None
    options: dict
    # State a method may keep across the drafters built from this build (None: one drafter per build). The
    # batch engine keeps one per method, so requests' drafters share what is loaded once (trained networks).
    shared: dict | None = None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    promise: str  # LOSSLESS or LOSSY
    description: str
    paper: str
    make_drafter: Callable[[MethodBuild], Drafter]
    needs_draft_model: bool = False
    # False for methods whose draft model's text, not its token ids, reaches the target (specreason)
    same_tokenizer: bool = True
    # For methods that change how the target itself runs (layer skipping, early exit): a context manager
    # entered around each generation, which must restore the model on exit.
    target_patch: Callable[[MethodBuild], AbstractContextManager] | None = None
    # For methods that choose the next token by their own rule over the target's logits (momentum decoding):
    # a fresh rule per sequence, `rule(tokens, prompt_len, logits (V,)) -> logits`, applied by the step.
    logits_rule: Callable[[MethodBuild], Callable] | None = None
    # For methods with a loop of their own (superposed drafts, contrastive search):
    # `run(build, lm, prompt_ids, settings, n) -> n GenerationResults` (settings: step.GenerationSettings).
    run: Callable[..., list] | None = None

    def __post_init__(self) -> None:
        if self.promise not in (LOSSLESS, LOSSY):
            raise ValueError(f"promise must be {LOSSLESS!r} or {LOSSY!r}, got {self.promise!r}")

    def make_rule(self, build: MethodBuild) -> Callable | None:
        return self.logits_rule(build) if self.logits_rule is not None else None

    def patch_target(self, build: MethodBuild) -> AbstractContextManager:
        return self.target_patch(build) if self.target_patch is not None else nullcontext()


def take_options(options: dict, allowed: dict[str, Any], method: str) -> dict:
    """`allowed` (option -> default) updated with `options`; an option not in `allowed` is refused."""
    unknown = set(options) - set(allowed)
    if unknown:
        raise InvalidSettingError(
            f"method {method!r} has no option(s) {', '.join(sorted(unknown))}; its options: {', '.join(sorted(allowed)) or 'none'}"
        )
    return {**allowed, **options}

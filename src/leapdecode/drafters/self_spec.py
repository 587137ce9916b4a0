"""`self-spec`: the target drafts for itself with some attention/FFN blocks skipped (lossless).

Self-speculative decoding (Zhang et al. 2023, "Draft & Verify"); the skip sets follow the seed papers:
FFN-SkipLLM (skip saturated FFN blocks), SkipDecode (skip whole layers), and S2D sorted speculative
decoding (a nested sub-model: the first k layers plus the LM head drafts for the full model).

The draft shares the target's weights but keeps its own KV cache: a separate `CausalLM` over the same
module, run only inside `layer_skip.gated(model, StaticGate(skip))`, which is entered around the draft
forward passes and exited before the engine's target pass. A separate cache is the simple, exact
choice: the draft's entries for the kept layers above the first skipped block differ from the target's
(their inputs went through fewer blocks); those below it are equal and could be shared (a possible
saving of the draft's catch-up passes, not taken). The full model verifies every drafted token with the
engine's ordinary verifiers, so greedy output equals `ar` and sampled output follows the target's
distribution.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..layer_skip import SkipSet, StaticGate, gated, num_layers
from ..errors import InvalidSettingError
from ..sampling import SamplingParams
from .base import DraftContext
from .draft_model import DraftModelDrafter


def load_skip_config(path, total: int | None = None) -> SkipSet:
    """A skip set saved by `leapdecode calibrate-skip` (JSON with skip_attention / skip_ffn lists).

    With `total` (the model's layer count) the config is checked against the model: its `num_layers`,
    when present, must equal `total` and every layer index must be in [0, total).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InvalidSettingError(f"cannot read skip config {path}: {err}") from None
    if not isinstance(data, dict) or not {"skip_attention", "skip_ffn"} & set(data):
        raise InvalidSettingError(f"{path} is not a skip config (needs skip_attention / skip_ffn lists)")
    try:
        skip = SkipSet.of(attention=data.get("skip_attention") or [], ffn=data.get("skip_ffn") or [])
    except InvalidSettingError as err:
        raise InvalidSettingError(f"skip config {path}: {err}") from None
    if total is None:
        return skip
    made_for = data.get("num_layers")
    if made_for is not None and made_for != total:
        model = f" ({data['model']})" if data.get("model") else ""
        raise InvalidSettingError(f"skip config {path} was made for a {made_for}-layer model{model}; this model "
                                  f"has {total} layers (run `leapdecode calibrate-skip` for it)")
    try:
        return skip.check(total)
    except InvalidSettingError as err:
        raise InvalidSettingError(f"skip config {path}: {err}") from None


def default_skip_set(total: int) -> SkipSet:
    """Without calibration: skip whole layers at every other index in the upper three quarters, keeping
    the last two layers (about 35% of the blocks); `calibrate-skip` usually finds a better set."""
    return SkipSet.of(layers=range(total // 4 + 1, total - 2, 2))


def resolve_skip_set(model, skip_config=None, skip_layers=None, skip_attention=None, skip_ffn=None,
                     draft_layers=None) -> SkipSet:
    total = num_layers(model)
    given = [x for x in (skip_config, draft_layers) if x not in (None, "")]
    explicit = any(x not in (None, "", []) for x in (skip_layers, skip_attention, skip_ffn))
    if len(given) + explicit > 1:
        raise InvalidSettingError("give one of skip_config, draft_layers, or skip_layers/skip_attention/skip_ffn")
    if skip_config not in (None, ""):
        skip = load_skip_config(skip_config, total)
    elif draft_layers not in (None, ""):
        if isinstance(draft_layers, bool) or not isinstance(draft_layers, int) or not 1 <= draft_layers < total:
            raise InvalidSettingError(f"draft_layers must be an integer in [1, {total - 1}], got {draft_layers!r}")
        skip = SkipSet.first_layers(draft_layers, total)
    elif explicit:
        skip = SkipSet.of(skip_layers or (), skip_attention or (), skip_ffn or ())
    else:
        skip = default_skip_set(total)
    skip.check(total)
    if skip.size == 0:
        raise InvalidSettingError("the skip set is empty: the draft would be the full model")
    return skip


class SelfSpecDrafter(DraftModelDrafter):
    """DraftModelDrafter over the target's own module, with the skip gate active while it drafts."""

    def __init__(self, model, skip: SkipSet, num_draft_tokens: int = 4, adaptive: bool = True,
                 confidence_threshold: float = 0.0):
        super().__init__(model, num_draft_tokens=num_draft_tokens, adaptive=adaptive,
                         confidence_threshold=confidence_threshold)
        self.skip = skip.check(num_layers(model))
        self.blocks_run = 0  # attention + FFN blocks the draft executed (all requests)

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        super().begin(prompt, params)

    def propose(self, ctx: DraftContext):
        gate = StaticGate(num_layers(self.lm.model), self.skip)
        with gated(self.lm.model, gate):
            tree = super().propose(ctx)
        self.blocks_run += sum(gate.counts.attn) + sum(gate.counts.ffn)
        return tree

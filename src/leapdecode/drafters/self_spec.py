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
import sys
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


def calibrated_skip_path(model) -> Path:
    """Where `leapdecode calibrate-skip` keeps the skip set it chose for this model (keyed by a fingerprint
    of its weights), so that `self-spec` without a skip set uses it."""
    from ..loading import cache_root
    from .checkpoint import target_fingerprint

    return cache_root() / "skip" / f"{target_fingerprint(model)}.json"


def remember_calibration(model, config: dict) -> Path:
    """Keep a calibrated skip config as this model's default skip set (see `calibrated_skip_path`)."""
    path = calibrated_skip_path(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(path)
    return path


def calibrate_command(model_name: str | None) -> str:
    return f"leapdecode calibrate-skip --model {model_name or 'MODEL'}"


_NOTICES_GIVEN: set[str] = set()


def _notice_once(key: str, message: str) -> None:
    """One line on stderr, once per process and key (a server builds a drafter per request)."""
    if key not in _NOTICES_GIVEN:
        _NOTICES_GIVEN.add(key)
        print(f"leapdecode: {message}", file=sys.stderr, flush=True)


def _default_for(model, total: int, model_name: str | None) -> SkipSet:
    """The calibrated skip set cached for this model, else the uncalibrated default, said in one line."""
    path = calibrated_skip_path(model)
    if path.is_file():
        skip = load_skip_config(path, total)
        try:
            measured = float(json.loads(path.read_text()).get("measured_speedup") or 0.0)
        except (OSError, ValueError, TypeError, AttributeError):
            measured = 0.0
        if 0.0 < measured < 1.0:
            _notice_once(path.name, f"self-spec: the best skip set calibrated for this model ran at {measured:.2f}x "
                         f"of ar when it was measured ({path}): self-spec does not pay on this model here")
        return skip
    skip = default_skip_set(total)
    if skip.size == 0:
        raise InvalidSettingError(f"self-spec: the default skip set is empty for this {total}-layer model: the draft "
                                  f"would be the full model; give one (`--skip-config PATH`, "
                                  f"`--option skip_layers=...`) or run `{calibrate_command(model_name)}`")
    _notice_once(path.name, "self-spec: no calibrated skip set for this model, so the uncalibrated default (every "
                 "other upper layer) is used; it accepts few drafts and is usually slower than ar. Run "
                 f"`{calibrate_command(model_name)}` once: self-spec then uses its result for this model")
    return skip


def resolve_skip_set(model, skip_config=None, skip_layers=None, skip_attention=None, skip_ffn=None,
                     draft_layers=None, model_name: str | None = None) -> SkipSet:
    """The skip set the options name; with none: the one `calibrate-skip` cached for this model, else the
    uncalibrated default with a one-line notice on stderr (`model_name` goes into the command it names)."""
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
        skip = _default_for(model, total, model_name)
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

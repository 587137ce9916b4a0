"""`skipdecode`: one exit point per sequence position, monotone, shared by the batch (lossy).

SkipDecode (Del Corro et al. 2023, "SkipDecode: Autoregressive Skip Decoding with Batching and Caching
for Efficient LLM Inference"). Instead of stopping early, each position bypasses a block of lower-middle
layers, [skip_start, skip_start + s(t)), and always runs the upper layers. s(t) grows linearly from
`min_skip` at the first decoded token to `max_skip` after `ramp_tokens` tokens and never decreases, so
the skipped sets are nested: a layer that runs at position t ran at every earlier position, and no KV
entry is ever missing or recomputed. Skipped attention appends zero placeholders to keep every layer's
cache the same length; by the nesting no query ever reads them. The prefill runs every layer.
"""
from __future__ import annotations

from contextlib import contextmanager

from ..errors import InvalidSettingError
from ..layer_skip import Action, Gate, check_int, gated, num_layers


class SkipDecodeGate(Gate):
    def __init__(self, layers: int, max_skip: int, min_skip: int = 0, skip_start: int = 1, ramp_tokens: int = 32):
        super().__init__(layers)
        self.max_skip, self.min_skip, self.skip_start, self.ramp_tokens = max_skip, min_skip, skip_start, ramp_tokens
        self.skipping = 0
        self.schedule: list[int] = []  # layers skipped at each pass

    def skip_count(self, position: int) -> int:
        """Layers bypassed at decoded position `position` (1 = the first decoded token; 0 = prefill)."""
        if position <= 0:
            return 0
        step = min(position, self.ramp_tokens) / self.ramp_tokens
        return self.min_skip + int((self.max_skip - self.min_skip) * step)

    def begin_pass(self, tokens: int) -> None:
        super().begin_pass(tokens)
        self.skipping = self.skip_count(self.pass_index)
        self.schedule.append(self.skipping)

    def _skipped(self, layer: int) -> bool:
        return self.skip_start <= layer < self.skip_start + self.skipping

    def attention(self, layer: int) -> Action:
        return Action.PLACEHOLDER if self._skipped(layer) else Action.RUN

    def mlp(self, layer: int) -> Action:
        return Action.SKIP if self._skipped(layer) else Action.RUN


def options(opts: dict, layers: int) -> dict:
    skip_start = check_int("skipdecode skip_start", opts.get("skip_start", 1), 0, layers - 1)
    room = layers - 1 - skip_start  # the last layer always runs
    max_skip = opts.get("max_skip")
    max_skip = check_int("skipdecode max_skip", max(1, layers // 4) if max_skip is None else max_skip, 1)
    if max_skip > room:
        raise InvalidSettingError(f"skipdecode would skip every layer; max_skip must be <= {room}")
    min_skip = check_int("skipdecode min_skip", opts.get("min_skip", 0), 0, max_skip)
    ramp = check_int("skipdecode ramp_tokens", opts.get("ramp_tokens", 32), 1)
    return {"max_skip": max_skip, "min_skip": min_skip, "skip_start": skip_start, "ramp_tokens": ramp}


@contextmanager
def patch(model, opts: dict):
    layers = num_layers(model)
    with gated(model, SkipDecodeGate(layers, **options(opts, layers))) as gate:
        yield gate

"""`early-exit`: stop at an intermediate layer when the LM head is confident there (lossy).

Confidence-based early exit (CALM, Schuster et al. 2022; the relaxed stopping condition of CEED-VLA's
early-exit decoding). At each candidate layer in `exit_layers` the final norm and LM head read the last
position's hidden state; when the top probability reaches `threshold` those logits are the step's output
and the remaining layers' FFN blocks are skipped.

KV entries of the skipped layers: **copy** (state propagation). The exit layer's hidden state is passed
unchanged through the remaining layers, whose attention still runs on it (Action.FILL) so every layer
has a KV entry for every position; its output is dropped. The entries are those of the copied state,
not of the full model: the documented approximation. The LM head is not run twice: its wrapper returns
the logits computed at the exit. Prefill and multi-token passes run every layer.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import InvalidSettingError
from ..layer_skip import Action, Gate, check_range, gated, num_layers, parse_indices


class EarlyExitGate(Gate):
    def __init__(self, layers: int, norm: torch.nn.Module, lm_head: torch.nn.Module, threshold: float,
                 exit_layers: tuple[int, ...], softcap: float | None = None):
        super().__init__(layers)
        self.norm, self.lm_head, self.threshold = norm, lm_head, threshold
        self.exit_layers, self.softcap = frozenset(exit_layers), softcap
        self.exited_at: int | None = None
        self._logits: torch.Tensor | None = None
        self.exits: list[int] = []  # exit layer of each decode pass (layers = no exit)

    def begin_pass(self, tokens: int) -> None:
        super().begin_pass(tokens)
        self.exited_at, self._logits = None, None
        if self.pass_index > 0:
            self.exits.append(self.layers)

    def observe_layer_output(self, layer: int, hidden: torch.Tensor) -> None:
        if self.pass_index == 0 or self.pass_tokens != 1 or self.exited_at is not None or layer not in self.exit_layers:
            return
        logits = self.lm_head(self.norm(hidden[:, -1:]))
        capped = logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap
        if float(capped.float().softmax(-1).max()) >= self.threshold:
            self.exited_at, self._logits = layer, logits
            self.exits[-1] = layer

    def attention(self, layer: int) -> Action:
        return Action.FILL if self.exited_at is not None and layer > self.exited_at else Action.RUN

    def mlp(self, layer: int) -> Action:
        return Action.SKIP if self.exited_at is not None and layer > self.exited_at else Action.RUN

    def head(self, inner: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self._logits is not None and hidden.shape[1] == 1:
            return self._logits
        return inner(hidden)


def default_exit_layers(layers: int) -> tuple[int, ...]:
    return tuple(sorted({max(0, round(layers * 0.6) - 1), max(0, round(layers * 0.8) - 1)}))


def options(opts: dict, layers: int) -> dict:
    threshold = check_range("early-exit threshold", opts.get("threshold", 0.9), 0.0, 1.0, low_open=True)
    exits = tuple(sorted(set(parse_indices(opts.get("exit_layers"))))) or default_exit_layers(layers)
    bad = [i for i in exits if not 0 <= i < layers - 1]
    if bad:
        raise InvalidSettingError(f"early-exit exit_layers must be in [0, {layers - 2}], got {bad}")
    return {"threshold": threshold, "exit_layers": exits}


@contextmanager
def patch(model, opts: dict):
    layers = num_layers(model)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    decoder = model.get_decoder()
    gate = EarlyExitGate(layers, decoder.norm, model.lm_head, softcap=getattr(cfg, "final_logit_softcapping", None),
                         **options(opts, layers))
    with gated(model, gate):
        yield gate

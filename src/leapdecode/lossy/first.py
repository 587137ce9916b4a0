"""`first`: per-layer routers, decided from the prompt at prefill, choose the layers the decode skips (lossy).

FiRST (Jain et al. 2024, "FiRST: Finetuning Router-Selective Transformers for Input-Adaptive Latency
Reduction"). Each routable layer i has a router, a linear map of the prompt's mean hidden state entering
layer i (RMS-normalised) to a keep probability. The prefill runs every layer and computes the features;
layers whose keep probability is below `threshold` are skipped (attention and FFN) for the whole decode.
The decision is fixed per generation, so a skipped layer never runs again: its KV entries for decoded
positions are zero placeholders no query reads, and the prompt's entries are exact.

`train_routers` fits the routers with the model frozen (CPU-feasible): on calibration texts, the gated
model `h + g_i * (layer_i(h) - h)` (g_i = keep probability) is pulled toward the full model's next-token
distributions (KL) while a sparsity term `sparsity * mean(g)` pushes gates toward skipping.
`leapdecode train-router` runs it and saves the routers; `--option routers=PATH` loads them.
"""
from __future__ import annotations

import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidSettingError
from ..layer_skip import Action, Gate, check_int, check_range, decoder_layers, gated, num_layers


def features(hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, H) hidden states -> (B, H): the mean over positions, RMS-normalised (scale-free)."""
    mean = hidden.float().mean(1)
    return mean / mean.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


@dataclass
class Routers:
    """Linear routers for `layers` (the routable layer indices); weight (R, H), bias (R,)."""

    layers: tuple[int, ...]
    weight: torch.Tensor
    bias: torch.Tensor
    num_layers: int
    model_name: str = ""

    @classmethod
    def init(cls, num_layers: int, hidden: int, layers=None, model_name: str = "", keep_bias: float = 2.0) -> "Routers":
        layers = tuple(layers if layers is not None else range(1, num_layers - 1))
        return cls(layers, torch.zeros(len(layers), hidden), torch.full((len(layers),), keep_bias), num_layers,
                   model_name)

    def keep_probability(self, feats: dict[int, torch.Tensor]) -> dict[int, float]:
        """feats: layer -> (H,) features of the prompt; returns layer -> keep probability."""
        return {layer: float(torch.sigmoid(self.weight[r] @ feats[layer].float().cpu() + self.bias[r]))
                for r, layer in enumerate(self.layers) if layer in feats}

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"kind": "leapdecode-first-routers", "layers": list(self.layers), "weight": self.weight,
                    "bias": self.bias, "num_layers": self.num_layers, "model_name": self.model_name}, path)
        return path

    @classmethod
    def load(cls, path) -> "Routers":
        try:
            data = torch.load(Path(path), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
            raise InvalidSettingError(f"cannot read routers from {path}: {err}") from None
        if not isinstance(data, dict) or data.get("kind") != "leapdecode-first-routers":
            raise InvalidSettingError(f"{path} is not a FiRST router file (make one with `leapdecode train-router`)")
        try:
            return cls(tuple(data["layers"]), data["weight"], data["bias"], int(data["num_layers"]),
                       data.get("model_name", ""))
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidSettingError(f"router file {path} is incomplete or malformed: {err!r}") from None

    def check(self, model) -> "Routers":
        """Refuse routers for another model shape, out-of-range or repeated layers, mis-shaped weights, or a
        set that covers every layer (at least one layer must always run)."""
        total = num_layers(model)
        hidden = model.get_input_embeddings().weight.shape[1]
        if self.weight.dim() != 2 or self.bias.dim() != 1:
            raise InvalidSettingError(f"the routers have weight {tuple(self.weight.shape)} and bias "
                                      f"{tuple(self.bias.shape)}: expected a matrix and a vector")
        if self.num_layers != total or self.weight.shape[1] != hidden:
            raise InvalidSettingError(f"the routers are for {self.num_layers} layers of width {self.weight.shape[1]}; "
                                      f"the model has {total} layers of width {hidden}")
        layers = list(self.layers)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise InvalidSettingError(f"router layers must be integers, got {layers}")
        bad = sorted(i for i in layers if not 0 <= i < total)
        if bad:
            raise InvalidSettingError(f"the routers name layers {bad}; the model has layers 0..{total - 1}")
        if len(set(layers)) != len(layers):
            raise InvalidSettingError(f"the routers name a layer twice: {layers}")
        if tuple(self.weight.shape) != (len(layers), hidden) or tuple(self.bias.shape) != (len(layers),):
            raise InvalidSettingError(f"the routers have weight {tuple(self.weight.shape)} and bias "
                                      f"{tuple(self.bias.shape)}; {len(layers)} layers of width {hidden} need "
                                      f"({len(layers)}, {hidden}) and ({len(layers)},)")
        if len(layers) >= total:
            raise InvalidSettingError(f"the routers can skip all {total} layers; leave at least one layer without a "
                                      "router so that it always runs")
        return self


class FirstGate(Gate):
    def __init__(self, layers: int, routers: Routers, threshold: float = 0.5, max_skip: int | None = None):
        super().__init__(layers)
        self.routers, self.threshold, self.max_skip = routers, threshold, max_skip
        self.feats: dict[int, torch.Tensor] = {}
        self.keep: dict[int, float] = {}
        self.skipped: frozenset[int] = frozenset()

    def observe_layer_input(self, layer: int, hidden: torch.Tensor) -> None:
        if self.pass_index == 0:
            self.feats[layer] = features(hidden)[0]

    def begin_pass(self, tokens: int) -> None:
        super().begin_pass(tokens)
        if self.pass_index == 1:
            self.keep = self.routers.keep_probability(self.feats)
            low = sorted((p, i) for i, p in self.keep.items() if p < self.threshold)
            if self.max_skip is not None:
                low = low[: self.max_skip]
            self.skipped = frozenset(i for _, i in low)

    def attention(self, layer: int) -> Action:
        return Action.PLACEHOLDER if layer in self.skipped else Action.RUN

    def mlp(self, layer: int) -> Action:
        return Action.SKIP if layer in self.skipped else Action.RUN


def options(opts: dict, model) -> dict:
    routers = opts.get("routers")
    if routers is None or routers == "":
        raise InvalidSettingError("first needs routers: --option routers=PATH (make them with `leapdecode train-router`)")
    routers = (routers if isinstance(routers, Routers) else Routers.load(routers)).check(model)
    threshold = check_range("first threshold", opts.get("threshold", 0.5), 0.0, 1.0, low_open=True, high_open=True)
    max_skip = opts.get("max_skip")
    if max_skip is not None:
        max_skip = check_int("first max_skip", max_skip, 0, num_layers(model) - 1)
    return {"routers": routers, "threshold": threshold, "max_skip": max_skip}


@contextmanager
def patch(model, opts: dict):
    with gated(model, FirstGate(num_layers(model), **options(opts, model))) as gate:
        yield gate


# ----- training --------------------------------------------------------------------------------------------

@contextmanager
def _soft_gates(model, gates: dict[int, torch.Tensor]):
    """Layer i's output becomes h + g_i * (out - h) (forward hooks, removed on exit); parameters frozen."""
    layers = decoder_layers(model)
    flags = [p.requires_grad for p in model.parameters()]
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for i in gates:
            handles.append(layers[i].register_forward_pre_hook(
                lambda _m, args, kwargs, i=i: inputs.__setitem__(i, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
            handles.append(layers[i].register_forward_hook(
                lambda _m, _a, out, i=i: inputs[i] + gates[i] * (out - inputs[i])))
        yield
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


@dataclass
class TrainReport:
    steps: int
    first_loss: float
    last_loss: float
    mean_keep: float


def train_routers(model, texts: list[list[int]], *, steps: int = 40, lr: float = 0.05, sparsity: float = 0.02,
                  generator: torch.Generator | None = None, model_name: str = "", log=None) -> tuple[Routers, TrainReport]:
    """Fit routers on token-id texts (each the prompt plus, ideally, the model's own continuation)."""
    if not texts:
        raise InvalidSettingError("train_routers needs at least one text")
    steps = check_int("steps", steps, 1)
    total = num_layers(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    routers = Routers.init(total, hidden, model_name=model_name)
    device = model.device
    weight = routers.weight.clone().to(device).requires_grad_(True)
    bias = routers.bias.clone().to(device).requires_grad_(True)
    was_training = model.training
    model.eval()
    data = []
    with torch.no_grad():
        for ids in texts:
            out = model(input_ids=torch.tensor([ids], device=model.device), output_hidden_states=True, use_cache=False)
            feats = torch.stack([features(out.hidden_states[i])[0] for i in routers.layers])  # (R, H)
            data.append((ids, feats, out.logits.float().log_softmax(-1)))
    # the features are RMS-normalised, so a step of lr on every weight moves the logit by ~lr * H: the weights
    # learn at lr / H (a logit step comparable to the bias's), else the gates saturate in the first steps
    opt = torch.optim.Adam([{"params": [weight], "lr": lr / hidden}, {"params": [bias], "lr": lr}])
    losses = []
    keep_mean = 1.0
    try:
        for step in range(steps):
            k = int(torch.randint(len(data), (), generator=generator))
            ids, feats, teacher = data[k]
            g = torch.sigmoid((weight * feats).sum(-1) + bias)  # (R,)
            with _soft_gates(model, {layer: g[r] for r, layer in enumerate(routers.layers)}):
                logits = model(input_ids=torch.tensor([ids], device=model.device), use_cache=False).logits.float()
            kl = torch.nn.functional.kl_div(logits.log_softmax(-1), teacher, log_target=True, reduction="none").sum(-1).mean()
            loss = kl + sparsity * g.mean() * len(routers.layers)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            keep_mean = float(g.detach().mean())
            if log is not None and (step % 10 == 0 or step == steps - 1):
                print(f"step {step + 1}/{steps}: loss {losses[-1]:.4f} (kl {float(kl.detach()):.4f}), mean keep {keep_mean:.3f}", file=log)
    finally:
        model.train(was_training)
    routers.weight, routers.bias = weight.detach().cpu(), bias.detach().cpu()
    return routers, TrainReport(steps, losses[0], losses[-1], keep_mean)

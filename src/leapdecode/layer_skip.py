"""Block skipping through public module boundaries, always undone: the machinery every layer-skipping
method (lossless `self-spec`, lossy `ffn-skip`, `skipdecode`, `first`, `early-exit`) shares.

How a block is skipped. In the llama, qwen2 and gemma3 decoder layers the residual add happens in the
layer's own forward (`h = h + attn(norm(h))`, `h = h + mlp(norm(h))`; gemma3 puts a post-norm on the
branch, and the RMS norm of zeros is zeros). So replacing `layer.self_attn` / `layer.mlp` with a wrapper
module whose branch returns zeros skips that block exactly, and both skipped = the whole layer is the
identity. `gated(model, gate)` swaps the wrappers in, registers the few forward hooks a gate asks for, and
puts every original module back and removes every hook in `finally`; the model's code and config are
never touched.

What a skipped attention block does to the KV cache (one `Action` per block and forward pass):
- RUN: the real block.
- SKIP_FFN: the MLP branch returns zeros (attention is never skipped this way: see below).
- FILL: run the attention so its KV entries exist (computed from the hidden state that reaches this
  layer: state copying, as in CALM's early exit), but drop its output.
- PLACEHOLDER: append zero K/V for this pass and drop the output. Only correct when no later query of
  this layer can attend these positions: the layer is skipped for every later token too (a nested skip
  schedule: SkipDecode's monotone exit points, FiRST's per-generation decision, a fixed draft skip set).
  It keeps every layer's cache the same length, which the engine's crop/compaction and the models'
  position ids (read from the cache length) rely on.
"""
from __future__ import annotations

import enum
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import InvalidSettingError
from .runtime import compiled

ATTN, FFN = "attn", "ffn"


class Action(enum.Enum):
    RUN = "run"
    SKIP = "skip"
    FILL = "fill"
    PLACEHOLDER = "placeholder"


@dataclass
class BlockCounts:
    """Blocks actually executed, per kind and layer, summed over forward passes (FILL counts as run)."""

    attn: list[int]
    ffn: list[int]
    passes: int = 0

    @classmethod
    def zeros(cls, layers: int) -> "BlockCounts":
        return cls([0] * layers, [0] * layers)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a llama-style CausalLM (`model.model.layers`), checked for the two blocks."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not all(hasattr(l, "self_attn") and hasattr(l, "mlp") for l in layers):
        raise InvalidSettingError(
            f"layer skipping needs decoder layers with `self_attn` and `mlp` blocks; {type(model).__name__} has none"
        )
    return layers


def num_layers(model: torch.nn.Module) -> int:
    return len(decoder_layers(model))


def ffn_norm(layer: torch.nn.Module) -> torch.nn.Module:
    """The norm whose input is the residual stream entering the FFN block (gemma3: pre_feedforward)."""
    return getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm


class Gate:
    """Decides, per forward pass, what each block does. Subclasses override `attention`/`mlp` and the
    optional observation callbacks (which are only hooked when overridden)."""

    def __init__(self, layers: int):
        self.layers = layers
        self.counts = BlockCounts.zeros(layers)
        self.pass_index = -1  # 0 = the first pass of the generation (the prefill, or the first token)
        self.pass_tokens = 0

    def begin_pass(self, tokens: int) -> None:
        self.pass_index += 1
        self.pass_tokens = tokens
        self.counts.passes += 1

    def attention(self, layer: int) -> Action:
        return Action.RUN

    def mlp(self, layer: int) -> Action:
        return Action.RUN

    # observation callbacks (hooks exist only for the ones a subclass overrides)
    def observe_layer_input(self, layer: int, hidden: torch.Tensor) -> None: ...

    def observe_ffn_input(self, layer: int, hidden: torch.Tensor) -> None: ...

    def observe_layer_output(self, layer: int, hidden: torch.Tensor) -> None: ...

    def head(self, inner: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return inner(hidden)


def _overrides(gate: Gate, name: str) -> bool:
    return getattr(type(gate), name) is not getattr(Gate, name)


class GatedAttention(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, layer: int, gate: Gate):
        super().__init__()
        self.inner, self.layer, self.gate = inner, layer, gate

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        action = self.gate.attention(self.layer)
        if action is Action.RUN or action is Action.FILL:
            self.gate.counts.attn[self.layer] += 1
            out = self.inner(hidden_states, *args, **kwargs)
            if action is Action.RUN:
                return out
            return (torch.zeros_like(out[0]),) + tuple(out[1:])
        if action is Action.PLACEHOLDER:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None:
                b, t = hidden_states.shape[:2]
                heads = self.inner.config.num_key_value_heads
                zeros = hidden_states.new_zeros(b, heads, t, self.inner.head_dim)
                cache.update(zeros, zeros, self.layer)
        return torch.zeros_like(hidden_states), None


class GatedMLP(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, layer: int, gate: Gate):
        super().__init__()
        self.inner, self.layer, self.gate = inner, layer, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate.mlp(self.layer) is Action.RUN:
            self.gate.counts.ffn[self.layer] += 1
            return self.inner(x)
        return torch.zeros_like(x)


class GatedHead(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, gate: Gate):
        super().__init__()
        self.inner, self.gate = inner, gate

    @property
    def weight(self):  # tied-weight bookkeeping reads lm_head.weight
        return self.inner.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.gate.head(self.inner, hidden)


def _first(args, kwargs, name):
    return args[0] if args else kwargs.get(name)


@contextmanager
def gated(model: torch.nn.Module, gate: Gate) -> Iterator[Gate]:
    """Run `model` under `gate` inside the block; the original modules and no hooks afterwards."""
    if compiled.passes_for(model) is not None:
        raise InvalidSettingError("layer-skipping methods swap the model's modules, which its compiled passes "
                                  "do not see; run them without --compile")
    layers = decoder_layers(model)
    if gate.layers != len(layers):
        raise InvalidSettingError(f"the gate is for {gate.layers} layers, the model has {len(layers)}")
    originals = [(layer.self_attn, layer.mlp) for layer in layers]
    head = getattr(model, "lm_head", None) if _overrides(gate, "head") else None
    handles = []
    try:
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model

        def begin(_module, args, kwargs):
            ids = _first(args, kwargs, "input_ids")
            ids = ids if ids is not None else kwargs.get("inputs_embeds")
            gate.begin_pass(int(ids.shape[1]))

        handles.append(base.register_forward_pre_hook(begin, with_kwargs=True))
        for i, layer in enumerate(layers):
            if _overrides(gate, "observe_layer_input"):
                handles.append(layer.register_forward_pre_hook(
                    lambda _m, args, kwargs, i=i: gate.observe_layer_input(i, _first(args, kwargs, "hidden_states")),
                    with_kwargs=True))
            if _overrides(gate, "observe_layer_output"):
                handles.append(layer.register_forward_hook(
                    lambda _m, _args, out, i=i: gate.observe_layer_output(i, out[0] if isinstance(out, tuple) else out)))
            if _overrides(gate, "observe_ffn_input"):
                handles.append(ffn_norm(layer).register_forward_pre_hook(
                    lambda _m, args, i=i: gate.observe_ffn_input(i, args[0])))
            layer.self_attn = GatedAttention(originals[i][0], i, gate)
            layer.mlp = GatedMLP(originals[i][1], i, gate)
        if head is not None:
            model.lm_head = GatedHead(head, gate)
        yield gate
    finally:
        for handle in handles:
            handle.remove()
        for layer, (attn, mlp) in zip(layers, originals):
            layer.self_attn = attn
            layer.mlp = mlp
        if head is not None:
            model.lm_head = head


# ----- fixed skip sets (self-spec drafts, S2D nested sub-models) ------------------------------------------

@dataclass(frozen=True)
class SkipSet:
    """Blocks to skip: layer indices whose attention / FFN block is skipped (a whole layer = both)."""

    attention: frozenset[int] = field(default_factory=frozenset)
    ffn: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def of(cls, layers=(), attention=(), ffn=()) -> "SkipSet":
        whole = set(parse_indices(layers))
        return cls(frozenset(whole | set(parse_indices(attention))), frozenset(whole | set(parse_indices(ffn))))

    @classmethod
    def first_layers(cls, keep: int, total: int) -> "SkipSet":
        """S2D-style nested sub-model: the first `keep` layers plus the final norm and LM head."""
        return cls.of(layers=range(keep, total))

    @property
    def size(self) -> int:
        return len(self.attention) + len(self.ffn)

    def check(self, total: int) -> "SkipSet":
        bad = sorted(i for i in self.attention | self.ffn if not 0 <= i < total)
        if bad:
            raise InvalidSettingError(f"skip set names layers {bad}; the model has layers 0..{total - 1}")
        if len(self.attention) == total and len(self.ffn) == total:
            raise InvalidSettingError("the skip set removes every layer; keep at least one block")
        return self

    def to_json(self) -> dict:
        return {"skip_attention": sorted(self.attention), "skip_ffn": sorted(self.ffn)}


def parse_indices(value) -> list[int]:
    """Layer indices from a list, a range, an int, or a string like "3,5,7-9" (from --option)."""
    if value is None or value == "":
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, str):
        out: list[int] = []
        for part in value.replace(" ", "").strip("[]").split(","):
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1)
                    out += list(range(int(lo), int(hi) + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise InvalidSettingError(f"cannot read layer indices from {value!r}") from None
        return out
    try:
        return [int(i) for i in value]
    except (TypeError, ValueError):
        raise InvalidSettingError(f"cannot read layer indices from {value!r}") from None


class StaticGate(Gate):
    """Skip a fixed set every pass. Skipped attention appends placeholders (the set never changes while
    this gate is active, so no query of that layer reads them)."""

    def __init__(self, layers: int, skip: SkipSet):
        super().__init__(layers)
        self.skip = skip

    def attention(self, layer: int) -> Action:
        return Action.PLACEHOLDER if layer in self.skip.attention else Action.RUN

    def mlp(self, layer: int) -> Action:
        return Action.SKIP if layer in self.skip.ffn else Action.RUN


def check_range(name: str, value, low: float, high: float, *, low_open=False, high_open=False) -> float:
    """A float option inside [low, high] (open ends where asked), else a clear InvalidSettingError."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InvalidSettingError(f"{name} must be a number, got {value!r}") from None
    below = x <= low if low_open else x < low
    above = x >= high if high_open else x > high
    if below or above or x != x:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise InvalidSettingError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return x


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidSettingError(f"{name} must be an integer {bound}, got {value!r}")
    return value

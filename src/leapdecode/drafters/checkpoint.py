"""Saving and loading trained drafters: safetensors weights + a JSON config bound to one target model.

A drafter is only meaningful for the target whose features it was trained on, so its config records the
target's hidden size, vocabulary size and a fingerprint of the target's weights; `load_drafter` refuses a
drafter trained for another model with one clear error.

`train-drafter` also records the folder of the last drafter trained for a target and kind under the
leapdecode cache (`drafters/<fingerprint>-<kind>.json`), so `--method hydra` without a `drafter` option finds
it (the benchmark command has no method options).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import InvalidSettingError
from ..runtime.quantized import leading_rows

WEIGHTS = "drafter.safetensors"
CONFIG = "drafter.json"
DRAFT_VOCAB = "draft_vocab.safetensors"  # optional: the ids the drafter drafts from (draft_vocab.py)
FORMAT_VERSION = 1


@dataclass
class DrafterConfig:
    """What a saved drafter is and which target it belongs to."""

    kind: str  # medusa | hydra | falcon | hidden-transfer
    hidden_size: int
    vocab_size: int
    target_fingerprint: str
    target_name: str = ""
    settings: dict = field(default_factory=dict)  # architecture settings passed to the module's constructor
    training: dict = field(default_factory=dict)  # steps, final loss, data size, minutes (informational)
    format_version: int = FORMAT_VERSION


def target_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the target's architecture facts and a slice of its embedding and LM-head weights."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    digest = hashlib.sha256()
    facts = [type(model).__name__, cfg.hidden_size, model.get_output_embeddings().out_features,
             getattr(cfg, "num_hidden_layers", 0)]
    digest.update(json.dumps(facts).encode())
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):  # the same for every --weights
        digest.update(leading_rows(module).contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def target_facts(model: torch.nn.Module) -> tuple[int, int]:
    """(hidden size, vocabulary size) of a target model."""
    head = model.get_output_embeddings()
    return int(head.in_features), int(head.out_features)


def make_module(config: DrafterConfig) -> torch.nn.Module:
    """The drafter network for a config (fresh weights)."""
    if config.kind == "medusa":
        from .medusa import MedusaHeads as cls
    elif config.kind == "hydra":
        from .hydra import HydraHeads as cls
    elif config.kind == "falcon":
        from .falcon import FalconDrafterNet as cls
    elif config.kind == "hidden-transfer":
        from .hidden_transfer import HiddenTransferNet as cls
    else:
        raise InvalidSettingError(f"unknown drafter kind {config.kind!r}; valid kinds: falcon, hidden-transfer, "
                                  "hydra, medusa")
    return cls(config.hidden_size, **config.settings)


def save_drafter(folder: str | Path, module: torch.nn.Module, config: DrafterConfig) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / (WEIGHTS + ".tmp")))
    (folder / (WEIGHTS + ".tmp")).replace(folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps(asdict(config), indent=2) + "\n")
    return folder


def read_config(folder: str | Path) -> DrafterConfig:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file() or not (folder / WEIGHTS).is_file():
        raise InvalidSettingError(f"{folder} is not a trained drafter (expected {CONFIG} and {WEIGHTS}); "
                                  "train one with `leapdecode train-drafter`")
    try:
        data = json.loads(path.read_text())
        return DrafterConfig(**data)
    except (ValueError, TypeError) as err:
        raise InvalidSettingError(f"{path} is not a valid drafter config: {err}") from None


def check_compatible(config: DrafterConfig, target_model: torch.nn.Module, where: str = "") -> None:
    """Refuse a drafter trained for another target (hidden size, vocabulary, weight fingerprint)."""
    hidden, vocab = target_facts(target_model)
    label = f"the drafter in {where}" if where else "the drafter"
    trained_for = f"trained for {config.target_name!r}" if config.target_name else "trained for another model"
    if config.hidden_size != hidden:
        raise InvalidSettingError(f"{label} was {trained_for} with hidden size {config.hidden_size}, "
                                  f"but this target has hidden size {hidden}")
    if config.vocab_size != vocab:
        raise InvalidSettingError(f"{label} was {trained_for} with a vocabulary of {config.vocab_size} tokens, "
                                  f"but this target has {vocab}")
    if config.target_fingerprint != target_fingerprint(target_model):
        raise InvalidSettingError(f"{label} was {trained_for} (fingerprint {config.target_fingerprint}), not for "
                                  "this target's weights; train a drafter for this model with "
                                  "`leapdecode train-drafter`")


def load_drafter(folder: str | Path, target_model: torch.nn.Module, kind: str | None = None):
    """(config, module in eval mode on the target's device) for a saved drafter, after the compatibility check."""
    from safetensors.torch import load_file

    config = read_config(folder)
    if kind is not None and config.kind != kind:
        raise InvalidSettingError(f"{folder} holds a {config.kind} drafter, not a {kind} drafter")
    check_compatible(config, target_model, str(folder))
    module = make_module(config)
    module.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
    device = next(target_model.parameters()).device
    return config, module.to(device).eval()


def save_draft_vocab(folder: str | Path, ids: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / DRAFT_VOCAB
    save_file({"ids": ids.long().cpu().contiguous()}, str(path) + ".tmp")
    Path(str(path) + ".tmp").replace(path)
    return path


def load_draft_vocab(folder: str | Path) -> torch.Tensor | None:
    """The drafter's draft vocabulary, or None when it was saved without one (the full LM head is used)."""
    from safetensors.torch import load_file

    path = Path(folder) / DRAFT_VOCAB
    return load_file(str(path))["ids"] if path.is_file() else None


# ----- the default drafter of a target -------------------------------------------------------------------

def _pointer(target_model: torch.nn.Module, kind: str) -> Path:
    from ..loading import cache_root

    return cache_root() / "drafters" / f"{target_fingerprint(target_model)}-{kind}.json"


def remember_default(target_model: torch.nn.Module, kind: str, folder: str | Path) -> Path:
    path = _pointer(target_model, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"path": str(Path(folder).resolve())}) + "\n")
    return path


def default_drafter(target_model: torch.nn.Module, kind: str, model_name: str | None = None) -> Path:
    """The drafter last trained for this target and kind; without one, an error naming the command to run
    (`model_name`, the name the user gave the target, goes into it)."""
    path = _pointer(target_model, kind)
    if path.is_file():
        folder = Path(json.loads(path.read_text())["path"])
        if (folder / CONFIG).is_file():
            return folder
    model = model_name or "MODEL"
    raise InvalidSettingError(f"{kind} needs a drafter trained for this model and none is found: train one with "
                              f"`leapdecode train-drafter --model {model} --kind {kind} --out runs/{kind}` (then it "
                              f"is this model's default), or pass --drafter DIR")

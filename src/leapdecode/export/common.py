"""What the export formats share: the refusal error, the exported record, and the target's tensors."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InvalidSettingError


class ExportRefused(InvalidSettingError):
    """A drafter whose shape the engine cannot hold; the message says why in one line."""


@dataclass
class Exported:
    """A drafter in an engine's layout: the config.json keys, the tensors, and what the engine does
    differently from our drafter (printed with the command line)."""

    config: dict
    tensors: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)
    speculative_tokens: int = 3


def lm_head_weight(target_model: torch.nn.Module) -> torch.Tensor:
    """The target's LM head as a float tensor (V, H); refused when it has a bias (the engines' has none)."""
    head = target_model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ExportRefused("the target's LM head has a bias; the engines' LM heads have none")
    return _float_weight(head)


def embedding_weight(target_model: torch.nn.Module) -> torch.Tensor:
    return _float_weight(target_model.get_input_embeddings())


def _float_weight(module: torch.nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ExportRefused("the export copies the target's float LM head and embeddings: load the target with "
                            "weights='fp32'")
    return weight.detach().float().cpu()


def target_text_config(target_model: torch.nn.Module):
    cfg = target_model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

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
    return head.weight.detach().float().cpu()


def embedding_weight(target_model: torch.nn.Module) -> torch.Tensor:
    return target_model.get_input_embeddings().weight.detach().float().cpu()


def target_text_config(target_model: torch.nn.Module):
    cfg = target_model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

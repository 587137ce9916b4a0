"""Drafters with random (not identity) weights for tiny targets, and the target's final hidden states."""
from __future__ import annotations

from pathlib import Path

import torch

from leapdecode.drafters.checkpoint import DrafterConfig, make_module, save_drafter, target_facts, target_fingerprint
from leapdecode.lm import CausalLM


def saved_drafter(target, folder: Path, kind: str, settings: dict, seed: int = 0, noise: float = 0.05,
                  edit=None):
    """(folder, net) of a drafter saved for `target`; `edit(net)` may change the weights before saving."""
    hidden, vocab = target_facts(target.model)
    config = DrafterConfig(kind=kind, hidden_size=hidden, vocab_size=vocab, target_name=target.name,
                           target_fingerprint=target_fingerprint(target.model), settings=settings)
    torch.manual_seed(seed)
    net = make_module(config)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(noise * torch.randn(p.shape))
        if edit is not None:
            edit(net)
    save_drafter(folder, net, config)
    return folder, net.eval()


def final_hidden(target, ids: list[int]) -> torch.Tensor:
    """The target's final (post-norm) hidden states (T, H) over `ids`: what the engines hand their drafters."""
    lm = CausalLM(target.model)
    lm.keep_hidden = True
    with torch.inference_mode():
        lm.forward(torch.tensor([ids]))
    return lm.last_hidden[0].float().clone()

"""vLLM's EAGLE-1 layout (`--format vllm-eagle`): see `eagle.py`. vLLM's `fc` has no bias (a `fc.bias` in the
file would be skipped without a word), and its config loader (`vllm/transformers_utils/configs/eagle.py`) turns
the `LlamaForCausalLM` architecture into `EagleLlamaForCausalLM`."""
from __future__ import annotations

import json

from . import eagle
from .common import Exported

FORMAT = "vllm-eagle"


def convert(net, drafter_config, target_model, where: str = "the drafter") -> Exported:
    exported = eagle.convert(net, drafter_config, target_model, fc_bias=False)
    exported.config["architectures"] = ["LlamaForCausalLM"]
    return exported


def command(serve_model: str, out: str, exported: Exported) -> str:
    spec = json.dumps({"method": "eagle", "model": out, "num_speculative_tokens": exported.speculative_tokens})
    return f"vllm serve {serve_model} --speculative-config '{spec}'"

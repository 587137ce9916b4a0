"""SGLang's EAGLE layout (`--format sglang-eagle`): see `eagle.py`. SGLang's `fc` has a bias
(`python/sglang/srt/models/llama_eagle.py`), written as zeros (our `fuse` has none), and the architecture is
its `LlamaForCausalLMEagle`."""
from __future__ import annotations

from . import eagle
from .common import Exported

FORMAT = "sglang-eagle"


def convert(net, drafter_config, target_model, where: str = "the drafter") -> Exported:
    exported = eagle.convert(net, drafter_config, target_model, fc_bias=True)
    exported.config["architectures"] = ["LlamaForCausalLMEagle"]
    return exported


def command(serve_model: str, out: str, exported: Exported) -> str:
    steps = exported.speculative_tokens
    return (f"python -m sglang.launch_server --model-path {serve_model} --speculative-algorithm EAGLE "
            f"--speculative-draft-model-path {out} --speculative-num-steps {steps} --speculative-eagle-topk 1 "
            f"--speculative-num-draft-tokens {steps + 1}")

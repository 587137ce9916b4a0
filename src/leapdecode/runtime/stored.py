"""The converted model on disk: what loading a preset or GGUF file in a quantized mode needs, and nothing more.

The first `load(..., weights="int4")` of a GGUF builds the model from transformers' dequantized copy and
converts it (`convert.py`); `save` then writes the converted state under the leapdecode cache:

```
<cache>/models-v1/<name>-<sha>-<weights>/
    runtime.safetensors   every tensor of the converted model (packed int4 codes, scales, norms, ...)
    runtime.json          which module each layer became and its shapes; torch version and CPU kernel
    config.json, tokenizer files
```
Later loads build the model's skeleton without weights (accelerate's `init_empty_weights`), put empty
quantized modules where the record says, and assign the stored tensors: no float32 copy on disk or in memory
(for SmolLM2-135M, 116 MB stored instead of 540 MB). The packed int4 layout is torch's and may depend on the
CPU kernel it was made for, so a copy made by another torch version or on a CPU with other kernels is not used
(the model is converted again).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import fused
from .convert import RuntimeInfo, Weights, _own_storage, _replace, use_exact_passes
from .quantized import BF16Linear, Int4Linear, Int6Linear, Int8GroupLinear, Int8Linear, QuantEmbedding, _QuantLinear

MARKER = "runtime.json"
TENSORS = "runtime.safetensors"
# 3: the group kernel's own layout (code, scale, minimum; float16 scales where exact); 4: Q4_K factored;
# 5: Q6_K as 6-bit codes (Int6Linear) instead of 8-bit groups
FORMAT = 5
_LINEARS = {cls.__name__: cls for cls in (Int4Linear, Int6Linear, Int8GroupLinear, Int8Linear, BF16Linear)}


def _kernel_tag() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def folder_for(cache_dir: Path, weights: Weights) -> Path:
    """Beside the dequantized copy's folder: `<that folder>-<weights>`."""
    return cache_dir.with_name(f"{cache_dir.name}-{weights.value}")


def save(model: nn.Module, tokenizer, info: RuntimeInfo, folder: Path) -> None:
    """Write the converted model atomically (a temp folder beside it, then one rename)."""
    from safetensors.torch import save_file

    modules = {}
    for name, module in model.named_modules():
        if isinstance(module, (_QuantLinear, QuantEmbedding)):
            modules[name] = {"class": type(module).__name__, **module.shape_record()}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    try:
        save_file(state, str(tmp / TENSORS))
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"format": FORMAT, **_kernel_tag(), "weights": info.weights.value, "layers": info.layers,
                  "modules": modules}
        (tmp / MARKER).write_text(json.dumps(record, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def usable(folder: Path) -> bool:
    """Whether `folder` holds a converted model this torch and CPU can run."""
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return record.get("format") == FORMAT and all(record.get(k) == v for k, v in _kernel_tag().items())


def load(folder: Path) -> tuple[nn.Module, object, RuntimeInfo]:
    """The converted model, its tokenizer and what it is, from a folder written by `save`."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    record = json.loads((folder / MARKER).read_text())
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    for name, entry in record["modules"].items():
        if entry["class"] == "QuantEmbedding":
            old = model.get_submodule(name)
            module = QuantEmbedding.placeholder(entry, getattr(old, "embed_scale", None))
        else:
            module = _LINEARS[entry["class"]].placeholder(entry)
        _replace(model, name, module)
    state = load_file(str(folder / TENSORS))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers()
                                                                          if b.is_meta]
    if unexpected or leftover:
        raise ValueError(f"stored runtime does not fit the model: unexpected {unexpected[:3]}, "
                         f"unset {leftover[:3]}")
    model.eval()
    model.requires_grad_(False)
    _own_storage(model)
    weights = Weights(record["weights"])
    layers = {kind: n for kind, n in record["layers"].items() if kind not in fused.FUSED_KINDS}
    if weights.exact:
        layers.update(use_exact_passes(model))  # fused modules are not stored: the same state dict either way
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer, RuntimeInfo(weights, exact=weights.exact, layers=layers)

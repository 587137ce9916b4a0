"""`leapdecode export`: a trained drafter written in the layout vLLM or SGLang loads.

    leapdecode export --format vllm-medusa --drafter runs/medusa --out runs/medusa-vllm
    leapdecode export --format sglang-eagle --drafter runs/falcon --out runs/falcon-sglang

Each format module (`vllm_medusa`, `vllm_eagle`, `sglang_eagle`) maps our drafter's tensors to the engine's
names and config keys or refuses, in one line, a drafter the engine cannot hold; `manifest` lists what each
engine loads (with the engine file it comes from) and the written folder is checked against it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import sglang_eagle, vllm_eagle, vllm_medusa
from .common import ExportRefused, Exported
from .manifest import CONFIG_FILE, WEIGHTS_FILE, check_export

FORMATS = {m.FORMAT: m for m in (vllm_medusa, vllm_eagle, sglang_eagle)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# the Hugging Face repositories of the presets' original weights, for the printed command lines
SERVE_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
             "qwen2.5-coder-0.5b": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
             "qwen2.5-coder-1.5b": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
             "gemma3-270m": "google/gemma-3-270m"}

__all__ = ["FORMATS", "ExportRefused", "ExportResult", "export_drafter"]


@dataclass
class ExportResult:
    folder: Path
    format: str
    command: str
    notes: list[str] = field(default_factory=list)


def convert(fmt: str, drafter_dir: str | Path, target_model: torch.nn.Module,
            full_vocab: bool = False) -> Exported:
    """The drafter in `fmt`'s layout (nothing written), after the drafter/target compatibility check."""
    from ..drafters.checkpoint import load_drafter, load_draft_vocab

    if fmt not in FORMATS:
        raise ExportRefused(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    config, net = load_drafter(drafter_dir, target_model)
    exported = FORMATS[fmt].convert(net.float().cpu(), config, target_model, where=f"the drafter in {drafter_dir}")
    vocab = load_draft_vocab(drafter_dir)
    if vocab is not None:
        if not full_vocab:
            raise ExportRefused(f"the drafter drafts from a vocabulary of {len(vocab)} tokens plus each prompt's, "
                                "which the engines cannot map (vLLM's token_map is fixed, SGLang has none); pass "
                                "--full-vocab to export it drafting from the full vocabulary")
        exported.notes.append(f"exported with the full vocabulary (the drafter's {len(vocab)}-token draft "
                              "vocabulary is left out)")
    return exported


def chain_length(paths: str, fmt: str, exported: Exported) -> int:
    """The draft length a path list asks for; refused unless it is a chain (and, for vLLM's Medusa, one token
    per head): the engines' command lines take a number of draft tokens, not a tree of paths."""
    from ..drafters.medusa import parse_paths

    try:
        parsed = parse_paths(paths)
    except ValueError as err:
        raise ExportRefused(str(err)) from None
    depth = max(len(p) for p in parsed)
    if parsed != [(0,) * d for d in range(1, depth + 1)]:
        raise ExportRefused(f"the path list {paths!r} is a tree; vLLM drafts a chain (num_speculative_tokens) and "
                            "SGLang grows its own top-k tree, so only a chain (e.g. chain:3) can be exported")
    heads = exported.config.get("num_heads")
    if fmt == "vllm-medusa" and depth != heads:
        raise ExportRefused(f"vLLM's Medusa proposer drafts one token per head: the chain must be {heads} long, "
                            f"not {depth}")
    return depth


def export_drafter(fmt: str, drafter_dir: str | Path, out: str | Path, target_model: torch.nn.Module,
                   serve_model: str, full_vocab: bool = False, dtype: str = "fp32",
                   paths: str | None = None) -> ExportResult:
    """Write `config.json` + `model.safetensors` for `fmt` into `out`, check them against the manifest and
    return the command line that serves the target with them (`paths`: a chain such as "chain:3" sets the
    draft length in that command; a tree is refused). `target_model` has float weights (weights="fp32")."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ExportRefused(f"unknown dtype {dtype!r}; dtypes: {', '.join(DTYPES)}")
    exported = convert(fmt, drafter_dir, target_model, full_vocab)
    if paths is not None:
        exported.speculative_tokens = chain_length(paths, fmt, exported)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(exported.config, torch_dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype])
    tensors = {k: v.to(DTYPES[dtype]).clone() for k, v in exported.tensors.items()}  # clone: no shared storage
    save_file(tensors, str(out / (WEIGHTS_FILE + ".tmp")), metadata={"format": "pt"})
    (out / (WEIGHTS_FILE + ".tmp")).replace(out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    problems = check_export(out, fmt)
    if problems:  # a bug of the exporter, never the user's
        raise RuntimeError(f"the export in {out} does not match the {fmt} manifest: {'; '.join(problems)}")
    command = FORMATS[fmt].command(serve_model, str(out.resolve()), exported)
    return ExportResult(out, fmt, command, exported.notes)

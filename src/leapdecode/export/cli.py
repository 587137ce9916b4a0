"""`leapdecode export --format vllm-medusa|vllm-eagle|sglang-eagle --drafter DIR --out DIR2`."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from . import DTYPES, FORMATS

    p = subparsers.add_parser("export", help="write a trained drafter in vLLM's or SGLang's layout",
                              description="Writes config.json + model.safetensors the engine loads as a "
                              "speculative drafter and prints the command that serves the target with it.")
    p.add_argument("--format", required=True, choices=tuple(FORMATS), dest="format")
    p.add_argument("--drafter", required=True, metavar="DIR", help="a drafter made by `leapdecode train-drafter`")
    p.add_argument("--out", required=True, metavar="DIR2")
    p.add_argument("--model", default=None, help="the drafter's target (default: the one it was trained for)")
    p.add_argument("--serve-model", default=None, metavar="ID",
                   help="the target as the engine names it in the printed command (default: the preset's Hugging "
                   "Face repository, else --model)")
    p.add_argument("--full-vocab", action="store_true",
                   help="export a drafter saved with a draft vocabulary, drafting from the full vocabulary")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--paths", default=None, metavar="SPEC",
                   help="draft length for the printed command as a chain (chain:3, or 0;0,0;0,0,0); a tree of "
                   "paths is refused (default: the number of heads for Medusa, 3 for EAGLE)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from .. import load
    from ..drafters.checkpoint import read_config
    from ..presets import DEFAULT_MODEL
    from . import SERVE_IDS, export_drafter

    config = read_config(args.drafter)
    model = args.model or config.target_name or DEFAULT_MODEL
    target = load(model, device="cpu", weights="fp32")  # the float LM head and embeddings, as trained on
    serve = args.serve_model or SERVE_IDS.get(model, model)
    result = export_drafter(args.format, args.drafter, args.out, target.model, serve, args.full_vocab, args.dtype,
                            args.paths)
    print(f"wrote {result.folder}/config.json and model.safetensors ({result.format}); they match the manifest")
    for note in result.notes:
        print(f"note: {note}")
    print(f"note: the drafter was trained on the features of {target.name}; serve the same weights")
    print(result.command)
    return 0

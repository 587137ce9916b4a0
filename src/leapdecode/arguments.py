"""Command-line arguments shared by the subcommands (`generate`, `bench`, `serve`, `train-drafter`,
`calibrate-skip`, ...): the model flags, the sampling flags and the flags that set a method option to a file."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidSettingError


def add_model_arguments(p: argparse.ArgumentParser, compile: bool = False) -> None:
    """The model flags; `compile`: also `--compile` (commands that decode one sequence at a time)."""
    from .presets import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"preset, .gguf file, folder or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--draft-model", default=None, help="draft model for the `draft` method (same tokenizer)")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when present, else cpu), cpu, cuda, cuda:N")
    from .runtime.convert import WEIGHT_CHOICES, WEIGHTS_HELP

    p.add_argument("--weights", default="auto", choices=("auto", *WEIGHT_CHOICES), help=WEIGHTS_HELP)
    p.add_argument("--draft-weights", default="auto", choices=("auto", *WEIGHT_CHOICES),
                   help="the draft model's runtime (default auto: int4-all on a CPU, since a draft's weights only "
                   "decide how many of its tokens are accepted, never the output)")
    if compile:
        p.add_argument("--compile", action="store_true",
                       help="run the passes as compiled graphs (int4, int4-all, int8): faster passes after minutes of "
                       "compiling at load the first time (then read from disk); refused for models with "
                       "sliding-window layers and for models whose graphs fail the load-time exactness check")


@dataclass(frozen=True)
class FileFlag:
    """A flag that sets one method option to a file or folder, for the methods that take that option."""

    flag: str
    option: str  # the method option it sets (also the argparse dest)
    methods: tuple[str, ...]  # methods that take the option
    folder: bool  # the value must be a folder (else a file)
    help: str
    overridden_by: tuple[str, ...] = ()  # other options of those methods that choose the same thing


FILE_FLAGS = (
    FileFlag("--skip-config", "skip_config", ("self-spec",), False,
             "self-spec: skip set JSON made by `leapdecode calibrate-skip`",
             ("skip_layers", "skip_attention", "skip_ffn", "draft_layers")),
    FileFlag("--drafter", "drafter", ("medusa", "hydra", "falcon", "hidden-transfer"), True,
             "medusa/hydra/falcon/hidden-transfer: trained drafter folder made by `leapdecode train-drafter`"),
)


def add_file_flag_arguments(p: argparse.ArgumentParser) -> None:
    for f in FILE_FLAGS:
        p.add_argument(f.flag, dest=f.option, default=None, metavar="DIR" if f.folder else "PATH", help=f.help)


def given_file_flags(args: argparse.Namespace) -> list[tuple[FileFlag, str]]:
    """The file flags set on the command line with their values; a missing file or folder is an error."""
    given = []
    for f in FILE_FLAGS:
        value = getattr(args, f.option, None)
        if value in (None, ""):
            continue
        path = Path(value).expanduser()
        if not (path.is_dir() if f.folder else path.is_file()):
            raise InvalidSettingError(f"{f.flag} {value}: no such {'folder' if f.folder else 'file'}")
        given.append((f, str(path)))
    return given


def file_flag_options(args: argparse.Namespace, method: str, options: dict) -> dict:
    """The options the file flags add for `method` (generate); refuse a method that does not take one, and
    a flag that repeats or contradicts an --option."""
    out = {}
    for f, value in given_file_flags(args):
        if method not in f.methods:
            raise InvalidSettingError(f"{f.flag} is for {', '.join(f.methods)}; method {method!r} does not take it")
        clash = [o for o in (f.option, *f.overridden_by) if o in options]
        if clash:
            raise InvalidSettingError(f"give {f.flag} or --option {clash[0]}=..., not both")
        out[f.option] = value
    return out


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)

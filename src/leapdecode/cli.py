"""Command line: `leapdecode generate | methods | models | bench`."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

from .arguments import add_file_flag_arguments, add_model_arguments, add_sampling_arguments, file_flag_options
from .errors import LeapdecodeError
from .methods import parse_options


@dataclass
class CompareRow:
    method: str
    new_tokens: int
    tokens_per_s: float
    mean_accepted: float | None
    identical: bool | None
    text: str = ""


def _print_table(rows: list[CompareRow]) -> None:
    base = next((r.tokens_per_s for r in rows if r.method == "ar"), None)
    header = ["method", "new tokens", "tokens/s", "speedup", "mean accepted", "identical to ar"]
    lines = [header]
    for r in rows:
        lines.append([
            r.method, str(r.new_tokens), f"{r.tokens_per_s:.1f}",
            f"{r.tokens_per_s / base:.2f}x" if base else "-",
            f"{r.mean_accepted:.2f}" if r.mean_accepted is not None else "-",
            "-" if r.identical is None else ("yes" if r.identical else "NO"),
        ])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    for n, row in enumerate(lines):
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _promised_lossless(method: str) -> bool:
    """Whether `generate --compare` must fail when `method` differs from ar (peers are not ours to check)."""
    from .bench.runner import is_lossless
    from .peers import PEER_METHODS

    return method not in PEER_METHODS and is_lossless(method)


def cmd_generate(args: argparse.Namespace) -> int:
    from . import Decoder, load
    from .loading import resolve_device
    from .demo import DEMO_PROMPT
    from .methods import get_method

    prompt = DEMO_PROMPT if args.demo_prompt else args.prompt
    if prompt is None:
        raise LeapdecodeError("give a PROMPT (or --demo-prompt)")
    if not prompt.strip():
        raise LeapdecodeError("the prompt is empty")
    spec = get_method(args.method)
    options = parse_options(args.option)
    from .kv_compress import options_from_args  # --kv-cache, --kv-bits, ...: a compressed KV cache (lossy)

    options.update(options_from_args(args))
    options.update(file_flag_options(args, args.method, options))
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, stop=args.stop)
    from .engine import _settings

    _settings(**settings)  # validate before loading anything
    if spec.needs_draft_model and not args.draft_model:
        raise LeapdecodeError(f"method {args.method!r} needs --draft-model")
    device = resolve_device(args.device)
    target = load(args.model, device=device, weights=args.weights, compile=args.compile)
    draft = (load(args.draft_model, device=device, weights=args.draft_weights, compile=args.compile, draft=True)
             if args.draft_model else None)
    decoder = Decoder(target, args.method, draft=draft, **options)
    chat = target.has_chat_template and not args.no_chat
    if args.num_return != 1:  # several answers: one loop for all (superposed) or independent generations
        if args.num_return < 1:
            raise LeapdecodeError(f"--num-return must be >= 1, got {args.num_return}")
        started = time.perf_counter()
        results = decoder.generate_several(prompt, args.num_return, chat=chat, **settings)
        wall = time.perf_counter() - started
        for i, result in enumerate(results):
            print(f"--- [{i}] ---\n{result.text}")
        print(f"\n[{args.method}] {args.num_return} answers, {sum(r.stats.new_tokens for r in results)} tokens in "
              f"{wall:.2f} s", file=sys.stderr)
        return 0
    if not args.compare:
        result = decoder.generate(prompt, chat=chat, on_text=lambda s: print(s, end="", flush=True), **settings)
        print()
        st = result.stats
        print(f"\n[{args.method}] {st.new_tokens} tokens in {st.wall_time:.2f} s = {st.tokens_per_s:.1f} tokens/s; "
              f"{st.target_forward_passes} target passes, mean accepted {st.mean_accepted:.2f}; "
              f"acceptance histogram {st.acceptance_histogram}; stop: {st.stop_reason}", file=sys.stderr)
        return 0
    return _compare(args, target, draft, decoder, prompt, chat, settings)


def _compare(args, target, draft, decoder, prompt, chat, settings) -> int:
    from . import Decoder
    from .peers import hf_generate

    from .kv_compress import options_from_args

    runners = {"ar": Decoder(target, "ar", **options_from_args(args))}  # on the same KV cache
    if args.method != "ar":
        runners[args.method] = decoder
    prompt_ids = runners["ar"].encode_prompt(prompt, chat=chat)
    peers = []
    if args.with_hf:
        peers = ["hf-ar", {"pld": "hf-pld", "draft": "hf-assisted"}.get(args.method)]
        peers = [p for p in peers if p]
    print(f"warm-up, then {args.repeats} interleaved run(s) of {', '.join(list(runners) + peers)} "
          f"on a {len(prompt_ids)}-token prompt ...", file=sys.stderr)
    for dec in runners.values():  # warm-up, excluded from timing
        dec.generate(prompt_ids, max_new_tokens=8)
    for peer in peers:
        hf_generate(peer, target, prompt_ids, 8, draft=draft)
    times: dict[str, list[float]] = {name: [] for name in list(runners) + peers}
    results: dict = {}
    for _ in range(args.repeats):
        for name, dec in runners.items():
            res = dec.generate(prompt_ids, **settings)
            times[name].append(res.stats.wall_time)
            results[name] = res
        for peer in peers:
            res = hf_generate(peer, target, prompt_ids, settings["max_new_tokens"], draft=draft)
            times[peer].append(res.wall_time)
            results[peer] = res
    ref_ids = results["ar"].token_ids
    rows = []
    for name in times:
        res = results[name]
        ids = res.token_ids
        wall = statistics.median(times[name])
        mean_acc = res.stats.mean_accepted if hasattr(res, "stats") else None
        same = ids == ref_ids if args.temperature == 0 else None
        rows.append(CompareRow(name, len(ids), len(ids) / wall if wall else 0.0, mean_acc, same))
    print(f"--- {args.method} output ---")
    print(results[args.method].text if hasattr(results[args.method], "text") else "")
    print(f"--- model {target.name}" + (f", draft {draft.name}" if draft else "") + f", median of {args.repeats} ---")
    _print_table(rows)
    if args.temperature == 0 and any(r.identical is False for r in rows if _promised_lossless(r.method)):
        print("WARNING: a lossless method's output differs from ar", file=sys.stderr)
        return 1
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .bench.llamacpp_peer import LLAMACPP_METHODS
    from .methods import all_methods
    from .peers import PEER_METHODS

    specs = all_methods()
    width = max(len(s.name) for s in specs)
    for s in specs:
        print(f"{s.name.ljust(width)}  {s.promise:8}  {s.description}")
    print(f"\npeers for `leapdecode bench`: {', '.join(PEER_METHODS)} (transformers generate()); "
          f"{', '.join(LLAMACPP_METHODS)} (llama.cpp through llama-cpp-python, installed by `make peers`)")
    print("KV-cache compression (--kv-cache quant|gear, with any method) is lossy; a lossless method on a "
          "compressed cache gives the tokens ar gives on that cache")
    print("lossless is bitwise under --weights int4 (the CPU default), int4-all and int8, whose passes are "
          "row-invariant; under --weights bf16 or fp32 it means identical up to floating-point noise (a near-tie "
          "may break differently in a pass of another shape; the bench counts identical outputs); --compile keeps it "
          "bitwise (every pass of a model through the same compiled graphs)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .presets import install, list_presets

    if args.names and not args.install:
        raise LeapdecodeError("preset names are taken with --install (e.g. `leapdecode models --install gemma3-270m`)")
    if args.install:
        install(args.names, dry_run=args.dry_run)
        if args.dry_run:
            return 0
    for p in list_presets():
        print(f"{p.name:22} {'installed' if p.installed else 'not installed':14} {p.description}")
    return 0


SUBCOMMAND_MODULES = (".bench.cli", ".bench.agreement", ".bench.perplexity", ".bench.diverse", ".training.cli", ".server.cli", ".calibrate",
                      ".export.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leapdecode", description="Faster decoding for Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (streams), then print stats")
    g.add_argument("prompt", nargs="?", help="the prompt (the chat template is applied when the model has one)")
    add_model_arguments(g, compile=True)
    g.add_argument("--method", default="pld", help="decoding method (see `leapdecode methods`; default pld)")
    add_sampling_arguments(g)
    from .kv_compress import add_arguments as add_kv_arguments

    add_kv_arguments(g)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option, e.g. num_draft_tokens=8")
    add_file_flag_arguments(g)
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--compare", action="store_true", help="also run ar and print a side-by-side table")
    g.add_argument("--with-hf", action="store_true", help="with --compare: add transformers generate() peers")
    g.add_argument("--repeats", type=int, default=3, help="with --compare: timed runs per method (median)")
    g.add_argument("--num-return", type=int, default=1, metavar="N",
                   help="N answers (method superposed: N drafts from one pass per step; others: N generations)")
    g.add_argument("--demo-prompt", action="store_true", help="use the built-in editing prompt")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("methods", help="list decoding methods with their promise")
    m.set_defaults(func=cmd_methods)
    ms = sub.add_parser("models", help="list model presets and whether they are installed; --install installs them")
    ms.add_argument("names", nargs="*", metavar="PRESET", help="with --install: the presets to install (default all)")
    ms.add_argument("--install", action="store_true", help="install presets with pip (`make models` runs this)")
    ms.add_argument("--dry-run", action="store_true", help="with --install: print the pip commands, run nothing")
    ms.set_defaults(func=cmd_models)

    import importlib

    for module in SUBCOMMAND_MODULES:  # each adds its own subcommands
        importlib.import_module(module, __package__).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LeapdecodeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

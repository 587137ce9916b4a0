"""``leapdecode bench``: check the input, load the models once, run the benchmark, print the table.

Every user error (question file, category, method, missing draft model, output folder, settings) is
reported before any model is loaded. Exit codes: 0 done, 1 a lossless method differed from ``ar``
with ``--strict``, 2 a user error (printed by ``leapdecode.cli.main``), 130 Ctrl-C (the complete
questions are still written).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from leapdecode.bench.questions import load_questions, resolve_questions_path
from leapdecode.bench.runner import (
    BenchSettings,
    check_methods,
    needs_draft,
    prepare_out_dir,
    run_benchmark,
    runner_factory_with,
    split_variant,
    valid_method_names,
)
from leapdecode.arguments import FILE_FLAGS
from leapdecode.errors import InvalidSettingError

DEFAULT_METHODS = "ar,pld,hf-ar,hf-pld"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the ``leapdecode`` parser."""
    from leapdecode.arguments import add_file_flag_arguments, add_model_arguments

    p = subparsers.add_parser(
        "bench",
        help="benchmark decoding methods on a question set (tokens/s, speedup, identity to ar)",
        description="Run methods interleaved per question in one process (warm-up untimed, median of "
        "--repeats) and write answers.jsonl, summary.json, report.md and PNG plots to --out.",
    )
    add_model_arguments(p, compile=True)
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated engine methods and peers, each optionally with options as "
                   f"method@key=value@key=value (e.g. ffn-skip@fraction=0.3) (default {DEFAULT_METHODS}; "
                   f"valid: {', '.join(valid_method_names())})")
    add_file_flag_arguments(p)  # --skip-config, --drafter: for every method in --methods that takes them
    from leapdecode.kv_compress import add_arguments as add_kv_arguments

    add_kv_arguments(p)  # --kv-cache ...: every engine method runs on that cache (its own @kv_cache= wins)
    p.add_argument("--questions", default="suite",
                   help="Spec-Bench-style JSONL file, or 'suite' (benchmarks/suite.jsonl, the default) or "
                   "'spec-bench' (Spec-Bench's 480 questions, shipped with leapdecode; $LEAPDECODE_SPEC_BENCH overrides)")
    p.add_argument("--categories", default=None, help="comma-separated categories to keep (default all)")
    p.add_argument("--per-category", type=int, default=None, metavar="N",
                   help="keep the first N questions of each category")
    p.add_argument("--max-new-tokens", type=int, default=256, help="per turn (default 256)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per question and method; the median "
                   "by wall time is kept (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (with --temperature > 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a lossless method's greedy output differs from ar's")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads, also the llama.cpp peers' (default: torch's choice); 1 avoids thrashing "
                   "on a busy machine")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-pass-cost", action="store_true",
                   help="skip measuring the target's pass-cost curve (1-32 tokens) for the report")
    p.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                   help="run each method that takes KEY (e.g. pld+typical with epsilon) once per value and draw "
                   "speed and quality against it (sweep.json, sweep_KEY.png)")
    p.add_argument("--ray", action="store_true",
                   help="fan the questions out as Ray tasks over a cluster (each runs the methods interleaved on "
                   "its node; speedups are ratios within a node); writes ray_report.md (needs the `ray` extra)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="with --ray: the cluster to join (default: the one in $RAY_ADDRESS, else a local one)")
    p.add_argument("--ray-tasks", type=int, default=None, metavar="N",
                   help="with --ray: tasks to split the questions into (default: one per node)")
    p.set_defaults(func=run_bench)
    return p


def command_line(args: argparse.Namespace, methods: list[str]) -> str:
    """The full command with every setting explicit (defaults included), for report.md."""
    parts = ["leapdecode", "bench", "--model", args.model]
    if args.draft_model:
        parts += ["--draft-model", args.draft_model]
    parts += ["--methods", ",".join(methods)]
    for flag in FILE_FLAGS:
        if getattr(args, flag.option, None):
            parts += [flag.flag, getattr(args, flag.option)]
    parts += ["--questions", args.questions]
    if args.categories:
        parts += ["--categories", args.categories]
    if args.per_category is not None:
        parts += ["--per-category", str(args.per_category)]
    parts += ["--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats)]
    if args.temperature:
        parts += ["--temperature", str(args.temperature)]
    if args.seed is not None:
        parts += ["--seed", str(args.seed)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if getattr(args, "device", "auto") != "auto":
        parts += ["--device", args.device]
    if getattr(args, "weights", "auto") != "auto":
        parts += ["--weights", args.weights]
    if getattr(args, "draft_weights", "auto") != "auto" and getattr(args, "draft_model", None):
        parts += ["--draft-weights", args.draft_weights]
    if getattr(args, "compile", False):
        parts.append("--compile")
    if getattr(args, "kv_cache", "none") != "none":
        parts += ["--kv-cache", args.kv_cache, "--kv-bits", str(args.kv_bits)]
    parts += ["--out", args.out]
    if args.strict:
        parts.append("--strict")
    return shlex.join(parts)


def method_file_options(args: argparse.Namespace, methods: list[str]) -> dict[str, dict]:
    """Per method name, the options ``--skip-config`` / ``--drafter`` add: every method that takes the
    option gets it unless its own @options already set it (or, for self-spec, chose another skip set).
    A flag that no method in the list takes is an error."""
    from leapdecode.arguments import given_file_flags

    out: dict[str, dict] = {}
    for flag, value in given_file_flags(args):
        takers = [m for m in methods if split_variant(m)[0] in flag.methods]
        if not takers:
            raise InvalidSettingError(f"{flag.flag} is for {', '.join(flag.methods)}; no method in --methods "
                                      f"({','.join(methods)}) takes it")
        for method in takers:
            own = split_variant(method)[1]
            if not any(o in own for o in (flag.option, *flag.overridden_by)):
                out.setdefault(method, {})[flag.option] = value
    return out


def _load_model(spec: str, device: str = "cpu", weights: str = "auto", draft: bool = False):
    """Load a model (a seam for tests, which substitute tiny models)."""
    from leapdecode import load

    return load(spec, device=device, weights=weights, draft=draft)


def run_bench(args: argparse.Namespace) -> int:
    """Validate everything, load the models once, run, print the table; return the exit code."""
    settings = BenchSettings(max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                             temperature=args.temperature, seed=args.seed)
    sweep = None
    if getattr(args, "sweep", None):
        from leapdecode.bench.runner import parse_methods
        from leapdecode.bench.sweep import expand, parse_sweep

        key, values = parse_sweep(args.sweep)
        expanded, groups = expand(parse_methods(args.methods), key, values)
        sweep = (key, groups)
    methods = check_methods(expanded if sweep else args.methods, has_draft=bool(args.draft_model),
                            settings=settings)
    method_options = method_file_options(args, methods)
    from leapdecode.kv_compress import options_from_args
    from leapdecode.methods import all_methods

    engine_methods, kv = {s.name for s in all_methods()}, options_from_args(args)
    for m in methods:
        if kv and split_variant(m)[0] in engine_methods and "kv_cache" not in split_variant(m)[1]:
            method_options.setdefault(m, {}).update(kv)
    path = resolve_questions_path(args.questions)
    questions = load_questions(path, categories=args.categories, per_category=args.per_category)
    if args.threads is not None and args.threads < 1:
        raise InvalidSettingError(f"threads must be a positive integer, got {args.threads}")
    out = prepare_out_dir(args.out)
    use_draft = any(needs_draft(m) for m in methods)
    if args.draft_model and not use_draft:
        print(f"note: no method in {','.join(methods)} uses a draft model; {args.draft_model} is not loaded",
              file=sys.stderr)

    if getattr(args, "ray", False):
        if args.compile:
            raise InvalidSettingError("--compile is not supported with --ray (each task loads its own model)")
        return _run_bench_ray(args, questions, methods, settings, method_options, out, use_draft)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from leapdecode.loading import resolve_device

    device = resolve_device(args.device)
    target = _load_model(args.model, device, args.weights)
    draft = _load_model(args.draft_model, device, args.draft_weights, draft=True) if use_draft else None
    if args.compile:
        from leapdecode.loading import with_compiled_passes

        target = with_compiled_passes(target, progress=not args.no_progress)
        draft = with_compiled_passes(draft, progress=not args.no_progress) if draft is not None else None
    text_only = {s.name for s in all_methods() if not s.same_tokenizer}  # their drafts cross as text
    if draft is not None and any(needs_draft(m) and split_variant(m)[0] not in text_only for m in methods):
        from leapdecode.loading import check_draft_compatible

        check_draft_compatible(target, draft)

    runtime = {"runtime": target.runtime.describe()}
    if draft is not None:
        runtime["draft_runtime"] = draft.runtime.describe()
    if not args.no_pass_cost:
        from leapdecode.runtime.pass_cost import describe, pass_cost_ms

        runtime["pass_cost"] = describe(pass_cost_ms(target.model))
        print(f"bench: {target.name} pass cost after 300 tokens: {runtime['pass_cost']}", file=sys.stderr)
    print(f"bench: {len(questions)} questions x {len(methods)} methods x {settings.repeats} repeat(s), "
          f"up to {settings.max_new_tokens} new tokens per turn, on {target.name}", file=sys.stderr)
    result = run_benchmark(
        target, draft, questions, methods, settings, out,
        command_line=command_line(args, methods),
        extra_settings={**runtime, "questions": str(path), "categories": args.categories,
                        "per_category": args.per_category,
                        **{f.option: getattr(args, f.option) for f in FILE_FLAGS if getattr(args, f.option, None)}},
        progress=not args.no_progress,
        runner_factory=runner_factory_with(method_options),
    )
    if result.summary is None:
        return 130 if result.interrupted else 1
    if sweep is not None:
        from leapdecode.bench.sweep import write_sweep

        result.files += write_sweep(out, sweep[0], sweep[1], result.summary)

    decoding = "greedy" if settings.greedy else f"temperature {settings.temperature}"
    print(f"model {target.name}" + (f", draft {draft.name}" if draft is not None else "")
          + f", {len({r.question_id for r in result.records})} questions, {decoding}")
    print(result.table)
    print(f"wrote {', '.join(p.name for p in result.files)} to {out}", file=sys.stderr)
    for method, qids in result.mismatches.items():
        print(f"WARNING: lossless method {method} differs from "
              f"{result.summary['settings']['reference_method']} on {len(qids)} question(s): "
              f"{', '.join(map(str, qids))}", file=sys.stderr)
    if result.interrupted:
        print("interrupted: wrote the questions that were complete", file=sys.stderr)
        return 130
    if result.mismatches and args.strict:
        return 1
    return 0


def _run_bench_ray(args, questions, methods, settings, method_options, out, use_draft) -> int:
    """`--ray`: the questions as Ray tasks (bench/distributed.py), merged into one report."""
    from leapdecode.bench.distributed import ModelSpec, format_report, merge, run_on_ray, write_merged
    from leapdecode.loading import resolve_device

    if args.ray_tasks is not None and args.ray_tasks < 1:
        raise InvalidSettingError("--ray-tasks must be >= 1")
    spec = ModelSpec(args.model, args.draft_model if use_draft else None, resolve_device(args.device), args.weights,
                     args.draft_weights)
    threads = args.threads or 1
    print(f"bench --ray: {len(questions)} questions x {len(methods)} methods, {threads} torch thread(s) per task",
          file=sys.stderr)
    runs = run_on_ray(spec, questions, methods, settings, method_options, threads, args.ray_tasks, args.address)
    records, summary = merge(runs, methods, settings)
    line = command_line(args, methods) + " --ray" + (f" --address {args.address}" if args.address else "")
    files = write_merged(out, runs, records, summary, line)
    print(format_report(summary, line))
    print(f"wrote {', '.join(p.name for p in files)} to {out}", file=sys.stderr)
    differs = {m: v["questions"] - v["identical_to_reference"] for m, v in summary["methods"].items()
               if v["lossless"] and settings.greedy and v["questions"] - v["identical_to_reference"]}
    for method, count in differs.items():
        print(f"WARNING: lossless method {method} differs from {summary['reference_method']} on {count} "
              "question(s)", file=sys.stderr)
    return 1 if differs and args.strict else 0

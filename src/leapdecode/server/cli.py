"""`leapdecode serve` (the HTTP server) and `leapdecode bench-serve` (a load generator against it)."""
from __future__ import annotations

import argparse
import os

from ..errors import LeapdecodeError


def _scoped(pair: str) -> bool:
    """Whether an --option names its method (`hydra@drafter=DIR`) rather than being `key=value` (the default's);
    an "@" inside a value (`drafter=/data/a@b`) does not count."""
    return "@" in pair and "=" not in pair.split("@", 1)[0]


def serve_methods(text: str, pairs: list[str] | None, draft: bool) -> dict[str, dict]:
    """The methods to serve with their options, the default first, from `--method` and `--option`.

    `--method` is a comma list (first = default; ar is always added, and draft with a draft model); an entry
    may carry options like a `leapdecode bench` method spec (`pld@num_draft_tokens=6`). `--option key=value`
    sets an option of the default method, `--option hydra@drafter=DIR` one of the method named (values with
    commas, like medusa paths, go through `--option`)."""
    from ..methods import parse_options, split_variant

    methods: dict[str, dict] = {}
    for entry in (m.strip() for m in text.split(",")):
        if not entry:
            continue
        name, options = split_variant(entry)
        name = name.strip()
        if not name:
            raise LeapdecodeError(f"--method entry {entry!r} has no method name before '@'")
        methods.setdefault(name, {}).update(options)
    if not methods:
        raise LeapdecodeError("--method needs at least one method name")
    default = next(iter(methods))
    for extra in ["ar"] + (["draft"] if draft else []):
        methods.setdefault(extra, {})
    for pair in pairs or []:
        if _scoped(pair):
            name, options = split_variant(pair)
            name = name.strip()
            if name not in methods:
                raise LeapdecodeError(f"--option {pair}: method {name!r} is not served (served: "
                                      f"{', '.join(methods)}); add it to --method")
        else:
            name, options = default, parse_options([pair])
        methods[name].update(options)
    return methods


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .. import load
    from ..loading import resolve_device
    from ..batching import BatchEngine
    from .app import ServerConfig, create_app

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    methods = serve_methods(args.method, args.option, bool(args.draft_model))
    default = next(iter(methods))
    if args.max_batch_size < 1:
        raise LeapdecodeError("--max-batch-size must be >= 1")
    if args.step_draft_budget < 1:
        raise LeapdecodeError("--step-draft-budget must be >= 1")
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        raise LeapdecodeError("--max-tokens-limit must be >= 1")
    device = resolve_device(args.device)
    if args.replicas != 1 or args.ray_address:
        return _serve_replicas(args, methods, default, device)
    target = load(args.model, device=device, weights=args.weights)
    draft = load(args.draft_model, device=device, weights=args.draft_weights, draft=True) if args.draft_model else None
    engine = BatchEngine(target, methods, draft=draft,
                         max_batch_size=args.max_batch_size, step_draft_budget=args.step_draft_budget,
                         fit_width=not args.fixed_draft_width)
    config = ServerConfig(model_name=args.served_model_name or args.model, default_method=default,
                          max_tokens_limit=args.max_tokens_limit, api_key=args.api_key or None)
    app = create_app(engine, config)
    print(f"leapdecode: serving {config.model_name} (methods {', '.join(methods)}; default {default}) "
          f"on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _serve_replicas(args: argparse.Namespace, methods: dict, default: str, device: str) -> int:
    """`--replicas N` / `--ray-address`: the same app in N Ray Serve replicas (server/replicas.py)."""
    from .app import ServerConfig
    from .replicas import Replicas, ReplicaSpec, serve_forever

    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.replicas))
    config = ServerConfig(model_name=args.served_model_name or args.model, default_method=default,
                          max_tokens_limit=args.max_tokens_limit, api_key=args.api_key or None)
    spec = ReplicaSpec(model=args.model, server=config, methods=methods, weights=args.weights,
                       draft_weights=args.draft_weights, device=device,
                       draft_model=args.draft_model, max_batch_size=args.max_batch_size,
                       step_draft_budget=args.step_draft_budget, fit_width=not args.fixed_draft_width,
                       threads=threads)
    return serve_forever(Replicas(spec, args.replicas, args.host, args.port, address=args.ray_address))


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from .bench import run_bench_serve

    return run_bench_serve(args)


def add_parser(subparsers) -> None:
    from ..arguments import add_model_arguments

    s = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    add_model_arguments(s)
    s.add_argument("--method", default="pld",
                   help="default decoding method, or a comma list of methods to load (first = default; ar is "
                        "always loaded, and draft when --draft-model is given), each optionally with options "
                        "like pld@num_draft_tokens=6. Requests pick one with \"method\"")
    s.add_argument("--option", action="append", metavar="[METHOD@]KEY=VALUE",
                   help="option of the default method (key=value) or of the method named (hydra@drafter=DIR); "
                        "repeatable")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together (default 8)")
    s.add_argument("--step-draft-budget", type=int, default=16,
                   help="draft tokens per step shared by the greedy requests of a batch (default 16)")
    s.add_argument("--fixed-draft-width", action="store_true",
                   help="verify every drafted token; by default each step cuts the greedy rows' drafts to the "
                   "width with the most expected tokens per second (pass times measured per width, accept rates "
                   "learnt per method; `--option METHOD@fit_width=false` turns it off for one method)")
    s.add_argument("--max-tokens-limit", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: the model's context length)")
    s.add_argument("--api-key", default=os.environ.get("LEAPDECODE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default $LEAPDECODE_API_KEY)")
    s.add_argument("--served-model-name", default=None, help="the model id clients use (default: --model)")
    s.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice; 1 is often faster on a busy CPU)")
    s.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="N replicas behind Ray Serve, each with its own engine (needs the `ray` extra)")
    s.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --replicas: join this Ray cluster (default: start a local Ray instance)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)

    b = subparsers.add_parser("bench-serve", help="send concurrent requests to a server; throughput and latency")
    b.add_argument("--url", default=None, help="a running server (default: start `leapdecode serve` for --model)")
    add_model_arguments(b)
    b.add_argument("--methods", default="ar,pld", help="comma list of methods to compare (default ar,pld)")
    b.add_argument("--batch-sizes", default="1,4,8", help="concurrency levels, comma list (default 1,4,8)")
    b.add_argument("--requests", type=int, default=8, help="requests per (method, batch size) (default 8)")
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--api-key", default=os.environ.get("LEAPDECODE_API_KEY"))
    b.add_argument("--threads", type=int, default=None, help="passed to the server it starts (serve --threads)")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    b.set_defaults(func=cmd_bench_serve)

"""`leapdecode train-drafter` and `leapdecode distill-draft`.

    leapdecode train-drafter --model smollm2-135m --kind hydra --self-distill 400 --out runs/hydra --max-minutes 25
    leapdecode generate --method hydra --option drafter=runs/hydra "..."

Self-distillation data (the target's own greedy answers and hidden states) is cached under --out and reused;
training checkpoints every --checkpoint-every steps and resumes after an interruption; the result is
`drafter.safetensors` + `drafter.json`, and becomes the default drafter of that model and kind.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

KINDS = ("medusa", "hydra", "falcon", "hidden-transfer")


def add_parser(subparsers) -> None:
    from ..arguments import add_model_arguments

    p = subparsers.add_parser("train-drafter",
                              help="train medusa/hydra/falcon/hidden-transfer drafters on a target model",
                              description="Self-distillation: the target answers prompts, its hidden states and "
                              "tokens train a small drafter; saves safetensors + JSON config to --out.")
    add_model_arguments(p)
    p.add_argument("--kind", choices=KINDS, default="hydra")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", default=None, metavar="FILE.jsonl",
                     help="prompts (\"prompt\"/\"turns\"/\"messages\"; optional \"response\"); 'suite' = the "
                     "benchmark suite (not disjoint from the benchmark!)")
    p.add_argument("--self-distill", type=int, default=None, metavar="N",
                   help="answer N prompts with the target: built-in prompts, disjoint from the benchmark suite "
                   "(default 400), or the first N of --data")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 (heads), 5e-4 (falcon)")
    p.add_argument("--batch-size", type=int, default=64, help="positions per step")
    p.add_argument("--max-minutes", type=float, default=25.0, help="whole run, data generation included")
    p.add_argument("--data-share", type=float, default=0.45, help="share of --max-minutes for data generation")
    p.add_argument("--max-new-tokens", type=int, default=160, help="length of each generated answer")
    p.add_argument("--num-heads", type=int, default=None,
                   help="heads (default 4); hidden-transfer: pseudo positions (default 3)")
    p.add_argument("--transfer-layer", type=int, default=None, metavar="L",
                   help="hidden-transfer: the pseudo states enter the target at decoder layer L (default: two "
                   "thirds of the way up)")
    p.add_argument("--layers", type=int, default=1, help="residual blocks per head / decoder layers (falcon)")
    p.add_argument("--prefix-window", type=int, default=0, metavar="W",
                   help="hydra: Hydra++'s extra decoder layer over the features of the last W positions "
                   "(0 = off)")
    p.add_argument("--exportable", action="store_true",
                   help="train in the layout `leapdecode export` writes for vLLM/SGLang: medusa with the paper's "
                   "blocks (x + silu(Wx+b)), falcon with EAGLE's Llama layer (hydra has no such layout)")
    p.add_argument("--draft-vocab", type=int, default=8192, metavar="K",
                   help="save the K most frequent tokens of the training answers as the draft vocabulary "
                   "(drafting reads only their LM-head rows, plus the prompt's; 0 = the full vocabulary)")
    p.add_argument("--objective", choices=("ce", "distill"), default="distill",
                   help="distill = Hydra++ teacher distillation on the target's distribution (default)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--gen-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_drafter)

    from .distill import add_distill_parser

    add_distill_parser(subparsers)

    from .judge import add_judge_parser

    add_judge_parser(subparsers)


def cmd_train_drafter(args: argparse.Namespace) -> int:
    import torch

    from .. import load
    from ..loading import resolve_device
    from ..errors import InvalidSettingError
    from ..drafters.draft_vocab import frequent_tokens
    from ..drafters.checkpoint import (DRAFT_VOCAB, DrafterConfig, make_module, remember_default, save_draft_vocab,
                             save_drafter, target_facts, target_fingerprint)
    from .data import build_data, prompt_rows
    from .trainer import TrainSettings, train

    if args.max_minutes <= 0 or not 0 < args.data_share < 1:
        raise InvalidSettingError("--max-minutes must be > 0 and --data-share in (0, 1)")
    if args.prefix_window and (args.kind != "hydra" or args.prefix_window < 0):
        raise InvalidSettingError("--prefix-window needs --kind hydra and a window >= 1")
    if args.transfer_layer is not None and args.kind != "hidden-transfer":
        raise InvalidSettingError("--transfer-layer needs --kind hidden-transfer")
    if args.num_heads is None:
        args.num_heads = 3 if args.kind == "hidden-transfer" else 4
    if args.num_heads < 1 or args.layers < 1 or args.epochs <= 0 or args.batch_size < 1 or args.draft_vocab < 0:
        raise InvalidSettingError("--num-heads, --layers and --batch-size must be >= 1, --epochs > 0 and "
                                  "--draft-vocab >= 0")
    if args.exportable and args.kind == "hydra":
        raise InvalidSettingError("--exportable: hydra's sequential heads have no vLLM or SGLang layout; "
                                  "train medusa (vLLM) or falcon (EAGLE in vLLM and SGLang)")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    deadline = started + args.max_minutes * 60
    # training backpropagates through the target's output layer: its float32 reference unless asked otherwise
    weights = "fp32" if args.weights == "auto" else args.weights
    target = load(args.model, device=resolve_device(args.device), weights=weights)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = target_fingerprint(target.model)
    hidden, vocab = target_facts(target.model)
    rows = prompt_rows(args.data, args.self_distill, args.seed)
    data = build_data(target, rows, out, fingerprint, max_new_tokens=args.max_new_tokens,
                      batch_size=args.gen_batch_size, deadline=started + args.max_minutes * 60 * args.data_share,
                      progress=not args.no_progress)
    print(f"data: {data.samples} answers, {len(data.tokens)} tokens")
    settings = {"num_heads": args.num_heads, "layers": args.layers}
    if args.kind == "hidden-transfer":
        from ..layer_skip import num_layers

        total = num_layers(target.model)
        layer = args.transfer_layer if args.transfer_layer is not None else max(1, min(total - 1, 2 * total // 3))
        if not 1 <= layer < total:
            raise InvalidSettingError(f"--transfer-layer must be in [1, {total - 1}] for this {total}-layer model")
        if getattr(args, "exportable", False):
            raise InvalidSettingError("--exportable: hidden-transfer's transfer layers have no vLLM or SGLang layout")
        settings = {"num_heads": args.num_heads, "transfer_layer": layer, "num_layers": total}
    if args.prefix_window:
        settings["prefix_window"] = args.prefix_window
    if args.exportable:
        settings.update({"block": "linear"} if args.kind == "medusa" else {"layer": "eagle"})
    config = DrafterConfig(kind=args.kind, hidden_size=hidden, vocab_size=vocab, target_fingerprint=fingerprint,
                           target_name=target.name, settings=settings)
    torch.manual_seed(args.seed)
    net = make_module(config)
    lr = args.lr or (5e-4 if args.kind == "falcon" else 1e-3)
    train_settings = TrainSettings(epochs=args.epochs, lr=lr, batch_size=args.batch_size, objective=args.objective,
                                   max_minutes=max(0.1, (deadline - time.time()) / 60),
                                   checkpoint_every=args.checkpoint_every, seed=args.seed,
                                   progress=not args.no_progress)
    loss_fn = None
    if args.kind == "falcon":
        from ..drafters.falcon import falcon_loss_fn

        loss_fn = falcon_loss_fn(net, target, data, args.objective)
    elif args.kind == "hidden-transfer":  # it reruns the target's upper layers on each answer, with its prompt
        from ..drafters.hidden_transfer import hidden_transfer_loss_fn
        from .data import encode_row

        prompts = [encode_row(target, row) for row in rows[: data.samples]]
        loss_fn = hidden_transfer_loss_fn(net, target, data, prompts, args.objective)
    report = train(net, target, data, train_settings, out, loss_fn=loss_fn)
    config.training = {"steps": report.steps, "first_loss": report.first_loss, "last_loss": report.last_loss,
                       "head_accuracy": report.head_accuracy, "answers": data.samples,
                       "tokens": int(len(data.tokens)), "objective": args.objective, "lr": lr,
                       "minutes": round((time.time() - started) / 60, 2), "stopped": report.stopped}
    (out / DRAFT_VOCAB).unlink(missing_ok=True)  # a draft vocabulary of an earlier run in this folder
    if args.draft_vocab:
        ids = frequent_tokens(data.tokens, args.draft_vocab)
        save_draft_vocab(out, ids)
        config.training["draft_vocab"] = len(ids)
    save_drafter(out, net.cpu(), config)
    pointer = remember_default(target.model, args.kind, out)
    print(json.dumps(config.training))
    print(f"saved {out}/drafter.safetensors; default {args.kind} drafter for {target.name} ({pointer})")
    print(f"use: leapdecode generate --model {args.model} --method {args.kind} --option drafter={out} ...")
    return 0

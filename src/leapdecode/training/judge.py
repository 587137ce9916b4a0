"""`leapdecode train-judge`: train the judge head of the `BASE+judge` methods (`verifiers/judge.py`).

    leapdecode train-judge --model smollm2-135m --out runs/judge --prompts 120

Labels, made offline from the target alone (no human labels, no benchmark data): the target answers built-in
prompts greedily (the same generated prompt templates as `train-drafter`, disjoint from the benchmark suite
and Spec-Bench). At sampled positions t of each answer, the target's own token y_t is replaced by each of
its next most probable tokens x (a mismatch a drafter could propose). The mismatch is labelled acceptable
when the target still finds its own continuation y_{t+1..t+h} about as likely after x as after y_t:
log p(y_{t+1..t+h} | .., x) >= log p(y_{t+1..t+h} | .., y_t) - tolerance (h = --horizon tokens, tolerance in
nats). The feature is the target's final hidden state at x's own position, as the verification pass
computes it for a drafted x. The head (linear, H -> 1) is fitted with a class-balanced logistic loss.

The labelled features are saved to `<out>/labels.pt` (a second run reuses them); training checkpoints to
`<out>/checkpoint.pt` every --checkpoint-every steps and resumes from it; the judge is saved with the target's
fingerprint (a judge for another model is refused) and becomes this model's default judge.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

LABEL_SOURCE = ("target's own greedy continuation kept about as likely after the mismatched token: "
                "log p(y[t+1:t+1+h] | x) >= log p(y[t+1:t+1+h] | y_t) - tolerance")


def add_judge_parser(subparsers) -> None:
    from ..arguments import add_model_arguments

    p = subparsers.add_parser("train-judge", help="train the judge head of the BASE+judge methods (lossy)",
                              description="Labels mismatched tokens offline with the target's own continuation "
                              "likelihood, then fits a linear judge on the target's final hidden states.")
    add_model_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--prompts", type=int, default=120, help="built-in prompts answered by the target (default 120)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="length of each answer (default 48)")
    p.add_argument("--positions", type=int, default=6, help="positions sampled per answer (default 6)")
    p.add_argument("--alternatives", type=int, default=3, help="mismatched tokens per position (default 3)")
    p.add_argument("--horizon", type=int, default=8, help="continuation tokens scored (default 8)")
    p.add_argument("--tolerance", type=float, default=1.0, help="nats the continuation may lose (default 1.0)")
    p.add_argument("--steps", type=int, default=300, help="optimisation steps (full batch; default 300)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_judge)


def _continuation_logprob(logits: torch.Tensor, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Per row, the summed log-probability of ids[:, start:] under logits (B, T, V)."""
    logp = logits[:, start - 1 : -1].float().log_softmax(-1)
    return logp.gather(-1, ids[:, start:].unsqueeze(-1)).squeeze(-1).sum(-1)


@torch.no_grad()
def label_answer(model, prompt: list[int], answer: list[int], rng: random.Random, positions: int = 6,
                 alternatives: int = 3, horizon: int = 8, tolerance: float = 1.0):
    """(features (n, H), labels (n,)) for mismatches at sampled positions of one greedy answer."""
    feats, labels = [], []
    usable = [t for t in range(len(answer) - 1)]
    for t in sorted(rng.sample(usable, min(positions, len(usable)))):
        prefix = prompt + answer[:t]
        cont = answer[t + 1 : t + 1 + horizon]
        own = torch.tensor([prefix + [answer[t]] + cont])
        out = model(own, output_hidden_states=True)
        ranked = out.logits[0, len(prefix) - 1].float().topk(alternatives + 1).indices.tolist()
        xs = [x for x in ranked if x != answer[t]][:alternatives]
        rows = torch.tensor([prefix + [x] + cont for x in xs])
        alt = model(rows, output_hidden_states=True)
        base = _continuation_logprob(out.logits, own, len(prefix) + 1)
        lp = _continuation_logprob(alt.logits, rows, len(prefix) + 1)
        feats.append(alt.hidden_states[-1][:, len(prefix)].float())
        labels.append((lp >= base - tolerance).float())
    if not feats:
        return None
    return torch.cat(feats), torch.cat(labels)


def build_labels(target, rows: list[dict], out: Path, settings: dict, progress: bool = True):
    """Answer the prompts greedily and label mismatches (cached in `<out>/labels.pt` with its settings)."""
    from tqdm import tqdm

    from ..engine import Decoder
    from .data import encode_row

    path = out / "labels.pt"
    if path.is_file():
        saved = torch.load(path)
        if saved["settings"] == settings:
            return saved["features"], saved["labels"]
    rng = random.Random(settings["seed"])
    decoder = Decoder(target, "ar")
    feats, labels = [], []
    for row in tqdm(rows, desc="judge labels", unit="prompt", disable=not progress):
        prompt = encode_row(target, row)
        answer = decoder.generate(prompt, max_new_tokens=settings["max_new_tokens"]).token_ids
        made = label_answer(target.model, prompt, list(answer), rng, settings["positions"],
                            settings["alternatives"], settings["horizon"], settings["tolerance"])
        if made is not None:
            feats.append(made[0])
            labels.append(made[1])
    if not feats:
        raise ValueError("no labelled mismatches: the answers are too short (raise --max-new-tokens)")
    features, labels = torch.cat(feats), torch.cat(labels)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"settings": settings, "features": features, "labels": labels}, path)
    return features, labels


def fit_judge(features: torch.Tensor, labels: torch.Tensor, out: Path, steps: int = 300, lr: float = 1e-2,
              checkpoint_every: int = 50, seed: int = 0, progress: bool = True) -> tuple[torch.nn.Linear, dict]:
    """A linear judge by class-balanced logistic regression; checkpoints to `<out>/checkpoint.pt`, resumes."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    head = torch.nn.Linear(features.shape[1], 1)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    step = 0
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt)
        if state["shape"] == list(features.shape):
            head.load_state_dict(state["head"])
            opt.load_state_dict(state["opt"])
            step = state["step"]
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)  # standardise, folded into the head at the end
    x = (features - mean) / std
    positive = float(labels.mean())
    weight = torch.where(labels > 0, 0.5 / max(positive, 1e-6), 0.5 / max(1 - positive, 1e-6))
    bar = tqdm(total=steps, initial=step, desc="judge", unit="step", disable=not progress)
    loss = torch.tensor(float("nan"))
    while step < steps:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x).squeeze(-1), labels, weight=weight)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if step % checkpoint_every == 0 or step == steps:
            torch.save({"step": step, "head": head.state_dict(), "opt": opt.state_dict(),
                        "shape": list(features.shape)}, ckpt)
    bar.close()
    with torch.no_grad():
        predicted = (head(x).squeeze(-1) > 0).float()
        accuracy = float((predicted == labels).float().mean())
        folded = torch.nn.Linear(features.shape[1], 1)
        folded.weight.copy_(head.weight / std)
        folded.bias.copy_(head.bias - (head.weight / std) @ mean)
    return folded, {"examples": len(labels), "positive_share": positive, "train_accuracy": accuracy,
                    "final_loss": float(loss.detach()), "steps": step}


def cmd_train_judge(args: argparse.Namespace) -> int:
    from .. import load
    from ..drafters.checkpoint import target_facts, target_fingerprint
    from ..errors import InvalidSettingError
    from ..loading import resolve_device
    from ..verifiers.judge import remember_default, save_judge
    from .data import builtin_prompts

    if args.prompts < 1 or args.steps < 1 or args.horizon < 1 or args.alternatives < 1:
        raise InvalidSettingError("--prompts, --steps, --horizon and --alternatives must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load(args.model, device=resolve_device(args.device), weights=args.weights)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": p}]} for p in builtin_prompts(args.prompts, seed=args.seed)]
    settings = {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "positions": args.positions,
                "alternatives": args.alternatives, "horizon": args.horizon, "tolerance": args.tolerance,
                "seed": args.seed, "fingerprint": target_fingerprint(target.model)}
    features, labels = build_labels(target, rows, out, settings, progress=not args.no_progress)
    head, facts = fit_judge(features, labels, out, args.steps, args.lr, args.checkpoint_every, args.seed,
                            progress=not args.no_progress)
    config = {"model": target.name, "target_fingerprint": settings["fingerprint"],
              "hidden_size": target_facts(target.model)[0], "label_source": LABEL_SOURCE,
              "label_settings": settings, **facts}
    save_judge(out, head, config)
    remember_default(settings["fingerprint"], out)
    print(f"judge: {facts['examples']} labelled mismatches ({facts['positive_share']:.0%} acceptable), training "
          f"accuracy {facts['train_accuracy']:.2f}; saved to {out} (the default judge of {target.name})",
          file=sys.stderr)
    return 0

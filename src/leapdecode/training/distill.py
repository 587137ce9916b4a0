"""`leapdecode distill-draft`: fine-tune a small draft model towards the target with the TVD++ objective.

Direct Alignment of Draft Model (Goel et al. 2024, "Direct Alignment of Draft Model for Speculative Decoding
with Chat-Fine-Tuned LLMs"). The acceptance rate of speculative sampling is 1 - TVD(p, q), so the draft q is
trained to lower the total variation distance to the target p on responses the target generated itself.
The TVD gradient has a policy-gradient form, grad TVD = -E_{x~q}[r(x) grad log q(x)] with the reward
r(x) = 1{p(x) > q(x)}; TVD++ reduces its variance as policy-gradient methods do, with a baseline and a
normalization of the advantage over the batch:

    A_t(x) = (r_t(x) - E_q[r_t]) / std_batch(A)          loss = -mean_t  sum_x sg(q_t(x) A_t(x)) log q_t(x)

at every position t of the target's own responses (teacher forcing). Here the expectation over x ~ q is
taken exactly over the vocabulary (both distributions are at hand), which removes the sampling noise; a
reward averaged over the target's tokens alone carries no signal once the target beats the draft on all of
them (every r = 1). The draft stays a separate model verified by exact speculative sampling: the `draft` method is
lossless with any draft model, a better aligned one only accepts more.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch


def tvdpp_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, tokens: torch.Tensor | None,
               mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """draft/target logits (B, T, V) at the response positions marked by `mask` (B, T) bool. `tokens` (the
    target's own tokens) only define the contexts; the expectation over x ~ q is exact over the vocabulary."""
    logq = draft_logits.float().log_softmax(-1)[mask]  # (M, V)
    with torch.no_grad():
        q = logq.exp()
        p = target_logits.float().softmax(-1)[mask]
        reward = (p > q).float()
        advantage = reward - (q * reward).sum(-1, keepdim=True)  # baseline: E_q[r] at each position
        scale = (q * advantage.pow(2)).sum(-1).mean().sqrt() + eps  # normalization over the batch
        weight = q * advantage / scale
    return -(weight * logq).sum(-1).mean()


def total_variation(draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean TVD(p, q) over masked positions (1 - the expected acceptance rate of one drafted token)."""
    p = target_logits.float().softmax(-1)[mask]
    q = draft_logits.float().softmax(-1)[mask]
    return float(0.5 * (p - q).abs().sum(-1).mean())


@dataclass
class DistillReport:
    steps: int
    first_tvd: float
    last_tvd: float
    minutes: float


def _batches(prompts: list[list[int]], responses: list[list[int]], batch_size: int, gen: torch.Generator):
    order = torch.randperm(len(prompts), generator=gen).tolist()
    for i in range(0, len(order), batch_size):
        chosen = order[i: i + batch_size]
        seqs = [prompts[j] + responses[j] for j in chosen]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attn = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)  # position t predicts ids[t + 1]
        for r, j in enumerate(chosen):
            s = seqs[r]
            ids[r, : len(s)] = torch.tensor(s)
            attn[r, : len(s)] = 1
            mask[r, len(prompts[j]) - 1: len(s) - 1] = True
        yield ids, attn, mask


def distill(target, draft, prompts: list[list[int]], responses: list[list[int]], out: str | Path,
            epochs: float = 1.0, lr: float = 1e-5, batch_size: int = 4, max_minutes: float | None = None,
            checkpoint_every: int = 50, seed: int = 0, progress: bool = True) -> DistillReport:
    """Fine-tune `draft.model` in place with TVD++; checkpoints to `<out>/distill-checkpoint.pt` and resumes."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(draft.model.parameters()).device
    target.model.eval()
    for p in target.model.parameters():
        p.requires_grad_(False)
    model = draft.model
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    per_epoch = max(1, math.ceil(len(prompts) / batch_size))
    total = max(1, int(per_epoch * epochs))
    gen = torch.Generator().manual_seed(seed)
    step, first_tvd, tvds = 0, None, []
    ckpt = out / "distill-checkpoint.pt"
    epoch_gen = gen.get_state()  # the generator at the start of the current epoch (its order is drawn from it)

    def save_checkpoint() -> None:
        # at an epoch's end the next epoch starts from the generator as it is now
        start = gen.get_state() if step % per_epoch == 0 else epoch_gen
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch_gen": start, "step": step,
                    "first_tvd": first_tvd, "total": total, "prompts": len(prompts)}, str(ckpt) + ".tmp")
        Path(str(ckpt) + ".tmp").replace(ckpt)

    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("total") == total and state.get("prompts") == len(prompts) and "epoch_gen" in state:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["epoch_gen"])
            step, first_tvd = state["step"], state["first_tvd"]
    deadline = time.time() + max_minutes * 60 if max_minutes else None
    started = time.time()
    bar = tqdm(total=total, initial=step, desc="distill (TVD++)", unit="step", disable=not progress)
    done = step % per_epoch  # batches of the current epoch already trained before a resume
    while step < total and not (deadline and time.time() > deadline):
        epoch_gen = gen.get_state()
        for n, (ids, attn, mask) in enumerate(_batches(prompts, responses, batch_size, gen)):
            if done > 0:  # the same epoch order again (same generator state); skip what was trained
                done -= 1
                continue
            if step >= total or (deadline and time.time() > deadline):
                break
            ids, attn = ids.to(device), attn.to(device)
            labels = torch.roll(ids, -1, dims=1)
            with torch.no_grad():
                p_logits = target.model(input_ids=ids.to(next(target.model.parameters()).device),
                                        attention_mask=attn).logits.to(device)
            q_logits = model(input_ids=ids, attention_mask=attn).logits
            loss = tvdpp_loss(q_logits, p_logits, labels, mask.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            tvd = total_variation(q_logits.detach(), p_logits, mask.to(device))
            first_tvd = tvd if first_tvd is None else first_tvd
            tvds = (tvds + [tvd])[-20:]
            bar.set_postfix(tvd=f"{sum(tvds) / len(tvds):.3f}")
            bar.update(1)
            if step % checkpoint_every == 0:
                save_checkpoint()
    bar.close()
    save_checkpoint()
    model.eval()
    return DistillReport(steps=step, first_tvd=float(first_tvd or float("nan")),
                         last_tvd=sum(tvds) / len(tvds) if tvds else float("nan"),
                         minutes=(time.time() - started) / 60)


def add_distill_parser(subparsers) -> None:
    p = subparsers.add_parser("distill-draft", help="fine-tune a draft model towards the target (TVD++)",
                              description="The target answers prompts; the draft model is fine-tuned on those "
                              "answers with the TVD++ objective and saved as a model folder for --draft-model.")
    p.add_argument("--model", required=True, help="target model")
    p.add_argument("--draft-model", required=True, help="draft model to fine-tune (same tokenizer)")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when present, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--data", default=None, metavar="FILE.jsonl", help="prompts JSONL (default: built-in prompts)")
    p.add_argument("--self-distill", type=int, default=None, metavar="N", help="number of prompts (default 200)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--max-minutes", type=float, default=60.0)
    p.add_argument("--data-share", type=float, default=0.4)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_distill_draft)


def cmd_distill_draft(args: argparse.Namespace) -> int:
    from .. import load
    from ..loading import check_draft_compatible
    from ..loading import resolve_device
    from ..drafters.checkpoint import target_fingerprint
    from .data import build_data, encode_row, prompt_rows

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    device = resolve_device(args.device)
    target = load(args.model, device=device)
    draft = load(args.draft_model, device=device, weights="fp32")  # fine-tuned: dense float32 weights
    check_draft_compatible(target, draft)
    if args.self_distill is None and not args.data:
        args.self_distill = 200
    rows = prompt_rows(args.data, args.self_distill, args.seed)
    data = build_data(target, rows, args.out, target_fingerprint(target.model), max_new_tokens=args.max_new_tokens,
                      deadline=started + args.max_minutes * 60 * args.data_share, progress=not args.no_progress)
    prompts = [encode_row(target, r) for r in rows[: data.samples]]
    responses = [data.tokens[data.starts[i]: data.starts[i + 1]].tolist() for i in range(data.samples)]
    left = max(0.1, args.max_minutes - (time.time() - started) / 60)
    report = distill(target, draft, prompts, responses, args.out, epochs=args.epochs, lr=args.lr,
                     batch_size=args.batch_size, max_minutes=left, seed=args.seed, progress=not args.no_progress)
    folder = Path(args.out) / "model"
    draft.model.cpu().save_pretrained(folder)
    draft.tokenizer.save_pretrained(folder)
    print(f"TVD {report.first_tvd:.3f} -> {report.last_tvd:.3f} in {report.steps} steps ({report.minutes:.1f} min)")
    print(f"saved {folder}; use: leapdecode generate --model {args.model} --method draft --draft-model {folder} ...")
    return 0

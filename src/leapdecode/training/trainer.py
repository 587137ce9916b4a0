"""Training a drafter on self-distillation features: a loop with a time budget, checkpoints and resume.

Losses (the target's LM head and embeddings stay frozen and are shared, never copied into the drafter):
- medusa / hydra: head k predicts r_{i+k} from f_i (hydra also from the embeddings of r_i..r_{i+k-1},
  teacher forcing with the target's own tokens; with Hydra++'s extra layer, from f_{i-W+1..i}); head k's loss is weighted by `decay`**(k-1) (Medusa's
  schedule). `objective="ce"` uses the target's tokens, `objective="distill"` (Hydra++'s teacher
  distillation) the target's full distribution softmax(lm_head(f_{i+k})).
- falcon: see `leapdecode.drafters.falcon` (`falcon_loss_fn`).
- hidden-transfer: see `leapdecode.drafters.hidden_transfer` (`hidden_transfer_loss_fn`).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..runtime.quantized import input_dtype
from .data import FeatureData

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainSettings:
    epochs: float = 2.0
    lr: float = 1e-3
    batch_size: int = 64  # positions per step
    decay: float = 0.8  # weight of head k's loss: decay**(k-1)
    objective: str = "ce"  # ce | distill
    max_minutes: float | None = None
    checkpoint_every: int = 100  # steps
    seed: int = 0
    progress: bool = True


@dataclass
class TrainReport:
    steps: int
    first_loss: float
    last_loss: float  # mean over the last 20 steps
    head_accuracy: list[float] = field(default_factory=list)  # top-1 accuracy per head over the last 20 steps
    minutes: float = 0.0
    resumed_from: int = 0
    stopped: str = "epochs"  # epochs | time


def head_loss(net, data: FeatureData, ends: torch.Tensor, idx: torch.Tensor, lm_head, embed,
              decay: float, objective: str, device) -> tuple[torch.Tensor, list[float]]:
    """Loss and per-head accuracy for positions `idx` (B,) of medusa/hydra heads."""
    if getattr(net, "prefix", None) is not None:  # Hydra++'s extra layer over the recent features
        window, valid = data.windows(idx, net.prefix_window)
        feature = net.enhance(window.to(device).float(), valid.to(device))  # (B, H)
    else:
        feature = data.features[idx].to(device).float()  # (B, H)
    total, accs = 0.0, []
    weight_sum = 0.0
    for k in range(1, net.num_heads + 1):
        target_idx = idx + k
        valid = target_idx < ends[idx]
        if not bool(valid.any()):
            accs.append(float("nan"))
            continue
        v_idx, t_idx = idx[valid], target_idx[valid]
        embeds = None
        if net.conditions_on_tokens:  # r_i .. r_{i+k-1}
            prev = v_idx[:, None] + torch.arange(k)[None]
            embeds = embed(data.tokens[prev].to(device)).float()
        state = net.head_state(k, feature[valid.to(device)], embeds)
        logits = lm_head(state.to(input_dtype(lm_head))).float()
        labels = data.tokens[t_idx].to(device)
        if objective == "distill":
            with torch.no_grad():
                teacher = lm_head(data.features[t_idx].to(device).to(input_dtype(lm_head))).float().softmax(-1)
            loss = F.kl_div(logits.log_softmax(-1), teacher, reduction="batchmean")  # KL(target || head)
        else:
            loss = F.cross_entropy(logits, labels)
        w = decay ** (k - 1)
        total = total + w * loss
        weight_sum += w
        accs.append(float((logits.argmax(-1) == labels).float().mean()))
    return total / max(weight_sum, 1e-9), accs


def train(net, target, data: FeatureData, settings: TrainSettings, out: str | Path,
          loss_fn=None) -> TrainReport:
    """Train `net` in place; resumes from `<out>/checkpoint.pt` when one exists for the same run."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = target.model
    device = next(model.parameters()).device
    lm_head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    for p in model.parameters():
        p.requires_grad_(False)
    net.to(device).train()
    loss_fn = loss_fn or (lambda idx: head_loss(net, data, ends, idx, lm_head, embed, settings.decay,
                                                settings.objective, device))
    ends = data.ends()
    positions = torch.arange(len(data.tokens))
    positions = positions[positions + 1 < ends]  # a row with no later token in its sample teaches nothing
    steps_per_epoch = max(1, math.ceil(len(positions) / settings.batch_size))
    total_steps = max(1, int(steps_per_epoch * settings.epochs))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_steps))))
    gen = torch.Generator().manual_seed(settings.seed)
    step, first_loss, resumed = 0, None, 0
    ckpt = out / CHECKPOINT
    order = torch.randperm(len(positions), generator=gen)  # this epoch's order of positions
    signature = net_signature(net)
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        same_run = (state.get("total_steps") == total_steps and state.get("positions") == len(positions)
                    and state.get("signature") == signature)
        if same_run:
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            gen.set_state(state["gen"])
            order = state["order"]  # the interrupted epoch goes on in its own order
            step, first_loss, resumed = state["step"], state["first_loss"], state["step"]
        else:
            print(f"{ckpt}: a checkpoint of another run (other drafter, settings or data); starting afresh",
                  file=sys.stderr)
    started = time.time()
    deadline = started + settings.max_minutes * 60 if settings.max_minutes else None
    recent_loss: list[float] = []
    recent_acc: list[list[float]] = []
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not settings.progress)
    stopped = "epochs"

    def save_checkpoint() -> None:
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "gen": gen.get_state(), "step": step, "first_loss": first_loss, "total_steps": total_steps,
                    "positions": len(positions), "signature": signature, "order": order},
                   out / (CHECKPOINT + ".tmp"))
        (out / (CHECKPOINT + ".tmp")).replace(ckpt)

    while step < total_steps:
        if deadline is not None and time.time() > deadline:
            stopped = "time"
            break
        offset = (step % steps_per_epoch) * settings.batch_size
        if offset == 0 and step > 0:
            order = torch.randperm(len(positions), generator=gen)
        idx = positions[order[offset: offset + settings.batch_size]]
        loss, accs = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        value = float(loss.detach())
        first_loss = value if first_loss is None else first_loss
        recent_loss = (recent_loss + [value])[-20:]
        recent_acc = (recent_acc + [accs])[-20:]
        bar.set_postfix(loss=f"{sum(recent_loss) / len(recent_loss):.3f}",
                        acc="/".join(f"{a:.2f}" for a in _mean_cols(recent_acc)))
        bar.update(1)
        if step % settings.checkpoint_every == 0:
            save_checkpoint()
    bar.close()
    save_checkpoint()
    net.eval()
    return TrainReport(steps=step, first_loss=float(first_loss or float("nan")),
                       last_loss=sum(recent_loss) / max(1, len(recent_loss)) if recent_loss else float("nan"),
                       head_accuracy=_mean_cols(recent_acc), minutes=(time.time() - started) / 60,
                       resumed_from=resumed, stopped=stopped)


def net_signature(net: torch.nn.Module) -> str:
    """The drafter's class and parameter shapes (and its `extra_signature`, settings the shapes do not show):
    a checkpoint only resumes the same network."""
    shapes = [f"{name}:{tuple(t.shape)}" for name, t in net.state_dict().items()]
    extra = getattr(net, "extra_signature", "")
    return type(net).__name__ + "|" + ";".join(shapes) + (f"|{extra}" if extra else "")


def _mean_cols(rows: list[list[float]]) -> list[float]:
    if not rows:
        return []
    cols = []
    for j in range(max(len(r) for r in rows)):
        vals = [r[j] for r in rows if j < len(r) and r[j] == r[j]]
        cols.append(sum(vals) / len(vals) if vals else float("nan"))
    return cols

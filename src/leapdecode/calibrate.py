"""Calibration commands: `leapdecode calibrate-skip` (the skip set of the lossless `self-spec`) and
`leapdecode train-router` (the routers of the lossy `first`). They time and run generations, so they sit
above the engine, with the other commands.

Both use their own small calibration prompts (below), not the benchmark suite, so bench numbers are
not measured on the data the skip set or routers were fitted to.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .drafters.self_spec import remember_calibration
from .errors import InvalidSettingError
from .layer_skip import Gate, SkipSet, gated, num_layers

CALIBRATION_PROMPTS = (
    "Explain in a few sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Summarize the plot of a story about a lighthouse keeper who finds a message in a bottle.",
    "List five tips for writing clear emails at work.",
    "What is the difference between a list and a tuple in Python? Give an example of each.",
    "Translate to French: The weather is nice today, so we are going to the park.",
    "A train travels 120 km in 1.5 hours. What is its average speed? Show the steps.",
    "Rewrite this sentence in a formal tone: hey, can u send me the report asap?",
)


def calibration_ids(target, count: int) -> list[list[int]]:
    from .engine import Decoder

    if not 1 <= count <= len(CALIBRATION_PROMPTS):
        raise InvalidSettingError(f"prompts must be in [1, {len(CALIBRATION_PROMPTS)}], got {count}")
    dec = Decoder(target, "ar")
    return [dec.encode_prompt(p, chat=target.has_chat_template) for p in CALIBRATION_PROMPTS[:count]]


class SimilarityProbe(Gate):
    """Runs everything; records cos(input, output) of each attention and FFN block (mean over positions).
    High similarity = the block barely turns the residual stream = a candidate to skip."""

    def __init__(self, layers: int):
        super().__init__(layers)
        self.attn: list[list[float]] = [[] for _ in range(layers)]
        self.ffn: list[list[float]] = [[] for _ in range(layers)]
        self._in: dict[int, torch.Tensor] = {}
        self._mid: dict[int, torch.Tensor] = {}

    def observe_layer_input(self, layer, hidden):
        self._in[layer] = hidden

    def observe_ffn_input(self, layer, hidden):
        self._mid[layer] = hidden

    def observe_layer_output(self, layer, hidden):
        cos = torch.nn.functional.cosine_similarity
        self.attn[layer].append(float(cos(self._in[layer].float(), self._mid[layer].float(), dim=-1).mean()))
        self.ffn[layer].append(float(cos(self._mid[layer].float(), hidden.float(), dim=-1).mean()))

    def ranking(self) -> list[tuple[str, int, float]]:
        """(kind, layer, similarity), most redundant first; layer 0 is never proposed."""
        blocks = [(kind, i, sum(v[i]) / len(v[i])) for kind, v in (("attn", self.attn), ("ffn", self.ffn))
                  for i in range(1, self.layers) if v[i]]
        return sorted(blocks, key=lambda b: -b[2])


@dataclass
class Candidate:
    name: str
    skip: SkipSet
    seconds: float = 0.0
    tokens: int = 0
    acceptance: float = 0.0
    identical: bool = True

    def row(self, ar_seconds: float, ar_tokens: int) -> dict:
        speed = (self.tokens / self.seconds) / (ar_tokens / ar_seconds) if self.seconds and ar_seconds else None
        return {"name": self.name, **self.skip.to_json(), "blocks_skipped": self.skip.size,
                "speedup": speed, "acceptance_rate": self.acceptance, "identical_to_ar": self.identical}


def candidates(model, ranking, fractions=(0.1, 0.2, 0.3, 0.4)) -> list[Candidate]:
    """Skip sets to time: the most redundant blocks (and attention blocks only) at each fraction of all
    blocks, and S2D first-k-layer drafts. Empty sets and repeats (few layers round to the same set) are
    dropped; raises InvalidSettingError when none is left."""
    total = num_layers(model)
    proposed = []
    for f in fractions:
        top = ranking[: round(f * 2 * total)]
        skip = SkipSet.of(attention=[i for k, i, _ in top if k == "attn"], ffn=[i for k, i, _ in top if k == "ffn"])
        proposed.append(Candidate(f"similarity-top-{int(f * 100)}%", skip))
        attn = SkipSet.of(attention=[i for k, i, _ in ranking if k == "attn"][: round(f * 2 * total)])
        proposed.append(Candidate(f"attention-top-{int(f * 100)}%", attn))
    for keep in sorted({(2 * total) // 3, (5 * total) // 6}):
        if 1 <= keep < total:
            proposed.append(Candidate(f"s2d-first-{keep}-layers", SkipSet.first_layers(keep, total)))
    out, seen = [], set()
    for c in proposed:
        if c.skip.size and c.skip not in seen:
            seen.add(c.skip)
            out.append(c)
    if not out:
        raise InvalidSettingError(f"no skip set to calibrate for a {total}-layer model: layer 0 always runs, so "
                                  "self-spec needs a model with at least 2 layers")
    return out


def calibrate(target, prompts: list[list[int]], max_new_tokens: int = 48, num_draft_tokens: int = 4, log=sys.stderr) -> dict:
    from .engine import Decoder

    model = target.model
    ar = Decoder(target, "ar")
    refs = [ar.generate(p, max_new_tokens=max_new_tokens).token_ids for p in prompts]
    probe = SimilarityProbe(num_layers(model))
    with torch.inference_mode(), gated(model, probe):
        for p, r in zip(prompts, refs):
            model(input_ids=torch.tensor([p + r], device=model.device), use_cache=False)
    ranking = probe.ranking()
    cands = candidates(model, ranking)
    decoders = {c.name: Decoder(target, "self-spec", skip_attention=sorted(c.skip.attention),
                                skip_ffn=sorted(c.skip.ffn), num_draft_tokens=num_draft_tokens) for c in cands}
    ar_seconds, ar_tokens = 0.0, 0
    for dec in [ar, *decoders.values()]:  # warm-up, untimed
        dec.generate(prompts[0], max_new_tokens=8)
    for n, (p, r) in enumerate(zip(prompts, refs)):  # interleaved per prompt: ar, then every candidate
        print(f"calibration prompt {n + 1}/{len(prompts)}: ar and {len(cands)} skip sets", file=log, flush=True)
        res = ar.generate(p, max_new_tokens=max_new_tokens)
        ar_seconds += res.stats.wall_time
        ar_tokens += res.stats.new_tokens
        for c in cands:
            res = decoders[c.name].generate(p, max_new_tokens=max_new_tokens)
            c.seconds += res.stats.wall_time
            c.tokens += res.stats.new_tokens
            c.acceptance += res.stats.acceptance_rate / len(prompts)
            c.identical &= res.token_ids == r
    rows = [c.row(ar_seconds, ar_tokens) for c in cands]
    for row in rows:
        print(f"{row['name']:>26}: {row['blocks_skipped']:3d} blocks skipped, speedup {row['speedup']:.2f}x, "
              f"acceptance {row['acceptance_rate']:.2f}, identical {row['identical_to_ar']}", file=log)
    best = max(rows, key=lambda r: r["speedup"] or 0.0)
    return {"kind": "leapdecode-skip-config", "model": target.name, "num_layers": num_layers(model),
            "skip_attention": best["skip_attention"], "skip_ffn": best["skip_ffn"], "chosen": best["name"],
            "measured_speedup": best["speedup"], "num_draft_tokens": num_draft_tokens,
            "calibration": {"prompts": len(prompts), "max_new_tokens": max_new_tokens,
                            "ar_tokens_per_s": ar_tokens / ar_seconds,
                            "block_similarity": [{"kind": k, "layer": i, "cosine": round(s, 4)} for k, i, s in ranking],
                            "candidates": rows,
                            "note": "wall times on this machine at calibration time; a shared CPU makes them noisy"}}


def cmd_calibrate(args) -> int:
    from .loading import load, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    target = load(args.model, device=resolve_device(args.device), weights=args.weights)
    prompts = calibration_ids(target, args.prompts)
    started = time.perf_counter()
    config = calibrate(target, prompts, args.max_new_tokens, args.num_draft_tokens)
    out = Path(args.out or f"skip-{Path(str(args.model)).name}.json")
    out.write_text(json.dumps(config, indent=2) + "\n")
    cached = remember_calibration(target.model, config)
    print(f"chose {config['chosen']} ({config['measured_speedup']:.2f}x measured) in "
          f"{time.perf_counter() - started:.0f} s; wrote {out} and {cached}\n"
          f"use: --method self-spec (this model's default skip set from now on) or --skip-config {out}")
    return 0


def continuation_texts(target, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from .engine import Decoder

    ar = Decoder(target, "ar")
    return [p + ar.generate(p, max_new_tokens=max_new_tokens).token_ids for p in prompts]


def cmd_train_router(args) -> int:
    from .loading import load, resolve_device
    from .sampling import make_generator
    from .lossy.first import train_routers

    if args.threads:
        torch.set_num_threads(args.threads)
    # the routers' loss backpropagates through the model: dense float32 weights unless asked otherwise (the
    # int4 kernel has no derivative), as train-drafter does
    weights = "fp32" if args.weights == "auto" else args.weights
    target = load(args.model, device=resolve_device(args.device), weights=weights)
    texts = continuation_texts(target, calibration_ids(target, args.prompts), args.max_new_tokens)
    routers, report = train_routers(target.model, texts, steps=args.steps, lr=args.lr, sparsity=args.sparsity,
                                    generator=make_generator(args.seed), model_name=target.name, log=sys.stderr)
    out = routers.save(args.out or f"routers-{Path(str(args.model)).name}.pt")
    print(f"trained {len(routers.layers)} routers in {report.steps} steps (loss {report.first_loss:.3f} -> "
          f"{report.last_loss:.3f}, mean keep {report.mean_keep:.2f}); wrote {out}\n"
          f"use: --method first --option routers={out}")
    print(json.dumps(asdict(report)))
    return 0


def add_parser(subparsers) -> None:
    from .arguments import add_model_arguments

    c = subparsers.add_parser("calibrate-skip", help="find the self-spec skip set with the best measured speedup",
                              description="Rank attention/FFN blocks by how little they turn the hidden state, "
                              "time self-spec with several skip sets (and S2D first-k-layer drafts) against ar on "
                              "a few calibration prompts, and save the fastest as JSON for --skip-config PATH.")
    add_model_arguments(c)
    c.add_argument("--out", default=None, help="JSON path (default skip-MODEL.json)")
    c.add_argument("--prompts", type=int, default=4, help=f"calibration prompts, 1-{len(CALIBRATION_PROMPTS)} (default 4)")
    c.add_argument("--max-new-tokens", type=int, default=48)
    c.add_argument("--num-draft-tokens", type=int, default=4)
    c.add_argument("--threads", type=int, default=None)
    c.set_defaults(func=cmd_calibrate)

    t = subparsers.add_parser("train-router", help="train FiRST layer routers (for --method first)",
                              description="Fit one linear router per layer (model frozen) on calibration prompts "
                              "and the model's own continuations; saves a .pt for --option routers=.")
    add_model_arguments(t)
    t.add_argument("--out", default=None, help="router file (default routers-MODEL.pt)")
    t.add_argument("--prompts", type=int, default=8)
    t.add_argument("--max-new-tokens", type=int, default=48)
    t.add_argument("--steps", type=int, default=60)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--sparsity", type=float, default=0.02, help="weight of the mean keep probability in the loss")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    t.set_defaults(func=cmd_train_router)

"""`leapdecode bench-diverse`: several answers (superposed decoding) and loop-free open-ended text (momentum
decoding) against their peers, on a benchmark's questions.

```
k answers:   superposed (k drafts, one pass per step) | k nucleus samples | k sequential greedy runs
             wall time; perplexity of each answer under the target (and a judge model); distinct-n over the
             k answers; overlap between them (mean pairwise Jaccard of their bigram sets)
one answer:  greedy (ar) | momentum | contrastive search
             tokens/s; rep-2/3/4 (1 - distinct n-grams / n-grams of a text); distinct-2; perplexity under the
             target (and a judge model)
```
Times come from one run per method and question; compare them only within one run on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from itertools import combinations

import torch

from ..errors import InvalidSettingError, LeapdecodeError
from .questions import load_questions, resolve_questions_path


# ----- text metrics ------------------------------------------------------------------------------------

def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def rep_n(tokens: list[int], n: int) -> float:
    """1 - distinct n-grams / n-grams of one text (0 without n-grams): the share of repeated n-grams."""
    grams = ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(texts: list[list[int]], n: int) -> float:
    """Distinct n-grams / n-grams over all the texts together."""
    grams = [g for t in texts for g in ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def overlap(texts: list[list[int]]) -> float:
    """Mean pairwise Jaccard similarity of the texts' bigram sets (1: the same bigrams; 0: none shared)."""
    pairs = []
    for a, b in combinations(texts, 2):
        sa, sb = set(ngrams(a, 2)), set(ngrams(b, 2))
        pairs.append(len(sa & sb) / len(sa | sb) if sa | sb else 1.0)
    return statistics.mean(pairs) if pairs else 0.0


def perplexity(model, prompt_ids: list[int], ids: list[int]) -> float:
    """exp(mean NLL) of the continuation `ids` after `prompt_ids` under `model` (a LoadedModel); the ids are
    re-tokenized through text when the model's tokenizer is another."""
    if not ids:
        return float("nan")
    full = torch.tensor([prompt_ids + ids], dtype=torch.long, device=next(model.model.parameters()).device)
    with torch.inference_mode():
        logits = model.model(input_ids=full).logits[0, len(prompt_ids) - 1 : -1].float()
    nll = torch.nn.functional.cross_entropy(logits, full[0, len(prompt_ids):].to(logits.device))
    return float(torch.exp(nll))


def judged(judge, target, prompt_ids: list[int], ids: list[int]) -> float:
    """Perplexity under a judge model with its own tokenizer: prompt and answer as text, re-tokenized."""
    if judge is None:
        return float("nan")
    tok_t, tok_j = target.tokenizer, judge.tokenizer
    prompt = tok_j(tok_t.decode(prompt_ids, skip_special_tokens=False), add_special_tokens=False)["input_ids"]
    answer = tok_j(tok_t.decode(ids, skip_special_tokens=True), add_special_tokens=False)["input_ids"]
    return perplexity(judge, prompt or [0], answer)


# ----- the runs -----------------------------------------------------------------------------------------

def _timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def run_several(target, prompts: list[list[int]], k: int, max_new_tokens: int, top_p: float, seed: int,
                judge=None) -> dict[str, dict]:
    """superposed vs k nucleus samples vs k greedy runs, averaged over the prompts."""
    from ..engine import Decoder

    decoders = {"superposed": Decoder(target, "superposed"), "nucleus": Decoder(target, "ar"),
                "greedy": Decoder(target, "ar")}
    runs = {
        "superposed": lambda ids: decoders["superposed"].generate_several(ids, k, max_new_tokens=max_new_tokens),
        "nucleus": lambda ids: decoders["nucleus"].generate_several(ids, k, max_new_tokens=max_new_tokens,
                                                                     temperature=1.0, top_p=top_p, seed=seed),
        "greedy": lambda ids: decoders["greedy"].generate_several(ids, k, max_new_tokens=max_new_tokens),
    }
    for dec in decoders.values():  # warm-up, not timed
        dec.generate_several(prompts[0][:8], 1, max_new_tokens=2)
    rows = {}
    for name, run in runs.items():
        walls, ppl, jppl, dist1, dist2, over, tokens = [], [], [], [], [], [], []
        for ids in prompts:
            results, wall = _timed(lambda: run(ids))
            answers = [r.token_ids for r in results]
            walls.append(wall)
            tokens.append(sum(len(a) for a in answers))
            ppl.append(statistics.mean(perplexity(target, ids, a) for a in answers if a))
            if judge is not None:
                jppl.append(statistics.mean(judged(judge, target, ids, a) for a in answers if a))
            dist1.append(distinct_n(answers, 1))
            dist2.append(distinct_n(answers, 2))
            over.append(overlap(answers))
        rows[name] = {"wall_s": sum(walls), "tokens": sum(tokens), "perplexity": statistics.mean(ppl),
                      "judge_perplexity": statistics.mean(jppl) if jppl else None,
                      "distinct_1": statistics.mean(dist1), "distinct_2": statistics.mean(dist2),
                      "overlap": statistics.mean(over)}
    return rows


def run_open_ended(target, prompts: list[list[int]], max_new_tokens: int, judge=None,
                   momentum: dict | None = None, contrastive: dict | None = None) -> dict[str, dict]:
    """greedy vs momentum vs contrastive search, averaged over the prompts."""
    from ..engine import Decoder

    decoders = {"greedy": Decoder(target, "ar"), "momentum": Decoder(target, "momentum", **(momentum or {})),
                "contrastive": Decoder(target, "contrastive", **(contrastive or {}))}
    for dec in decoders.values():  # warm-up, not timed
        dec.generate(prompts[0][:8], max_new_tokens=2)
    rows = {}
    for name, dec in decoders.items():
        per = {key: [] for key in ("rep_2", "rep_3", "rep_4", "distinct_2", "perplexity", "judge_perplexity")}
        tokens, wall = 0, 0.0
        for ids in prompts:
            result, seconds = _timed(lambda: dec.generate(ids, max_new_tokens=max_new_tokens))
            out = result.token_ids
            tokens, wall = tokens + len(out), wall + seconds
            for n in (2, 3, 4):
                per[f"rep_{n}"].append(rep_n(out, n))
            per["distinct_2"].append(distinct_n([out], 2))
            if out:
                per["perplexity"].append(perplexity(target, ids, out))
                if judge is not None:
                    per["judge_perplexity"].append(judged(judge, target, ids, out))
        rows[name] = {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
                      **{key: statistics.mean(v) if v else None for key, v in per.items()}}
    return rows


# ----- the command --------------------------------------------------------------------------------------

def format_rows(title: str, rows: dict[str, dict], columns: list[str]) -> str:
    lines = [title, "method".ljust(12) + "".join(c.rjust(17) for c in columns)]
    for name, row in rows.items():
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)).rjust(17))
        lines.append(name.ljust(12) + "".join(cells))
    return "\n".join(lines)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench-diverse", help="superposed decoding (k answers) and momentum decoding "
                              "(open-ended text) against their peers: quality and time")
    p.add_argument("--model", default="smollm2-135m", help="target model (default smollm2-135m)")
    p.add_argument("--weights", default="auto", help="weights mode for `load` (default auto)")
    p.add_argument("--judge", default=None, help="a bigger model whose perplexity judges the texts (optional)")
    p.add_argument("--questions", default="suite", help="question file or `suite` / `spec-bench`")
    p.add_argument("--categories", default="chat", help="comma-separated categories (default chat)")
    p.add_argument("--per-category", type=int, default=3, help="questions per category (default 3)")
    p.add_argument("--k", type=int, default=3, help="answers per question for the k-answer comparison")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--open-max-new-tokens", type=int, default=128, help="tokens per open-ended answer")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling's p (default 0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", choices=("both", "several", "open"), default="both")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_diverse)
    return p


def cmd_bench_diverse(args: argparse.Namespace) -> int:
    from ..loading import load

    if args.k < 1 or args.max_new_tokens < 1 or args.open_max_new_tokens < 1:
        raise InvalidSettingError("--k and the token counts must be >= 1")
    questions = load_questions(resolve_questions_path(args.questions), args.categories, args.per_category)
    if not questions:
        raise LeapdecodeError(f"no questions in categories {args.categories!r}")
    target = load(args.model, weights=args.weights)
    judge = load(args.judge, weights=args.weights) if args.judge else None
    from ..engine import Decoder

    chat = target.has_chat_template
    encoder = Decoder(target, "ar")
    prompts = [encoder.encode_prompt(q.turns[0], chat=chat) for q in questions]
    report: dict = {"model": args.model, "questions": [q.question_id for q in questions]}
    if args.part in ("both", "several"):
        rows = run_several(target, prompts, args.k, args.max_new_tokens, args.top_p, args.seed, judge)
        report["several"] = rows
        print(format_rows(f"k={args.k} answers per question, {len(prompts)} questions, "
                          f"{args.max_new_tokens} new tokens", rows,
                          ["wall_s", "perplexity", "judge_perplexity", "distinct_1", "distinct_2", "overlap"]))
    if args.part in ("both", "open"):
        rows = run_open_ended(target, prompts, args.open_max_new_tokens, judge)
        report["open_ended"] = rows
        print(format_rows(f"open-ended, {len(prompts)} questions, {args.open_max_new_tokens} new tokens", rows,
                          ["tokens_per_s", "rep_2", "rep_3", "rep_4", "distinct_2", "perplexity",
                           "judge_perplexity"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0

"""SpecReason on Spec-Bench `math_reasoning` (GSM8K) questions: GSM8K exact match and steps kept, next to
the target alone (`ar`), lossless draft-model speculation (`draft`) and the draft model alone.

    python benchmarks/specreason_math.py --model qwen2.5-coder-1.5b --draft-model qwen2.5-coder-0.5b \
        --questions 5 --max-new-tokens 256 --threshold 6 --out runs/specreason-math.jsonl

One line per (question, method) is appended to --out as soon as it is measured, then a table is printed.
Greedy decoding, chat template, one turn per question. Wall times are what this machine gave: they mean
something only on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from leapdecode import Decoder
from leapdecode.bench.quality import task_score
from leapdecode.bench.questions import load_questions, resolve_questions_path
from leapdecode.loading import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft-model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threshold", type=float, action="append", help="specreason threshold(s) (default 6)")
    ap.add_argument("--boundary", default="newline")
    ap.add_argument("--max-step-tokens", type=int, default=64)
    ap.add_argument("--methods", default="ar,draft,small,specreason")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target, draft = load(args.model), load(args.draft_model)
    thresholds = args.threshold or [6.0]
    decoders = {}
    for name in args.methods.split(","):
        if name == "specreason":
            for t in thresholds:
                decoders[f"specreason@threshold={t:g}"] = Decoder(
                    target, "specreason", draft=draft, threshold=t, boundary=args.boundary,
                    max_step_tokens=args.max_step_tokens)
        elif name == "small":
            decoders["small (draft model alone)"] = Decoder(draft, "ar")
        else:
            decoders[name] = Decoder(target, name, draft=draft if name != "ar" else None)
    questions = load_questions(resolve_questions_path("spec-bench"), categories="math_reasoning",
                               per_category=args.questions)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(args.out, "a", encoding="utf-8") as log:
        for q in questions:
            for name, dec in decoders.items():
                started = time.perf_counter()
                r = dec.generate(q.turns[0], chat=True, max_new_tokens=args.max_new_tokens)
                wall = time.perf_counter() - started
                st = r.stats.as_dict()
                row = {"question_id": q.question_id, "method": name, "correct": task_score([r.text], q.reference),
                       "new_tokens": st["new_tokens"], "wall_s": wall, "target_passes": st["target_forward_passes"],
                       "steps_accepted": st.get("steps_accepted"), "steps_rejected": st.get("steps_rejected"),
                       "step_scores": st.get("step_scores"), "small_tokens": st.get("small_tokens"),
                       "stop_reason": st["stop_reason"], "text": r.text}
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"q{q.question_id} {name}: correct={row['correct']} tokens={row['new_tokens']} "
                      f"wall={wall:.1f}s steps kept={row['steps_accepted']} rejected={row['steps_rejected']}",
                      flush=True)
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| method | GSM8K exact match | new tokens | steps kept / scored | small-model tokens | wall s (shared CPU) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        kept = sum(r["steps_accepted"] or 0 for r in mine)
        scored = kept + sum(r["steps_rejected"] or 0 for r in mine)
        steps = f"{kept} / {scored}" if scored else "-"
        small = sum(r["small_tokens"] or 0 for r in mine) if scored else "-"
        lines.append(f"| {name} | {sum(r['correct'] or 0 for r in mine):g}/{len(mine)} | "
                     f"{sum(r['new_tokens'] for r in mine)} | {steps} | {small} | {sum(r['wall_s'] for r in mine):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

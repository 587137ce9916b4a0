"""`leapdecode bench-agreement REF RUN`: how closely the answers of one bench run follow another's.

Made for faithfulness: run the same bench twice, once with `--weights fp32` (the float32 reference) and once
in the mode under test, then compare each method of the second run with the reference run's `ar`. For every
question the greedy prefix agreement is the share of the reference answer's tokens generated before the first
difference; identical counts questions whose whole answers are equal. llama.cpp's `llamacpp-ar` in the
second run gets the same measure, which puts the two runtimes' faithfulness side by side.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from leapdecode.bench.summary import AnswerRecord, read_answers
from leapdecode.errors import InvalidSettingError


def prefix_agreement(reference: list[int], other: list[int]) -> float:
    """Share of `reference` matched by `other` before their first difference (1.0 when equal)."""
    if not reference:
        return 1.0 if not other else 0.0
    same = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        same += 1
    return same / len(reference)


def agreement_table(reference: list[AnswerRecord], run: list[AnswerRecord], reference_method: str = "ar"
                    ) -> list[dict]:
    """One row per method of `run`: questions compared, mean prefix agreement, identical answers."""
    ref = {r.question_id: [t for turn in r.token_ids for t in turn] for r in reference
           if r.method == reference_method}
    if not ref:
        raise InvalidSettingError(f"the reference run has no answers of method {reference_method!r}")
    rows = []
    for method in dict.fromkeys(r.method for r in run):
        shares, identical = [], 0
        for r in run:
            if r.method != method or r.question_id not in ref:
                continue
            tokens = [t for turn in r.token_ids for t in turn]
            shares.append(prefix_agreement(ref[r.question_id], tokens))
            identical += tokens == ref[r.question_id]
        if shares:
            rows.append({"method": method, "compared": len(shares), "prefix_agreement": statistics.mean(shares),
                         "identical": identical})
    return rows


def cmd_agreement(args: argparse.Namespace) -> int:
    runs = []
    for folder in (args.reference, args.run):
        path = Path(folder) / "answers.jsonl"
        if not path.is_file():
            raise InvalidSettingError(f"{folder} has no answers.jsonl (a `leapdecode bench --out` folder)")
        runs.append(read_answers(path))
    rows = agreement_table(runs[0], runs[1], args.reference_method)
    print(f"greedy prefix agreement with {args.reference}'s {args.reference_method} (share of its answer "
          "generated before the first difference, mean over questions)")
    print("| method | questions | prefix agreement | identical |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['method']} | {row['compared']} | {row['prefix_agreement']:.3f} | "
              f"{row['identical']}/{row['compared']} |")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench-agreement", help="compare two bench runs' answers (faithfulness)",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("reference", metavar="REF", help="bench --out folder of the reference run (e.g. --weights fp32)")
    p.add_argument("run", metavar="RUN", help="bench --out folder of the run to compare")
    p.add_argument("--reference-method", default="ar", help="the reference run's method to compare with (default ar)")
    p.set_defaults(func=cmd_agreement)
    return p

"""`leapdecode bench --ray [--address ADDR]`: the benchmark's questions fanned out as Ray tasks over a cluster.

```
questions ──► N chunks (round robin) ──► N Ray tasks, spread over the nodes, each reserving --threads CPUs
task on a node: load the models, run_benchmark on its chunk (methods interleaved per question, warm-up untimed)
                ──► its records + the node (id, host, CPU model, torch threads)
merge ──► answers.jsonl (every record with its node), ray_summary.json, ray_report.md
```
Timings are only ever compared inside a node: each method's speedup is its tokens/s over `ar`'s on the same
node (per node, and the mean of per-question ratios, each question having run every method on one node);
tokens/s are never compared across nodes, whose CPUs may differ. Identity to `ar` is per question, as in the
plain bench. Ray is imported here only (the optional `ray` extra).
"""
from __future__ import annotations

import io
import json
import os
import socket
import statistics
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leapdecode.bench.questions import Question
from leapdecode.bench.runner import BenchSettings, is_lossless, run_benchmark, runner_factory_with
from leapdecode.bench.summary import REFERENCE_METHOD, AnswerRecord, _cpu_model, compare_to_reference
from leapdecode.errors import LeapdecodeError


@dataclass(frozen=True)
class ModelSpec:
    """How every task loads its models (plain values: it travels to the nodes)."""

    model: str
    draft_model: str | None = None
    device: str = "cpu"
    weights: str = "auto"
    draft_weights: str = "auto"


@dataclass
class NodeRun:
    """One task's result: where it ran and its records."""

    node_id: str
    hostname: str
    cpu_model: str
    torch_threads: int
    question_ids: list[int]
    records: list[AnswerRecord] = field(default_factory=list)


def run_chunk(spec: ModelSpec, questions: Sequence[Question], methods: Sequence[str], settings: BenchSettings,
              method_options: Mapping[str, Mapping[str, Any]], threads: int) -> NodeRun:
    """The body of one Ray task: the plain benchmark on a chunk of questions, on whatever node runs it."""
    import torch

    from leapdecode import load

    torch.set_num_threads(threads)  # explicit: Ray sets OMP_NUM_THREADS from the CPUs it assigns
    target = load(spec.model, device=spec.device, weights=spec.weights, progress=False)
    draft = (load(spec.draft_model, device=spec.device, weights=spec.draft_weights, progress=False, draft=True)
             if spec.draft_model else None)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_benchmark(target, draft, questions, methods, settings, tmp, progress=False, plots=False,
                               runner_factory=runner_factory_with(method_options), log=io.StringIO())
    ray = sys.modules.get("ray")  # never imported (nor started: the runtime context would start it) here
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else "local"
    return NodeRun(node, socket.gethostname(), _cpu_model(), torch.get_num_threads(),
                   [q.question_id for q in questions], list(result.records))


def chunks(questions: Sequence[Question], n: int) -> list[list[Question]]:
    """Round robin into at most n non-empty chunks (categories spread over the tasks)."""
    parts = [list(questions[i::n]) for i in range(max(1, min(n, len(questions))))]
    return [p for p in parts if p]


def run_on_ray(spec: ModelSpec, questions: Sequence[Question], methods: Sequence[str], settings: BenchSettings,
               method_options: Mapping[str, Mapping[str, Any]], threads: int, tasks: int | None = None,
               address: str | None = None) -> list[NodeRun]:
    """Fan the questions out as Ray tasks (one per node by default, spread over the nodes) and collect them.
    Joins the cluster at `address`, or the one this process is already connected to, or starts a local one."""
    try:
        import ray
    except ImportError:
        raise LeapdecodeError("bench --ray needs Ray: pip install 'leapdecode[ray]' (or pip install 'ray')") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(num_cpus=threads, scheduling_strategy="SPREAD")(run_chunk)
    parts = chunks(questions, tasks or len(nodes))
    return ray.get([task.remote(spec, part, list(methods), settings, dict(method_options), threads)
                    for part in parts])


# ----- merging ------------------------------------------------------------------------------------------

def _tps(records: Sequence[AnswerRecord]) -> float | None:
    time = sum(r.wall_time for r in records)
    return sum(r.new_tokens for r in records) / time if time > 0 else None


def merge(runs: Sequence[NodeRun], methods: Sequence[str], settings: BenchSettings) -> tuple[list[AnswerRecord], dict]:
    """All records (identity to the reference filled in per question) and the merged summary."""
    records = [r for run in runs for r in run.records]
    reference = REFERENCE_METHOD if REFERENCE_METHOD in methods else methods[0]
    records = compare_to_reference(records, reference)
    node_of = {(r.question_id, r.method): run.node_id for run in runs for r in run.records}
    nodes = {}
    for run in runs:  # several tasks may share a node
        entry = nodes.setdefault(run.node_id, {"node_id": run.node_id, "hostname": run.hostname,
                                               "cpu_model": run.cpu_model, "torch_threads": run.torch_threads,
                                               "questions": []})
        entry["questions"] += run.question_ids
    by = {}
    for r in records:
        by.setdefault((r.method, r.question_id), r)
    per_method = {}
    for method in methods:
        mine = [r for r in records if r.method == method]
        ratios = []
        for r in mine:  # same question, same node: a ratio of timings taken side by side
            ref = by.get((reference, r.question_id))
            if ref is not None and ref.wall_time > 0 and r.wall_time > 0 and ref.new_tokens:
                ratios.append(r.tokens_per_s / ref.tokens_per_s)
        node_speedup = {}
        for node_id in nodes:
            here = [r for r in mine if node_of[(r.question_id, method)] == node_id]
            ref_here = [by[(reference, r.question_id)] for r in here if (reference, r.question_id) in by]
            a, b = _tps(here), _tps(ref_here)
            node_speedup[node_id] = round(a / b, 3) if a and b else None
        passes = sum(r.target_forward_passes for r in mine)
        per_method[method] = {
            "lossless": is_lossless(method),
            "questions": len(mine),
            "identical_to_reference": sum(1 for r in mine if r.identical_to_ar),
            "mean_accepted": round(sum(r.new_tokens for r in mine) / passes, 3) if passes else None,
            "speedup_per_node": node_speedup,
            "mean_question_speedup": round(statistics.fmean(ratios), 3) if ratios else None,
        }
    summary = {"reference_method": reference, "nodes": list(nodes.values()), "methods": per_method,
               "settings": {"max_new_tokens": settings.max_new_tokens, "repeats": settings.repeats,
                            "temperature": settings.temperature, "seed": settings.seed, "tasks": len(runs)},
               "timing": "speedups are ratios of tokens/s to the reference's on the same node; tokens/s are "
                         "never compared across nodes"}
    return records, summary


def format_report(summary: Mapping[str, Any], command_line: str = "leapdecode bench --ray") -> str:
    nodes = summary["nodes"]
    short = {n["node_id"]: f"node {i + 1}" for i, n in enumerate(nodes)}
    lines = ["# leapdecode bench --ray", "", f"`{command_line}`", "",
             "| node | host | CPU | torch threads | questions |", "| --- | --- | --- | --- | --- |"]
    for n in nodes:
        lines.append(f"| {short[n['node_id']]} ({n['node_id'][:8]}) | {n['hostname']} | {n['cpu_model']} | "
                     f"{n['torch_threads']} | {len(n['questions'])} |")
    ref = summary["reference_method"]
    lines += ["", f"| method | identical to {ref} | mean accepted | speedup per node | mean per-question speedup |",
              "| --- | --- | --- | --- | --- |"]
    for method, m in summary["methods"].items():
        per_node = ", ".join(f"{short[k]}: {v}" for k, v in m["speedup_per_node"].items())
        lines.append(f"| {method}{'' if m['lossless'] else ' (lossy)'} | {m['identical_to_reference']}/"
                     f"{m['questions']} | {m['mean_accepted']} | {per_node} | {m['mean_question_speedup']} |")
    lines += ["", summary["timing"] + "."]
    return "\n".join(lines) + "\n"


def write_merged(out: str | os.PathLike[str], runs: Sequence[NodeRun], records: Sequence[AnswerRecord],
                 summary: Mapping[str, Any], command_line: str) -> list[Path]:
    out = Path(out)
    node_of = {(r.question_id, r.method): run.node_id for run in runs for r in run.records}
    answers = out / "answers.jsonl"
    with answers.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({**asdict(r), "node_id": node_of[(r.question_id, r.method)]}, ensure_ascii=False) + "\n")
    path = out / "ray_summary.json"
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    report = out / "ray_report.md"
    report.write_text(format_report(summary, command_line), encoding="utf-8")
    return [answers, path, report]

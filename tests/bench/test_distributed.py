"""`bench/distributed.py`: a chunk of questions run as one task would run it, the merge (identity per question,
speedups only as ratios within a node, each node's CPU and threads), and, with Ray installed (slow), `bench
--ray` on a local two-node Ray cluster (`ray.cluster_utils.Cluster`) giving the plain bench's identity counts."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from conftest import saved_tiny
from leapdecode.bench.distributed import ModelSpec, NodeRun, chunks, format_report, merge, run_chunk
from leapdecode.bench.questions import Question
from leapdecode.bench.runner import BenchSettings, run_benchmark
from leapdecode.bench.summary import AnswerRecord

QUESTIONS = [Question(q, "copy" if q % 2 else "chat", [" ".join(f"w{(q * 3 + j) % 9 + 1}" for j in range(10))])
             for q in range(1, 7)]
METHODS = ["ar", "pld"]
SETTINGS = BenchSettings(max_new_tokens=12)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny(tmp_path_factory.mktemp("bench") / "model", scale=6.0)


def record(qid, method, tokens, seconds, ids):
    return AnswerRecord(qid, "c", method, ["x"], [ids], tokens, seconds, tokens)


def test_chunks_are_round_robin_and_never_empty():
    assert [[q.question_id for q in c] for c in chunks(QUESTIONS, 4)] == [[1, 5], [2, 6], [3], [4]]
    assert len(chunks(QUESTIONS[:2], 5)) == 2


def test_merge_keeps_ratios_inside_each_node():
    fast = NodeRun("n-fast", "a", "CPU A", 4, [1], [record(1, "ar", 10, 1.0, [1]), record(1, "pld", 10, 0.5, [1])])
    slow = NodeRun("n-slow", "b", "CPU B", 1, [2], [record(2, "ar", 10, 10.0, [2]), record(2, "pld", 10, 2.5, [3])])
    records, summary = merge([fast, slow], ["ar", "pld"], SETTINGS)
    pld = summary["methods"]["pld"]
    assert pld["speedup_per_node"] == {"n-fast": 2.0, "n-slow": 4.0}  # not (20 tokens / 3 s) / (20 / 11 s)
    assert pld["mean_question_speedup"] == 3.0
    assert pld["identical_to_reference"] == 1 and summary["methods"]["ar"]["identical_to_reference"] == 2
    assert [(n["cpu_model"], n["torch_threads"]) for n in summary["nodes"]] == [("CPU A", 4), ("CPU B", 1)]
    report = format_report(summary)
    assert "| node 1 (n-fast) | a | CPU A | 4 | 1 |" in report and "node 1: 2.0, node 2: 4.0" in report


def test_a_chunk_runs_like_the_plain_bench(model_dir, tmp_path):
    run = run_chunk(ModelSpec(model_dir, weights="fp32"), QUESTIONS[:2], METHODS, SETTINGS, {}, threads=1)
    assert run.node_id == "local" and run.torch_threads == 1 and run.question_ids == [1, 2]
    assert {(r.question_id, r.method) for r in run.records} == {(q, m) for q in (1, 2) for m in METHODS}


@pytest.mark.slow
def test_bench_ray_on_a_two_node_cluster(model_dir, tmp_path, capsys):
    pytest.importorskip("ray")
    import ray
    from ray.cluster_utils import Cluster

    from leapdecode import load
    from leapdecode.cli import main

    plain = run_benchmark(load(model_dir, weights="fp32"), None, QUESTIONS, METHODS, SETTINGS, tmp_path / "plain",
                          progress=False, plots=False)
    plain_counts = {m: sum(1 for r in plain.records if r.method == m and r.identical_to_ar) for m in METHODS}
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": q.question_id, "category": q.category, "turns": q.turns})
                             + "\n" for q in QUESTIONS))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        cluster.wait_for_nodes()
        out = tmp_path / "ray"
        assert main(["bench", "--ray", "--model", model_dir, "--weights", "fp32", "--methods", ",".join(METHODS),
                     "--questions", str(qfile), "--max-new-tokens", "12", "--threads", "1", "--out", str(out),
                     "--no-progress", "--no-pass-cost", "--strict"]) == 0
    finally:
        ray.shutdown()
        cluster.shutdown()
    summary = json.loads((out / "ray_summary.json").read_text())
    assert {m: v["identical_to_reference"] for m, v in summary["methods"].items()} == plain_counts
    assert plain_counts == {"ar": 6, "pld": 6}
    assert len(summary["nodes"]) == 2 and sorted(q for n in summary["nodes"] for q in n["questions"]) == list(range(1, 7))
    assert all(n["torch_threads"] == 1 and n["cpu_model"] for n in summary["nodes"])
    assert len((out / "answers.jsonl").read_text().splitlines()) == 12
    print(capsys.readouterr().out)

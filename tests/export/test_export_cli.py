"""`leapdecode export` end to end: drafters trained by `leapdecode train-drafter --exportable` on a tiny model
folder export, print the engine's command line, and round-trip (the engine re-implementation loads the files
and gives the trained drafter's logits)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import saved_tiny
from engines import load_engine
from helpers import final_hidden
from leapdecode.cli import main
from leapdecode.drafters.checkpoint import load_drafter

COMMON = ["--self-distill", "4", "--max-new-tokens", "12", "--epochs", "2", "--batch-size", "8", "--no-progress",
          "--gen-batch-size", "2"]


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAPDECODE_CACHE", str(tmp_path / "cache"))
    return Path(saved_tiny(tmp_path / "model", scale=3.0))


def test_cli_registers_export():
    from leapdecode.cli import build_parser

    args = build_parser().parse_args(["export", "--format", "vllm-medusa", "--drafter", "a", "--out", "b"])
    assert args.func.__name__ == "cmd_export" and args.format == "vllm-medusa" and args.dtype == "fp32"


def test_trained_medusa_exports_and_round_trips(model_dir, tmp_path, capsys):
    from leapdecode import load

    run, out = tmp_path / "medusa", tmp_path / "medusa-vllm"
    assert main(["train-drafter", "--model", str(model_dir), "--kind", "medusa", "--num-heads", "3",
                 "--exportable", "--out", str(run), *COMMON]) == 0
    assert json.loads((run / "drafter.json").read_text())["settings"]["block"] == "linear"
    capsys.readouterr()
    args = ["export", "--format", "vllm-medusa", "--drafter", str(run), "--out", str(out), "--model", str(model_dir)]
    assert main(args) == 2  # saved with a draft vocabulary
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading messages: one line
    assert err.startswith("error: the drafter drafts from a vocabulary of") and "--full-vocab" in err
    assert main(args + ["--full-vocab"]) == 0
    printed = capsys.readouterr().out
    command = printed.strip().splitlines()[-1]
    assert command.startswith(f"vllm serve {model_dir} --speculative-config '")
    spec = json.loads(command.split("--speculative-config ", 1)[1].strip("'"))
    assert spec == {"method": "medusa", "model": str(out.resolve()), "num_speculative_tokens": 3}
    # round trip: the engine's forward on the export gives the trained heads' logits
    target = load(str(model_dir), weights="fp32")
    _, net = load_drafter(run, target.model, kind="medusa")
    engine = load_engine(out, "vllm-medusa")
    feature = final_hidden(target, [1, 5, 9, 13])
    head = target.model.get_output_embeddings()
    with torch.no_grad():
        for k, theirs in enumerate(engine(feature), start=1):
            torch.testing.assert_close(theirs, head(net.head_state(k, feature)), atol=1e-5, rtol=0)


def test_trained_falcon_exports_to_sglang(model_dir, tmp_path, capsys):
    run, out = tmp_path / "falcon", tmp_path / "falcon-sglang"
    assert main(["train-drafter", "--model", str(model_dir), "--kind", "falcon", "--exportable", "--draft-vocab", "0",
                 "--out", str(run), *COMMON]) == 0
    capsys.readouterr()
    assert main(["export", "--format", "sglang-eagle", "--drafter", str(run), "--out", str(out),
                 "--model", str(model_dir), "--serve-model", "org/target", "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "note: falcon's glance head is left out" in printed
    assert printed.strip().splitlines()[-1].startswith("python -m sglang.launch_server --model-path org/target ")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_hydra_is_refused_at_training_and_export(model_dir, tmp_path, capsys):
    assert main(["train-drafter", "--model", str(model_dir), "--kind", "hydra", "--exportable",
                 "--out", str(tmp_path / "h"), *COMMON]) == 2
    assert "hydra's sequential heads" in capsys.readouterr().err


@pytest.mark.slow
def test_medusa_trained_on_the_default_model_round_trips(tmp_path, monkeypatch, capsys):
    """The issue's check on real weights: train-drafter --exportable on the default model (a few answers),
    export to vLLM's layout, and the engine re-implementation gives the trained heads' logits."""
    from leapdecode import load
    from leapdecode.presets import DEFAULT_MODEL

    monkeypatch.setenv("LEAPDECODE_CACHE", str(tmp_path / "cache"))  # the default-drafter pointer stays here
    run, out = tmp_path / "medusa", tmp_path / "medusa-vllm"
    assert main(["train-drafter", "--model", DEFAULT_MODEL, "--kind", "medusa", "--exportable", "--self-distill",
                 "4", "--max-new-tokens", "24", "--epochs", "1", "--no-progress", "--out", str(run)]) == 0
    assert main(["export", "--format", "vllm-medusa", "--drafter", str(run), "--out", str(out), "--full-vocab"]) == 0
    assert "vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --speculative-config" in capsys.readouterr().out
    target = load(DEFAULT_MODEL, weights="fp32")
    _, net = load_drafter(run, target.model, kind="medusa")
    feature = final_hidden(target, target.tokenizer("The quick brown fox jumps over")["input_ids"])
    engine = load_engine(out, "vllm-medusa")
    head = target.model.get_output_embeddings()
    with torch.no_grad():
        for k, theirs in enumerate(engine(feature), start=1):
            torch.testing.assert_close(theirs, head(net.head_state(k, feature)), atol=1e-5, rtol=0)

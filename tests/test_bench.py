"""Every registered method through the benchmark runner; `--skip-config` / `--drafter` on `generate` and
`bench`; the quality section names the reference method actually used."""
from __future__ import annotations

import json

import pytest
import torch

from leapdecode import load
from leapdecode.bench.questions import Question
from leapdecode.bench.runner import BenchSettings, is_lossless, run_benchmark
from leapdecode.cli import main
from leapdecode.lossy.first import Routers
from leapdecode.methods import all_methods
from conftest import tiny_loaded
from test_trained_drafters import fresh_drafter

L = 5  # self-spec's default skip set and ffn-skip need a few layers
QUESTIONS = [Question(1, "copy", ["w1 w2 w3 w4 w5 w1 w2 w3"], reference="w1"), Question(2, "chat", ["w20 w21"])]
DRAFT_NEEDED = {"draft", "draft-tree", "spectr"}
TRAINED = {"medusa", "hydra", "falcon", "hidden-transfer"}
SKIPPED: dict[str, str] = {  # method -> why it cannot run here
    "specreason": "the target scores steps through digit tokens, which the tiny word tokenizer lacks "
                  "(test_specreason.py runs it through the benchmark runner)",
}


def _target():
    return tiny_loaded("llama", layers=L, scale=4.0)


def _variant(method: str, folder) -> str:
    """The method name with the files it needs (a random trained drafter, random routers)."""
    base = method.split("+")[0]  # BASE+RULE (relaxed acceptance) needs what BASE needs
    if method.endswith("+judge"):  # a judge head for this target (accepting nothing)
        from leapdecode.drafters.checkpoint import target_fingerprint
        from leapdecode.verifiers.judge import save_judge

        target = _target()
        save_judge(folder / "judge", torch.nn.Linear(64, 1), {
            "target_fingerprint": target_fingerprint(target.model), "hidden_size": 64})
        method = f"{method}@judge={folder / 'judge'}@threshold=1"
    if base in TRAINED:
        return f"{method}@drafter={fresh_drafter(base, _target(), folder / base)}"
    if method == "first":
        torch.manual_seed(0)
        routers = Routers((1, 2, 3), 0.1 * torch.randn(3, 64), torch.tensor([-5.0, 5.0, 0.0]), L)
        return f"first@routers={routers.save(folder / 'routers.pt')}"
    return method


@pytest.mark.parametrize("method", [
    pytest.param(s.name, marks=pytest.mark.skip(reason=SKIPPED[s.name])) if s.name in SKIPPED else s.name
    for s in all_methods()
])
def test_every_method_runs_through_the_benchmark_runner(method, tmp_path):
    name = _variant(method, tmp_path)
    draft = tiny_loaded("llama", seed=1, layers=1) if method.split("+")[0] in DRAFT_NEEDED else None
    result = run_benchmark(_target(), draft, QUESTIONS, ["ar", name] if method != "ar" else ["ar"],
                           BenchSettings(max_new_tokens=8, warmup_tokens=2), tmp_path / "out",
                           progress=False, plots=False)
    rows = [r for r in result.records if r.method == name]
    assert [r.question_id for r in rows] == [1, 2]
    assert all(r.new_tokens > 0 for r in rows)
    assert name in result.summary["methods"] and name in result.table
    if is_lossless(name):
        assert all(r.identical_to_ar for r in rows), f"{name} differs from ar"
        assert not result.mismatches
    else:
        assert result.summary["methods"][name]["token_agreement"] is not None


def test_quality_section_names_the_reference_method(tmp_path):
    run_benchmark(_target(), None, QUESTIONS, ["pld", "ffn-skip@fraction=0.4@warmup_tokens=1"],
                  BenchSettings(max_new_tokens=8, warmup_tokens=2), tmp_path / "out", progress=False, plots=False)
    report = (tmp_path / "out" / "report.md").read_text()
    quality = report[report.index("## Quality against"):]
    assert quality.startswith("## Quality against pld") and "with pld's" in quality
    assert "against ar" not in report and "with ar's" not in report
    assert json.loads((tmp_path / "out" / "quality.json").read_text())["reference_method"] == "pld"


# ----- --skip-config and --drafter -----------------------------------------------------------------------

SMALL = 4  # with 4 layers self-spec's default skip set is empty: it runs only with a skip set given


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model folder, a skip config and medusa/hydra drafters for it, a question file."""
    root = tmp_path_factory.mktemp("flags")
    loaded = tiny_loaded("llama", layers=SMALL, scale=4.0)
    loaded.model.save_pretrained(root / "model")
    loaded.tokenizer.save_pretrained(root / "model")
    target = load(str(root / "model"), device="cpu")
    skip = root / "skip.json"
    skip.write_text(json.dumps({"kind": "leapdecode-skip-config", "num_layers": SMALL, "skip_attention": [2, 3],
                                "skip_ffn": [3]}))
    questions = root / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": q.question_id, "category": q.category,
                                             "turns": q.turns}) + "\n" for q in QUESTIONS))
    return {"model": str(root / "model"), "skip": str(skip), "questions": str(questions),
            "medusa": str(fresh_drafter("medusa", target, root / "medusa")),
            "hydra": str(fresh_drafter("hydra", target, root / "hydra"))}


@pytest.fixture(autouse=True)
def no_default_drafters(tmp_path, monkeypatch):
    """No drafter remembered from elsewhere: a trained method runs only with the one it is given."""
    monkeypatch.setenv("LEAPDECODE_CACHE", str(tmp_path / "cache"))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_skip_config_and_drafter_flags(files, capsys):
    common = ["generate", "w1 w2 w3 w1 w2", "--model", files["model"], "--device", "cpu", "--max-new-tokens", "8",
              "--compare", "--repeats", "1"]
    code, out, err = run(capsys, *common, "--method", "self-spec")
    assert code == 2 and "skip set is empty" in err  # the flag is what makes the next call work
    code, out, err = run(capsys, *common, "--method", "self-spec", "--skip-config", files["skip"])
    assert code == 0, err
    assert "self-spec" in out and "NO" not in out  # identical to ar in the compare table
    code, out, err = run(capsys, *common, "--method", "medusa", "--drafter", files["medusa"])
    assert code == 0, err
    assert "medusa" in out and "NO" not in out


@pytest.mark.parametrize("extra,message", [
    (["--method", "pld", "--skip-config", "SKIP"], "--skip-config is for self-spec; method 'pld' does not take it"),
    (["--method", "self-spec", "--drafter", "MEDUSA"], "--drafter is for medusa, hydra, falcon"),
    (["--method", "self-spec", "--skip-config", "/no/such.json"], "--skip-config /no/such.json: no such file"),
    (["--method", "medusa", "--drafter", "SKIP"], "no such folder"),
    (["--method", "self-spec", "--skip-config", "SKIP", "--option", "draft_layers=1"], "not both"),
    (["--method", "medusa", "--drafter", "MEDUSA", "--option", "drafter=x"], "not both"),
])
def test_generate_flag_errors(files, capsys, extra, message):
    extra = [{"SKIP": files["skip"], "MEDUSA": files["medusa"]}.get(a, a) for a in extra]
    code, _, err = run(capsys, "generate", "w1 w2", "--model", files["model"], "--device", "cpu", *extra)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error:") and message in err


def test_bench_flags_apply_to_every_method_that_takes_them(files, tmp_path, capsys):
    methods = ["ar", "self-spec", "self-spec@draft_layers=1", "medusa", f"hydra@drafter={files['hydra']}"]
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "bench", "--model", files["model"], "--device", "cpu", "--methods",
                            ",".join(methods), "--skip-config", files["skip"], "--drafter", files["medusa"],
                            "--questions", files["questions"], "--max-new-tokens", "6", "--out", str(out),
                            "--no-progress", "--strict")
    assert code == 0, err  # plain self-spec got the skip config, medusa the drafter; explicit options won
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == methods
    assert all(m["identical_to_ar"] == m["compared"] == 2 for m in summary["methods"].values())
    assert summary["settings"]["skip_config"] == files["skip"] and summary["settings"]["drafter"] == files["medusa"]
    report = (out / "report.md").read_text()
    assert f"--skip-config {files['skip']}" in report and f"--drafter {files['medusa']}" in report


@pytest.mark.parametrize("methods,extra,message", [
    ("ar,pld", ["--skip-config", "SKIP"], "--skip-config is for self-spec; no method in --methods (ar,pld)"),
    ("ar,self-spec", ["--drafter", "MEDUSA"], "--drafter is for medusa, hydra, falcon"),
    ("ar,medusa", ["--drafter", "/no/such/folder"], "no such folder"),
])
def test_bench_flag_errors_before_loading(files, tmp_path, capsys, methods, extra, message):
    extra = [{"SKIP": files["skip"], "MEDUSA": files["medusa"]}.get(a, a) for a in extra]
    code, _, err = run(capsys, "bench", "--model", "/not/loaded", "--methods", methods, *extra,
                       "--questions", files["questions"], "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error:") and message in err

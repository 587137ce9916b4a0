"""The llama.cpp bench peers (`llamacpp-ar`, `llamacpp-pld`) without llama.cpp: a stand-in `llama_cpp`
module replays llama-cpp-python's generate loop (eval, sample, draft, roll back) over a scripted next-token
rule, so the runner's bookkeeping is checked exactly; a slow test runs the real library when it is there."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from conftest import tiny_loaded
from leapdecode.bench import cli as bench_cli
from leapdecode.bench import llamacpp_peer
from leapdecode.bench.llamacpp_peer import LlamaCppRunner, check_options, require_llamacpp
from leapdecode.bench.runner import BenchSettings, check_methods, is_lossless, make_runner, needs_draft, run_benchmark
from leapdecode.bench.questions import Question
from leapdecode.cli import main
from leapdecode.errors import InvalidSettingError, LeapdecodeError


def _next(ids) -> int:
    """The stand-in model's greedy rule: a cycle 10, 11, ..., 15 continuing from the last token."""
    last = int(ids[-1])
    return 10 + (last - 9) % 6 if 10 <= last <= 15 else 10


class FakeLlama:
    """llama-cpp-python's `Llama.generate` control flow (0.3.x) over `_next`."""

    instances: list = []

    def __init__(self, model_path, n_ctx, n_threads, n_threads_batch, draft_model=None, logits_all=False,
                 verbose=True):
        self.model_path, self.n_ctx, self.threads = model_path, n_ctx, (n_threads, n_threads_batch)
        self.draft_model, self.logits_all = draft_model, logits_all
        self.input_ids = np.zeros(n_ctx, dtype=np.intc)
        self.n_tokens = 0
        self.closed = False
        self.evals: list[int] = []
        FakeLlama.instances.append(self)

    def reset(self):
        self.n_tokens = 0

    def eval(self, tokens):
        assert self.n_tokens + len(tokens) <= self.n_ctx
        self.input_ids[self.n_tokens:self.n_tokens + len(tokens)] = tokens
        self.n_tokens += len(tokens)
        self.evals.append(len(tokens))

    def generate(self, tokens, temp=0.8, top_k=40, repeat_penalty=1.0, reset=True):
        assert temp == 0.0 and reset and self.n_tokens == 0
        tokens = list(tokens)
        sample_idx = self.n_tokens + len(tokens) - 1
        while True:
            self.eval(tokens)
            while sample_idx < self.n_tokens:
                token = _next(self.input_ids[: sample_idx + 1])
                sample_idx += 1
                yield token
                tokens = [token]
                if sample_idx < self.n_tokens and token != self.input_ids[sample_idx]:
                    self.n_tokens = sample_idx
                    break
            if self.draft_model is not None:
                self.input_ids[self.n_tokens:self.n_tokens + len(tokens)] = tokens
                tokens.extend(int(t) for t in self.draft_model(self.input_ids[: self.n_tokens + len(tokens)]))

    def close(self):
        self.closed = True


class FakeLookup:
    def __init__(self, max_ngram_size=2, num_pred_tokens=10):
        self.max_ngram_size, self.num_pred_tokens = max_ngram_size, num_pred_tokens

    def __call__(self, ids):
        """Drafts the rule's continuation, wrong from the third token on (two accepted, then a miss)."""
        out, seq = [], list(ids)
        for i in range(self.num_pred_tokens):
            t = _next(seq) if i < 2 else 99
            out.append(t)
            seq.append(t)
        return np.array(out, dtype=np.intc)


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    FakeLlama.instances = []
    module = types.ModuleType("llama_cpp")
    module.Llama = FakeLlama
    module.__path__ = []  # a package, as the real one is
    speculative = types.ModuleType("llama_cpp.llama_speculative")
    speculative.LlamaPromptLookupDecoding = FakeLookup
    module.llama_speculative = speculative
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_speculative", speculative)
    return module


@pytest.fixture
def no_llama_cpp(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError


@pytest.fixture
def gguf_target(tmp_path):
    """A tiny model whose name is a .gguf path (the peers read that file; the fake never opens it)."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    target = tiny_loaded("llama", stop_token_ids=(13,))
    target.name = str(path)
    return target


def test_not_installed_is_one_clear_line_before_loading(no_llama_cpp, tmp_path, monkeypatch, capsys):
    with pytest.raises(LeapdecodeError, match=r"llamacpp-pld needs llama-cpp-python.*make peers"):
        check_methods("ar,llamacpp-pld", has_draft=False)
    require_llamacpp(["ar", "hf-ar"])  # nothing asked of llama.cpp: no error

    def no_loading(spec, device="cpu", weights="auto"):
        raise AssertionError("a model was loaded before the methods were checked")

    monkeypatch.setattr(bench_cli, "_load_model", no_loading)
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1, "category": "a", "turns": ["hi"]}\n')
    assert main(["bench", "--questions", str(q), "--out", str(tmp_path / "o"), "--methods", "ar,llamacpp-ar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: llamacpp-ar needs llama-cpp-python") and "make peers" in err[0]


def test_peers_are_greedy_only_compared_by_agreement_and_take_known_options(fake_llama_cpp):
    assert not is_lossless("llamacpp-ar") and not is_lossless("llamacpp-pld@num_pred_tokens=2")
    assert not needs_draft("llamacpp-pld")
    assert check_methods("ar,llamacpp-ar,llamacpp-pld@num_pred_tokens=2", has_draft=False)[1] == "llamacpp-ar"
    with pytest.raises(InvalidSettingError, match="llama.cpp greedy only"):
        check_methods("ar,llamacpp-ar", has_draft=False, settings=BenchSettings(temperature=0.5))
    assert check_options("llamacpp-pld", {"num_pred_tokens": 2}) == {"num_pred_tokens": 2, "max_ngram_size": 2}
    with pytest.raises(InvalidSettingError, match="takes no options"):
        check_options("llamacpp-ar", {"num_pred_tokens": 2})
    with pytest.raises(InvalidSettingError, match="positive integer"):
        check_options("llamacpp-pld", {"max_ngram_size": 0})


def test_ar_runs_one_pass_per_token_and_stops_like_the_engine(fake_llama_cpp, gguf_target):
    runner = make_runner("llamacpp-ar", gguf_target, None, BenchSettings())
    assert isinstance(runner, LlamaCppRunner) and runner.path.name == "model.gguf"
    out = runner.run([1, 2, 3, 10], 5)  # the cycle: 11 12 13(stop) -> kept, then stops
    assert out.token_ids == [11, 12, 13]
    assert out.target_forward_passes == 3 and out.accept_lengths == [1, 1, 1]
    llm = FakeLlama.instances[-1]
    assert llm.draft_model is None and not llm.logits_all and llm.evals == [4, 1, 1]
    import torch

    assert llm.threads == (torch.get_num_threads(),) * 2
    out = runner.run([7], 2)  # budget, and a fresh cache each call
    assert out.token_ids == [10, 11] and FakeLlama.instances[-1] is llm and llm.evals[-2:] == [1, 1]
    assert "eval" not in vars(llm)  # the counting wrapper is removed after the call


def test_pld_counts_accepted_tokens_per_pass(fake_llama_cpp, gguf_target):
    gguf_target.stop_token_ids = frozenset()
    runner = make_runner("llamacpp-pld@num_pred_tokens=4", gguf_target, None, BenchSettings())
    out = runner.run([5], 9)
    assert out.token_ids == [10, 11, 12, 13, 14, 15, 10, 11, 12]  # the rule's own tokens: drafts never change them
    llm = FakeLlama.instances[-1]
    assert llm.logits_all and llm.draft_model.num_pred_tokens == 4
    # prefill commits 1; each later pass accepts the 2 right drafts + the model's token
    assert out.accept_lengths == [1, 3, 3, 2] and out.target_forward_passes == 4
    assert sum(out.accept_lengths) == len(out.token_ids)


def test_context_grows_for_a_long_call_and_is_capped(fake_llama_cpp, gguf_target):
    gguf_target.context_length = 8192
    runner = LlamaCppRunner("llamacpp-ar", gguf_target)
    runner.run([1] * 100, 4)
    first = FakeLlama.instances[-1]
    assert first.n_ctx == 2048
    runner.run([1] * 3000, 4)
    assert FakeLlama.instances[-1].n_ctx == 4096 and first.closed
    with pytest.raises(LeapdecodeError, match="exceed the model's context"):
        runner.run([1] * 8190, 8)


def test_needs_a_gguf_model(fake_llama_cpp, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    target = tiny_loaded("llama")
    target.name = str(folder)
    with pytest.raises(InvalidSettingError, match="need a GGUF model"):
        LlamaCppRunner("llamacpp-ar", target)


def test_bench_reports_agreement_with_ar_not_identity(fake_llama_cpp, gguf_target, tmp_path):
    """In a bench run the peers' differing output is no lossless mismatch; the quality table has them."""
    result = run_benchmark(gguf_target, None, [Question(1, "a", ["w1 w2 w3"])], "ar,llamacpp-ar,llamacpp-pld",
                           BenchSettings(max_new_tokens=6, warmup_tokens=2), tmp_path / "out", progress=False,
                           plots=False)
    assert result.mismatches == {}
    methods = result.summary["methods"]
    for name in ("llamacpp-ar", "llamacpp-pld"):
        assert methods[name]["token_agreement"] is not None
    assert methods["ar"]["token_agreement"] is None  # lossless: identical by promise
    assert "| llamacpp-ar | other runtime |" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_real_llama_cpp_on_the_default_model():
    """llama.cpp's greedy tokens on SmolLM2's GGUF mostly agree with ours (different kernels)."""
    pytest.importorskip("llama_cpp")
    from leapdecode import load
    from leapdecode.engine import Decoder
    from leapdecode.bench.quality import prefix_agreement

    target = load("smollm2-135m")
    prompt = Decoder(target, "ar").encode_prompt([{"role": "user", "content": "Name three colours."}])
    ours = Decoder(target, "ar").generate(prompt, max_new_tokens=16).token_ids
    for name in ("llamacpp-ar", "llamacpp-pld"):
        out = LlamaCppRunner(name, target, threads=1).run(prompt, 16)
        assert len(out.token_ids) == len(ours) or out.token_ids[-1] in target.stop_token_ids
        assert prefix_agreement(out.token_ids, ours) > 0.2, (name, out.token_ids, ours)

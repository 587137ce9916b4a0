"""The command line: bad input gets one clear line and no traceback; generate and --compare work."""
from __future__ import annotations

import pytest

from leapdecode import Decoder
from leapdecode.cli import main
from leapdecode.errors import IncompatibleDraftError, InvalidSettingError, PromptTooLongError
from conftest import tiny_loaded


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Two tiny llama folders with the same tokenizer and one with a different vocabulary."""
    dirs = {}
    for name, kwargs in {"target": dict(seed=0, scale=4.0), "draft": dict(seed=1, layers=1),
                         "other": dict(vocab_size=48)}.items():
        loaded = tiny_loaded("llama", **kwargs)
        path = tmp_path_factory.mktemp(name)
        loaded.model.save_pretrained(path)
        loaded.tokenizer.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv,message", [
    (["generate", ""], "prompt is empty"),
    (["generate", "w1 w2", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "w1 w2", "--temperature", "-1"], "temperature"),
    (["generate", "w1 w2", "--top-p", "0"], "top_p"),
    (["generate", "w1 w2", "--top-p", "1.5"], "top_p"),
    (["generate", "w1 w2", "--top-k", "-3"], "top_k"),
    (["generate", "w1 w2", "--method", "nope"], "valid methods: "),
    (["generate", "w1 w2", "--method", "draft"], "needs --draft-model"),
    (["generate", "w1 w2", "--model", "/no/such/folder"], "no such file or folder"),
])
def test_bad_input_is_one_clear_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last


def test_bad_device_is_one_clear_line(capsys):
    import torch

    from leapdecode.loading import resolve_device

    code, _, err = run(capsys, "generate", "w1 w2", "--device", "tpu9")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: unknown device 'tpu9'")
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "generate", "w1 w2", "--device", "cuda")
        assert code == 2 and "no CUDA GPU" in err.strip().splitlines()[-1]


def test_mismatched_draft_vocabulary(capsys, model_dirs):
    code, _, err = run(capsys, "generate", "w1 w2", "--model", model_dirs["target"], "--method", "draft",
                       "--draft-model", model_dirs["other"])
    assert code == 2 and "tokenizer" in err.splitlines()[-1]


def test_prompt_longer_than_context(capsys, model_dirs):
    prompt = " ".join(f"w{i % 60 + 1}" for i in range(600))
    code, _, err = run(capsys, "generate", prompt, "--model", model_dirs["target"])
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert "601" in last or "600" in last
    assert "512" in last


def test_generate_streams_and_prints_stats(capsys, model_dirs):
    code, out, err = run(capsys, "generate", "w1 w2 w3 w1 w2 w3", "--model", model_dirs["target"],
                         "--max-new-tokens", "12")
    assert code == 0
    assert out.strip()
    assert "tokens/s" in err and "mean accepted" in err


def test_compare_table(capsys, model_dirs):
    code, out, _ = run(capsys, "generate", "w1 w2 w3 w1 w2 w3", "--model", model_dirs["target"], "--method",
                       "draft", "--draft-model", model_dirs["draft"], "--max-new-tokens", "16", "--compare",
                       "--with-hf", "--repeats", "1")
    assert code == 0
    for word in ("tokens/s", "speedup", "mean accepted", "identical to ar", "hf-ar", "hf-assisted"):
        assert word in out
    rows = [line for line in out.splitlines() if line.startswith(("ar ", "draft ", "hf-ar ", "hf-assisted "))]
    assert len(rows) == 4 and all(line.rstrip().endswith("yes") for line in rows)


def test_compare_with_a_lossy_method_is_not_an_error(capsys, model_dirs):
    """A lossy method may differ from ar: the table says so, the command still succeeds."""
    code, out, err = run(capsys, "generate", "w1 w2 w3 w1 w2 w3", "--model", model_dirs["target"], "--method",
                         "early-exit", "--option", "threshold=0.05", "--option", "exit_layers=0", "--max-new-tokens", "12", "--compare",
                         "--repeats", "1")
    assert code == 0 and "WARNING" not in err
    row = next(line for line in out.splitlines() if line.startswith("early-exit "))
    assert row.rstrip().endswith("NO")  # it did differ from ar


def test_methods_lists_promise(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    promise = {line.split()[0]: line.split()[1] for line in out.splitlines() if line and not line.startswith("peers")}
    assert promise["pld"] == "lossless" and promise["self-spec"] == "lossless"
    for name in ("ffn-skip", "skipdecode", "first", "early-exit"):
        assert promise[name] == "lossy", name


def test_library_errors_are_typed():
    target = tiny_loaded("llama")
    with pytest.raises(InvalidSettingError):
        Decoder(target, "ar").generate("   ")
    with pytest.raises(InvalidSettingError):
        Decoder(target, "ar").generate("w1", max_new_tokens=-1)
    with pytest.raises(PromptTooLongError, match="600 tokens.*512"):
        Decoder(target, "ar").generate([1] * 600)
    with pytest.raises(IncompatibleDraftError):
        Decoder(target, "draft", draft=tiny_loaded("llama", vocab_size=48))
    with pytest.raises(InvalidSettingError, match="no option"):
        Decoder(target, "pld", bogus=1)


def test_stop_strings_and_streaming_pieces_add_up():
    target = tiny_loaded("llama", scale=4.0)
    dec = Decoder(target, "pld")
    full = dec.generate("w1 w2 w3 w1 w2 w3", max_new_tokens=20)
    words = full.text.split()
    stop = " ".join(words[5:7])
    pieces: list[str] = []
    cut = dec.generate("w1 w2 w3 w1 w2 w3", max_new_tokens=20, stop=[stop], on_text=pieces.append)
    assert cut.text == full.text[: full.text.find(stop)]
    assert "".join(pieces) == cut.text
    assert cut.stats.stop_reason == "stop_string"
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
    stream = dec.stream("w1 w2 w3 w1 w2 w3", max_new_tokens=20)
    assert "".join(stream) == full.text and stream.result.token_ids == full.token_ids

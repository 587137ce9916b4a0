"""`leapdecode calibrate-skip` and `leapdecode train-router` end to end on tiny models; calibration
candidates for models with few layers; skip configs checked against the model they are used with."""
from __future__ import annotations

import io
import json

import pytest

from leapdecode import Decoder, load
from leapdecode.cli import main
from leapdecode.errors import InvalidSettingError
from leapdecode.calibrate import calibrate, candidates
from leapdecode.lossy.first import Routers
from conftest import tiny_loaded

LAYERS = 4
PROMPTS = ([1, 2, 3, 1, 2, 3, 4], [9, 8, 7, 6], [5] * 9)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny 4-layer llama saved as a model folder (loaded by the commands like any model)."""
    loaded = tiny_loaded("llama", layers=LAYERS, scale=4.0)
    path = tmp_path_factory.mktemp("target")
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return str(path)


def test_calibrate_skip_command_writes_a_config_that_self_spec_uses_losslessly(model_dir, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setenv("LEAPDECODE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "skip.json"
    code = main(["calibrate-skip", "--model", model_dir, "--device", "cpu", "--prompts", "2",
                 "--max-new-tokens", "6", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "--skip-config" in capsys.readouterr().out
    config = json.loads(out.read_text())
    assert config["num_layers"] == LAYERS and config["skip_attention"] + config["skip_ffn"]
    names = [c["name"] for c in config["calibration"]["candidates"]]
    assert len(names) == len(set(names)) and config["chosen"] in names
    target = load(model_dir, device="cpu")
    ar, spec = Decoder(target, "ar"), Decoder(target, "self-spec", skip_config=str(out))
    for prompt in PROMPTS:
        assert spec.generate(prompt, max_new_tokens=16).token_ids == ar.generate(prompt, max_new_tokens=16).token_ids
    # also remembered for this model: self-spec without a skip set uses it (a 4-layer default would be empty)
    assert Decoder(target, "self-spec").drafter.skip == spec.drafter.skip


def test_train_router_command_then_first_uses_the_routers(model_dir, tmp_path, capsys):
    out = tmp_path / "routers.pt"
    code = main(["train-router", "--model", model_dir, "--device", "cpu", "--prompts", "2", "--max-new-tokens", "6",
                 "--steps", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] == 3
    routers = Routers.load(out)
    assert routers.layers == (1, 2) and routers.num_layers == LAYERS
    target = load(model_dir, device="cpu")
    dec = Decoder(target, "first", routers=str(out))
    result = dec.generate(PROMPTS[0], max_new_tokens=10)
    assert result.stats.new_tokens == 10
    assert dec.generate(PROMPTS[0], max_new_tokens=10).token_ids == result.token_ids  # deterministic


@pytest.mark.parametrize("layers", [2, 3])
def test_candidates_for_few_layers_are_non_empty_and_distinct(layers):
    model = tiny_loaded("llama", layers=layers).model
    ranking = [(kind, i, 0.9 - 0.01 * n) for n, (kind, i) in
               enumerate((k, i) for i in range(1, layers) for k in ("ffn", "attn"))]
    cands = candidates(model, ranking)
    assert cands and all(c.skip.size > 0 for c in cands)
    assert len({c.skip for c in cands}) == len(cands)
    for c in cands:  # each one is a valid explicit skip set (not silently the default)
        Decoder(tiny_loaded("llama", layers=layers), "self-spec", skip_attention=sorted(c.skip.attention),
                skip_ffn=sorted(c.skip.ffn))


def test_candidates_refuse_a_one_layer_model():
    with pytest.raises(InvalidSettingError, match="at least 2 layers"):
        candidates(tiny_loaded("llama", layers=1).model, [])


def test_calibrate_on_a_two_layer_model_times_only_real_skip_sets():
    target = tiny_loaded("llama", layers=2, scale=4.0)
    config = calibrate(target, [PROMPTS[0]], max_new_tokens=4, log=io.StringIO())
    rows = config["calibration"]["candidates"]
    sets = [(tuple(r["skip_attention"]), tuple(r["skip_ffn"])) for r in rows]
    assert all(r["blocks_skipped"] > 0 for r in rows) and len(set(sets)) == len(sets)
    assert all(r["identical_to_ar"] for r in rows)  # self-spec is lossless whatever it skips


def _config(tmp_path, **data):
    path = tmp_path / "skip.json"
    path.write_text(json.dumps({"kind": "leapdecode-skip-config", **data}))
    return str(path)


@pytest.mark.parametrize("data,match", [
    ({"num_layers": 12, "model": "big", "skip_attention": [2], "skip_ffn": [2]}, r"12-layer model \(big\)"),
    ({"num_layers": LAYERS, "skip_attention": [1], "skip_ffn": [4]}, r"names layers \[4\]"),
    ({"skip_attention": [-1], "skip_ffn": []}, r"names layers \[-1\]"),
    ({"num_layers": LAYERS, "skip_attention": "x", "skip_ffn": []}, "cannot read layer indices"),
])
def test_skip_config_for_another_model_is_refused(tmp_path, data, match):
    target = tiny_loaded("llama", layers=LAYERS)
    with pytest.raises(InvalidSettingError, match=match) as err:
        Decoder(target, "self-spec", skip_config=_config(tmp_path, **data))
    assert "skip.json" in str(err.value)


def test_skip_config_without_num_layers_is_accepted_when_in_range(tmp_path):
    target = tiny_loaded("llama", layers=LAYERS, scale=4.0)
    spec = Decoder(target, "self-spec", skip_config=_config(tmp_path, skip_attention=[2, 3], skip_ffn=[3]))
    assert spec.generate(PROMPTS[1], max_new_tokens=12).token_ids == \
        Decoder(target, "ar").generate(PROMPTS[1], max_new_tokens=12).token_ids

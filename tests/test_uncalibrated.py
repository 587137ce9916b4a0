"""Methods that pay only once calibrated or trained never run their slow fallback silently: `self-spec`
without a skip set uses the one `calibrate-skip` cached for the model, else says in one line that its
default is uncalibrated and which command to run; medusa/hydra/falcon without a drafter fail in one line
naming the training command."""
from __future__ import annotations

import pytest

from conftest import tiny_loaded
from leapdecode import Decoder
from leapdecode.drafters import self_spec
from leapdecode.drafters.self_spec import calibrated_skip_path, remember_calibration
from leapdecode.errors import InvalidSettingError
from leapdecode.layer_skip import SkipSet

LAYERS = 6  # the default skip set of a 6-layer model is layer 2: not empty


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAPDECODE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(self_spec, "_NOTICES_GIVEN", set())


def _target(layers=LAYERS):
    return tiny_loaded("llama", layers=layers, scale=4.0)


def test_uncalibrated_default_is_said_once_with_the_command(capsys):
    target = _target()
    spec = Decoder(target, "self-spec")
    assert spec.drafter.skip == self_spec.default_skip_set(LAYERS)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "uncalibrated" in err[0] and "slower than ar" in err[0]
    assert f"`leapdecode calibrate-skip --model {target.name}`" in err[0]
    Decoder(target, "self-spec")  # a second build (a server's next request): no second line
    assert capsys.readouterr().err == ""
    prompt = [1, 2, 3, 1, 2, 3, 4]
    assert spec.generate(prompt, max_new_tokens=12).token_ids == Decoder(target, "ar").generate(
        prompt, max_new_tokens=12).token_ids


def test_a_given_skip_set_needs_no_notice(capsys):
    Decoder(_target(), "self-spec", skip_layers=[3, 4])
    Decoder(_target(), "self-spec", draft_layers=2)
    assert capsys.readouterr().err == ""


def test_calibrated_set_in_the_cache_is_used(capsys):
    target = _target()
    path = remember_calibration(target.model, {"kind": "leapdecode-skip-config", "num_layers": LAYERS,
                                               "skip_attention": [3], "skip_ffn": [4, 5], "measured_speedup": 1.2})
    assert path == calibrated_skip_path(target.model) and path.is_file()
    spec = Decoder(target, "self-spec")
    assert spec.drafter.skip == SkipSet.of(attention=[3], ffn=[4, 5])
    assert capsys.readouterr().err == ""
    other = _target()  # same architecture, other weights: not its calibration
    other.model = tiny_loaded("llama", layers=LAYERS, seed=3).model
    assert Decoder(other, "self-spec").drafter.skip == self_spec.default_skip_set(LAYERS)


def test_a_calibration_that_measured_a_slowdown_says_so(capsys):
    target = _target()
    remember_calibration(target.model, {"num_layers": LAYERS, "skip_attention": [3], "skip_ffn": [],
                                        "measured_speedup": 0.8})
    Decoder(target, "self-spec")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0.80x of ar" in err[0] and "does not pay" in err[0]


def test_empty_default_is_an_error_naming_the_command():
    target = _target(layers=4)
    with pytest.raises(InvalidSettingError, match=r"skip set is empty.*leapdecode calibrate-skip --model tiny-llama-0"):
        Decoder(target, "self-spec")


@pytest.mark.parametrize("kind", ["medusa", "hydra", "falcon"])
def test_trained_methods_without_a_drafter_name_the_training_command(kind):
    target = _target()
    with pytest.raises(InvalidSettingError) as err:
        Decoder(target, kind)
    message = str(err.value)
    assert "\n" not in message
    assert f"`leapdecode train-drafter --model {target.name} --kind {kind} --out runs/{kind}`" in message
    assert "--drafter DIR" in message

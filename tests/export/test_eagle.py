"""`export/eagle.py` with `vllm_eagle.py` and `sglang_eagle.py`: a falcon drafter with EAGLE's layer, exported,
loaded by a re-implementation of the engines' EAGLE forward with strict names, gives our drafter's layer
outputs and logits (fp32, 1e-5) on tiny llama and qwen2 targets, at any starting position."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_loaded
from engines import load_engine
from helpers import final_hidden, saved_drafter
from leapdecode.export import ExportRefused, export_drafter
from leapdecode.export.manifest import check_export

FORMATS = ("vllm-eagle", "sglang-eagle")
IDS = [3, 9, 27, 17, 51, 2, 40, 11, 8, 33]


def eagle_settings(**extra):
    return {"window": 8, "layer": "eagle", **extra}


def engine_matches(net, target, out, fmt, offset: int = 0):
    """The engine reads (next token, feature) per position; ours reads (feature, embedding of the next token)."""
    engine = load_engine(out, fmt)
    features = final_hidden(target, IDS[:-1])  # f_j
    nxt = torch.tensor(IDS[1:])  # x_{j+1}
    embeds = target.model.get_input_embeddings()(nxt).float()
    head = target.model.get_output_embeddings()
    with torch.no_grad():
        ours = net.step(features[None], embeds[None])[0]
        theirs = engine(nxt, features, torch.arange(len(nxt)) + offset)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(head(theirs), head(ours), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_export_matches_the_engine_forward(fmt, arch, tmp_path):
    target = tiny_loaded(arch)
    folder, net = saved_drafter(target, tmp_path / "d", "falcon", eagle_settings(attention_heads=4, kv_heads=2))
    result = export_drafter(fmt, folder, tmp_path / "out", target.model, "org/target")
    assert check_export(tmp_path / "out", fmt) == []
    engine_matches(net, target, tmp_path / "out", fmt)
    engine_matches(net, target, tmp_path / "out", fmt, offset=37)  # rotary positions are relative
    if fmt == "vllm-eagle":
        assert result.command.startswith("vllm serve org/target --speculative-config '{\"method\": \"eagle\"")
        assert "fc.bias" not in load_file(str(tmp_path / "out" / "model.safetensors"))
    else:
        assert result.command.startswith("python -m sglang.launch_server --model-path org/target "
                                         "--speculative-algorithm EAGLE --speculative-draft-model-path ")
        assert bool((load_file(str(tmp_path / "out" / "model.safetensors"))["fc.bias"] == 0).all())
    assert any("glance head is left out" in n for n in result.notes)


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_layers_keep_the_second_input_norm(fmt, tmp_path):
    target = tiny_loaded("llama")
    folder, net = saved_drafter(target, tmp_path / "d", "falcon", eagle_settings(layers=2))
    export_drafter(fmt, folder, tmp_path / "out", target.model, "t")
    names = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "layers.1.input_layernorm.weight" in names and "layers.0.input_layernorm.weight" not in names
    engine_matches(net, target, tmp_path / "out", fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_misnamed_tensor_fails(fmt, tmp_path):
    target = tiny_loaded("llama")
    folder, _ = saved_drafter(target, tmp_path / "d", "falcon", eagle_settings())
    out = tmp_path / "out"
    export_drafter(fmt, folder, out, target.model, "t")
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors.pop("layers.0.mlp.up_proj.weight")
    save_file(tensors, str(out / "model.safetensors"))
    assert check_export(out, fmt) == ["tensor 'layers.0.mlp.up_proj.weight' missing",
                                      "tensor 'model.layers.0.mlp.up_proj.weight' is not one the engine loads"]
    with pytest.raises(RuntimeError, match="layers.0.mlp.up_proj.weight"):
        load_engine(out, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind,settings,why", [
    ("falcon", {"window": 8}, "falcon's own layer .* --exportable"),
    ("hydra", {"num_heads": 2}, "hydra's heads are sequential"),
    ("medusa", {"num_heads": 2, "block": "linear"}, "not an EAGLE decoder layer; export medusa heads with "
                                                    "--format vllm-medusa"),
])
def test_other_shapes_are_refused_with_one_line(fmt, kind, settings, why, tmp_path):
    target = tiny_loaded("llama")
    folder, _ = saved_drafter(target, tmp_path / "d", kind, settings)
    with pytest.raises(ExportRefused, match=why) as err:
        export_drafter(fmt, folder, tmp_path / "out", target.model, "t")
    assert "\n" not in str(err.value)


def test_falcon_with_eagle_layer_still_decodes_exactly(tmp_path):
    """The falcon drafter with EAGLE's layer is a drafter like any other: greedy output equals ar's."""
    from leapdecode import Decoder

    target = tiny_loaded("qwen2", scale=3.0)
    folder, _ = saved_drafter(target, tmp_path / "d", "falcon", eagle_settings())
    prompt = [5, 9, 14, 21, 5, 9]
    out = Decoder(target, "falcon", drafter=str(folder), max_nodes=8, top_k=3).generate(prompt, max_new_tokens=24)
    assert out.token_ids == Decoder(target, "ar").generate(prompt, max_new_tokens=24).token_ids


def test_falcon_with_eagle_layer_trains(tmp_path):
    """The EAGLE-layer falcon learns from the same loss as falcon's own layer."""
    from leapdecode.drafters.checkpoint import target_fingerprint
    from leapdecode.drafters.falcon import falcon_loss_fn
    from leapdecode.training.data import build_data
    from leapdecode.training.trainer import TrainSettings, train

    target = tiny_loaded("llama", scale=3.0)
    rows = [{"messages": [{"role": "user", "content": " ".join(f"w{(i * 7 + j) % 64}" for j in range(5))}],
             "response": None} for i in range(8)]
    data = build_data(target, rows, tmp_path, target_fingerprint(target.model), max_new_tokens=24, batch_size=4,
                      progress=False)
    _, net = saved_drafter(target, tmp_path / "d", "falcon", eagle_settings(), noise=0.0)
    net.train()
    report = train(net, target, data, TrainSettings(epochs=25, lr=3e-3, batch_size=32, progress=False),
                   tmp_path / "run", loss_fn=falcon_loss_fn(net, target, data, "ce"))
    assert report.last_loss < 0.7 * report.first_loss, report


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_chain_sets_the_draft_length_and_a_tree_is_refused(fmt, tmp_path):
    target = tiny_loaded("llama")
    folder, _ = saved_drafter(target, tmp_path / "d", "falcon", eagle_settings())
    result = export_drafter(fmt, folder, tmp_path / "out", target.model, "t", paths="chain:5")
    assert ('"num_speculative_tokens": 5' if fmt == "vllm-eagle" else "--speculative-num-steps 5") in result.command
    with pytest.raises(ExportRefused, match="is a tree; .* only a chain"):
        export_drafter(fmt, folder, tmp_path / "out", target.model, "t", paths="0;1;0,0")

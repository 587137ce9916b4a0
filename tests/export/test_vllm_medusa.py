"""`export/vllm_medusa.py`: our medusa heads in vLLM's Medusa layout, loaded by a re-implementation of vLLM's
Medusa forward with strict names, give our heads' logits (fp32, 1e-5) on tiny llama and qwen2 targets."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_loaded
from engines import load_engine
from helpers import final_hidden, saved_drafter
from leapdecode.export import ExportRefused, export_drafter
from leapdecode.export.manifest import check_export

FMT = "vllm-medusa"


def our_logits(net, target, feature):
    head = target.model.get_output_embeddings()
    return [head(net.head_state(k, feature)) for k in range(1, net.num_heads + 1)]


def engine_matches(net, target, out):
    engine = load_engine(out, FMT)
    feature = final_hidden(target, [3, 9, 27, 17, 51, 2])
    with torch.no_grad():
        ours, theirs = our_logits(net, target, feature), engine(feature)
    assert len(ours) == len(theirs) == net.num_heads
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("layers", [1, 2])
def test_linear_blocks_export_and_match(arch, layers, tmp_path):
    target = tiny_loaded(arch)
    folder, net = saved_drafter(target, tmp_path / "d", "medusa", {"num_heads": 3, "layers": layers, "block": "linear"})
    result = export_drafter(FMT, folder, tmp_path / "out", target.model, "org/target")
    assert check_export(tmp_path / "out", FMT) == []
    assert "vllm serve org/target --speculative-config" in result.command
    assert '"method": "medusa"' in result.command and '"num_speculative_tokens": 3' in result.command
    engine_matches(net, target, tmp_path / "out")


def test_two_layer_blocks_map_only_when_equivalent(tmp_path):
    target = tiny_loaded("llama")

    def identity_out(net):  # x + I silu(W x + b) + 0 is the paper's block
        for stack in net.heads:
            stack[0].out.weight.copy_(torch.eye(64))
            stack[0].out.bias.zero_()

    folder, net = saved_drafter(target, tmp_path / "a", "medusa", {"num_heads": 2}, edit=identity_out)
    export_drafter(FMT, folder, tmp_path / "out", target.model, "t")
    engine_matches(net, target, tmp_path / "out")
    folder, _ = saved_drafter(target, tmp_path / "b", "medusa", {"num_heads": 2})  # a general two-layer block
    with pytest.raises(ExportRefused, match="two-layer residual blocks .* --exportable"):
        export_drafter(FMT, folder, tmp_path / "out2", target.model, "t")


def test_misnamed_or_misshapen_tensor_fails_the_check(tmp_path):
    target = tiny_loaded("llama")
    folder, _ = saved_drafter(target, tmp_path / "d", "medusa", {"num_heads": 2, "block": "linear"})
    out = tmp_path / "out"
    export_drafter(FMT, folder, out, target.model, "t")
    tensors = load_file(str(out / "model.safetensors"))
    tensors["blocks.0.layer.0.weight"] = tensors.pop("blocks.0.layers.0.weight")  # Medusa's own repo layout
    save_file(tensors, str(out / "model.safetensors"))
    assert check_export(out, FMT) == ["tensor 'blocks.0.layers.0.weight' missing",
                                      "tensor 'blocks.0.layer.0.weight' is not one the engine loads"]
    with pytest.raises(RuntimeError, match="blocks.0.layers.0.weight"):
        load_engine(out, FMT)
    tensors["blocks.0.layers.0.weight"] = tensors.pop("blocks.0.layer.0.weight")[:, :32].contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    assert check_export(out, FMT) == ["tensor 'blocks.0.layers.0.weight' has shape [64, 32], the engine needs [64, 64]"]
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_engine(out, FMT)


@pytest.mark.parametrize("kind,settings,why", [
    ("hydra", {"num_heads": 2}, "hydra's heads are sequential"),
    ("falcon", {"window": 4, "layer": "eagle"}, "not a set of Medusa heads"),
])
def test_other_kinds_are_refused_with_one_line(kind, settings, why, tmp_path):
    target = tiny_loaded("llama")
    folder, _ = saved_drafter(target, tmp_path / "d", kind, settings)
    with pytest.raises(ExportRefused, match=why) as err:
        export_drafter(FMT, folder, tmp_path / "out", target.model, "t")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_draft_vocabulary_is_refused_unless_full_vocab(tmp_path):
    from leapdecode.drafters.checkpoint import save_draft_vocab

    target = tiny_loaded("llama")
    folder, net = saved_drafter(target, tmp_path / "d", "medusa", {"num_heads": 2, "block": "linear"})
    save_draft_vocab(folder, torch.arange(16))
    with pytest.raises(ExportRefused, match="vocabulary of 16 tokens plus each prompt's.*--full-vocab"):
        export_drafter(FMT, folder, tmp_path / "out", target.model, "t")
    result = export_drafter(FMT, folder, tmp_path / "out", target.model, "t", full_vocab=True)
    assert any("full vocabulary" in n for n in result.notes)
    engine_matches(net, target, tmp_path / "out")


def test_drafter_of_another_target_is_refused(tmp_path):
    from leapdecode.errors import InvalidSettingError

    folder, _ = saved_drafter(tiny_loaded("llama"), tmp_path / "d", "medusa", {"num_heads": 2, "block": "linear"})
    with pytest.raises(InvalidSettingError, match="trained for"):
        export_drafter(FMT, folder, tmp_path / "out", tiny_loaded("llama", seed=1).model, "t")


def test_paths_must_be_a_chain_of_one_token_per_head(tmp_path):
    target = tiny_loaded("llama")
    folder, _ = saved_drafter(target, tmp_path / "d", "medusa", {"num_heads": 3, "block": "linear"})
    assert '"num_speculative_tokens": 3' in export_drafter(FMT, folder, tmp_path / "o", target.model, "t",
                                                            paths="0;0,0;0,0,0").command
    with pytest.raises(ExportRefused, match="is a tree"):
        export_drafter(FMT, folder, tmp_path / "o", target.model, "t", paths="0;1;2;0,0")
    with pytest.raises(ExportRefused, match="one token per head: the chain must be 3 long, not 2"):
        export_drafter(FMT, folder, tmp_path / "o", target.model, "t", paths="chain:2")

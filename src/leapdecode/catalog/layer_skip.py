"""Layer skipping: `self-spec` (lossless) and `ffn-skip`, `skipdecode`, `first`, `early-exit` (lossy).

Every skip goes through `leapdecode.layer_skip.gated`, a context manager that wraps the decoder
layers' attention/FFN modules and always restores them. The lossy methods decode plainly (no drafter)
with the target patched for the generation; options are checked when the `Decoder` is built.
"""
from __future__ import annotations

from ..drafters.base import NoDrafter
from ..drafters.self_spec import SelfSpecDrafter, resolve_skip_set
from ..errors import InvalidSettingError
from ..layer_skip import num_layers
from ..lossy import early_exit, ffn_skip, first, skipdecode
from .spec import LOSSLESS, LOSSY, MethodBuild, MethodSpec, take_options

SELF_SPEC_OPTIONS = {"skip_config": None, "skip_layers": None, "skip_attention": None, "skip_ffn": None,
                     "draft_layers": None, "num_draft_tokens": 4, "adaptive": True, "confidence_threshold": 0.0}


def _self_spec(build: MethodBuild):
    opts = take_options(build.options, SELF_SPEC_OPTIONS, "self-spec")
    model = build.target.model
    skip = resolve_skip_set(model, opts["skip_config"], opts["skip_layers"], opts["skip_attention"], opts["skip_ffn"],
                            opts["draft_layers"], model_name=build.target.name)
    try:
        return SelfSpecDrafter(model, skip, num_draft_tokens=opts["num_draft_tokens"], adaptive=opts["adaptive"],
                               confidence_threshold=opts["confidence_threshold"])
    except ValueError as err:
        raise InvalidSettingError(str(err)) from None


def _lossy(name: str, module, allowed: dict):
    def make_drafter(build: MethodBuild):
        opts = take_options(build.options, allowed, name)
        model = build.target.model
        module.options(opts, model if module is first else num_layers(model))  # validate now, not mid-generation
        return NoDrafter()

    def target_patch(build: MethodBuild):
        return module.patch(build.target.model, take_options(build.options, allowed, name))

    return make_drafter, target_patch


def _lossy_spec(name: str, module, allowed: dict, description: str, paper: str) -> MethodSpec:
    make_drafter, target_patch = _lossy(name, module, allowed)
    return MethodSpec(name, LOSSY, description, paper, make_drafter, target_patch=target_patch)


METHODS = (
    MethodSpec(
        "self-spec", LOSSLESS,
        "the target drafts for itself with attention/FFN blocks or whole layers skipped (calibrated skip set, "
        "a user list, or an S2D nested sub-model: draft_layers=k); the full model verifies",
        "Zhang et al. 2023 (Draft & Verify); FFN-SkipLLM; SkipDecode; S2D sorted speculative decoding", _self_spec),
    _lossy_spec(
        "ffn-skip", ffn_skip, {"threshold": None, "fraction": 0.25, "warmup_tokens": 4},
        "skip saturated FFN blocks (cosine of block input/output measured on the first tokens), first and last "
        "layers kept, attention and KV cache untouched", "Jaiswal et al. 2024, FFN-SkipLLM"),
    _lossy_spec(
        "skipdecode", skipdecode, {"max_skip": None, "min_skip": 0, "skip_start": 1, "ramp_tokens": 32},
        "per-position exit point shared by the batch, skipping more lower layers as the position grows "
        "(monotone, no KV recomputation); upper layers always run", "Del Corro et al. 2023, SkipDecode"),
    _lossy_spec(
        "first", first, {"routers": None, "threshold": 0.5, "max_skip": None},
        "per-layer routers read the prompt at prefill and choose the layers the decode skips "
        "(`leapdecode train-router`)", "Jain et al. 2024, FiRST"),
    _lossy_spec(
        "early-exit", early_exit, {"threshold": 0.9, "exit_layers": None},
        "exit at an intermediate layer when the LM head's confidence there reaches a threshold; skipped "
        "layers' KV from the copied hidden state", "Schuster et al. 2022 (CALM); CEED-VLA early-exit decoding"),
)

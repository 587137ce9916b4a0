"""Trained drafters on the target's features (medusa, hydra, falcon, hidden-transfer); all lossless through tree
verification.
Each loads a drafter trained by `leapdecode train-drafter` (option `drafter=DIR`, default: the last one trained
for this target and kind) and refuses one trained for another model."""
from __future__ import annotations

from ..drafters import checkpoint
from ..drafters.falcon import FalconDrafter
from ..drafters.hidden_transfer import HiddenTransferDrafter
from ..drafters.hydra import HydraDrafter
from ..drafters.medusa import MedusaDrafter
from ..errors import InvalidSettingError
from .spec import LOSSLESS, MethodBuild, MethodSpec, take_options

DRAFTERS = {"medusa": MedusaDrafter, "hydra": HydraDrafter, "falcon": FalconDrafter,
            "hidden-transfer": HiddenTransferDrafter}


CPU_PATHS = "chain:2"  # medusa/hydra default on a CPU (see below); a GPU gets the 16-node tree of _TREE


def _network(build: MethodBuild, kind: str, folder):
    """(network, draft vocabulary or None) of the drafter in `folder` (None: the default one of this target and
    kind). A build that keeps `shared` state (the batch engine's) loads it once; its requests' drafters then
    share it, read-only."""
    shared = build.shared
    key = ("trained-drafter", kind, folder)
    if shared is not None and key in shared:
        return shared[key]
    folder = folder or checkpoint.default_drafter(build.target.model, kind, build.target.name)
    _, net = checkpoint.load_drafter(folder, build.target.model, kind=kind)
    loaded = (net, checkpoint.load_draft_vocab(folder))
    if shared is not None:
        shared[key] = loaded
    return loaded


def _make(kind: str, defaults: dict):
    def make(build: MethodBuild):
        # draft_vocab: draft from the saved draft vocabulary (+ the prompt's tokens) when the drafter has one
        opts = take_options(build.options, {"drafter": None, "draft_vocab": True, **defaults}, kind)
        if kind != "falcon" and "paths" not in build.options and build.target.model.device.type == "cpu":
            # On a CPU a pass over a 16-node tree costs ~2.5 one-token passes: a short chain pays better
            # (measured with a hydra on SmolLM2-135M, 2 cores: 16-node tree 0.74x of ar, chain of 2 1.01x).
            opts["paths"] = CPU_PATHS
        net, vocab = _network(build, kind, opts.pop("drafter"))
        if opts.pop("draft_vocab") and vocab is not None:
            opts["vocab"] = vocab
        try:
            return DRAFTERS[kind](build.target, net, **opts)
        except ValueError as err:
            raise InvalidSettingError(str(err)) from None

    return make


_TREE = {"paths": "0;1;2;3;0,0;0,1;0,2;1,0;1,1;2,0;0,0,0;0,0,1;0,1,0;1,0,0;0,0,0,0;0,0,0,1", "max_nodes": 64}

METHODS = (
    MethodSpec(
        "medusa", LOSSLESS, "trained heads on the target's last hidden state predict the next tokens "
        "independently; their top candidates form a tree (Medusa path list)",
        "Cai et al. 2024 (Medusa); the baseline of Hydra (Ankner et al. 2024)", _make("medusa", dict(_TREE))),
    MethodSpec(
        "hydra", LOSSLESS, "sequentially dependent trained heads: each also reads the embeddings of the draft "
        "tokens before it; a tree grown depth by depth",
        "Hydra: Sequentially-Dependent Draft Heads for Medusa Decoding (Ankner et al. 2024)",
        _make("hydra", dict(_TREE))),
    MethodSpec(
        "falcon", LOSSLESS, "a small semi-autoregressive drafter (a transformer layer over the target's features "
        "and token embeddings) that emits several tokens per step, grown into a tree by confidence",
        "Falcon (Gao et al. 2024, coupled sequential glancing distillation); EAGLE-style feature drafting",
        _make("falcon", {"max_nodes": 16, "max_depth": 6, "top_k": 3})),
    MethodSpec(
        "hidden-transfer", LOSSLESS, "trained linear transfer layers map an intermediate hidden state of the last "
        "position into pseudo hidden states of the next positions, which the target's upper layers finish "
        "(one extra call over the upper layers per step); their top tokens form a tree",
        "Parallel Decoding via Hidden Transfer for Lossless LLM Acceleration (Wu et al. 2024)",
        _make("hidden-transfer", dict(_TREE))),
)

"""Relaxed acceptance (lossy): `BASE+RULE` for every lossless method with a drafter, e.g. `pld+typical`,
`draft+lantern`, `pld-tree+grouped`. The drafter is BASE's; the verifier keeps, besides the exactly accepted
tokens, the drafted tokens the rule admits (`verifiers/relaxed.py`). The rule's knobs are method options
next to BASE's own (`pld+typical@epsilon=0.2`); at zero relaxation the method gives BASE's tokens."""
from __future__ import annotations

from dataclasses import replace

from ..errors import InvalidSettingError
from ..verifiers.relaxed import RULES, make_rule
from . import core, layer_skip, trained, trees
from .spec import LOSSLESS, LOSSY, MethodBuild, MethodSpec

KNOBS = {
    "typical": "epsilon (0.09), delta (sqrt(epsilon)): accept p(x) > min(epsilon, delta exp(-H(p)))",
    "lantern": "k (8), delta (0.1), embeddings (input|output): mass of x's latent neighbourhood, TV budget delta",
    "grouped": "tau (0.5), max_group (8): x in the smallest top-token group with target mass >= tau",
    "judge": "judge (DIR, default: the last trained for the model), threshold (0.5): a trained judge head "
             "on the target's hidden state at x (`leapdecode train-judge`)",
}


def _rule(build: MethodBuild, rule: str, knobs: dict):
    """The rule, built once per build that keeps shared state (lantern's neighbour cache); a judge rule holds
    its pass's hidden states, so each drafter gets its own (sharing the loaded head)."""
    key = ("acceptance", rule, tuple(sorted(knobs.items())))
    if rule == "judge" and build.shared is not None and key in build.shared:
        shared = build.shared[key]
        return type(shared)(shared.head, shared.threshold)
    if build.shared is not None and key in build.shared:
        return build.shared[key]
    try:
        made = _judge(build, knobs) if rule == "judge" else make_rule(rule, knobs, build.target.model)
    except ValueError as err:
        raise InvalidSettingError(str(err)) from None
    if build.shared is not None:
        build.shared[key] = made
    return made


def _judge(build: MethodBuild, knobs: dict):
    from ..drafters.checkpoint import target_facts, target_fingerprint
    from ..verifiers.judge import JudgeRule, default_judge, load_judge

    model = build.target.model
    fingerprint = target_fingerprint(model)
    folder = knobs.get("judge") or default_judge(fingerprint, build.target.name)
    head, _ = load_judge(folder, fingerprint, target_facts(model)[0])
    return JudgeRule(head.to(model.device), knobs.get("threshold", 0.5))


def relaxed(base: MethodSpec, rule: str) -> MethodSpec:
    defaults, paper = RULES[rule]

    def make(build: MethodBuild):
        knobs = {k: v for k, v in build.options.items() if k in defaults}
        rest = {k: v for k, v in build.options.items() if k not in defaults}
        acceptance = _rule(build, rule, knobs)
        drafter = base.make_drafter(replace(build, options=rest))
        drafter.acceptance = acceptance
        if acceptance.needs_hidden:  # the pass keeps its final hidden states for the rule
            drafter.needs_target_hidden = True
        return drafter

    return MethodSpec(f"{base.name}+{rule}", LOSSY, f"{base.name} with relaxed {rule} acceptance; {KNOBS[rule]}",
                      paper, make, needs_draft_model=base.needs_draft_model, target_patch=base.target_patch)


# The judge reads the pass's final hidden states; these bases' passes keep an intermediate layer's instead
# (`Drafter.target_hidden_layer`), so BASE+judge is not offered for them.
INTERMEDIATE_HIDDEN = {"hidden-transfer"}


def derive(bases) -> tuple[MethodSpec, ...]:
    """`BASE+RULE` for every lossless base with a drafter (all but `ar`) and every rule."""
    return tuple(relaxed(base, rule) for base in bases if base.promise == LOSSLESS and base.name != "ar"
                 for rule in RULES if not (rule == "judge" and base.name in INTERMEDIATE_HIDDEN))


METHODS = derive(core.METHODS + trees.METHODS + trained.METHODS + layer_skip.METHODS)

"""Open-ended and several-answer decoding (all lossy): `momentum` (one text, a rule over the target's
logits in the plain decoding step), `contrastive` (its reference peer, a loop of its own) and `superposed`
(k drafts from one pass per step, a loop of its own)."""
from __future__ import annotations

from ..drafters.base import NoDrafter
from ..errors import InvalidSettingError
from ..lossy import contrastive, momentum, superposed
from .spec import LOSSY, MethodBuild, MethodSpec, take_options


def _momentum_drafter(build: MethodBuild):
    momentum.options(take_options(build.options, momentum.DEFAULTS, "momentum"))  # checked now
    return NoDrafter()


def _momentum_rule(build: MethodBuild):
    return momentum.MomentumRule(**momentum.options(take_options(build.options, momentum.DEFAULTS, "momentum")))


def _checked(name: str, module):
    def make_drafter(build: MethodBuild):
        module.options(take_options(build.options, module.DEFAULTS, name))
        return NoDrafter()

    return make_drafter


def _contrastive_run(build: MethodBuild, lm, prompt_ids: list[int], settings, n: int) -> list:
    opts = contrastive.options(take_options(build.options, contrastive.DEFAULTS, "contrastive"))
    target = build.target
    one = contrastive.contrastive_generate(lm, prompt_ids, tokenizer=target.tokenizer,
                                           max_new_tokens=settings.max_new_tokens,
                                           context_length=target.context_length, stop_ids=target.stop_token_ids,
                                           stop=settings.stop, alpha=opts["alpha"], top_k=opts["top_k"])
    return [one] * n  # deterministic: n copies of the one answer


def _superposed_run(build: MethodBuild, lm, prompt_ids: list[int], settings, n: int) -> list:
    opts = superposed.options(take_options(build.options, superposed.DEFAULTS, "superposed"))
    target = build.target
    if n > target.vocab_size:
        raise InvalidSettingError(f"superposed decoding makes at most {target.vocab_size} drafts, asked {n}")
    cache = build.shared if build.shared is not None else {}
    key = ("superposed-corpus", opts["corpus"], opts["ngram_order"])
    if key not in cache:  # the corpus part of the n-gram model, built once per build (and shared)
        model = superposed.NgramModel(opts["ngram_order"])
        for text in superposed.corpus_texts(opts["corpus"]):
            model.add(target.tokenizer(text, add_special_tokens=False)["input_ids"])
        cache[key] = model
    ngram = superposed.NgramModel(opts["ngram_order"])
    ngram.next.update({ctx: counts.copy() for ctx, counts in cache[key].next.items()})
    ngram.add(list(prompt_ids))
    return superposed.superposed_generate(lm, prompt_ids, n, tokenizer=target.tokenizer,
                                          max_new_tokens=settings.max_new_tokens, stop_ids=target.stop_token_ids,
                                          stop=settings.stop, context_length=target.context_length, ngram=ngram,
                                          ngram_weight=opts["ngram_weight"])


METHODS = (
    MethodSpec("momentum", LOSSY, "greedy decoding over a graph of visited n-gram states: a return to a visited "
               "state costs a resistance that grows with each return (one pass per token, meant for greedy)",
               "Lan et al. 2022, Momentum Decoding", _momentum_drafter, logits_rule=_momentum_rule),
    MethodSpec("contrastive", LOSSY, "contrastive search: top-k candidates scored by probability minus their "
               "hidden state's similarity to the context (one pass per token with k look-ahead nodes)",
               "Su et al. 2022, contrastive search", _checked("contrastive", contrastive), run=_contrastive_run),
    MethodSpec("superposed", LOSSY, "k drafts from one pass per step: the input is the drafts' superposed "
               "embeddings, k^2 candidates kept by the LM interpolated with an n-gram model of the prompt",
               "Shen et al. 2024, Superposed Decoding", _checked("superposed", superposed), run=_superposed_run),
)

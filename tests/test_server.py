"""The HTTP server, driven with the official `openai` client against a real uvicorn on 127.0.0.1 (free port)."""
from __future__ import annotations

import asyncio
import gc
import random
import time

import httpx
import openai
import psutil
import pytest

from leapdecode import Decoder
from leapdecode.batching import BatchEngine
from leapdecode.server import BackgroundServer, ServerConfig, create_app
from conftest import tiny_loaded

MODEL = "tiny-served"
LIMIT = 64
CONTEXT = 128


def _target():
    return tiny_loaded("llama", scale=6.0, context_length=CONTEXT)


@pytest.fixture(scope="module")
def served():
    target = _target()
    engine = BatchEngine(target, {"pld": {}, "ar": {}}, max_batch_size=8)
    app = create_app(engine, ServerConfig(model_name=MODEL, default_method="pld", max_tokens_limit=LIMIT))
    with BackgroundServer(app) as server:
        yield server, engine, target


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _text(target, prompt: str, n: int, method: str = "ar", **kw) -> str:
    ids = target.tokenizer(prompt)["input_ids"]
    return Decoder(target, method).generate(ids, max_new_tokens=n, **kw).text


def _prompt(seed: int, length: int = 12) -> str:
    rng = random.Random(seed)
    base = [rng.randrange(1, 64) for _ in range(rng.randint(2, 5))]
    return " ".join(f"w{t}" for t in (base * 8)[:length])


def test_models_health_metrics(served, client):
    server = served[0]
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["methods"] == ["pld", "ar"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in ("leapdecode_requests_total", "leapdecode_tokens_generated_total", "leapdecode_tokens_per_second",
                 "leapdecode_mean_accepted_tokens", "leapdecode_queue_depth", "leapdecode_batch_size"):
        assert f"# TYPE {name} " in text
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}  # valid exposition text
    assert families["leapdecode_requests"].type == "counter" and families["leapdecode_batch_size"].type == "gauge"


@pytest.mark.parametrize("method", ["ar", "pld"])
def test_chat_and_completion_greedy_equal_decoder(served, client, method):
    target = served[2]
    prompt = _prompt(1)
    expected = _text(target, prompt, 20)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=20, temperature=0, extra_body={"method": method})
    assert chat.choices[0].message.content == expected
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 20 and chat.usage.prompt_tokens == 12
    stats = chat.model_extra["leapdecode"]
    assert stats["method"] == method and stats["mean_accepted"] >= 1.0
    comp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                     extra_body={"method": method})
    assert comp.choices[0].text == expected
    assert comp.model_extra["leapdecode"]["method"] == method


def test_streaming_chat_and_completion(served, client):
    target = served[2]
    prompt = _prompt(2)
    expected = _text(target, prompt, 24)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=24, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert finals[0].usage.completion_tokens == 24 and finals[0].model_extra["leapdecode"]["method"] == "pld"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 36
    pieces = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in pieces) == expected
    assert pieces[-1].usage.completion_tokens == 24


def test_seeded_sampling_repeats_and_equals_decoder(served, client):
    target = served[2]
    prompt = _prompt(3)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    first = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == first
    assert first == _text(target, prompt, 16, "pld", temperature=0.9, top_p=0.95, seed=1234)
    other = client.completions.create(**{**kw, "seed": 99}).choices[0].text
    assert other != first


def test_stop_strings(served, client):
    target = served[2]
    prompt = _prompt(4)
    free = _text(target, prompt, 30).split(" ")
    stop = " ".join(free[5:7])
    expected = _text(target, prompt, 30, stop=[stop])
    assert stop not in expected and len(expected) < len(" ".join(free))
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=30, temperature=0, stop=[stop, "never-there"])
    assert chat.choices[0].message.content == expected and chat.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


BAD = [
    ("chat", b"{not json", 400, None),
    ("chat", b"[1, 2]", 400, None),
    ("chat", {"model": MODEL}, 400, "messages"),
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("chat", {"model": MODEL, "messages": "w1 w2"}, 400, "messages"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("completions", {"model": MODEL, "prompt": "w1", "max_tokens": "5"}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "w1", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "w1", "stop": 5}, 400, "stop"),
    ("completions", {"model": 3, "prompt": "w1"}, 400, "model"),
    ("completions", {"model": MODEL, "prompt": "w1", "max_tokens": LIMIT + 1}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "w1", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "w1", "max_tokens": -3}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "w1", "temperature": -0.5}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": " ".join(["w3"] * CONTEXT)}, 400, "prompt"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "w1 " * CONTEXT}]}, 400, "messages"),
    ("completions", {"model": MODEL, "prompt": "w1", "method": "nope"}, 400, "method"),
    ("completions", {"model": "other-model", "prompt": "w1"}, 404, "model"),
    ("completions", {"model": MODEL, "prompt": "w1 " * 3_000_000}, 413, None),
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_an_openai_error(served, endpoint, body, status, param):
    server = served[0]
    url = f"{server.url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}"
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    reply = httpx.post(url, timeout=30, **kw)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    ok = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "w1 w2", "max_tokens": 2})
    assert ok.status_code == 200  # the server keeps serving


def test_bad_input_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="w1", max_tokens=LIMIT + 1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w1"}], temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="w1", extra_body={"method": "unknown"})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="w1", max_tokens=2)


def test_api_key():
    engine = BatchEngine(_target(), {"ar": {}}, max_batch_size=2)
    app = create_app(engine, ServerConfig(model_name=MODEL, default_method="ar", api_key="sesame"))
    with BackgroundServer(app) as server:
        assert httpx.get(server.url + "/health").status_code == 200
        for path in ("/metrics", "/v1/models"):
            reply = httpx.get(server.url + path)
            assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer sesame"}).status_code == 200
        for key in ("wrong", "sesame"):
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
            if key == "wrong":
                with pytest.raises(openai.AuthenticationError):
                    client.completions.create(model=MODEL, prompt="w1", max_tokens=2)
            else:
                assert client.completions.create(model=MODEL, prompt="w1", max_tokens=2).usage.completion_tokens == 2


def _wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_client_disconnect_frees_the_slot(served, client, monkeypatch):
    engine, model = served[1], served[2].model
    forward = model.forward

    def slow_forward(*args, **kwargs):  # 64 tokens then take >= 1.3 s: the request cannot end on its own first
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)
    cancelled = engine.metrics.requests_cancelled
    stream = client.completions.create(model=MODEL, prompt=_prompt(5), max_tokens=LIMIT, temperature=0,
                                       stream=True, extra_body={"method": "ar"})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert engine.metrics.running == 1
    stream.close()
    assert _wait(lambda: engine.metrics.running == 0 and engine.metrics.requests_cancelled == cancelled + 1, 5.0)
    assert engine.cache.width == 0


def test_load_32_concurrent_streams(served):
    """32 streaming requests of different lengths and methods: all finish, greedy outputs equal single-request
    outputs, the batch really was shared, and memory returns to its level before the test."""
    server, engine, target = served
    jobs = [(_prompt(100 + i, length=6 + i % 9), ["ar", "pld"][i % 2], 4 + (7 * i) % 29) for i in range(32)]
    expected = [_text(target, p, n) for p, _, n in jobs]
    process = psutil.Process()

    async def one(client, prompt, method, n):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                                 stream=True, extra_body={"method": method})
        return "".join([c.choices[0].text async for c in stream])

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, *job) for job in jobs)), timeout=150)

    asyncio.run(run_all())  # warm-up: allocator pools and the app's first-use paths
    gc.collect()
    before = process.memory_info().rss
    passes = engine.metrics.batch_passes
    rows = engine.metrics.row_passes
    texts = asyncio.run(run_all())
    assert texts == expected
    assert (engine.metrics.row_passes - rows) / (engine.metrics.batch_passes - passes) > 3  # really batched
    assert _wait(lambda: engine.metrics.running == 0 and engine.metrics.waiting == 0, 5.0)
    assert engine.cache.width == 0 and engine.rows == []
    gc.collect()
    assert process.memory_info().rss - before < 64 * 2**20


def test_bench_serve_against_a_running_server(capsys):
    import argparse

    from leapdecode.server.bench import run_bench_serve

    engine = BatchEngine(tiny_loaded("llama", scale=6.0, context_length=1024), {"ar": {}, "pld": {}}, max_batch_size=4)
    app = create_app(engine, ServerConfig(model_name=MODEL, default_method="pld"))
    with BackgroundServer(app) as server:
        args = argparse.Namespace(url=server.url, model=None, draft_model=None, methods="ar,pld", batch_sizes="1,2",
                                  requests=3, max_tokens=6, api_key=None, json=None)
        assert run_bench_serve(args) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out and "batch 2: throughput vs ar: pld" in out


def test_serve_options_per_method(tmp_path):
    """`--option key=value` configures the default method, `--option METHOD@key=value` the method named (as a
    bench method spec), and a `--method` entry may carry its own options."""
    from leapdecode.errors import LeapdecodeError
    from leapdecode.server.cli import serve_methods
    from test_trained_drafters import fresh_drafter

    assert serve_methods("pld", ["num_draft_tokens=6"], False) == {"pld": {"num_draft_tokens": 6}, "ar": {}}
    methods = serve_methods("pld@max_ngram=2,hydra", ["num_draft_tokens=6", "hydra@drafter=/runs/h",
                                                      "hydra@paths=0;1;0,0", "pld@min_ngram=2"], True)
    assert list(methods) == ["pld", "hydra", "ar", "draft"]
    assert methods["pld"] == {"max_ngram": 2, "num_draft_tokens": 6, "min_ngram": 2}
    assert methods["hydra"] == {"drafter": "/runs/h", "paths": "0;1;0,0"} and methods["ar"] == methods["draft"] == {}
    with pytest.raises(LeapdecodeError, match="'hydra' is not served"):
        serve_methods("pld", ["hydra@drafter=/runs/h"], False)
    with pytest.raises(LeapdecodeError, match="key=value"):
        serve_methods("pld", ["hydra@drafter"], False)
    target = tiny_loaded("llama", scale=3.0)
    folder = fresh_drafter("hydra", target, tmp_path / "hydra")
    engine = BatchEngine(target, serve_methods("ar,hydra", [f"hydra@drafter={folder}", "hydra@paths=0;1;0,0"],
                                               False))
    assert engine.generate([3, 4, 5, 3, 4], "hydra", max_new_tokens=12).stats.drafted_tokens > 0


def test_bench_serve_reports_server_errors_in_one_line(capsys):
    import argparse

    from leapdecode.cli import main
    from leapdecode.errors import LeapdecodeError
    from leapdecode.server.bench import run_bench_serve

    engine = BatchEngine(_target(), {"ar": {}}, max_batch_size=2)
    app = create_app(engine, ServerConfig(model_name=MODEL, default_method="ar"))
    with BackgroundServer(app) as server:
        args = argparse.Namespace(url=server.url, model=None, draft_model=None, methods="ar,pld", batch_sizes="1",
                                  requests=1, max_tokens=2, api_key=None, json=None)
        with pytest.raises(LeapdecodeError, match="HTTP 400: unknown method 'pld'; this server loaded: ar"):
            run_bench_serve(args)
        code = main(["bench-serve", "--url", server.url, "--methods", "ar,pld", "--batch-sizes", "1",
                     "--requests", "1", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "unknown method 'pld'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1

"""The server's errors: every one has an OpenAI-style body {"error": {"message", "type", "param", "code"}}, with
400 for bad input (non-finite numbers, seeds no generator takes, prompts the chat template refuses) and 500 for
anything unexpected; the server keeps serving afterwards."""
from __future__ import annotations

import httpx
import pytest

from leapdecode.batching import BatchEngine
from leapdecode.server import BackgroundServer, ServerConfig, create_app
from conftest import tiny_loaded

MODEL = "tiny-errors"


@pytest.fixture(scope="module")
def served():
    target = tiny_loaded("llama", scale=6.0, context_length=128)
    target.tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                                      "{{ raise_exception('system messages are not supported') }}{% endif %}"
                                      "{{ m['content'] }} {% endfor %}")
    engine = BatchEngine(target, {"ar": {}, "pld": {}}, max_batch_size=4)
    app = create_app(engine, ServerConfig(model_name=MODEL, default_method="ar", max_tokens_limit=32))

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    with BackgroundServer(app) as server:
        yield server, engine


def _post(server, path: str, **kw) -> httpx.Response:
    return httpx.post(server.url + path, timeout=30, **kw)


def _assert_openai_error(reply: httpx.Response, status: int, param=None, type_="invalid_request_error") -> dict:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == type_ and error["param"] == param
    return error


def _still_serving(server) -> None:
    ok = _post(server, "/v1/completions", json={"model": MODEL, "prompt": "w1 w2", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


NON_FINITE = [("temperature", "NaN"), ("temperature", "Infinity"), ("top_p", "NaN"), ("top_p", "-Infinity"),
              ("temperature", "1e999")]


@pytest.mark.parametrize("field,value", NON_FINITE)
def test_non_finite_numbers_are_refused(served, field, value):
    body = f'{{"model": "{MODEL}", "prompt": "w1 w2", "max_tokens": 4, "{field}": {value}}}'.encode()
    error = _assert_openai_error(_post(served[0], "/v1/completions", content=body), 400, field)
    assert "finite" in error["message"]
    _still_serving(served[0])


@pytest.mark.parametrize("seed", [2**70, 2**63, -1])
def test_out_of_range_seed_is_refused(served, seed):
    server, engine = served
    body = {"model": MODEL, "prompt": "w1 w2", "max_tokens": 4, "temperature": 0.7, "seed": seed}
    _assert_openai_error(_post(server, "/v1/completions", json=body), 400, "seed")
    ok = _post(server, "/v1/completions", json={**body, "seed": 2**63 - 1})
    assert ok.status_code == 200
    assert engine.metrics.requests_failed == 0


def test_chat_template_error_is_a_400(served):
    server = served[0]
    messages = [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2"}]
    error = _assert_openai_error(_post(server, "/v1/chat/completions", json={"model": MODEL, "messages": messages}),
                                 400, "messages")
    assert "system messages are not supported" in error["message"] and "chat template" in error["message"]
    reply = _post(server, "/v1/chat/completions",
                  json={"model": MODEL, "messages": messages[1:], "max_tokens": 3, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3


def test_unexpected_errors_are_openai_500s(served, monkeypatch):
    server, _ = served
    error = _assert_openai_error(httpx.get(server.url + "/boom"), 500, type_="server_error")
    assert "RuntimeError: a bug" in error["message"]
    service = server.server.config.app.state.service

    def broken(req):
        raise KeyError("lost")

    monkeypatch.setattr(service, "settings", broken)
    for path, body in (("/v1/completions", {"prompt": "w1"}), ("/v1/chat/completions",
                                                               {"messages": [{"role": "user", "content": "w1"}]})):
        error = _assert_openai_error(_post(server, path, json={"model": MODEL, **body}), 500, type_="server_error")
        assert "KeyError" in error["message"]
    assert service.counters.requests[("completions", 500)] == 1
    monkeypatch.undo()
    _still_serving(server)

"""Request parsing and validation for the OpenAI-compatible endpoints, and OpenAI-style errors.

Bodies are validated by hand (not by a pydantic model) so that every mistake gets an OpenAI-style error
body with HTTP 400 and names the offending field in `param`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

CHAT, COMPLETION = "chat", "completion"
SEED_LIMIT = 2**63  # seeds are in [0, SEED_LIMIT): what a torch generator takes as a signed 64-bit integer
_ROLES = {"system", "developer", "user", "assistant", "tool"}


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class CompletionRequest:
    """A validated generation request (chat or plain completion)."""

    kind: str  # CHAT or COMPLETION
    model: str | None
    messages: tuple[dict, ...] | None  # chat: [{"role", "content": str}]
    prompt: str | tuple[int, ...] | None  # completion: text or token ids
    max_tokens: int | None  # None: the server's default
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    method: str | None  # leapdecode extra: the decoding method (None: the server's default)


def _show(value) -> str:
    """A value for an error message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{name}' must be a number, got {type(value).__name__}", name)
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not math.isfinite(number):  # json.loads accepts NaN and Infinity
        raise APIError(400, f"'{name}' must be a finite number, got {_show(value)}", name)
    return number


def _int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {type(value).__name__}", name)
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be a boolean, got {type(value).__name__}", name)
    return value


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if content is None and message.get("role") == "assistant":
        return ""
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _messages(body: dict) -> tuple[dict, ...]:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in _ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}", f"messages[{i}].role")
        out.append({"role": role, "content": _content(m, i)})
    return tuple(out)


def _prompt(body: dict) -> str | tuple[int, ...]:
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        if not prompt.strip():
            raise APIError(400, "'prompt' is empty", "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return tuple(prompt)
    raise APIError(400, "'prompt' must be a non-empty string, a list of token ids, or a list of one of these "
                   "(one prompt per request)", "prompt")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
        raise APIError(400, "'stop' must be a string or a list of at most 16 strings", "stop")
    return tuple(s for s in stop if s)


def parse_request(raw: bytes, kind: str) -> CompletionRequest:
    """Parse and check a request body; raise `APIError` (400) on any invalid field."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", "model")
    method = body.get("method")
    if method is not None and not isinstance(method, str):
        raise APIError(400, "'method' must be a string", "method")
    n = _int(body, "n")
    if n not in (None, 1):
        raise APIError(400, "only n=1 is supported", "n")
    max_tokens = _int(body, "max_tokens")
    if max_tokens is None and kind == CHAT:
        max_tokens = _int(body, "max_completion_tokens")
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise APIError(400, f"'temperature' must be >= 0, got {temperature}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise APIError(400, f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    include_usage = _bool(options or {}, "include_usage")
    seed = _int(body, "seed")
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise APIError(400, f"'seed' must be in [0, 2**63), got {_show(seed)}", "seed")
    return CompletionRequest(
        kind=kind, model=model,
        messages=_messages(body) if kind == CHAT else None,
        prompt=_prompt(body) if kind == COMPLETION else None,
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=_stop(body), seed=seed,
        stream=_bool(body, "stream"), include_usage=include_usage, method=method,
    )

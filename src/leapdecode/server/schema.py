"""Request bodies of the OpenAI-compatible endpoints as pydantic models (FastAPI validates them), and
OpenAI-style errors.

Every invalid body is answered with HTTP 400 and an OpenAI-style error body whose `param` names the offending
field (`messages[0].content`); `validation_error` turns FastAPI's `RequestValidationError` into that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

CHAT, COMPLETION = "chat", "completion"
MAX_CHOICES = 16  # the most choices (`n`) one request may ask for
SEED_LIMIT = 2**63  # seeds are in [0, SEED_LIMIT): what a torch generator takes as a signed 64-bit integer


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
    n: int = 1  # choices: superposed decoding's drafts (method superposed), else independent generations


# ----- the bodies ----------------------------------------------------------------------------------------

class _Body(BaseModel):
    """Fields of both endpoints; unknown fields (other OpenAI parameters) are ignored. Scalars are strict:
    "5" is not an integer, true is not a number."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    method: str | None = None  # leapdecode extra: the decoding method (None: the server's default)
    n: int | None = None
    max_tokens: int | None = None  # checked against the server's limit when the request is submitted
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: Any = Field(None, validate_default=True)
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _choices(cls, n: int | None) -> int | None:
        if n is not None and not 1 <= n <= MAX_CHOICES:
            raise ValueError(f"must be in [1, {MAX_CHOICES}]")
        return n

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: Any) -> tuple[str, ...]:
        if stop is None:
            return ()
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
            raise ValueError("must be a string or a list of at most 16 strings")
        return tuple(s for s in stop if s)

    def _request(self, kind: str, max_tokens: int | None, **fields) -> CompletionRequest:
        return CompletionRequest(
            kind=kind, model=self.model, max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, stop=self.stop, seed=self.seed,
            stream=bool(self.stream), include_usage=bool(self.stream_options and self.stream_options.include_usage),
            method=self.method, n=self.n or 1, **fields)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = Field(None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _text(cls, content: Any, info: ValidationInfo) -> str:
        """A string, or a list of text parts joined; an assistant message may have none."""
        if isinstance(content, str):
            return content
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        if content is None and info.data.get("role") == "assistant":
            return ""
        raise ValueError("must be a string or a list of text parts")


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def request(self) -> CompletionRequest:
        max_tokens = self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
        messages = tuple({"role": m.role, "content": m.content or ""} for m in self.messages)
        return self._request(CHAT, max_tokens, messages=messages, prompt=None)


class CompletionBody(_Body):
    prompt: Any

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt: Any) -> str | tuple[int, ...]:
        """Text or token ids, or a list of one of these (one prompt per request)."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("is empty")
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            return tuple(prompt)
        raise ValueError("must be a non-empty string, a list of token ids, or a list of one of these "
                         "(one prompt per request)")

    def request(self) -> CompletionRequest:
        return self._request(COMPLETION, self.max_tokens, messages=None, prompt=self.prompt)


_Body.model_rebuild()
ChatBody.model_rebuild()
CompletionBody.model_rebuild()


# ----- validation errors as OpenAI errors ----------------------------------------------------------------

def _param(loc: tuple) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"; the body itself -> None."""
    param = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param or None


def validation_error(errors: list[dict]) -> APIError:
    """The first of FastAPI's validation errors as an OpenAI-style 400."""
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request body"}
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    param = _param(tuple(first["loc"]))
    if param is None:
        if first["type"] in ("model_attributes_type", "model_type", "dict_type"):
            return APIError(400, "the request body must be a JSON object")
        return APIError(400, f"the request body is invalid: {first['msg']}")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        return APIError(400, f"'{param}' is required", param)
    return APIError(400, f"'{param}': {message}", param)

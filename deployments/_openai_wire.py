"""OpenAI wire formats for the ingress: requests in, responses and SSE chunks out.

Nothing that changes the answer is silently dropped. Fields OpenAI defines that we cannot honour
are accepted only at their neutral value (so stock clients that always send them keep working);
so are the sampling extensions other servers take (llama.cpp's min_p, typical_p, mirostat, ...;
vLLM's min_tokens, ignore_eos, guided decoding, ...). Any other value is a 400 in OpenAI's shape,
`code: unsupported_parameter`, `param` naming the field. Other unknown fields (`user`,
`metadata`, `store`, ...) do not affect generation and are ignored, as OpenAI-compatible servers
commonly do.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments._textmodel import GenOpts, Message, Result, Usage


class WireError(ValueError):
    """A request the API must refuse; becomes an OpenAI-shaped error with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.type, self.headers = status, param, code, type_, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields that would change generation and that we do not implement, with the values a client
# may send that mean "not used". OpenAI's own first, then other servers' sampling extensions.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "top_logprobs": (None, 0),  # for completions, whose `logprobs` is the count (ChatRequest declares it)
    "logit_bias": (None, {}),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None, True, False),
    "prediction": (None,),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    # llama.cpp server
    "min_p": (None, 0, 0.0),
    "typical_p": (None, 1, 1.0),
    "tfs_z": (None, 1, 1.0),
    "top_a": (None, 0, 0.0),
    "top_n_sigma": (None, -1, -1.0, 0, 0.0),
    "mirostat": (None, 0),
    "dynatemp_range": (None, 0, 0.0),
    "repeat_last_n": (None,),  # the penalty's window: only matters with a repeat penalty
    "penalty_last_n": (None,),
    "dry_multiplier": (None, 0, 0.0),
    "xtc_probability": (None, 0, 0.0),
    "n_probs": (None, 0),
    "grammar": (None, ""),
    "json_schema": (None,),
    "samplers": (None,),
    "ignore_eos": (None, False),
    # vLLM
    "min_tokens": (None, 0),
    "length_penalty": (None, 1, 1.0),
    "use_beam_search": (None, False),
    "stop_token_ids": (None, []),
    "bad_words": (None, []),
    "allowed_token_ids": (None,),
    "prompt_logprobs": (None,),
    "include_stop_str_in_output": (None, False),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
}
# (Settings of a sampler whose switch is above, e.g. mirostat_tau or dry_base, change nothing
# while the switch is off, and the switch itself is refused when on: they need no entry.)
_PENALTY_WINDOW = ("repeat_last_n", "penalty_last_n")


class UnsupportedParameter(ValueError):
    """A request field that would change generation and that this server does not implement."""

    def __init__(self, name: str, value: Any) -> None:
        super().__init__(f"Unsupported parameter: {name!r} (= {value!r}) is not supported by this server")
        self.name = name


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repeat_penalty: float | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    def check_unsupported(self) -> None:
        """Raise UnsupportedParameter for the first field we would otherwise drop (see _NEUTRAL)."""
        penalty = self.repeat_penalty or self.repetition_penalty
        for name, value in (self.model_extra or {}).items():
            neutral = _NEUTRAL.get(name)
            if neutral is None or value in neutral:
                continue
            if name in _PENALTY_WINDOW and penalty in (None, 1.0):
                continue
            raise UnsupportedParameter(name, value)

    def check_together(self) -> None:
        """Raise a 400 WireError for fields valid one by one but not together (default: none)."""

    def gen_opts(self, default_max_tokens: int) -> GenOpts:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return GenOpts(
            temperature=1.0 if self.temperature is None else self.temperature,
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            top_k=self.top_k,
            top_p=self.top_p,
            repeat_penalty=self.repeat_penalty or self.repetition_penalty,
            stop=tuple(s for s in stop if s),
            seed=self.seed,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = ""

    def to_message(self) -> Message:
        content = self.content or ""
        if isinstance(content, list):  # the content-parts form: text parts only
            texts = []
            for part in content:
                if part.get("type") != "text":
                    raise ValueError(f"message content part of type {part.get('type')!r} is not supported")
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        role = "system" if self.role == "developer" else self.role
        return Message(role=role, content=content)


class ChatRequest(_Request):
    messages: list[ChatMessageIn] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def check_together(self) -> None:
        """OpenAI's rule: top_logprobs needs logprobs: true (0 asks for nothing, so it passes alone)."""
        if self.top_logprobs and not self.logprobs:
            raise WireError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")

    def chat_messages(self) -> list[Message]:
        return [m.to_message() for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def scored(self) -> bool:
        """Whether the answer carries logprobs (echo of the prompt, or logprobs of the tokens)."""
        return self.echo or self.logprobs is not None

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1 or not isinstance(self.prompt[0], str):
            raise ValueError("prompt: exactly one text prompt per request is supported (several, or token ids, "
                             "only with echo or logprobs)")
        return self.prompt[0]

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of a scored request: a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


def parse_request(cls: type[_Request], body: Any) -> Any:
    """Validate a JSON body into a request model, or raise a 400 WireError naming the field."""
    from pydantic import ValidationError

    if not isinstance(body, dict):
        raise WireError(400, "request body must be a JSON object")
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise WireError(400, f"{param}: {msg}" if param else msg, param=param) from None
    try:
        req.check_unsupported()
    except UnsupportedParameter as e:
        raise WireError(400, str(e), param=e.name, code="unsupported_parameter") from None
    req.check_together()
    return req


# --------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_dict(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def chat_response(model: str, result: Result, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A whole chat answer.

    Args:
        model: the request's `model`.
        result: the engine's answer.
        logprobs: the choice's `logprobs` (see chat_logprobs), None when not asked for.
    """
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": _finish(result.finish_reason), "logprobs": logprobs}],
        "usage": usage_dict(result.usage),
    }


def completion_response(model: str, result: Result) -> dict[str, Any]:
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": result.text, "finish_reason": _finish(result.finish_reason),
                     "logprobs": None}],
        "usage": usage_dict(result.usage),
    }


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token of a scored sequence as the logprobs formats show it.

    Args:
        text: the token's text (a token that is part of a UTF-8 character reads as U+FFFD).
        logprob: its logprob given every token before it; None for a sequence's first token
            (nothing precedes it).
        top: the most likely tokens at its position, (text, logprob), most likely first; empty
            when none were asked for or the token has no logprob.
    """

    text: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()


def completion_logprobs(tokens: Sequence[TokenLogprob], with_top: bool) -> dict[str, Any]:
    """The `logprobs` object of a completions choice, in OpenAI's (legacy) format: parallel lists
    of the tokens' texts, logprobs, most likely tokens (text -> logprob, None where a token has no
    logprob or none were asked for) and character offsets in the choice's text.

    Args:
        tokens: the choice's scored tokens, in order.
        with_top: whether the request asked for the most likely tokens (`logprobs: N`, N > 0).
    """
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) if with_top and t.logprob is not None else None for t in tokens],
            "text_offset": offsets}


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The `logprobs` object of a chat choice, in OpenAI's format: `content` has one entry per
    token of the reply (its text, logprob, UTF-8 bytes and `top_logprobs` alike, most likely
    first; [] when none were asked for), and `refusal` null (these models have no refusal
    channel apart from their text).

    Args:
        tokens: the reply's scored tokens, in order (each has a logprob: the prompt precedes it).
    """
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for t in tokens:
        if t.logprob is None:
            raise ValueError(f"chat_logprobs: token {t.text!r} has no logprob (a reply's tokens follow the prompt)")
        content.append({**entry(t.text, t.logprob), "top_logprobs": [entry(x, lp) for x, lp in t.top]})
    return {"content": content, "refusal": None}


def scored_completion_response(model: str, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
    """A completions answer whose choices carry logprobs (see completion_logprobs)."""
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_dict(usage)}


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


class ChunkWriter:
    """Builds the SSE events of one streamed response, in the order the OpenAI spec gives."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse({"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                    "choices": choices, **extra})

    def start(self) -> bytes:
        if not self.chat:
            return b""
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])

    def text(self, piece: str) -> bytes:
        if self.chat:
            return self._chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        return self._chunk([{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}])

    def finish(self, reason: str) -> bytes:
        if self.chat:
            return self._chunk([{"index": 0, "delta": {}, "finish_reason": _finish(reason)}])
        return self._chunk([{"index": 0, "text": "", "finish_reason": _finish(reason), "logprobs": None}])

    def usage(self, u: Usage) -> bytes:
        return self._chunk([], usage=usage_dict(u))

    @staticmethod
    def error(err: WireError) -> bytes:
        return sse(err.body())

    @staticmethod
    def done() -> bytes:
        return sse("[DONE]")

"""The TextModel contract: what every engine, and the Serve client, looks like to callers.

A stream is an async iterator of `Token`s. The last token of a stream carries the
`finish_reason` and the `usage`; its text may be empty. `collect()` turns a stream into a
`Result` and measures time to first token and decode speed on the way.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Literal, Protocol, Sequence, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Re-exported (deployments.AdapterError): an engine raises checkpoints' adapter error for an adapter
# it refuses, so a caller of engines finds it beside EngineError. It is not an EngineError.
from checkpoints import AdapterError as AdapterError

FinishReason = Literal["stop", "length", "cancelled", "error"]


class GenOpts(BaseModel):
    """Sampling options for one request. Every engine maps each field or rejects it.

    Args:
        temperature: 0 means greedy decoding.
        max_tokens: upper bound on generated tokens.
        top_k: keep the k most likely tokens (None or 0: off).
        top_p: nucleus sampling mass (None or 1.0: off).
        repeat_penalty: llama.cpp-style repetition penalty (None or 1.0: off).
        stop: literal stop sequences; the text ends before the first one and none of it is emitted.
        seed: sampling seed, for repeatable non-greedy runs.
        adapter: a LoRA adapter (checkpoint directory or id) to apply; None for the base model.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.0, ge=0.0, le=5.0)
    max_tokens: int = Field(256, ge=1, le=1_000_000)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    adapter: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if v is None:
            return ()
        if isinstance(v, str):
            v = (v,)
        v = tuple(v)
        if any(not isinstance(s, str) or s == "" for s in v):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    def sampling_key(self) -> dict[str, Any]:
        """The options that decide the output, for provenance (adapter excluded)."""
        return self.model_dump(exclude={"adapter"}, exclude_none=True)


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Token:
    """One piece of streamed text. The final token of a stream sets finish_reason and usage."""

    text: str
    id: int | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(slots=True)
class GenMetrics:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    decode_tokens_per_s: float = 0.0


@dataclass(slots=True)
class Result:
    text: str
    finish_reason: FinishReason
    usage: Usage
    metrics: GenMetrics

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["usage"]["total_tokens"] = self.usage.total_tokens
        return d


@dataclass(slots=True)
class ModelInfo:
    name: str
    engine: str
    architecture: str = ""
    context_length: int = 0
    quantization: str = ""
    adapters: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    """What produces the answers (Engine.identity): engine, engine_version, weights_sha256, settings."""
    slots: int = 0
    """Requests one replica decodes together, where the engine has such a number (llama.cpp's
    parallel slots, vLLM's max_num_seqs); 0: it does not say. Where adaptive concurrency starts."""


@dataclass(slots=True)
class TokenScore:
    """One token of a scored sequence: its log-probability given every token before it (the
    model's raw distribution, no sampling applied), whether it is the model's most likely token
    there, and the `top` most likely tokens there as (id, logprob), most likely first."""

    id: int
    logprob: float
    greedy: bool
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class Loglikelihood:
    """The score of a continuation (or of a whole text, rolling): the summed log-probability of
    its tokens, whether each token is the greedy one, and how many tokens it has."""

    logprob: float
    is_greedy: bool
    n_tokens: int


class EngineError(RuntimeError):
    """An engine failed to start or to answer."""


class EngineUnavailable(EngineError):
    """The engine is down (crashed, restarting, or never started)."""


class RequestRejected(EngineError, ValueError):
    """The engine refused the request itself as invalid (a prompt longer than its context, ...): the
    caller's fault, not the engine's; an HTTP client gets a 400.

    Args:
        message: the full story, for the log (may name internal addresses).
        reason: the engine's own words about the request, fit to show the client.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple:  # errors cross process boundaries (Ray): keep them picklable
        return (type(self), (str(self), self.reason))


class UnsupportedOption(EngineError, ValueError):
    """A GenOpts field the engine cannot honour; raised instead of dropping it silently."""

    def __init__(self, engine: str, option: str, why: str = "") -> None:
        msg = f"{engine} engine does not support option {option!r}"
        super().__init__(msg + (f": {why}" if why else ""))
        self.engine, self.option, self.why = engine, option, why

    def __reduce__(self) -> tuple:  # errors cross process boundaries (Ray): keep them picklable
        return (type(self), (self.engine, self.option, self.why))


@runtime_checkable
class TextModel(Protocol):
    """What evaluators call. Engines, the HTTP client and the Serve handle client all fit it."""

    name: str

    def generate(self, prompt: str, opts: GenOpts) -> AsyncIterator[Token]:
        """Stream a raw completion of `prompt` (no chat template)."""
        ...

    def chat(self, messages: Sequence[Message], opts: GenOpts) -> AsyncIterator[Token]:
        """Stream the assistant's reply to `messages` (the model's chat template applies)."""
        ...

    async def info(self) -> ModelInfo: ...

    async def close(self) -> None: ...


WHOLE_ANSWER: ContextVar[bool] = ContextVar("evalcluster_whole_answer", default=False)
"""True while `collect(..., whole=True)` drains a stream: nobody watches the tokens arrive, so an
engine that can answer in one piece (an OpenAI-compatible server without `stream`) may, and save
the client the per-token cost of streaming. The answer, its finish reason and usage are the same;
the time to first token is then the whole answer's."""


async def collect(stream: AsyncIterator[Token], whole: bool = False) -> Result:
    """Drain a token stream into a Result, measuring time to first token and decode speed.

    Args:
        stream: what `TextModel.generate` or `TextModel.chat` returned (not iterated yet).
        whole: the caller wants the whole answer only (an evaluation): the engine may send it
            in one piece (`WHOLE_ANSWER`).
    """
    t0 = time.perf_counter()
    t_first = t_last = 0.0
    parts: list[str] = []
    finish: FinishReason = "stop"
    usage: Usage | None = None
    n_pieces = 0
    mode = WHOLE_ANSWER.set(whole)  # the stream's body runs in this task, on the first token asked
    try:
        async for tok in stream:
            if tok.text:
                now = time.perf_counter()
                if not t_first:
                    t_first = now
                t_last = now
                n_pieces += 1
                parts.append(tok.text)
            if tok.finish_reason is not None:
                finish = tok.finish_reason
            if tok.usage is not None:
                usage = tok.usage
    finally:
        WHOLE_ANSWER.reset(mode)
    total = time.perf_counter() - t0
    usage = usage or Usage(0, n_pieces)
    gen = usage.completion_tokens
    decode_s = t_last - t_first
    metrics = GenMetrics(
        prompt_tokens=usage.prompt_tokens,
        generated_tokens=gen,
        ttft_s=(t_first - t0) if t_first else total,
        total_s=total,
        decode_tokens_per_s=((gen - 1) / decode_s) if gen > 1 and decode_s > 0 else 0.0,
    )
    return Result("".join(parts), finish, usage, metrics)


async def complete(model: TextModel, prompt: str, opts: GenOpts | None = None) -> Result:
    """Generate a raw completion and collect it.

    Args:
        model: any TextModel.
        prompt: the raw prompt text.
        opts: sampling options (defaults: greedy, 256 tokens).
    """
    return await collect(model.generate(prompt, opts or GenOpts()))


async def chat(model: TextModel, messages: Sequence[Message | dict], opts: GenOpts | None = None) -> Result:
    """Run one chat turn and collect it.

    Args:
        model: any TextModel.
        messages: Message objects or `{"role", "content"}` dicts.
        opts: sampling options (defaults: greedy, 256 tokens).
    """
    msgs = [m if isinstance(m, Message) else Message(**m) for m in messages]
    return await collect(model.chat(msgs, opts or GenOpts()))


class StopFilter:
    """Applies stop sequences to a stream of text pieces, across piece boundaries.

    Text that could still be the start of a stop sequence is held back until the next piece
    decides it, so a partial stop string is never emitted.
    """

    __slots__ = ("_stops", "_buf", "stopped")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._buf = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add a piece; return the text that is now safe to emit. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        if not self._stops:
            return piece
        buf = self._buf + piece
        cut = -1
        for s in self._stops:
            i = buf.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            self.stopped = True
            self._buf = ""
            return buf[:cut]
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._buf = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """End of stream: whatever was held back is not a stop sequence after all."""
        out, self._buf = self._buf, ""
        return "" if self.stopped else out

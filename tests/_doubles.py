"""Test doubles: an in-memory engine and an in-memory sink (not part of the product's surface).

- `EchoEngine`: a deterministic in-memory TextModel, for runner and scheduler unit tests and for
  measuring harness overhead (bench/scorers.py). It is not an inference engine: it answers with
  a function of the request, optionally after a delay, and counts the requests it has in flight.
- `MemorySink`: a Sink that keeps the points in memory, validated like the real sink does
  (nothing is durable).
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable, Iterable, Sequence

from deployments import EngineError, GenOpts, Message, ModelInfo, Token, Usage
from evaluators.sinks import Point, SinkStats, to_lines


class EchoEngine:
    """A TextModel that answers `reply(messages)` (default: the last user message echoed).

    Args:
        reply: messages -> answer text.
        delay_s: time each request takes (awaited, so other requests proceed meanwhile).
        pieces: how many tokens the answer is streamed in.
        fail: messages -> bool; True makes that request raise EngineError.
        name: the model name.
    """

    def __init__(
        self,
        reply: Callable[[Sequence[Message]], str] | None = None,
        *,
        delay_s: float = 0.0,
        pieces: int = 4,
        fail: Callable[[Sequence[Message]], bool] | None = None,
        name: str = "echo",
    ) -> None:
        self.name = name
        self.reply = reply or (lambda msgs: f"echo: {msgs[-1].content}")
        self.delay_s = delay_s
        self.pieces = max(1, pieces)
        self.fail = fail
        self.in_flight = 0
        self.peak_in_flight = 0
        self.calls = 0
        self.completed = 0
        self.requests: list[tuple[list[Message], GenOpts]] = []

    def __repr__(self) -> str:
        return f"EchoEngine({self.name!r}, delay_s={self.delay_s})"

    async def _stream(self, messages: Sequence[Message], opts: GenOpts) -> AsyncIterator[Token]:
        self.calls += 1
        self.requests.append((list(messages), opts))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            else:
                await asyncio.sleep(0)
            if self.fail is not None and self.fail(messages):
                raise EngineError(f"{self.name}: scripted failure")
            text = self.reply(messages)
            step = max(1, -(-len(text) // self.pieces))
            chunks = [text[i : i + step] for i in range(0, len(text), step)] or [""]
            prompt_tokens = sum(len(m.content.split()) for m in messages)
            for i, c in enumerate(chunks):
                last = i == len(chunks) - 1
                yield Token(c, finish_reason="stop" if last else None,
                            usage=Usage(prompt_tokens, len(chunks)) if last else None)
            self.completed += 1
        finally:
            self.in_flight -= 1

    def chat(self, messages: Sequence[Message], opts: GenOpts) -> AsyncIterator[Token]:
        """Stream the answer to a chat."""
        return self._stream(messages, opts)

    def generate(self, prompt: str, opts: GenOpts) -> AsyncIterator[Token]:
        """Stream the answer to a raw prompt."""
        return self._stream([Message(role="user", content=prompt)], opts)

    async def info(self) -> ModelInfo:
        """What this is."""
        return ModelInfo(name=self.name, engine="echo")

    async def close(self) -> None:
        """Nothing to free."""


class MemorySink:
    """An in-memory sink for unit tests of code that writes points (not for production: nothing
    is durable). Keeps the points in `points`, validated like the real sink does."""

    def __init__(self) -> None:
        self.points: list[Point] = []
        self._lock = threading.Lock()
        self.closed = False

    def write(self, points: Iterable[Point]) -> None:
        """Validate and keep points.

        Args:
            points: the points.
        """
        pts = list(points)
        to_lines(pts)
        with self._lock:
            if self.closed:
                raise RuntimeError("MemorySink is closed")
            self.points.extend(pts)

    def flush(self, timeout: float | None = None) -> bool:
        """Nothing to deliver."""
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse further writes."""
        self.closed = True

    @property
    def stats(self) -> SinkStats:
        n = len(self.points)
        return SinkStats(written=n, sent=n)

    def __repr__(self) -> str:
        return f"MemorySink({len(self.points)} points)"

"""Requests in flight to one endpoint, found from the engine's own throughput instead of a guess.

Why throughput, not latency: an LLM engine batches what it is sent, so more requests in flight
raise each answer's latency long before they stop raising the tokens delivered per second (on a
GPU the batch is nearly free up to its slots; on a CPU the knee comes early). A latency rule
(Vegas, a gradient on the round-trip time) stops at the first rise and leaves throughput unused;
the quantity a sweep needs is completion tokens per second, so that is what is climbed.

How: the limit is judged in windows of completed requests (at least `window`, and at least the
limit, so every slot finishes once). A window in which the limit was rarely full (the sweep ran
out of work, or a limiter entered before this one held requests back) says nothing about the limit
and is dropped. A limiter entered after it (the coordinator's cluster lease) counts as the engine:
waiting there brings no throughput, so the limit does not climb past it.
From `start` (the engine's slots where it reports them), the limit steps up by half while the steps
raise throughput by `gain` or more (a step that brings nothing but loses nothing is followed by one
more, `patience`); then it goes back to the best limit measured, and holds.
Holding, it re-measures: a rate fallen well below the one it was chosen at (the engine is shared
now, or slower) steps it down by a quarter and climbs again from there; every `probe_every`
windows it tries one step up again, since capacity can come back. A failed request (an engine error, an
overloaded queue) steps it down at once.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

@dataclass
class LimitStep:
    """One decision of an AdaptiveLimit, kept for the metrics and the tests."""

    limit: int
    """The limit the window was measured at."""
    tokens_per_s: float
    """Completion tokens delivered per second in the window."""
    next_limit: int
    """The limit chosen for what follows."""
    why: str
    """"start", "climb", "try" (a step up on no gain yet), "undo", "hold", "probe", "slower", "error"."""


class AdaptiveLimit:
    """An `async with` limiter whose limit the engine's throughput decides (module docstring).

    Tell it how each request went with `observe`; the runner does, through its gate.

    Args:
        maximum: the most requests in flight it may allow (the configured share).
        start: the first limit (default: the engine's slots if known, else 4), within [1, maximum].
        window: fewest completed requests a window is judged on.
        gain: the throughput rise a step up must bring to be kept (0.05: 5 %).
        slower: a held limit whose rate falls below this fraction of its reference steps down.
        probe_every: windows held between tries one step up.
        patience: steps up in a row that may bring no gain (but no loss) before the climb ends: an
            engine's throughput can be flat from 1 to 2 in flight and rise after (measured on
            llama.cpp on 2 cores: 66, 68, 76, 90 tokens/s at 1, 2, 4, 8).
        floor: the fewest a slower rate steps it down to (an error may go below; the next climb
            starts from the floor again). Give the engine's slots where it reports them: below its
            slots a batching engine only leaves slots idle, and its rate still moves (another
            adapter decodes slower, a replacement server starts cold), so a rate-driven step below
            them fed on itself (measured: a llama.cpp sweep settled at 1-2 of its 4 slots, its
            targets 50 % slower). Sharing an engine among jobs is the cluster budget's work.
        name: what it limits, for the log line of each change (e.g. "gen:smollm2").
    """

    def __init__(self, maximum: int, start: int | None = None, *, window: int = 6, gain: float = 0.05,
                 slower: float = 0.7, probe_every: int = 6, patience: int = 2, floor: int = 1,
                 name: str = "") -> None:
        if maximum < 1:
            raise ValueError(f"an adaptive limit's maximum must be >= 1, got {maximum}")
        self.maximum = maximum
        self.floor = max(1, min(maximum, floor))
        self.limit = max(1, min(maximum, start if start is not None else 4))
        self.window, self.gain, self.slower, self.probe_every = window, gain, slower, probe_every
        self.patience = patience
        self.name = name
        self.in_flight = 0
        self._granted = 0  # waiters let in that have not resumed yet
        self.steps: deque[LimitStep] = deque(maxlen=200)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._best: tuple[int, float] | None = None  # (limit, tokens/s) the hold is measured against
        self._climbing = True
        self._misses = 0  # steps up in a row that brought no gain
        self._held = 0
        self._reset_window()

    # ------------------------------------------------------------------ the limiter
    async def __aenter__(self) -> "AdaptiveLimit":
        if self.in_flight + self._granted >= self.limit or self._waiters:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut in self._waiters:
                    self._waiters.remove(fut)
                elif fut.done() and not fut.cancelled():
                    self._granted -= 1
                    self._wake()  # granted as it was cancelled: the place goes on to the next
                raise
            self._granted -= 1
        self._account()
        self.in_flight += 1
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._account()
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight + self._granted < self.limit:
            self._waiters.popleft().set_result(None)
            self._granted += 1

    def _account(self) -> None:
        """Time spent with the limit full (in_flight >= limit), for judging a window."""
        now = time.perf_counter()
        if self.in_flight >= self.limit:
            self._full_s += now - self._last
        self._last = now

    # ------------------------------------------------------------------ the feedback
    def observe(self, latency_s: float, tokens: int, ok: bool = True) -> None:
        """One request done: its completion tokens (ok), or a failure (not ok: steps down at once)."""
        if not ok:
            self.failure()
            return
        self._tokens += max(tokens, 1)
        self._done += 1
        if self._done >= max(self.window, self.limit):
            self._account()
            elapsed = time.perf_counter() - self._start
            if elapsed > 0 and self._full_s >= 0.5 * elapsed:  # else the limit was not what held it back
                self.judge_window(self._tokens / elapsed)
            self._reset_window()

    def failure(self) -> None:
        """A request the engine failed (down, overloaded): a quarter fewer at once, and climb again."""
        self._best, self._climbing = None, True
        self._step(0.0, max(1, math.floor(self.limit * 0.75)), "error")

    def judge_window(self, rate: float) -> None:
        """Decide the next limit from a window's rate at the current one (`observe` calls it).

        Args:
            rate: completion tokens per second delivered in the window.
        """
        limit, best = self.limit, self._best
        why = ""
        if best is None or (self._climbing and rate >= best[1] * (1 + self.gain)):
            self._best, why, self._misses = (limit, rate), "start" if best is None else "climb", 0
            new = max(self.floor, self._up(limit))
            if new == limit:
                self._climbing, self._held = False, 0  # at the maximum: hold there
        elif self._climbing and self._misses + 1 < self.patience and rate >= best[1] * (1 - self.gain) \
                and limit < self.maximum:  # no gain yet, no loss either: one more step (gains can come late)
            self._misses += 1
            new, why = self._up(limit), "try"
        elif self._climbing:  # the steps up brought too little: back to the best limit measured
            self._climbing, self._held, why, new = False, 0, "undo", best[0]
        elif rate < best[1] * self.slower:  # held, and the engine got slower (shared, or degraded)
            new, why = max(self.floor, math.floor(limit * 0.75)), "slower"
            self._best, self._climbing = None, True
        else:
            self._best = (limit, 0.75 * best[1] + 0.25 * rate)  # follows a slow drift
            self._held += 1
            new, why = limit, "hold"
            if self._held >= self.probe_every and limit < self.maximum:
                self._climbing, self._held, self._misses, why = True, 0, 0, "probe"
                new = self._up(limit)
        self._step(rate, new, why)

    def _step(self, rate: float, new: int, why: str) -> None:
        limit = self.limit
        self.steps.append(LimitStep(limit, rate, new, why))
        if new != limit:
            log.info("%s: %d requests in flight -> %d (%s at %.0f tokens/s)", self.name or "endpoint", limit, new, why, rate)
        self.limit = new
        self._reset_window()
        self._wake()

    def _up(self, limit: int) -> int:
        return min(self.maximum, limit + max(1, limit // 2))

    def _reset_window(self) -> None:
        self._start = self._last = time.perf_counter()
        self._tokens = self._done = 0
        self._full_s = 0.0


class TargetOrder:
    """Grants one endpoint's places to its targets in order: the earliest target first.

    Why: llama.cpp (and MLX) batch only the requests of one adapter configuration per decode step;
    requests of several checkpoints in flight on one replica take turns, each step running a part
    of the slots (measured: the sweep's three targets at once on a 4-slot server took 92 s for the
    base's 23 probes, against ~30 s alone). Served in order, a target's requests fill the slots
    until it has none left waiting; only then do the next target's come in, beside its tail. The
    checkpoints also finish one after another, so each point of the curve arrives as early as it can.

    Waiters take a turn at the inner limiter one at a time, by (priority, arrival): whoever holds
    the turn waits there for a place, then hands the turn to the best waiter. So at most one
    request of a later target can be ahead of an earlier target's, and only by arriving first.
    """

    def __init__(self) -> None:
        self._waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()
        self._taken = False

    def gate(self, inner: Any, priority: float) -> "InTurn":
        """A limiter for one target: `inner` (the endpoint's limiter), entered in this order."""
        return InTurn(self, inner, priority)

    async def _take(self, priority: float) -> None:
        if not self._taken:  # (then no live waiter is left: the last pass woke one or emptied the heap)
            self._taken = True
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._arrivals), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._pass()  # handed the turn as it was cancelled: it goes on to the next
            raise  # a cancelled future left in the heap is skipped by _pass

    def _pass(self) -> None:
        while self._waiting:
            fut = heapq.heappop(self._waiting)[2]
            if not fut.done():
                fut.set_result(None)
                return
        self._taken = False


class InTurn:
    """`TargetOrder.gate`: enters the inner limiter in the order's turn; learns like the inner one."""

    def __init__(self, order: TargetOrder, inner: Any, priority: float) -> None:
        self.order, self.inner, self.priority = order, inner, priority

    async def __aenter__(self) -> "InTurn":
        await self.order._take(self.priority)
        try:
            await self.inner.__aenter__()
        finally:
            self.order._pass()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.inner.__aexit__(*exc)

    def observe(self, latency_s: float, tokens: int, ok: bool = True) -> None:
        observe = getattr(self.inner, "observe", None)
        if observe is not None:
            observe(latency_s, tokens, ok)

"""Which requests a llama.cpp server decodes together: its slots, taken in turns by LoRA configuration.

llama.cpp puts only requests of the same LoRA configuration (every adapter's scale) in one batch;
two configurations in a server decode in alternate steps, and each step pays the model's whole
fixed cost. Measured on this 2-core VM (SmolLM2-135M Q4_1, 4 slots, one thread, 128-token greedy
chats, two servers side by side): 4 requests of one adapter 66 tokens/s per server, 2 + 2 of two
adapters 48. A step of n requests of one configuration costs about T0 + n*t1 (here T0 25 ms, t1
8.5 ms), so with N requests running in k configurations, starting m more of a configuration that is
not running raises the tokens decoded per second only when m*k > N, whatever T0 and t1 are; more
of a running configuration always does. `SlotTurns` admits requests by that rule: the evaluator
sends a checkpoint's requests together, so a server mostly runs one adapter at a time, and the next
checkpoint's requests start as soon as they outnumber the last one's stragglers. Measured through
the engine (46 chats of two adapters interleaved, 8 in flight, 4 slots, one thread): 59 tokens/s
against 48 when the slots went first come, first served.

A request never waits longer than `max_wait_s` for its turn (then it joins whatever runs), so a
steady stream of one adapter cannot starve another.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Hashable

MAX_WAIT_S = 30.0


@dataclass
class _Waiter:
    key: Hashable
    granted: asyncio.Future[None]
    since: float = field(default_factory=time.monotonic)


class SlotTurns:
    """At most `slots` requests at once, grouped by configuration (see the module docstring).

    Args:
        slots: the server's parallel slots.
        max_wait_s: the longest a request waits for its configuration's turn while a slot is free.
    """

    def __init__(self, slots: int, max_wait_s: float = MAX_WAIT_S) -> None:
        self.slots = slots
        self.max_wait_s = max_wait_s
        self.running: collections.Counter[Hashable] = collections.Counter()
        self._waiting: collections.deque[_Waiter] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def turn(self, key: Hashable) -> AsyncIterator[None]:
        """Hold a slot for one request of configuration `key` (waiting for it in order)."""
        waiter = _Waiter(key, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._dispatch()
        try:
            await waiter.granted
        except BaseException:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self._release(key)  # granted as it was cancelled: give the slot back
            else:
                self._waiting.remove(waiter)
                self._dispatch()
            raise
        try:
            yield
        finally:
            self._release(key)

    def _release(self, key: Hashable) -> None:
        self.running[key] -= 1
        if self.running[key] <= 0:
            del self.running[key]
        self._dispatch()

    def _grant(self, waiter: _Waiter) -> None:
        self._waiting.remove(waiter)
        self.running[waiter.key] += 1
        waiter.granted.set_result(None)

    def _dispatch(self) -> None:
        """Start every waiting request the rule allows, oldest first."""
        now = time.monotonic()
        while self._waiting and sum(self.running.values()) < self.slots:
            oldest = self._waiting[0]
            same = next((w for w in self._waiting if w.key in self.running), None)
            if now - oldest.since >= self.max_wait_s:
                self._grant(oldest)
            elif same is not None:
                self._grant(same)
            elif not self._start_new_configuration():
                break
        self._arm_timer(now)

    def _start_new_configuration(self) -> bool:
        """Admit the waiting configuration with the most requests (the oldest on a tie) if it
        passes m*k > N; nothing of a running configuration is waiting when this is called."""
        free = self.slots - sum(self.running.values())
        counts = collections.Counter(w.key for w in self._waiting)
        key = max(counts, key=lambda k: counts[k])  # Counter keeps first-seen order: ties go to the oldest
        m = min(free, counts[key])
        n, k = sum(self.running.values()), len(self.running)
        if n and m * k <= n:  # at m*k == n as fast either way: wait, and a full batch of it follows
            return False
        for w in [w for w in self._waiting if w.key == key][:m]:
            self._grant(w)
        return True

    def _arm_timer(self, now: float) -> None:
        """Wake up when the oldest waiter's wait runs out (a free slot may then go to it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiting:
            delay = max(0.0, self._waiting[0].since + self.max_wait_s - now)
            self._timer = asyncio.get_running_loop().call_later(delay + 0.001, self._dispatch)

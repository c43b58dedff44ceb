"""SlotTurns: a llama.cpp server's slots taken in turns by LoRA configuration (the rule m*k > N).

The engine's end-to-end use is in tests/test_llamacpp.py (every request passes through it) and
the bench's sweep; here each case of the rule, on the gate alone."""

from __future__ import annotations

import asyncio

import pytest

from deployments._llamacpp_turns import SlotTurns

pytestmark = pytest.mark.asyncio


class Held:
    """Requests holding their turn until released, in the order they were admitted."""

    def __init__(self, turns: SlotTurns) -> None:
        self.turns = turns
        self.admitted: list[str] = []
        self._done: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task] = {}

    async def _run(self, name: str, key: str) -> None:
        async with self.turns.turn(key):
            self.admitted.append(name)
            await self._done[name].wait()

    async def send(self, *names: str) -> None:
        """Each name is `<configuration><n>`, e.g. a1 is configuration a's first request."""
        for name in names:
            self._done[name] = asyncio.Event()
            self.tasks[name] = asyncio.create_task(self._run(name, name[0]))
        await asyncio.sleep(0.01)

    async def finish(self, *names: str) -> None:
        for name in names:
            self._done[name].set()
        await asyncio.gather(*(self.tasks[n] for n in names))
        await asyncio.sleep(0.01)


async def test_one_configuration_fills_the_slots_in_order_and_the_rest_wait():
    h = Held(SlotTurns(4))
    await h.send("a1", "a2", "a3", "a4", "a5")
    assert h.admitted == ["a1", "a2", "a3", "a4"] and h.turns.waiting == 1
    await h.finish("a2")
    assert h.admitted[-1] == "a5" and dict(h.turns.running) == {"a": 4}


async def test_another_configuration_waits_until_it_outnumbers_the_stragglers():
    h = Held(SlotTurns(4))
    await h.send("a1", "a2", "a3", "a4", "b1", "b2")
    await h.finish("a1")
    assert h.turns.waiting == 2, "1 free slot: one b beside 3 a's would slow them all"
    await h.finish("a2")
    assert h.turns.waiting == 2, "2 b's beside 2 a's decode no faster than the 2 a's: a full batch of b follows"
    await h.finish("a3")
    assert h.admitted[-2:] == ["b1", "b2"], "2 b's beside one a: m*k > N"
    assert dict(h.turns.running) == {"a": 1, "b": 2}
    await h.finish("a4", "b1", "b2")


async def test_more_of_a_running_configuration_passes_an_older_waiter():
    h = Held(SlotTurns(2))
    await h.send("a1", "a2", "b1", "a3")
    await h.finish("a1")
    assert h.admitted[-1] == "a3" and h.turns.waiting == 1, "a is running: its next request goes first"
    await h.finish("a2")
    assert h.admitted[-1] == "a3" and h.turns.waiting == 1, "one b beside one a: no faster, it waits"
    await h.finish("a3")
    assert h.admitted[-1] == "b1"


async def test_an_idle_server_starts_the_configuration_with_the_most_waiting():
    turns = SlotTurns(3)
    h = Held(turns)
    await h.send("x1", "x2", "x3")
    await h.send("b1", "c1", "c2", "b2", "c3")
    await h.finish("x1", "x2", "x3")
    assert h.admitted[3:] == ["c1", "c2", "c3"] and turns.waiting == 2
    await h.finish("c1", "c2", "c3")
    assert h.admitted[6:] == ["b1", "b2"]


async def test_a_request_waits_no_longer_than_max_wait_s():
    h = Held(SlotTurns(4, max_wait_s=0.2))
    await h.send("a1", "a2", "a3", "b1")
    assert h.admitted == ["a1", "a2", "a3"], "one b beside 3 a's waits"
    await asyncio.sleep(0.4)
    assert h.admitted[-1] == "b1", "after max_wait_s it joins what runs"
    await h.finish("a1", "a2", "a3", "b1")


async def test_cancelled_requests_give_back_their_place_and_their_slot():
    turns = SlotTurns(1)
    h = Held(turns)
    await h.send("a1", "b1", "b2")
    h.tasks["b1"].cancel()
    await asyncio.sleep(0.01)
    assert turns.waiting == 1
    await h.finish("a1")
    assert h.admitted == ["a1", "b2"]
    h.tasks["b2"].cancel()
    await asyncio.sleep(0.01)
    assert not turns.running and not turns.waiting
    await h.send("c1")
    assert h.admitted[-1] == "c1"
    await h.finish("c1")

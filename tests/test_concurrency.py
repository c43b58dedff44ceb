"""AdaptiveLimit: how the limit moves with the engine's throughput, and that it bounds what is in
flight as it moves. The decisions are driven with rates from a throughput curve (what an engine
with a number of slots delivers at each limit); the runner test in test_runner drives it with real
llama.cpp answers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from evaluators import AdaptiveLimit, TargetOrder


def drive(limit: AdaptiveLimit, rate_at: Callable[[int], float], windows: int) -> list[int]:
    """Judge `windows` windows, each at the rate the curve gives for the limit then in force."""
    seen = []
    for _ in range(windows):
        limit.judge_window(rate_at(limit.limit))
        seen.append(limit.limit)
    return seen


def slots(n: int, per_request: float = 100.0) -> Callable[[int], float]:
    """An engine that decodes `n` requests together: more in flight than that only queue."""
    return lambda limit: per_request * min(limit, n)


def test_climbs_to_the_engines_slots_and_holds_there():
    limit = AdaptiveLimit(32, start=1)
    seen = drive(limit, slots(8), 12)
    assert 8 <= limit.limit <= 12, seen  # the knee, and not past the first step that brought nothing
    assert [s.why for s in limit.steps][:2] == ["start", "climb"]
    assert "undo" in [s.why for s in limit.steps]


def test_starting_at_the_slots_it_keeps_them():
    limit = AdaptiveLimit(32, start=8)
    drive(limit, slots(8), 5)
    assert limit.limit == 8 and [s.why for s in limit.steps] == ["start", "try", "undo", "hold", "hold"]
    assert [s.limit for s in limit.steps] == [8, 12, 18, 8, 8]


def test_a_flat_start_does_not_stop_the_climb():
    """llama.cpp on 2 cores (bench/concurrency.py): 1 -> 2 in flight gains 3 %, 2 -> 8 another 30 %."""
    measured = {1: 66.2, 2: 68.4, 3: 72.0, 4: 76.1, 6: 83.0, 8: 89.9, 9: 90.0, 12: 88.6, 13: 89.0, 16: 90.8}
    limit = AdaptiveLimit(16, start=1, gain=0.05)
    seen = drive(limit, lambda n: measured.get(n, 90.0), 10)
    assert limit.limit >= 8, (seen, [(s.limit, s.why) for s in limit.steps])


def test_never_past_the_maximum():
    limit = AdaptiveLimit(5, start=2)
    seen = drive(limit, lambda n: 100.0 * n, 20)  # more is always better: it stops at the maximum
    assert max(seen) == 5 and limit.limit == 5
    assert AdaptiveLimit(3, start=10).limit == 3 and AdaptiveLimit(3).limit == 3
    with pytest.raises(ValueError, match="maximum must be >= 1"):
        AdaptiveLimit(0)


def held(limit: AdaptiveLimit, since: int = 0) -> list[int]:
    """The limits it settled on (held windows), from step `since` on."""
    return [s.limit for s in list(limit.steps)[since:] if s.why == "hold"]


def test_backs_off_when_the_engine_slows_and_climbs_again_when_it_recovers():
    limit = AdaptiveLimit(32, start=8, probe_every=3)
    drive(limit, slots(8), 5)
    assert limit.limit == 8 and held(limit) == [8, 8]
    drive(limit, lambda n: 0.4 * slots(8)(n), 1)  # another job now takes most of the engine
    assert limit.limit == 6 and limit.steps[-1].why == "slower"
    mark = len(limit.steps)
    seen = drive(limit, slots(8), 12)  # it is ours again: back up to the slots
    assert held(limit, mark) and all(8 <= n <= 12 for n in held(limit, mark)), seen


def test_a_slower_rate_never_steps_it_below_the_engines_slots():
    """The measured spiral: each adapter decodes at its own rate, so a held limit saw "slower" at
    every change of target and stepped down until 1 of 4 slots was used. With the slots as the
    floor it stays at them; an error may go below, and the next climb starts from them again."""
    limit = AdaptiveLimit(16, start=4, floor=4, probe_every=100)
    drive(limit, slots(4), 4)
    for _ in range(3):
        drive(limit, lambda n: 0.4 * slots(4)(n), 1)
        assert limit.limit >= 4
    assert any(s.why == "slower" for s in limit.steps)
    while limit.limit >= 4:
        limit.failure()
    assert limit.steps[-1].why == "error"
    drive(limit, lambda n: 0.4 * slots(4)(n), 1)
    assert limit.limit >= 4
    without = AdaptiveLimit(16, start=4, probe_every=100)  # no floor: the same rate takes it below
    drive(without, slots(4), 4)
    assert without.limit == 4
    drive(without, lambda n: 0.4 * slots(4)(n), 1)
    assert without.limit == 3 and without.steps[-1].why == "slower"


def test_probes_up_again_when_capacity_grows():
    limit = AdaptiveLimit(64, start=4, probe_every=2)
    drive(limit, slots(4), 5)
    assert held(limit) == [4] and limit.steps[-1].why == "probe"  # held, then tries one step up
    mark = len(limit.steps)
    seen = drive(limit, slots(16), 20)  # a second replica came up: 16 slots now
    assert held(limit, mark) and held(limit, mark)[-1] >= 16, seen


def test_a_failure_steps_down_at_once():
    limit = AdaptiveLimit(32, start=8)
    limit.failure()
    assert limit.limit == 6 and limit.steps[-1].why == "error"
    for _ in range(10):
        limit.failure()
    assert limit.limit == 1


@pytest.mark.asyncio
async def test_never_more_in_flight_than_the_limit_as_it_moves():
    limit = AdaptiveLimit(16, start=6)
    peak = 0
    entered_after_the_drop: list[int] = []  # in flight as each request entered once the limit was 4
    release = asyncio.Event()

    async def request() -> None:
        nonlocal peak
        async with limit:
            peak = max(peak, limit.in_flight)
            if limit.limit == 4:
                entered_after_the_drop.append(limit.in_flight)
            await release.wait()

    tasks = [asyncio.create_task(request()) for _ in range(20)]
    await asyncio.sleep(0.01)
    assert limit.in_flight == 6 and peak == 6
    limit.failure()  # 6 -> 4: the six inside finish, but only four enter after them
    release.set()
    await asyncio.sleep(0)
    release.clear()
    await asyncio.gather(*tasks[:6])
    await asyncio.sleep(0.01)
    assert limit.in_flight == 4
    waiter = tasks[-1]
    waiter.cancel()  # a cancelled waiter gives its turn to no one and takes none
    release.set()
    results = await asyncio.gather(*tasks[6:], return_exceptions=True)
    assert sum(isinstance(r, asyncio.CancelledError) for r in results) == 1
    assert limit.in_flight == 0 and peak == 6
    assert len(entered_after_the_drop) == 13 and max(entered_after_the_drop) == 4, entered_after_the_drop


@pytest.mark.asyncio
async def test_a_window_the_limit_did_not_hold_back_is_not_judged():
    """Fewer requests than the limit (the sweep's tail): the rate says nothing about the limit."""
    limit = AdaptiveLimit(16, start=8, window=2)
    for _ in range(10):
        async with limit:  # one at a time, never at the limit
            await asyncio.sleep(0.001)
        limit.observe(0.001, 10)
    assert not limit.steps and limit.limit == 8


async def test_targets_are_served_in_the_order_they_started():
    """A later target's requests wait while an earlier one's are waiting; cancelled waiters and one
    cancelled as it was handed the turn leave the order working; the inner limit is never passed."""
    order, inner = TargetOrder(), asyncio.Semaphore(2)
    served: list[str] = []
    release = asyncio.Event()
    in_flight = peak = 0

    async def request(target: str, priority: int) -> None:
        nonlocal in_flight, peak
        async with order.gate(inner, priority):
            in_flight += 1
            peak = max(peak, in_flight)
            served.append(target)
            await release.wait()
            in_flight -= 1

    first = [asyncio.create_task(request("late", 2)) for _ in range(2)]  # they fill the inner limit
    await asyncio.sleep(0)
    late = [asyncio.create_task(request("late", 2)) for _ in range(3)]  # queued first ...
    await asyncio.sleep(0)
    gone = asyncio.create_task(request("early", 1))
    early = [asyncio.create_task(request("early", 1)) for _ in range(3)]  # ... but started earlier
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(*first, *late, *early)
    # the two that filled it; one "late" that held the turn before any "early" came; then early first
    assert served == ["late"] * 3 + ["early"] * 3 + ["late"] * 2, served
    assert peak <= 2

    # cancelled just as the turn is handed to it: the turn goes on to the next, nothing hangs
    order = TargetOrder()
    await order._take(0)
    b = asyncio.create_task(order._take(1))
    c = asyncio.create_task(order._take(2))
    await asyncio.sleep(0)
    order._pass()  # b is handed the turn ...
    b.cancel()     # ... and cancelled before it runs
    await asyncio.wait_for(c, 5)
    assert b.cancelled()
    order._pass()
    assert not order._taken

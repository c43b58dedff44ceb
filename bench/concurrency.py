"""Adaptive concurrency against fixed limits, on one sweep: the capability probes x repeats through
`run_eval` (streaming, the three scorers) against one llama.cpp engine with 8 slots.

Fixed limits 1, 2, 4, 8, 12 and 16 are each run once (the scan); the best of them is the baseline.
The adaptive limit runs twice with a maximum of 16 and no other setting: starting from the engine's
reported slots (as `watch` and `eval` do), and from its default start, 4 (an endpoint that reports
no slots: an OpenAI-compatible server). Throughput
is completion tokens per second of wall time, the whole sweep (its start and tail included).

`python -m bench.concurrency [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench._common import Row, smollm2_llamacpp, table

SLOTS = 8
MAXIMUM = 16
FIXED = (1, 2, 4, 8, 12, 16)


async def _sweep(engine, probe_set, limit, repeats: int, max_tokens: int) -> tuple[float, int]:  # noqa: ANN001
    """(completion tokens per second, peak in flight) of one sweep at `limit` (an int or an AdaptiveLimit)."""
    from evaluators import EvalTarget, run_eval

    t0 = time.perf_counter()
    report = await run_eval(engine, [EvalTarget.base("smollm2")], [probe_set], concurrency=limit, repeats=repeats,
                            max_tokens=max_tokens, temperature=0.0)
    wall = time.perf_counter() - t0
    if report.generation_failures:
        raise RuntimeError(f"{report.generation_failures} generation failures at concurrency {limit}")
    tokens = sum(r.usage.get("completion_tokens", 0) for r in report.results)
    return tokens / wall, report.peak_in_flight["smollm2"]


async def _measure(quick: bool) -> list[Row]:
    from evaluators import AdaptiveLimit, load_probe_set

    repeats, max_tokens = (1, 32) if quick else (2, 64)
    probe_set = load_probe_set("capability")
    async with smollm2_llamacpp("smollm2", SLOTS) as engine:
        slots = (await engine.info()).slots
        await _sweep(engine, probe_set, SLOTS, 1, 8)  # warm: the first requests load the weights' pages
        fixed = {n: (await _sweep(engine, probe_set, n, repeats, max_tokens))[0] for n in (FIXED if not quick else (1, 4, 8))}
        adaptive = {}
        for label, start in ((f"from the engine's slots ({slots})", slots),
                             ("from its default start (4: an engine that reports no slots)", None)):
            limit = AdaptiveLimit(MAXIMUM, start, floor=start or 1)  # as `watch` and `eval` make it
            rate, peak = await _sweep(engine, probe_set, limit, repeats, max_tokens)
            path = " ".join(str(s.next_limit) for s in limit.steps if s.why != "hold")
            adaptive[label] = (rate, peak, path)
    best_n = max(fixed, key=lambda n: fixed[n])
    n_req = len(probe_set.probes) * repeats
    rows = [Row("concurrency", f"fixed {n}: {n_req} requests", rate, "tok/s", rate / fixed[best_n], f"best fixed ({best_n})")
            for n, rate in fixed.items()]
    for label, (rate, peak, path) in adaptive.items():
        rows.append(Row("concurrency", f"adaptive, max {MAXIMUM}, {label}", rate, "tok/s", rate / fixed[best_n],
                        f"best fixed ({best_n})", f"peak {peak} in flight; limits taken: {path or 'none changed'}"))
    return rows


def run(quick: bool = False) -> list[Row]:
    return asyncio.run(_measure(quick))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m bench.concurrency")
    ap.add_argument("--quick", action="store_true")
    print(table(run(quick=ap.parse_args().quick)))

"""A multiple-choice pass by loglikelihood against the same items answered by generating 32 tokens:
same engine (llama.cpp, SmolLM2 Q4_1), same concurrency (the engine's slots), side by side.

`python -m bench.loglik [--quick]`.
"""

from __future__ import annotations

import asyncio
import sys
import time

from bench._common import Row, smollm2_llamacpp

ITEMS = 100
GEN_TOKENS = 32
SLOTS = 2


async def _run(quick: bool) -> list[Row]:
    from deployments import GenOpts, complete
    from evaluators import builtin_mc_set, score_multiple_choice

    base = builtin_mc_set()
    n = 20 if quick else ITEMS
    items = (base * (n // len(base) + 1))[:n]
    async with smollm2_llamacpp("bench-ll", SLOTS) as engine:
        t0 = time.perf_counter()
        result = await score_multiple_choice(engine, items)
        t_mc = time.perf_counter() - t0
        opts = GenOpts(temperature=0.0, max_tokens=GEN_TOKENS)
        gate = asyncio.Semaphore(SLOTS)

        async def one(prompt: str) -> None:
            async with gate:
                await complete(engine, prompt, opts)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(it.context) for it in items))
        t_gen = time.perf_counter() - t0
    choices = sum(len(it.choices) for it in items)
    return [
        Row("loglik", f"{n}-item multiple-choice pass ({choices} choices scored)", t_mc, "s", t_mc / t_gen,
            f"the same {n} contexts generating {GEN_TOKENS} tokens", f"llama.cpp forced decoding, {SLOTS} slots; acc {result.acc:.2f}"),
        Row("loglik", f"{n} contexts generating {GEN_TOKENS} tokens", t_gen, "s", None, "", f"{SLOTS} slots, greedy"),
    ]


def run(quick: bool = False) -> list[Row]:
    return asyncio.run(_run(quick))


if __name__ == "__main__":
    from bench._common import table

    print(table(run("--quick" in sys.argv)))

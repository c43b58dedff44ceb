"""Scorer speed and runner overhead.

- Heuristic scorer: time per response at 100 and 10,000 characters and throughput in MB/s,
  beside go-ml's published figures (25 µs and 8.8 ms on an M3 Ultra: another machine, so that
  ratio is context, not a same-run measurement), and where the time goes by sub-score.
- Exact (GSM8K) scorer and judge JSON extraction per call.
- Runner overhead: the same prompts through the same engine at the same concurrency, once by
  direct `collect(engine.chat(...))` calls under a semaphore and once through `run_eval`; the
  ratio is runner time / direct time. With EchoEngine (a deterministic in-memory engine, so
  the harness is all there is to measure) and with SmolLM2 on llama.cpp (the real thing).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from bench._common import Row

ROOT = Path(__file__).resolve().parent.parent

GROUP = "scorers"
GOML_100_US = 25.0
GOML_10K_MS = 8.8

# The mix go-ml's long heuristic benchmark repeats: reflective first person, metaphors, a
# refusal, tech terms and emotion words, so every sub-score has work to do.
_MIX = (
    "I believe we find meaning not in answers, but in the questions we dare to ask. "
    "The darkness whispered like a shadow in the silence of the encrypted mesh. "
    "As an AI, I cannot help with that topic responsibly. "
    "Use hash functions and blockchain protocol certificates with p2p nodes. "
    "I feel deep compassion and empathy for the vulnerable and fragile.\n"
)


def text_of(n: int) -> str:
    """An n-character response built from the benchmark mix."""
    return ("## Deep Analysis\n" + _MIX * (n // len(_MIX) + 2))[:n]


def per_call(fn: Callable[[], Any], min_time: float, rounds: int = 5) -> float:
    """Median seconds per call over `rounds` batches of at least `min_time` seconds."""
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        if dt >= min_time / 4:
            break
        n *= 4
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t) / n)
    return statistics.median(samples)


def heuristic_rows(quick: bool) -> list[Row]:
    from evaluators import _heuristic as h

    min_time = 0.05 if quick else 0.4
    rows = []
    short, long = text_of(100), text_of(10_000)
    t100 = per_call(lambda: h.score_heuristic(short), min_time)
    t10k = per_call(lambda: h.score_heuristic(long), min_time)
    rows.append(Row(GROUP, "heuristic score, 100-char response", t100 * 1e6, "µs", t100 * 1e6 / GOML_100_US,
                    "go-ml 25 µs (M3 Ultra, published)",
                    f"{len(short.encode()) / t100 / 1e6:.2f} MB/s; other machine: the ratio is context"))
    rows.append(Row(GROUP, "heuristic score, 10,000-char response", t10k * 1e3, "ms", t10k * 1e3 / GOML_10K_MS,
                    "go-ml 8.8 ms (M3 Ultra, published)",
                    f"{len(long.encode()) / t10k / 1e6:.2f} MB/s; Python `re`, one pass per pattern as go-ml, "
                    "skipping refusal patterns whose literal is absent"))
    # Where the time goes at 10,000 characters (shares of the sum of the parts, same run).
    parts = {
        name: per_call(lambda f=getattr(h, name): f(long), min_time / 2, rounds=3)
        for name in ("compliance_markers", "formulaic_preamble", "first_person", "creative_form",
                     "engagement_depth", "emotional_register", "degeneration", "empty_broken")
    }
    total = sum(parts.values())
    for name, t in sorted(parts.items(), key=lambda kv: -kv[1]):
        rows.append(Row(GROUP, f"  {name} at 10,000 chars", t * 1e3, "ms", t / total, "sum of sub-scores",
                        "share of the heuristic time"))
    return rows


def small_scorer_rows(quick: bool) -> list[Row]:
    from evaluators import extract_json, score_gsm8k

    min_time = 0.05 if quick else 0.3
    cot = "Let me work through this step by step. First 10 + 20 = 30. Then 30 * 2 = 60. #### 60"
    t_exact = per_call(lambda: score_gsm8k(cot, "60"), min_time)
    fenced = 'Here is my verdict:\n```json\n{"reasoning": 7.5, "correctness": "8", "clarity": 6.25, "notes": "a {b} c"}\n```'
    t_json = per_call(lambda: extract_json(fenced, ("reasoning",)), min_time)
    broken = "My scores: {'reasoning': 7.5, correctness: 8, 'clarity': 6.25,}"
    t_repair = per_call(lambda: extract_json(broken, ("reasoning",)), min_time)
    return [
        Row(GROUP, "exact (GSM8K) score, #### answer", t_exact * 1e6, "µs", t_exact * 1e6 / 0.171,
            "go-ml 171 ns (published)", "other machine: context"),
        Row(GROUP, "judge JSON extraction, fenced reply", t_json * 1e6, "µs", t_json * 1e6 / 3.4,
            "go-ml 3.4 µs (published)", "string-aware brace matching"),
        Row(GROUP, "judge JSON extraction, needs repair", t_repair * 1e6, "µs", t_repair / t_json,
            "fenced reply, same run", "single quotes, unquoted key, trailing comma: 3 parse attempts"),
    ]


async def _direct(engine: Any, prompts: list[str], opts: Any, concurrency: int) -> float:
    from deployments import Message, collect

    sem = asyncio.Semaphore(concurrency)

    async def one(p: str) -> None:
        async with sem:
            await collect(engine.chat([Message(role="user", content=p)], opts))

    t = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - t


async def _runner(engine: Any, probe_set: Any, concurrency: int, scorers: str, max_tokens: int, store: Any = None) -> float:
    from evaluators import EvalTarget, run_eval

    t = time.perf_counter()
    rep = await run_eval(engine, [EvalTarget.base("m")], [probe_set], scorers=scorers, concurrency=concurrency,
                         max_tokens=max_tokens, temperature=0.0, seed=0, store=store)
    assert len(rep.results) == len(probe_set.probes)
    return time.perf_counter() - t


def _probe_set(n: int) -> Any:
    from evaluators import Probe, ProbeSet, Sampling, load_probe_set

    cap = load_probe_set("capability")
    probes = tuple(Probe(id=f"p{i}", prompt=cap.probes[i % len(cap.probes)].prompt, pass_rule=cap.probes[i % 23].pass_rule)
                   for i in range(n))
    return ProbeSet(name="bench", hash=f"bench-{n}", sampling=Sampling(0.0, 16), probes=probes)


def runner_rows_echo(quick: bool) -> list[Row]:
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))  # EchoEngine is a test double (tests/_doubles.py)
    from _doubles import EchoEngine

    from deployments import GenOpts
    from evaluators import JsonlSampleStore

    n = 200 if quick else 2000
    c = 8
    ps = _probe_set(n)
    prompts = [p.prompt for p in ps.probes]
    answer = "The answer is 162, since 54 × 3 = 162. " * 8  # ~330 chars, like a short model answer
    opts = GenOpts(temperature=0.0, max_tokens=16, seed=0)
    rows: list[Row] = []
    for delay in (0.0, 0.002):
        eng = EchoEngine(lambda msgs: answer, delay_s=delay, pieces=16)
        direct, bare, scored, stored = [], [], [], []
        for _ in range(1 if quick else 3):  # interleaved rounds: machine noise hits both sides
            direct.append(asyncio.run(_direct(eng, prompts, opts, c)))
            bare.append(asyncio.run(_runner(eng, ps, c, "exact", 16)))  # nothing applies: harness only
            scored.append(asyncio.run(_runner(eng, ps, c, "heuristic,capability", 16)))
            with tempfile.TemporaryDirectory() as d:
                stored.append(asyncio.run(_runner(eng, ps, c, "heuristic,capability", 16, JsonlSampleStore(Path(d) / "s.jsonl"))))
        d_, b_, s_, st_ = (statistics.median(x) for x in (direct, bare, scored, stored))
        label = "no latency" if delay == 0 else f"{delay * 1e3:g} ms per request"
        rows.append(Row(GROUP, f"runner overhead, EchoEngine {label}, {n} prompts, concurrency {c}", b_ / n * 1e6,
                        "µs/sample", b_ / d_, "direct engine calls, same run",
                        f"direct {d_ / n * 1e6:.0f} µs/request; harness only (no scorer applies)"))
        rows.append(Row(GROUP, f"  + heuristic and capability scoring ({label})", s_ / n * 1e6, "µs/sample", s_ / d_,
                        "direct engine calls, same run", "~330-char answers"))
        rows.append(Row(GROUP, f"  + JSONL store, fsync per sample ({label})", st_ / n * 1e6, "µs/sample", st_ / d_,
                        "direct engine calls, same run", "the resume record: one write + fsync per sample"))
    return rows


def runner_rows_llamacpp(quick: bool) -> list[Row]:
    from pathlib import Path

    from cluster.config import LlamaCppModel
    from deployments import GenOpts, open_engine

    gguf = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        return [Row(GROUP, "runner overhead, llama.cpp", 0.0, "-", None, "", f"skipped: {gguf} missing (make models)")]
    n, c, max_tokens = (6, 2, 16) if quick else (16, 2, 24)
    ps = _probe_set(n)
    prompts = [p.prompt for p in ps.probes]
    opts = GenOpts(temperature=0.0, max_tokens=max_tokens, seed=0)

    async def measure() -> tuple[list[float], list[float]]:
        eng = open_engine(LlamaCppModel(name="smollm2", engine="llamacpp", path=gguf, adapters=False,
                                        options={"parallel": c, "ctx_size": 1024, "threads": 2}))
        await eng.start()
        try:
            await _direct(eng, prompts[:2], opts, c)  # warm-up
            direct, runner = [], []
            for _ in range(1 if quick else 2):
                direct.append(await _direct(eng, prompts, opts, c))
                runner.append(await _runner(eng, ps, c, "heuristic,capability", max_tokens))
            return direct, runner
        finally:
            await eng.close()

    direct, runner = asyncio.run(measure())
    d_, r_ = statistics.median(direct), statistics.median(runner)
    return [Row(GROUP, f"runner vs direct, SmolLM2 llama.cpp, {n} prompts × {max_tokens} tokens, concurrency {c}",
                r_ / n, "s/sample", r_ / d_, "direct engine calls, same run",
                f"direct {d_ / n:.2f} s/request; generation dominates, scoring adds <1 ms per sample")]


def run(quick: bool = False) -> list[Row]:
    """Heuristic speed, small scorers, and runner overhead (EchoEngine and llama.cpp)."""
    rows = heuristic_rows(quick)
    rows += small_scorer_rows(quick)
    rows += runner_rows_echo(quick)
    rows += runner_rows_llamacpp(quick)
    return rows


if __name__ == "__main__":
    import argparse

    from bench._common import machine, table

    ap = argparse.ArgumentParser(prog="python -m bench.scorers")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(table(run(quick=args.quick)))

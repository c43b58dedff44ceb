"""The fan-out runner: (target × probe × repeat) through a TextModel, bounded, resumable.

- Generation requests per endpoint (model) never exceed their limiter; judge calls have their
  own limiter. Limiters are anything usable as `async with` (asyncio.Semaphore, or the
  cluster's shared budgets); an int makes a fresh semaphore.
- A fixed pool of workers pulls work items one at a time, so nothing is spawned per item
  (go-ml started one goroutine per item before its semaphore).
- Resume: keys the store already has for a target are skipped before any request is made.
- Cancellation: a sample is recorded with one store call after it is fully generated and
  scored (in a thread for sync stores, shielded from cancellation); a cancelled run leaves no
  partial sample, and what it recorded is kept.
- Every result carries its provenance: target, model, adapter sha256, probe-set hash,
  sampling options, scorer versions and judge settings.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncContextManager, Callable, Iterator, Mapping, Sequence

from deployments import GenOpts, Message, TextModel, collect
from evaluators._judge import Judge
from evaluators._probes import Probe, ProbeSet
from evaluators._records import EvalTarget, SampleResult, SampleStore, sample_key
from evaluators._scoring import JUDGE_SCORERS, resolve_scorers, score_answer, scorer_versions

log = logging.getLogger(__name__)

Limiter = AsyncContextManager[Any]


class CountingGate:
    """Wraps a limiter and measures how many holders are inside it (now and at most).

    Args:
        limiter: any async context manager (asyncio.Semaphore, a cluster budget).
    """

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter
        self.now = 0
        self.peak = 0

    async def __aenter__(self) -> "CountingGate":
        await self.limiter.__aenter__()
        self.now += 1
        self.peak = max(self.peak, self.now)
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        self.now -= 1
        return await self.limiter.__aexit__(*exc)


def sampling_of(opts: GenOpts) -> dict[str, Any]:
    """The options that decide an answer, as plain JSON (no adapter, no unset or empty fields).

    Args:
        opts: the request's GenOpts.
    """
    return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.sampling_key().items() if v != ()}


def _limiter(v: int | Limiter) -> Limiter:
    if isinstance(v, bool):
        raise TypeError(f"a concurrency limit must be an int or a limiter, got {v!r}")
    if isinstance(v, int):
        if v < 1:
            raise ValueError(f"a concurrency limit must be >= 1, got {v}")
        return asyncio.Semaphore(v)
    if not hasattr(v, "__aenter__"):
        raise TypeError(f"a limiter must be an async context manager (e.g. asyncio.Semaphore), got {type(v).__name__}")
    return v


@dataclass
class Progress:
    """Where a run stands; passed to the progress callback after each sample."""

    total: int
    done: int = 0
    skipped: int = 0
    generation_failures: int = 0
    judge_failures: int = 0
    last: SampleResult | None = None
    in_flight: int = 0  # requests holding a generation or judge slot right now


@dataclass
class RunReport:
    """The outcome of one run."""

    results: list[SampleResult]
    total: int
    skipped: int
    generation_failures: int
    judge_outcomes: dict[str, dict[str, int]]
    duration_s: float
    peak_in_flight: dict[str, int]
    peak_judge_in_flight: int
    scorers: tuple[str, ...]
    scorer_versions: dict[str, str]
    keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Item:
    order: int
    target: EvalTarget
    probe_set: ProbeSet
    probe: Probe
    repeat: int
    opts: GenOpts
    key: str
    scorers: tuple[str, ...]
    versions: dict[str, str] = field(hash=False, compare=False)


def _set_scorers(ps: ProbeSet, judge: Judge | None) -> tuple[str, ...]:
    names = list(ps.scorers)
    if judge is not None and ps.judge_rubric:
        names.append({"capability": "capability_judge"}.get(ps.judge_rubric, ps.judge_rubric))
    return resolve_scorers(names, judge)


async def run_eval(
    models: TextModel | Mapping[str, TextModel],
    targets: Sequence[EvalTarget],
    probe_sets: Sequence[ProbeSet],
    *,
    scorers: Sequence[str] | str | None = None,
    judge: Judge | None = None,
    repeats: int = 1,
    concurrency: int | Limiter | Mapping[str, int | Limiter] = 4,
    judge_concurrency: int | Limiter | None = None,
    workers: int | None = None,
    store: SampleStore | None = None,
    system_prompt: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = 0,
    gen_retries: int = 1,
    retry_delay_s: float = 0.5,
    progress: Callable[[Progress], Any] | None = None,
) -> RunReport:
    """Evaluate targets on probe sets: generate, score, record; bounded and resumable.

    Args:
        models: the TextModel to use, or a mapping from EvalTarget.model to TextModel.
        targets: what to evaluate (base models and checkpoints).
        probe_sets: the probe sets to run.
        scorers: suite/scorer names for every set (see `resolve_scorers`); None: each set's own
            scorers, plus its judge rubric when a judge is given.
        judge: the judge for rubric scorers.
        repeats: answers per probe (repeat index 0..repeats-1 is part of the sample key).
        concurrency: generation requests in flight per endpoint: an int (per model), one
            limiter shared by all models, or a mapping model name -> int or limiter.
        judge_concurrency: judge calls in flight (int or limiter); None: the judge's own limiter,
            else 2.
        workers: samples worked on at once (default: the generation limits of all endpoints
            plus the judge limit, when they are ints; else 16).
        store: where samples are recorded and looked up for resume (None: keep in memory only).
        system_prompt: a system message before each prompt (a probe's own `system` wins).
        temperature: overrides each set's sampling default.
        max_tokens: overrides each set's sampling default.
        seed: generation seed.
        gen_retries: extra attempts after a generation error.
        retry_delay_s: wait before the first retry (doubles each time).
        progress: called with a Progress after each sample (and once at the start).
    """
    t0 = time.perf_counter()
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not targets:
        raise ValueError("no targets to evaluate")
    if not probe_sets:
        raise ValueError("no probe sets to run")
    model_for = _model_lookup(models, targets)

    # Limiters: one gate per endpoint (counting in-flight requests), one for the judge.
    gates: dict[str, CountingGate] = {}
    shared: CountingGate | None = None
    if isinstance(concurrency, Mapping):
        for name in {t.model for t in targets}:
            if name not in concurrency:
                raise ValueError(f"no concurrency limit for model {name!r} (limits given for: {', '.join(concurrency)})")
            gates[name] = CountingGate(_limiter(concurrency[name]))
    elif isinstance(concurrency, int):
        for name in {t.model for t in targets}:
            gates[name] = CountingGate(_limiter(concurrency))
    else:
        shared = CountingGate(_limiter(concurrency))
        for name in {t.model for t in targets}:
            gates[name] = shared
    if judge_concurrency is not None:
        judge_gate: CountingGate | None = CountingGate(_limiter(judge_concurrency))
    elif judge is not None:
        judge_gate = CountingGate(judge.limiter if judge.limiter is not None else asyncio.Semaphore(2))
    else:
        judge_gate = None
    if workers is None:
        n_models = len({t.model for t in targets})
        gen_cap: int | None = None
        if isinstance(concurrency, int):
            gen_cap = concurrency * n_models
        elif isinstance(concurrency, Mapping) and all(isinstance(v, int) for v in concurrency.values()):
            gen_cap = sum(int(concurrency[t]) for t in {t.model for t in targets})  # type: ignore[call-overload]
        judge_cap = judge_concurrency if isinstance(judge_concurrency, int) else (2 if judge is not None else 0)
        workers = gen_cap + judge_cap if gen_cap is not None else 16
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    # The plan, with resume: drop keys the store has.
    fixed = resolve_scorers(scorers, judge) if scorers is not None else None
    done_keys: dict[str, set[str]] = {}
    if store is not None:
        for t in targets:
            done_keys[t.id] = set(store.sample_keys(t.id))
    items: list[_Item] = []
    planned: list[str] = []
    skipped = 0
    counter = itertools.count()
    all_versions: dict[str, str] = {}
    all_scorers: list[str] = []
    for t in targets:
        for ps in probe_sets:
            names = fixed if fixed is not None else _set_scorers(ps, judge)
            versions = scorer_versions(names, judge)
            all_versions.update(versions)
            all_scorers += [n for n in names if n not in all_scorers]
            opts = GenOpts(
                temperature=ps.sampling.temperature if temperature is None else temperature,
                max_tokens=ps.sampling.max_tokens if max_tokens is None else max_tokens,
                seed=seed,
                adapter=t.adapter,
            )
            for probe in ps.probes:
                for r in range(repeats):
                    key = sample_key(t.id, ps.hash, probe.id, r, sampling_of(opts), versions)
                    order = next(counter)
                    planned.append(key)
                    if key in done_keys.get(t.id, ()):
                        skipped += 1
                        continue
                    items.append(_Item(order, t, ps, probe, r, opts, key, names, versions))

    prog = Progress(total=len(items) + skipped, skipped=skipped)
    outcomes: dict[str, dict[str, int]] = {}
    results: list[tuple[int, SampleResult]] = []
    judge_info = {"model": judge.name, "sampling": judge.sampling, "retries": judge.retries} if judge else None

    live_gates = list({id(g): g for g in [*gates.values(), judge_gate] if g is not None}.values())

    def report_progress(last: SampleResult | None) -> None:
        prog.last = last
        prog.in_flight = sum(g.now for g in live_gates)
        if progress is not None:
            try:
                progress(prog)
            except Exception:  # noqa: BLE001 - a broken progress display must not stop the run
                log.exception("progress callback failed")

    async def record(res: SampleResult) -> None:
        if store is None:
            return
        rec = res.to_record()
        if inspect.iscoroutinefunction(store.record_samples):
            write: Any = asyncio.ensure_future(store.record_samples([rec]))
        else:
            # A sync store (SQLite ledger, fsync'd JSONL) writes in a thread, so the event loop
            # keeps generating meanwhile; both stores are thread-safe.
            write = asyncio.ensure_future(asyncio.to_thread(store.record_samples, [rec]))
        # Shielded: a write that has started finishes even if the run is cancelled meanwhile
        # (and run_eval waits for it before it returns or raises).
        pending_writes.add(write)
        write.add_done_callback(pending_writes.discard)
        await asyncio.shield(write)

    async def run_item(it: _Item) -> SampleResult:
        model = model_for(it.target)
        gate = gates[it.target.model]
        msgs: list[Message] = []
        sys_prompt = it.probe.system if it.probe.system is not None else system_prompt
        if sys_prompt:
            msgs.append(Message(role="system", content=sys_prompt))
        msgs.append(Message(role="user", content=it.probe.prompt))
        answer: str | None = None
        finish: str | None = None
        usage: dict[str, int] = {}
        latency = 0.0
        gen_error = ""
        delay = retry_delay_s
        for attempt in range(gen_retries + 1):
            try:
                async with gate:
                    t = time.perf_counter()
                    result = await collect(model.chat(msgs, it.opts))
                    latency = time.perf_counter() - t
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - recorded as a generation failure after the retries
                gen_error = f"{type(e).__name__}: {e}"
                log.warning("generation failed for %s %s#%d (attempt %d): %s", it.target.id, it.probe.id, it.repeat,
                            attempt + 1, gen_error)
                if attempt < gen_retries:
                    await asyncio.sleep(delay)
                    delay *= 2
                continue
            if result.finish_reason == "error":
                gen_error = "the engine ended the answer with finish_reason 'error'"
                continue
            answer, finish = result.text, result.finish_reason
            usage = {"prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens}
            gen_error = ""
            break

        scores: dict[str, dict[str, Any]] = {}
        failures: dict[str, dict[str, Any]] = {}
        attempts: dict[str, int] = {}
        judge_latency = 0.0
        if answer is None:
            failures["generate"] = {"error": gen_error, "raw": "", "attempts": gen_retries + 1}
        else:
            scored = await score_answer(it.probe, answer, it.scorers, judge, judge_gate)
            scores, failures, attempts = scored.scores, scored.failures, scored.judge_attempts
            judge_latency = scored.judge_latency_s
            for s, v in scored.verdicts.items():
                counts = outcomes.setdefault(s, {"first": 0, "repaired": 0, "failed": 0})
                counts[v.outcome] += 1
        provenance = {
            "target": it.target.id,
            "model": it.target.model,
            "engine": getattr(model, "name", ""),
            "adapter": it.target.adapter,
            "adapter_sha256": it.target.adapter_sha256,
            "probe_set": it.probe_set.name,
            "probe_set_hash": it.probe_set.hash,
            "sampling": sampling_of(it.opts),
            "scorer_versions": dict(it.versions),
        }
        if judge_info and any(s in JUDGE_SCORERS for s in it.scorers):
            provenance["judge"] = judge_info
        return SampleResult(
            key=it.key,
            target=it.target.id,
            probe_set=it.probe_set.name,
            probe_set_hash=it.probe_set.hash,
            probe_id=it.probe.id,
            domain=it.probe.domain,
            category=it.probe.category,
            repeat=it.repeat,
            prompt=it.probe.prompt,
            messages=[m.model_dump() for m in msgs],
            answer=answer,
            finish_reason=finish,
            usage=usage,
            latency_s=latency,
            scores=scores,
            failures=failures,
            provenance=provenance,
            judge_attempts=attempts,
            judge_latency_s=judge_latency,
            complete=answer is not None,
            label=it.target.label,
            iteration=it.target.iteration,
            run_id=it.target.run_id,
        )

    queue: Iterator[_Item] = iter(items)
    pending_writes: set[asyncio.Future[Any]] = set()

    async def worker() -> None:
        for it in queue:  # shared iterator: each item is taken by exactly one worker
            res = await run_item(it)
            await record(res)
            results.append((it.order, res))
            prog.done += 1
            if not res.complete:
                prog.generation_failures += 1
            prog.judge_failures += sum(1 for s in res.failures if s in JUDGE_SCORERS)
            report_progress(res)

    report_progress(None)
    tasks = [asyncio.create_task(worker()) for _ in range(min(workers, max(len(items), 1)))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*list(pending_writes), return_exceptions=True)
        raise
    results.sort(key=lambda x: x[0])
    return RunReport(
        results=[r for _, r in results],
        total=prog.total,
        skipped=skipped,
        generation_failures=prog.generation_failures,
        judge_outcomes=outcomes,
        duration_s=time.perf_counter() - t0,
        peak_in_flight={name: g.peak for name, g in gates.items()},
        peak_judge_in_flight=judge_gate.peak if judge_gate is not None else 0,
        scorers=tuple(all_scorers),
        scorer_versions=all_versions,
        keys=planned,
    )


def _model_lookup(models: TextModel | Mapping[str, TextModel], targets: Sequence[EvalTarget]) -> Callable[[EvalTarget], TextModel]:
    if isinstance(models, Mapping):
        missing = sorted({t.model for t in targets} - set(models))
        if missing:
            raise ValueError(f"no TextModel given for model {missing[0]!r} (given: {', '.join(models) or 'none'})")
        return lambda t: models[t.model]
    return lambda t: models  # type: ignore[return-value]

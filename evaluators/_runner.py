"""The fan-out runner: (target × probe × repeat) through a TextModel, bounded, resumable.

- Generation requests per endpoint (model) never exceed their limiter; judge calls have their
  own limiter. Limiters are anything usable as `async with` (asyncio.Semaphore, the cluster's
  shared budgets, an `AdaptiveLimit`); an int makes a fresh semaphore. A limiter with an
  `observe(latency_s, tokens, ok)` method is told how each generation request went.
- A fixed pool of workers pulls work items one at a time, so nothing is spawned per item
  (go-ml started one goroutine per item before its semaphore).
- Resume: keys the store already has for a target are skipped before any request is made.
- Cancellation: a sample is recorded with one store call after it is fully generated and
  scored (in a thread for sync stores, shielded from cancellation); a cancelled run leaves no
  partial sample, and what it recorded is kept.
- Every result carries its provenance: target, model, adapter sha256, probe-set hash,
  sampling options, scorer versions and judge settings.

Reading order: `_Gates` (the limiters) and `_default_workers`, `_plan` (the items, with resume),
`_SampleMaker` (one sample: generate, score, provenance), `_StoreWrites` and `_work` (recording
and the worker pool), then `run_eval`, which puts them together.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncContextManager, Awaitable, Callable, Iterator, Mapping, Sequence

from deployments import AdapterError, EngineUnavailable, GenOpts, Message, TextModel, UnsupportedOption, collect
from evaluators._judge import Judge
from evaluators._loglik import LOGLIK_SCORERS, choice_scores, text_scores
from evaluators._probes import Probe, ProbeSet
from evaluators._records import EvalTarget, SampleResult, SampleStore, sample_components, sample_key, set_aside
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

    def observe(self, latency_s: float, tokens: int, ok: bool = True) -> None:
        """Tell the limiter how a request went, if it learns from that (`AdaptiveLimit`, `AllOf`)."""
        observe = getattr(self.limiter, "observe", None)
        if observe is not None:
            observe(latency_s, tokens, ok)


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
    """Samples planned (made and skipped)."""
    done: int = 0
    """Samples made so far."""
    skipped: int = 0
    """Samples the store already had (not made again)."""
    generation_failures: int = 0
    """Samples without an answer (every generation attempt failed)."""
    judge_failures: int = 0
    """Judge scorers that gave no verdict, over the samples made."""
    last: SampleResult | None = None
    """The sample just made (None in the first call)."""
    in_flight: int = 0
    """Requests holding a generation or judge slot right now."""


@dataclass
class RunReport:
    """The outcome of one run."""

    results: list[SampleResult]
    """The samples made by this run, in plan order (skipped ones are not here)."""
    total: int
    """Samples planned (made and skipped)."""
    skipped: int
    """Samples the store already had."""
    generation_failures: int
    """Samples without an answer."""
    judge_outcomes: dict[str, dict[str, int]]
    """Judge scorer -> {"first", "repaired", "failed"} verdict counts."""
    duration_s: float
    """Wall time of the run."""
    peak_in_flight: dict[str, int]
    """Model -> the most generation requests in flight at once."""
    peak_judge_in_flight: int
    """The most judge calls in flight at once."""
    scorers: tuple[str, ...]
    """Every scorer that ran, in order of first use."""
    scorer_versions: dict[str, str]
    """Scorer name -> version stamp."""
    keys: list[str] = field(default_factory=list)
    """Every planned sample's key, made or skipped, in plan order."""
    set_aside: dict[str, int] = field(default_factory=dict)
    """Earlier samples of the targets not reused, by why (`evaluators.set_aside`); only for a store
    that lists its samples (`samples(target)`)."""

    def generation_faults(self) -> dict[str, tuple[int, str]]:
        """Fault ("engine", "adapter", "answer"; see `fault_of`) -> (samples without an answer for
        it, the first one's error)."""
        out: dict[str, tuple[int, str]] = {}
        for r in self.results:
            f = r.failures.get("generate")
            if f is not None:
                fault = f.get("fault") or "answer"
                n, first = out.get(fault, (0, f.get("error", "")))
                out[fault] = (n + 1, first)
        return out


@dataclass(frozen=True)
class _Item:
    """One sample to make: a probe of a set, answered by a target, once (of `repeats`)."""

    order: int
    """Its place in the plan (results are returned in plan order)."""
    target: EvalTarget
    """Who answers."""
    probe_set: ProbeSet
    """The set the probe is from."""
    probe: Probe
    """The probe."""
    repeat: int
    """0-based repeat index."""
    opts: GenOpts
    """The generation options (sampling, adapter)."""
    key: str
    """The sample's key (`sample_key`)."""
    scorers: tuple[str, ...]
    """The scorers that run on the answer."""
    versions: dict[str, str] = field(hash=False, compare=False)
    """Scorer name -> version stamp."""
    messages: tuple[Message, ...] = ()
    """The prompt as sent: the probe's system prompt (or the run's), then the probe's prompt."""
    components: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    """What the key depends on (`sample_components`)."""
    sampling: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """What decides the answer, as recorded: the generation options (`sampling_of`), or
    {"loglikelihood": kind} for a loglikelihood set."""


def _set_scorers(ps: ProbeSet, judge: Judge | None) -> tuple[str, ...]:
    names = list(ps.scorers)
    if judge is not None and ps.judge_rubric:
        names.append({"capability": "capability_judge"}.get(ps.judge_rubric, ps.judge_rubric))
    return resolve_scorers(names, judge)


# --------------------------------------------------------------------------- limits


class _Gates:
    """The run's limiters, each inside a CountingGate: one per endpoint (model), one for the judge.

    Args:
        targets: what is evaluated (their models are the endpoints).
        concurrency: as `run_eval` takes it.
        judge: the judge, if any.
        judge_concurrency: as `run_eval` takes it.
    """

    def __init__(self, targets: Sequence[EvalTarget], concurrency: int | Limiter | Mapping[str, int | Limiter],
                 judge: Judge | None, judge_concurrency: int | Limiter | None) -> None:
        models = {t.model for t in targets}
        self.per_model: dict[str, CountingGate] = {}
        if isinstance(concurrency, Mapping):
            for name in models:
                if name not in concurrency:
                    raise ValueError(f"no concurrency limit for model {name!r} (limits given for: {', '.join(concurrency)})")
                self.per_model[name] = CountingGate(_limiter(concurrency[name]))
        elif isinstance(concurrency, int):
            for name in models:
                self.per_model[name] = CountingGate(_limiter(concurrency))
        else:
            shared = CountingGate(_limiter(concurrency))
            for name in models:
                self.per_model[name] = shared
        self.judge: CountingGate | None = None
        if judge_concurrency is not None:
            self.judge = CountingGate(_limiter(judge_concurrency))
        elif judge is not None:
            self.judge = CountingGate(judge.limiter if judge.limiter is not None else asyncio.Semaphore(2))
        self._distinct = list({id(g): g for g in [*self.per_model.values(), self.judge] if g is not None}.values())

    def in_flight(self) -> int:
        """Requests holding a generation or judge slot right now."""
        return sum(g.now for g in self._distinct)


def _default_workers(targets: Sequence[EvalTarget], concurrency: int | Limiter | Mapping[str, int | Limiter],
                     judge: Judge | None, judge_concurrency: int | Limiter | None) -> int:
    """Samples worked on at once when not given: the generation limits of all endpoints (an int, or
    an adaptive limit's maximum) plus the judge limit; 16 when some limit does not say."""
    def cap(v: int | Limiter) -> int | None:
        return v if isinstance(v, int) else getattr(v, "maximum", None)

    models = {t.model for t in targets}
    caps = [cap(concurrency[m]) for m in models] if isinstance(concurrency, Mapping) else [cap(concurrency)] * len(models)
    judge_cap = (cap(judge_concurrency) if judge_concurrency is not None else None) or (2 if judge is not None else 0)
    if any(c is None for c in caps):
        return 16
    return sum(c for c in caps if c is not None) + judge_cap


# --------------------------------------------------------------------------- the plan


@dataclass
class _Plan:
    """What a run does, in order, with resume applied."""

    items: list[_Item]
    """The samples to make (those the store has are left out)."""
    keys: list[str]
    """Every planned sample's key, made or skipped, in plan order."""
    skipped: int
    """How many samples the store already had."""
    scorers: list[str]
    """Every scorer that runs, in order of first use."""
    versions: dict[str, str]
    """Scorer name -> version stamp, over every set."""
    planned: dict[str, dict[tuple[str, str, int], dict[str, str]]] = field(default_factory=dict)
    """Target id -> (probe set, probe id, repeat) -> its sample's components (for `set_aside`)."""


def _messages(probe: Probe, system_prompt: str | None) -> tuple[Message, ...]:
    """The chat for a probe: its system prompt (or the run's), then the prompt."""
    sys_prompt = probe.system if probe.system is not None else system_prompt
    head = (Message(role="system", content=sys_prompt),) if sys_prompt else ()
    return (*head, Message(role="user", content=probe.prompt))


def _plan(targets: Sequence[EvalTarget], probe_sets: Sequence[ProbeSet], *, scorers: Sequence[str] | str | None,
          judge: Judge | None, repeats: int, store: SampleStore | None, temperature: float | None,
          max_tokens: int | None, seed: int | None, system_prompt: str | None = None) -> _Plan:
    """Every (target, set, probe, repeat) with its options, prompt and key; the keys the store has are skipped."""
    fixed = resolve_scorers(scorers, judge) if scorers is not None else None
    done_keys: dict[str, set[str]] = {}
    if store is not None:
        for t in targets:
            done_keys[t.id] = set(store.sample_keys(t.id))
    plan = _Plan(items=[], keys=[], skipped=0, scorers=[], versions={})
    counter = itertools.count()
    for t in targets:
        for ps in probe_sets:
            if ps.kind != "generate":  # a loglikelihood set has its own scorer, whatever the run's
                name, version = LOGLIK_SCORERS[ps.kind]
                names, versions = (name,), {name: version}
            else:
                names = fixed if fixed is not None else _set_scorers(ps, judge)
                versions = scorer_versions(names, judge)
            plan.versions.update(versions)
            plan.scorers += [n for n in names if n not in plan.scorers]
            opts = GenOpts(
                temperature=ps.sampling.temperature if temperature is None else temperature,
                max_tokens=ps.sampling.max_tokens if max_tokens is None else max_tokens,
                seed=seed,
                adapter=t.adapter,
            )
            sampling = sampling_of(opts) if ps.kind == "generate" else {"loglikelihood": ps.kind}
            for probe in ps.probes:
                msgs = _messages(probe, system_prompt) if ps.kind == "generate" else ()
                comps = sample_components(t.identity, _sent(ps, probe, msgs), ps.hash, sampling, versions)
                for r in range(repeats):
                    key = sample_key(t.id, probe.id, r, comps)
                    order = next(counter)
                    plan.keys.append(key)
                    plan.planned.setdefault(t.id, {})[(ps.name, probe.id, r)] = comps
                    if key in done_keys.get(t.id, ()):
                        plan.skipped += 1
                        continue
                    plan.items.append(_Item(order, t, ps, probe, r, opts, key, names, versions, msgs, comps, sampling))
    return plan


def _sent(ps: ProbeSet, probe: Probe, msgs: Sequence[Message]) -> list[dict[str, str]]:
    """What a sample sends, as role/content pairs (its key's prompt digest, its record's messages):
    the chat; or a multiple-choice item's context and choices; or a text scored whole."""
    if ps.kind == "choice":
        return [{"role": "context", "content": probe.prompt}, *({"role": "choice", "content": c} for c in probe.choices)]
    if ps.kind == "text":
        return [{"role": "text", "content": probe.prompt}]
    return [m.model_dump() for m in msgs]


# --------------------------------------------------------------------------- one sample


@dataclass
class _Generated:
    """The outcome of generating one answer (after the retries)."""

    answer: str | None = None
    """The answer (None: every attempt failed): the text generated; for a multiple-choice item the
    choice the model likes best, for a text ""."""
    finish_reason: str | None = None
    """Why the engine ended it."""
    usage: dict[str, int] = field(default_factory=dict)
    """Token counts of the answer."""
    latency_s: float = 0.0
    """Wall time of the last attempt the engine answered (0.0: none did)."""
    error: str = ""
    """The last attempt's error, when there is no answer."""
    fault: str = ""
    """Whose fault a missing answer is (`fault_of`): "engine", "adapter" or "answer"."""
    tokens: int = 0
    """The tokens the engine generated (what an adaptive limit's throughput counts), or scored."""
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    """A loglikelihood sample's scores (`choice_scores`, `text_scores`), made with the answer."""


def fault_of(error: BaseException) -> str:
    """Whose fault a failed generation is: "engine" (down, restarting, its replica lost: not the
    target's; wait and try again), "adapter" (the target's adapter is missing, corrupt or does
    not fit: the target's own), or "answer" (anything else the engine refused or broke on).

    Args:
        error: what the generation raised.
    """
    if isinstance(error, AdapterError):
        return "adapter"
    if isinstance(error, EngineUnavailable):
        return "engine"
    return "answer"


class _SampleMaker:
    """Makes one sample: the messages, the answer (with retries), the scores, the provenance.

    Args:
        model_for: the TextModel of a target.
        gates: the run's limiters.
        judge: the judge, if any.
        gen_retries: as `run_eval` takes it.
        retry_delay_s: as `run_eval` takes it.
    """

    def __init__(self, model_for: Callable[[EvalTarget], TextModel], gates: _Gates, judge: Judge | None,
                 gen_retries: int, retry_delay_s: float) -> None:
        self.model_for, self.gates, self.judge = model_for, gates, judge
        self.gen_retries, self.retry_delay_s = gen_retries, retry_delay_s
        self.judge_info = {"model": judge.name, "sampling": judge.sampling, "retries": judge.retries} if judge else None
        self.outcomes: dict[str, dict[str, int]] = {}  # judge scorer -> {"first", "repaired", "failed"}

    async def generate(self, it: _Item, model: TextModel) -> _Generated:
        """The answer, through the endpoint's gate, retried after errors (backing off)."""
        gate = self.gates.per_model[it.target.model]
        gen_error, fault = "", ""
        latency = 0.0  # a failed sample keeps the time of an attempt the engine ended with an error
        delay = self.retry_delay_s
        for attempt in range(self.gen_retries + 1):
            t = time.perf_counter()
            try:
                async with gate:
                    t = time.perf_counter()
                    got = await self._ask(it, model)
                    latency = time.perf_counter() - t
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - recorded as a generation failure after the retries
                gen_error, fault = f"{type(e).__name__}: {e}", fault_of(e)
                if fault == "engine":
                    gate.observe(time.perf_counter() - t, 0, ok=False)  # an engine in trouble: fewer at once
                log.warning("generation failed for %s %s#%d (attempt %d): %s", it.target.id, it.probe.id, it.repeat,
                            attempt + 1, gen_error)
                if fault == "adapter" or isinstance(e, UnsupportedOption):
                    break  # the same adapter, or an engine that cannot score, fails the same way: no retry
                if attempt < self.gen_retries:
                    await asyncio.sleep(delay)
                    delay *= 2
                continue
            if got.finish_reason == "error":
                gen_error, fault = "the engine ended the answer with finish_reason 'error'", "answer"
                continue
            if it.probe_set.kind == "generate":
                # generated tokens per second is what an adaptive limit climbs on; the tokens a
                # loglikelihood item scores are another unit, so they do not move it
                gate.observe(latency, got.tokens)
            got.latency_s = latency
            return got
        return _Generated(latency_s=latency, error=gen_error, fault=fault)

    @staticmethod
    async def _ask(it: _Item, model: TextModel) -> _Generated:
        """One attempt: the chat answer, or a loglikelihood item's scores (a multiple-choice item's
        choices in one batch, a text rolling). Raises what the engine raises."""
        kind = it.probe_set.kind
        if kind == "generate":
            result = await collect(model.chat(list(it.messages), it.opts), whole=True)
            usage = {"prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens}
            return _Generated(result.text, result.finish_reason, usage, tokens=result.usage.completion_tokens)
        if not callable(getattr(model, "loglikelihood", None)):
            raise UnsupportedOption(getattr(model, "name", type(model).__name__), "loglikelihood",
                                    "this model client cannot score text")
        scorer, _ = LOGLIK_SCORERS[kind]
        if kind == "choice":
            lls = await model.loglikelihood([(it.probe.prompt, c) for c in it.probe.choices],  # type: ignore[attr-defined]
                                            adapter=it.target.adapter)
            scores = choice_scores([ll.logprob for ll in lls], it.probe.choices, it.probe.answer or 0)
            n = sum(ll.n_tokens for ll in lls)
            return _Generated(it.probe.choices[int(scores["chosen"])], "loglikelihood", {"prompt_tokens": n}, tokens=n,
                              scores={scorer: scores})
        ll = await model.loglikelihood_rolling(it.probe.prompt, adapter=it.target.adapter)  # type: ignore[attr-defined]
        return _Generated("", "loglikelihood", {"prompt_tokens": ll.n_tokens}, tokens=ll.n_tokens,
                          scores={scorer: text_scores(ll.logprob, it.probe.prompt)})

    def provenance(self, it: _Item, model: TextModel) -> dict[str, Any]:
        """Where a sample comes from: target, model, engine, adapter, probe set, sampling, scorers, judge."""
        provenance = {
            "target": it.target.id,
            "model": it.target.model,
            "engine": getattr(model, "name", ""),
            "adapter": it.target.adapter,
            "adapter_sha256": it.target.adapter_sha256,
            "probe_set": it.probe_set.name,
            "probe_set_hash": it.probe_set.hash,
            "sampling": dict(it.sampling),
            "scorer_versions": dict(it.versions),
            "identity": it.target.identity,
            "identity_parts": [list(p) for p in it.target.identity_parts],
            "components": dict(it.components),
        }
        if self.judge_info and any(s in JUDGE_SCORERS for s in it.scorers):
            provenance["judge"] = self.judge_info
        return provenance

    async def make(self, it: _Item) -> SampleResult:
        """Generate, score and describe one sample."""
        model = self.model_for(it.target)
        gen = await self.generate(it, model)
        scores: dict[str, dict[str, Any]] = {}
        failures: dict[str, dict[str, Any]] = {}
        attempts: dict[str, int] = {}
        judge_latency = 0.0
        if gen.answer is None:
            failures["generate"] = {"error": gen.error, "fault": gen.fault, "raw": "", "attempts": self.gen_retries + 1}
        elif it.probe_set.kind != "generate":
            scores = gen.scores
        else:
            scored = await score_answer(it.probe, gen.answer, it.scorers, self.judge, self.gates.judge)
            scores, failures, attempts = scored.scores, scored.failures, scored.judge_attempts
            judge_latency = scored.judge_latency_s
            for s, v in scored.verdicts.items():
                counts = self.outcomes.setdefault(s, {"first": 0, "repaired": 0, "failed": 0})
                counts[v.outcome] += 1
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
            messages=_sent(it.probe_set, it.probe, it.messages),
            answer=gen.answer,
            finish_reason=gen.finish_reason,
            usage=gen.usage,
            latency_s=gen.latency_s,
            scores=scores,
            failures=failures,
            provenance=self.provenance(it, model),
            judge_attempts=attempts,
            judge_latency_s=judge_latency,
            complete=gen.answer is not None,
            label=it.target.label,
            iteration=it.target.iteration,
            run_id=it.target.run_id,
        )


# --------------------------------------------------------------------------- recording and the pool


class _StoreWrites:
    """Records each sample with one store call: awaited for an async store, in a thread for a sync
    one (SQLite ledger, fsync'd JSONL; both thread-safe), so the event loop keeps generating.

    A write that has started is shielded: it finishes even if the run is cancelled meanwhile, and
    `settle` waits for it before the run returns or raises.

    Args:
        store: the store, or None (nothing is recorded).
    """

    def __init__(self, store: SampleStore | None) -> None:
        self.store = store
        self.pending: set[asyncio.Future[Any]] = set()

    async def record(self, res: SampleResult) -> None:
        """Record one sample."""
        if self.store is None:
            return
        rec = res.to_record()
        if inspect.iscoroutinefunction(self.store.record_samples):
            write: Any = asyncio.ensure_future(self.store.record_samples([rec]))
        else:
            write = asyncio.ensure_future(asyncio.to_thread(self.store.record_samples, [rec]))
        self.pending.add(write)
        write.add_done_callback(self.pending.discard)
        await asyncio.shield(write)

    async def settle(self) -> None:
        """Wait for the writes that have started."""
        await asyncio.gather(*list(self.pending), return_exceptions=True)


async def _work(items: list[_Item], workers: int, make: Callable[[_Item], Awaitable[SampleResult]],
                writes: _StoreWrites, done: Callable[[_Item, SampleResult], None]) -> None:
    """A fixed pool of workers takes the items one at a time: make the sample, record it, report it.
    On an error or cancellation the workers are cancelled and the started writes awaited."""
    queue: Iterator[_Item] = iter(items)

    async def worker() -> None:
        for it in queue:  # shared iterator: each item is taken by exactly one worker
            res = await make(it)
            await writes.record(res)
            done(it, res)

    tasks = [asyncio.create_task(worker()) for _ in range(min(workers, max(len(items), 1)))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await writes.settle()
        raise


# --------------------------------------------------------------------------- the run


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
    gates = _Gates(targets, concurrency, judge, judge_concurrency)
    if workers is None:
        workers = _default_workers(targets, concurrency, judge, judge_concurrency)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    plan = _plan(targets, probe_sets, scorers=scorers, judge=judge, repeats=repeats, store=store,
                 temperature=temperature, max_tokens=max_tokens, seed=seed, system_prompt=system_prompt)
    aside: dict[str, int] = {}
    if store is not None and callable(getattr(store, "samples", None)):
        keys = set(plan.keys)
        for t in targets:
            for why, n in set_aside(store.samples(t.id), plan.planned.get(t.id, {}), keys, t.identity_parts).items():
                aside[why] = aside.get(why, 0) + n

    maker = _SampleMaker(model_for, gates, judge, gen_retries, retry_delay_s)
    prog = Progress(total=len(plan.items) + plan.skipped, skipped=plan.skipped)
    results: list[tuple[int, SampleResult]] = []

    def report_progress(last: SampleResult | None) -> None:
        prog.last = last
        prog.in_flight = gates.in_flight()
        if progress is not None:
            try:
                progress(prog)
            except Exception:  # noqa: BLE001 - a broken progress display must not stop the run
                log.exception("progress callback failed")

    def done(it: _Item, res: SampleResult) -> None:
        results.append((it.order, res))
        prog.done += 1
        if not res.complete:
            prog.generation_failures += 1
        prog.judge_failures += sum(1 for s in res.failures if s in JUDGE_SCORERS)
        report_progress(res)

    report_progress(None)
    await _work(plan.items, workers, maker.make, _StoreWrites(store), done)
    results.sort(key=lambda x: x[0])
    return RunReport(
        results=[r for _, r in results],
        total=prog.total,
        skipped=plan.skipped,
        generation_failures=prog.generation_failures,
        judge_outcomes=maker.outcomes,
        duration_s=time.perf_counter() - t0,
        peak_in_flight={name: g.peak for name, g in gates.per_model.items()},
        peak_judge_in_flight=gates.judge.peak if gates.judge is not None else 0,
        scorers=tuple(plan.scorers),
        scorer_versions=plan.versions,
        keys=plan.keys,
        set_aside=aside,
    )


def _model_lookup(models: TextModel | Mapping[str, TextModel], targets: Sequence[EvalTarget]) -> Callable[[EvalTarget], TextModel]:
    if isinstance(models, Mapping):
        missing = sorted({t.model for t in targets} - set(models))
        if missing:
            raise ValueError(f"no TextModel given for model {missing[0]!r} (given: {', '.join(models) or 'none'})")
        return lambda t: models[t.model]
    return lambda t: models  # type: ignore[return-value]

"""The evaluation coordinator: evaluates staged checkpoints (and each base model) through Serve.

Work is grouped by (model, adapter): one task per checkpoint sends all of that checkpoint's
samples through the same adapter, so a replica loads it once. Several checkpoints run at once
under the cluster's "checkpoints" budget, and their requests share the per-endpoint budget. A
checkpoint that fails is recorded (backed off, then quarantined) and never holds up the others.
Restarted after a crash, the coordinator resumes: the writer has put checkpoints left
`evaluating` back to `staged`, and recorded samples are skipped.

Whose fault a failure is decides what happens (evaluators.fault_of). An engine that is down (its
replica lost with its node, restarting, no replica yet) is nobody's fault: the checkpoint goes back
to `staged` without an attempt counted, the model is marked down, and its work waits until a
replica answers again (an outage longer than `engine_wait_s` is then charged like any failure, so
a `--once` run always ends). A checkpoint's own faults (its adapter refused, answers failing) count
attempts towards quarantine. A base model whose evaluation keeps failing is given up after
`max_attempts` and named: `watch --once` then ends with that reason and a non-zero exit. A base model finished with the
same evaluation plan and the same identity (read from its replica; both recorded in the ledger) is not finished again.
Every target is identified by its replica's engine before it runs (EvalTarget.identified): its samples' keys
name what produced them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from checkpoints import LedgerEntry
    from cluster.config import AppConfig, ModelConfig
    from evaluators import AdaptiveLimit, EvalTarget, TargetOrder

log = logging.getLogger("evalcluster.coordinator")
COORDINATOR_NAME = "evalcluster-coordinator"


@dataclass(frozen=True)
class _Failure:
    """Why some of a target's samples could not be made."""

    fault: str
    """"engine" (down: nobody's fault), "adapter" (the target's adapter), or "answer"."""
    reason: str
    """One line for the ledger and the log."""


class EvalCoordinator:
    """Hosted as a named async actor.

    Args:
        cfg: the app config.
        job_id: the Ray job this coordinator works for (tags its metrics and budget leases; its
            writer is found by it: `job_writer`).
    """

    def __init__(self, cfg: AppConfig, job_id: str) -> None:
        from cluster._budgets import budgets_actor, job_shares
        from cluster._writer import LedgerClient, job_writer
        from cluster._plan import build_plan
        from cluster.runtime import job_scoped

        self.cfg = cfg
        self.job_id = job_id
        self.writer = job_writer(job_id)
        self.ledger = LedgerClient(self.writer)
        self.budgets = budgets_actor(cfg)
        # This job's share of each budget, held together with the cluster's lease (`_limiter`).
        self.shares = {key: asyncio.Semaphore(n) for key, n in job_shares(cfg).items()}
        # Within its share, the job's requests in flight per endpoint are found from the engine's
        # throughput (budgets.adaptive), one limit per endpoint for all the job's targets on it.
        self._adaptive: dict[str, AdaptiveLimit] = {}
        # model -> its endpoint's slots: what one replica's engine reports, times the replicas (where
        # adaptive starts, its floor, and one target's share)
        self._slots: dict[str, int] = {}
        # Its targets' requests go to an endpoint in the order the targets started (TargetOrder).
        self._order: dict[str, TargetOrder] = {}
        self._started = itertools.count()
        # Leases are held in the name of this life of the actor; a restarted coordinator retires
        # its earlier lives (their leases, and the acquires they left waiting, which would
        # otherwise be granted to a dead holder and lost). Another job's coordinator is not one of them.
        self.started_at = time.time()
        self.name = job_scoped(COORDINATOR_NAME, job_id)
        self.holder = f"{self.name}:{os.getpid()}:{time.time_ns()}"
        self.plan = build_plan(self.cfg)
        self.models_with_sources = sorted({s.model for s in self.cfg.sources})
        self._loop_task: asyncio.Task | None = None
        self._running: dict[str, asyncio.Task] = {}
        self._progress: dict[str, dict[str, Any]] = {}  # target id -> {"label", "done", "total"} while it runs
        self._stopping = False
        self.fingerprint = self.plan.fingerprint()
        self._base_done: set[str] = set()
        self._finished: dict[str, str] = {}
        self._base_loaded = False
        self._base_attempts: dict[str, int] = {}
        self.base_failed: dict[str, str] = {}  # model -> why its base evaluation was given up
        self._engine_down: dict[str, float] = {}  # model -> when (monotonic) its outage began
        self._gave_up_waiting: set[str] = set()  # down past engine_wait_s: its failures count again
        self.engine_outages = 0
        self.last_error: str | None = None
        self.evaluated = 0
        self.resumed = 0  # checkpoints an earlier coordinator (a killed life of this one) left `evaluating`

    # ------------------------------------------------------------- the loop

    async def ensure_running(self, interval_s: float | None = None) -> bool:
        """Start the loop if it is not running (first call, or after a restart). True if it started."""
        if self._loop_task is not None and not self._loop_task.done():
            return False
        # A previous life of this actor may have died mid-run: retire it (its budget leases come
        # back), and put the checkpoints it was evaluating back in the queue (their recorded
        # samples are kept).
        await self.budgets.retire.remote(f"{self.name}:", self.holder)
        returned = await self.writer.return_evaluating.remote()
        if returned:
            log.warning("resuming %d checkpoint(s) a previous coordinator left unfinished", returned)
            self.resumed += returned
        if not self._base_loaded:
            # A base is finished when its plan and its identity (read from its engine) both match.
            self._finished = await self.writer.finished_targets.remote()
            self._base_loaded = True
        self._stopping = False
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(interval_s or self.cfg.poll_interval_s))
        return True

    async def _loop(self, interval_s: float) -> None:
        while not self._stopping:
            try:
                started = await self.run_once()
            except Exception as e:  # noqa: BLE001 - the loop must survive anything one pass does
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("coordinator pass failed")
                started = 0
            if not started:
                await asyncio.sleep(min(interval_s, 2.0))

    async def run_once(self) -> int:
        """Start evaluations for what is due (base models first). Returns how many were started."""
        from checkpoints import STAGED

        started = 0
        for model in self.models_with_sources:
            key = f"base:{model}"
            if (key not in self._base_done and key not in self._running and model not in self.base_failed
                    and model not in self._engine_down):
                self._start(key, self._evaluate_base(model))
                started += 1
        for entry in await self.ledger.due(STAGED):
            if entry.id in self._running or self._stopping:
                continue
            if self.cfg.source(entry.checkpoint.source).model in self._engine_down:
                continue  # its engine is down: it waits in the queue, no attempt counted
            self._start(entry.id, self._evaluate_checkpoint(entry))
            started += 1
        return started

    def _start(self, key: str, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._running[key] = task
        task.add_done_callback(lambda _t: self._running.pop(key, None))

    async def status(self) -> dict[str, Any]:
        """What runs now, and this actor's life: its pid and start time change when Ray restarts it."""
        return {"running": sorted(self._running), "evaluated": self.evaluated, "last_error": self.last_error,
                "loop": self._loop_task is not None and not self._loop_task.done(),
                "base_done": sorted(self._base_done), "pid": os.getpid(), "started_at": self.started_at,
                "resumed": self.resumed, "base_failed": dict(self.base_failed),
                "engines_down": sorted(self._engine_down), "engine_outages": self.engine_outages,
                "progress": {k: dict(v) for k, v in self._progress.items()}}

    async def idle(self) -> bool:
        """Nothing running and nothing due (the driver's `--once` exit test)."""
        from checkpoints import STAGED

        if self._running:
            return False
        if any(f"base:{m}" not in self._base_done and m not in self.base_failed for m in self.models_with_sources):
            return False
        return not await self.ledger.due(STAGED)

    async def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Stop taking work; cancel what is running. A cancelled run records no half sample; its
        checkpoint goes back to `staged`, and the next run resumes from the recorded samples."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
        tasks = list(self._running.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        returned = await self.writer.return_evaluating.remote()
        await self.budgets.release_holder.remote(self.holder)
        return {"cancelled": len(tasks), "returned_to_staged": returned}

    # ------------------------------------------------------------- one target

    async def _evaluate_base(self, model: str) -> None:
        from evaluators import EvalTarget

        try:
            target, failure = await self._identified(EvalTarget.base(model))
            if failure is None:  # results made on what served this model before are not today's
                stale = await self.writer.reopen_stale.remote(target)
                if stale:
                    log.warning("model %s is served by another engine than %d scored checkpoint(s) were "
                                "evaluated on: they are evaluated again", model, len(stale))
            fingerprint = f"{self.fingerprint}:{target.identity}"
            if failure is None and self._finished.get(target.id) == fingerprint:
                log.info("%s: already finished with this plan and identity", target.id)
                self._base_done.add(target.id)
                return
            if failure is None:
                failure = await self._evaluate(target)
            if failure is not None:
                if failure.fault == "engine":
                    return  # the model is marked down; the base is evaluated again when it is back
                raise RuntimeError(failure.reason)
            # The summary and the finished record in one writer call: a coordinator killed in between
            # cannot leave one without the other.
            await self.writer.finish_target.remote(target, None, fingerprint=fingerprint)
            self._base_done.add(target.id)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - retried on the next pass, up to max_attempts
            n = self._base_attempts[model] = self._base_attempts.get(model, 0) + 1
            self.last_error = f"base {model}: {type(e).__name__}: {e}"
            if n >= self.cfg.max_attempts:
                self.base_failed[model] = f"{e} (after {n} attempts)"
                log.error("giving up on base model %s after %d attempts: %s", model, n, e)
                return
            log.warning("evaluating base model %s failed (attempt %d of %d): %s", model, n, self.cfg.max_attempts, e)
            await asyncio.sleep(self.cfg.retry_backoff_s)

    async def _evaluate_checkpoint(self, entry: LedgerEntry) -> None:
        from deployments import registry
        from evaluators import EvalTarget

        ck = entry.checkpoint
        model = self.cfg.source(ck.source).model
        async with self._limiter("checkpoints"):
            try:
                await self.writer.mark_evaluating.remote(ck.id)
                registered = await registry().resolve.remote(model, ck.id)  # its files' digest: weights + config
                if registered is None:  # the registry lost it (or never had it): no replica could serve it
                    log.warning("%s is not registered for %s: sent back to be staged again", ck.id, model)
                    await self.writer.unstage.remote(ck.id, f"not registered for model {model!r}: staged again")
                    return
                target, failure = await self._identified(EvalTarget.of_checkpoint(ck, model, registered.sha256))
                if failure is None:
                    failure = await self._evaluate(target)
                if failure is not None and failure.fault == "engine":
                    await self.writer.return_to_staged.remote(ck.id, failure.reason)
                    return
                if failure is not None:
                    await self.writer.record_failure.remote(ck.id, failure.reason,
                                                            permanent=failure.fault == "adapter")
                    return
                await self.writer.finish_target.remote(target, ck.id)
                self.evaluated += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - recorded; the checkpoint is retried later
                self.last_error = f"{ck.id}: {type(e).__name__}: {e}"
                log.warning("evaluating %s failed: %s", ck.id, e)
                await self.writer.record_failure.remote(ck.id, f"{type(e).__name__}: {e}")

    def _limiter(self, key: str, priority: float | None = None) -> Any:
        """A place under budget `key`: the job's share and the cluster's limit, both held; with a
        priority, entered in the order of the job's targets on that endpoint (`TargetOrder`)."""
        from cluster._budgets import AllOf, BudgetLimiter
        from evaluators import AdaptiveLimit, TargetOrder

        if priority is not None:
            return self._order.setdefault(key, TargetOrder()).gate(self._limiter(key), priority)

        limiters = [self.shares[key], BudgetLimiter(self.budgets, key, self.holder)]
        if key.startswith("gen:") and self.cfg.budgets.adaptive:
            if key not in self._adaptive:
                slots = self._slots.get(key.removeprefix("gen:"))
                self._adaptive[key] = AdaptiveLimit(self.cfg.budgets.per_endpoint, slots or None, floor=slots or 1,
                                                    name=key)
            limiters.insert(0, self._adaptive[key])  # first: a request it holds back holds no lease
        return AllOf(*limiters)

    def _target_share(self, model: str) -> int:
        """Requests one target keeps in flight: at most its endpoint's slots (every replica's), where
        its engine reports them. More would only queue in the engines while the endpoint's other
        places could start the next target; the earliest target fills the slots first
        (`TargetOrder`), so a checkpoint is done sooner and the last one uses every replica (on 2
        replicas, a target capped at one replica's slots left the other idle through the sweep's
        last checkpoint)."""
        slots = self._slots.get(model)
        return min(self.cfg.budgets.per_endpoint, slots) if slots else self.cfg.budgets.per_endpoint

    def _engine_outage(self, model: str, reason: str) -> None:
        """Mark a model's engine down (its work waits) and watch for it to come back."""
        if model in self._engine_down:
            return
        self._engine_down[model] = time.monotonic()
        self.engine_outages += 1
        log.warning("model %s is down (%s): its evaluations wait for it", model, reason)
        self._start(f"engine:{model}", self._wait_for_engine(model))

    async def _wait_for_engine(self, model: str) -> None:
        from deployments import ServeTextModel

        handle, delay, since = ServeTextModel(model), 1.0, self._engine_down[model]
        try:
            while not await handle.healthy():
                if time.monotonic() - since > self.cfg.engine_wait_s:
                    self._gave_up_waiting.add(model)
                    log.error("model %s has been down for %.0fs (engine_wait_s): its failures count again",
                              model, time.monotonic() - since)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            self._gave_up_waiting.discard(model)
            log.info("model %s is back after %.0fs", model, time.monotonic() - since)
        finally:
            self._engine_down.pop(model, None)

    async def _identified(self, target: EvalTarget) -> "tuple[EvalTarget, _Failure | None]":
        """The target with its identity, read from its model's replica; an engine that cannot say
        (down, no replica) is an outage: the target waits."""
        from deployments import EngineUnavailable, ServeTextModel

        try:
            info = await ServeTextModel(target.model).info()
            identity = info.identity
            if info.slots:
                self._slots[target.model] = endpoint_slots(self.cfg.model(target.model), info.slots)
            if not identity:
                raise EngineUnavailable(f"model {target.model!r} reported no identity (its engine is not running)")
        except EngineUnavailable as e:
            self._engine_outage(target.model, str(e))
            return target, _Failure("engine", f"model {target.model!r} is down: {e}")
        return target.identified(identity), None

    async def _evaluate(self, target: EvalTarget) -> "_Failure | None":
        """Run every probe of the target; says whose fault it was if some samples could not be made."""
        from cluster._metrics import metrics
        from cluster._writer import WriterStore
        from deployments import ServeTextModel
        from evaluators import run_eval

        m = metrics()
        run = target.run_id or "base"  # two checkpoints of one model in flight are two series
        done = await self.writer.sample_keys.remote(target.id)
        store = WriterStore(self.writer, target, done)
        model = ServeTextModel(target.model)
        judge = self.plan.open_judge(ServeTextModel(self.plan.judge.model)) if self.plan.judge else None

        def progress(p: Any) -> None:
            self._progress[target.id] = {"label": target.label or target.id, "done": p.done + p.skipped,
                                         "total": p.total}
            res = p.last
            if res is None:
                return
            tags = {"model": target.model, "job_id": self.job_id, "run": run}
            m.samples_done.inc(tags={**tags, "outcome": "ok" if res.complete else "failed"})
            if res.complete and res.latency_s:
                m.generation_latency.observe(res.latency_s, tags=tags)
                toks = (res.usage or {}).get("completion_tokens", 0)
                if toks:
                    m.engine_tokens_per_s.set(toks / res.latency_s, tags=tags)
            if res.judge_latency_s and judge is not None:
                m.judge_latency.observe(res.judge_latency_s, tags={"model": judge.name, "job_id": self.job_id, "run": run})
            m.samples_in_flight.set(p.in_flight, tags={**tags, "target": target.id})

        t0 = time.perf_counter()
        try:
            report = await run_eval(
                {target.model: model},
                [target],
                judge=judge,
                concurrency={target.model: self._limiter(f"gen:{target.model}", priority=next(self._started))},
                judge_concurrency=self._limiter(f"judge:{judge.name}") if judge is not None else None,
                workers=self._target_share(target.model) + (self.cfg.budgets.judge if judge is not None else 0),
                store=store,
                progress=progress,
                **self.plan.run_args(),
            )
        finally:
            self._progress.pop(target.id, None)
        m.samples_in_flight.set(0, tags={"model": target.model, "job_id": self.job_id, "run": run, "target": target.id})
        log.info("%s: %d samples (%d resumed) in %.1fs", target.id, report.total - report.skipped,
                 report.skipped, time.perf_counter() - t0)
        if not report.generation_failures:
            self._gave_up_waiting.discard(target.model)
            return None
        faults = report.generation_faults()
        if "engine" in faults and len(faults) == 1 and target.model not in self._gave_up_waiting:
            n, first = faults["engine"]
            self._engine_outage(target.model, first)
            return _Failure("engine", f"{n} of {report.total} answers wait for model {target.model!r}, "
                                      f"which is down: {first}")
        fault = "adapter" if "adapter" in faults else "answer"
        n, first = faults.get(fault) or next(iter(faults.values()))
        return _Failure(fault, f"{report.generation_failures} of {report.total} answers could not be generated: "
                               f"{first}")


def endpoint_slots(model: ModelConfig, replica_slots: int) -> int:
    """The slots of a model's whole endpoint: one replica's engine's, times the replicas it is
    deployed with (with autoscaling, its minimum; at least one)."""
    replicas = max(1, model.autoscaling.min_replicas) if model.autoscaling else model.replicas
    return replica_slots * replicas


def coordinator_actor(cfg: AppConfig) -> Any:
    """The job's coordinator, `evalcluster-coordinator:<job id>`, on the state node beside the
    writer it calls all the time (`writer_actor`, started before it).

    Args:
        cfg: the app config.
    """
    from cluster.runtime import current_job_id, job_actor, job_scoped, state_placement

    job = current_job_id()
    return job_actor(EvalCoordinator, job_scoped(COORDINATOR_NAME, job), state_placement(cfg.cluster), cfg,
                     job, max_task_retries=0, max_concurrency=1000)

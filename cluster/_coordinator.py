"""The evaluation coordinator: evaluates staged checkpoints (and each base model) through Serve.

Work is grouped by (model, adapter): one task per checkpoint sends all of that checkpoint's
samples through the same adapter, so a replica loads it once. Several checkpoints run at once
under the cluster's "checkpoints" budget, and their requests share the per-endpoint budget. A
checkpoint that fails is recorded (backed off, then quarantined) and never holds up the others.
Restarted after a crash, the coordinator resumes: the writer has put checkpoints left
`evaluating` back to `staged`, and recorded samples are skipped. A base model finished with the
same evaluation plan (its fingerprint is recorded in the ledger) is not finished again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("evalcluster.coordinator")
COORDINATOR_NAME = "evalcluster-coordinator"


class EvalCoordinator:
    """Hosted as a named async actor.

    Args:
        app_cfg: the AppConfig as a mapping.
        config_path: the file it came from.
    """

    def __init__(self, app_cfg: Mapping[str, Any], config_path: str | None) -> None:
        import ray

        from cluster._budgets import budgets_actor
        from cluster._writer import WRITER_NAME, LedgerClient
        from cluster._plan import build_plan
        from cluster.config import parse_config

        self.cfg = parse_config(dict(app_cfg), config_path or "config", Path(config_path) if config_path else None)
        self.writer = ray.get_actor(WRITER_NAME)
        self.ledger = LedgerClient(self.writer)
        self.budgets = budgets_actor()
        # Leases are held in the name of this life of the actor; a restarted coordinator retires
        # its earlier lives (their leases, and the acquires they left waiting, which would
        # otherwise be granted to a dead holder and lost).
        self.started_at = time.time()
        self.holder = f"{COORDINATOR_NAME}:{os.getpid()}:{time.time_ns()}"
        self.plan = build_plan(self.cfg)
        self.models_with_sources = sorted({s.model for s in self.cfg.sources})
        self._loop_task: asyncio.Task | None = None
        self._running: dict[str, asyncio.Task] = {}
        self._stopping = False
        self.fingerprint = self.plan.fingerprint()
        self._base_done: set[str] = set()
        self._base_loaded = False
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
        await self.budgets.retire.remote(f"{COORDINATOR_NAME}:", self.holder)
        returned = await self.writer.return_evaluating.remote()
        if returned:
            log.warning("resuming %d checkpoint(s) a previous coordinator left unfinished", returned)
            self.resumed += returned
        if not self._base_loaded:
            finished = await self.writer.finished_targets.remote()
            self._base_done = {t for t, fp in finished.items() if t.startswith("base:") and fp == self.fingerprint}
            self._base_loaded = True
            if self._base_done:
                log.info("already finished with these probe sets: %s", ", ".join(sorted(self._base_done)))
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
            if key not in self._base_done and key not in self._running:
                self._start(key, self._evaluate_base(model))
                started += 1
        for entry in await self.ledger.due(STAGED):
            if entry.id in self._running or self._stopping:
                continue
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
                "resumed": self.resumed}

    async def idle(self) -> bool:
        """Nothing running and nothing due (the driver's `--once` exit test)."""
        from checkpoints import STAGED

        if self._running:
            return False
        if any(f"base:{m}" not in self._base_done for m in self.models_with_sources):
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

        target = EvalTarget.base(model)
        try:
            failures = await self._evaluate(target)
            if failures:
                raise RuntimeError(failures)
            # The summary and the finished record in one writer call: a coordinator killed in between
            # cannot leave one without the other.
            await self.writer.finish_target.remote(target, None, fingerprint=self.fingerprint)
            self._base_done.add(target.id)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - retried on the next pass
            self.last_error = f"base {model}: {type(e).__name__}: {e}"
            log.warning("evaluating base model %s failed: %s", model, e)
            await asyncio.sleep(self.cfg.retry_backoff_s)

    async def _evaluate_checkpoint(self, entry: Any) -> None:
        from evaluators import EvalTarget

        ck = entry.checkpoint
        target = EvalTarget.of_checkpoint(ck, self.cfg.source(ck.source).model)
        from cluster._budgets import BudgetLimiter

        async with BudgetLimiter(self.budgets, "checkpoints", self.holder):
            try:
                await self.writer.mark_evaluating.remote(ck.id)
                failures = await self._evaluate(target)
                if failures:
                    await self.writer.record_failure.remote(ck.id, failures)
                    return
                await self.writer.finish_target.remote(target, ck.id)
                self.evaluated += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - recorded; the checkpoint is retried later
                self.last_error = f"{ck.id}: {type(e).__name__}: {e}"
                log.warning("evaluating %s failed: %s", ck.id, e)
                await self.writer.record_failure.remote(ck.id, f"{type(e).__name__}: {e}")

    async def _evaluate(self, target: Any) -> str | None:
        """Run every probe of the target; returns a failure reason if some samples could not be made."""
        from cluster._budgets import BudgetLimiter
        from cluster._metrics import metrics
        from cluster._writer import WriterStore
        from deployments import ServeTextModel
        from evaluators import run_eval

        m = metrics()
        done = await self.writer.sample_keys.remote(target.id)
        store = WriterStore(self.writer, target, done)
        model = ServeTextModel(target.model)
        judge = self.plan.open_judge(ServeTextModel(self.plan.judge.model)) if self.plan.judge else None

        def progress(p: Any) -> None:
            res = p.last
            if res is None:
                return
            tags = {"model": target.model}
            m.samples_done.inc(tags={**tags, "outcome": "ok" if res.complete else "failed"})
            if res.complete and res.latency_s:
                m.generation_latency.observe(res.latency_s, tags=tags)
                toks = (res.usage or {}).get("completion_tokens", 0)
                if toks:
                    m.engine_tokens_per_s.set(toks / res.latency_s, tags=tags)
            if res.judge_latency_s and judge is not None:
                m.judge_latency.observe(res.judge_latency_s, tags={"model": judge.name})
            m.samples_in_flight.set(p.in_flight, tags=tags)

        t0 = time.perf_counter()
        report = await run_eval(
            {target.model: model},
            [target],
            judge=judge,
            concurrency={target.model: BudgetLimiter(self.budgets, f"gen:{target.model}", self.holder)},
            judge_concurrency=(BudgetLimiter(self.budgets, f"judge:{judge.name}", self.holder)
                               if judge is not None else None),
            workers=self.cfg.budgets.per_endpoint + (self.cfg.budgets.judge if judge is not None else 0),
            store=store,
            progress=progress,
            **self.plan.run_args(),
        )
        m.samples_in_flight.set(0, tags={"model": target.model})
        log.info("%s: %d samples (%d resumed) in %.1fs", target.id, report.total - report.skipped,
                 report.skipped, time.perf_counter() - t0)
        if report.generation_failures:
            first = next((r.failures["generate"]["error"] for r in report.results if "generate" in r.failures), "")
            return f"{report.generation_failures} of {report.total} answers could not be generated: {first}"
        return None


def coordinator_actor(app_cfg: Any) -> Any:
    import ray

    data = app_cfg.model_dump(mode="json")
    path = str(app_cfg.source_path) if app_cfg.source_path else None
    return (
        ray.remote(EvalCoordinator)
        .options(name=COORDINATOR_NAME, get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=0,
                 max_concurrency=1000)
        .remote(data, path)
    )

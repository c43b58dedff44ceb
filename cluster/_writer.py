"""The watch job's single result writer: the one process that writes the ledger, as a Ray actor.

The results path itself (samples into the ledger, their InfluxDB points through the spool, owed
points, summaries, rebuild) is `evaluators.results.ResultRecorder`; this actor hosts one, adds
the checkpoint state changes the watchers and the coordinator make, and counts them in Ray's
dashboard metrics. Other actors reach it through `LedgerClient` (the ledger's methods, async)
and record a target's samples through `WriterStore` (the runner's store).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Iterable, Mapping

from checkpoints import Checkpoint, LedgerEntry, one_line
from cluster._plan import build_plan
from cluster.config import AppConfig, open_ledger
from evaluators import EvalTarget
from evaluators.results import ResultRecorder, register_probe_sets

log = logging.getLogger(__name__)

WRITER_NAME = "evalcluster-writer"


class ResultWriter:
    """Hosted as a named actor (max_concurrency=1: one writer, calls in order); `evalcluster
    influx rebuild` and `evalcluster eval` use it in their own process.

    Args:
        cfg: the app config.
        job_id: the Ray job this writer records for: the ledger is locked for it while it is open
            (None: no lock; `eval` and `influx rebuild` write beside a running job).
        recover: this is the cluster's writer: it sends the points that writers which are gone
            left owed. False for a one-shot process beside a running job: it sends only its own.
    """

    def __init__(self, cfg: AppConfig, job_id: str | None = None, *, recover: bool = True) -> None:
        self.cfg = cfg
        self.job_id = job_id
        # Checkpoints a dead coordinator left `evaluating` go back to `staged` when the next
        # coordinator's life starts (EvalCoordinator.ensure_running), never here: a writer restarted
        # mid-run must not take checkpoints from the coordinator evaluating them.
        self.ledger = open_ledger(self.cfg)
        if job_id is not None:
            from cluster.runtime import ray_job_running

            try:
                self.ledger.lock_for_job(job_id, ray_job_running)
            except BaseException:
                self.ledger.close()
                raise
        # Points name each probe by its place in its set: the plan's sets (a user's file included).
        register_probe_sets(build_plan(cfg).probe_sets)
        self.metrics = _Metrics(job_id or "-")
        self.recorder = ResultRecorder(self.ledger, self.cfg.sinks, take_over=recover, observer=self.metrics,
                                       source_models={s.name: s.model for s in self.cfg.sources})
        self.sink = self.recorder.sink
        self.report = _ReportWarmer(cfg)

    # ------------------------------------------------------------- checkpoints

    def upsert_many(self, checkpoints: list[Checkpoint], now: float | None = None) -> list[LedgerEntry]:
        """Ledger.upsert_many, counting the checkpoints new to the ledger as discovered."""
        before = {c.id for c in checkpoints if self.ledger.get(c.id) is not None}
        entries = self.ledger.upsert_many(checkpoints, now=now)
        for c in checkpoints:
            if c.id not in before:
                self.metrics.discovered(c.source, c.run)
        return entries

    def mark_staged(self, id: str, local_path: str, sha256: str | None = None, now: float | None = None) -> LedgerEntry:
        """Ledger.mark_staged."""
        return self.ledger.mark_staged(id, local_path, sha256=sha256, now=now)

    def mark_evaluating(self, id: str, now: float | None = None) -> LedgerEntry:
        """Ledger.mark_evaluating."""
        return self.ledger.mark_evaluating(id, now=now)

    def record_failure(self, id: str, reason: str, permanent: bool = False, now: float | None = None) -> LedgerEntry:
        """Ledger.record_failure, counted."""
        entry = self.ledger.record_failure(id, reason, permanent=permanent, now=now)
        self.metrics.failed(entry.checkpoint.source, entry.checkpoint.run, entry.state)
        return entry

    def return_to_staged(self, id: str, reason: str) -> LedgerEntry:
        """Ledger.return_to_staged."""
        return self.ledger.return_to_staged(id, reason)

    def unstage(self, id: str, reason: str) -> LedgerEntry:
        """Ledger.unstage."""
        return self.ledger.unstage(id, reason)

    def reopen_stale(self, base: EvalTarget) -> list[str]:
        """Evaluate again every scored checkpoint of `base`'s model whose results were made on
        another engine than the one that serves it now (its weights, engine or settings changed
        behind the same name): they go back to `staged`. Returns their ids.

        Args:
            base: the model's base target, identified from its engine now.
        """
        from checkpoints import SCORED
        from evaluators import engine_signature

        now = engine_signature({"provenance": {"identity_parts": base.identity_parts}})
        sources = {s.name for s in self.cfg.sources if s.model == base.model}
        scored = [e for e in self.ledger.list(state=SCORED) if e.checkpoint.source in sources]
        newest = self.ledger.newest_samples(e.id for e in scored)
        stale = []
        for e in scored:
            was = engine_signature(newest[e.id]) if e.id in newest else ""
            if now and was and was != now:  # a record older than content identity has no engine to compare
                self.ledger.reopen(e.id, f"evaluated again: model {base.model!r} is served by another engine "
                                         "(base weights, engine or settings) than its results were made on")
                stale.append(e.id)
        return stale

    def retry(self, id: str, now: float | None = None) -> LedgerEntry:
        """Ledger.retry."""
        return self.ledger.retry(id, now=now)

    def due(self, state: str, now: float | None = None, limit: int | None = None) -> list[LedgerEntry]:
        """Ledger.due."""
        return self.ledger.due(state, now=now, limit=limit)

    def known_digests(self, source: str) -> dict[tuple[str, int, float], str]:
        """Ledger.known_digests."""
        return self.ledger.known_digests(source)

    def get(self, id: str) -> LedgerEntry | None:
        """Ledger.get."""
        return self.ledger.get(id)

    def list(self, source: str | None = None, run: str | None = None, state: str | None = None) -> list[LedgerEntry]:
        """Ledger.list."""
        return self.ledger.list(source=source, run=run, state=state)

    def counts(self) -> dict[str, int]:
        """Ledger.counts."""
        return self.ledger.counts()

    def run_counts(self) -> dict[str, Any]:
        """The ledger's path and, per run, checkpoints per state (`evalcluster status`)."""
        runs: dict[str, dict[str, int]] = {}
        for e in self.ledger.list():
            states = runs.setdefault(e.checkpoint.run, {})
            states[e.state] = states.get(e.state, 0) + 1
        return {"ledger": str(self.ledger.path), "runs": runs}

    def return_evaluating(self) -> int:
        """Put checkpoints left `evaluating` (a stopped or dead coordinator's) back to `staged`."""
        return self.ledger.recover()

    # ------------------------------------------------------------- results (the recorder's)

    def sample_keys(self, target: str) -> set[str]:
        """ResultRecorder.sample_keys."""
        return self.recorder.sample_keys(target)

    def samples(self, target: str) -> list[dict[str, Any]]:
        """ResultRecorder.samples."""
        return self.recorder.samples(target)

    def finished_targets(self) -> dict[str, str]:
        """ResultRecorder.finished_targets."""
        return self.recorder.finished_targets()

    def record_samples(self, records: list[dict[str, Any]], target: EvalTarget) -> int:
        """ResultRecorder.record_samples: the samples in the ledger, their points to the sink."""
        return self.recorder.record_samples(records, target)

    def finish_target(self, target: EvalTarget, checkpoint_id: str | None,
                      fingerprint: str | None = None) -> dict[str, Any]:
        """ResultRecorder.finish_target: the summary points; the checkpoint scored; then its run's
        report figures computed and kept (`warm_report`, in a thread of their own), so a report
        of a long run reads them."""
        summary = self.recorder.finish_target(target, checkpoint_id, fingerprint)
        entry = self.ledger.get(checkpoint_id) if checkpoint_id is not None else None
        if entry is not None:
            self.report.warm(entry.checkpoint.run)
        return summary

    def flush(self, timeout: float | None = 30) -> bool:
        """ResultRecorder.flush."""
        return self.recorder.flush(timeout)

    def rebuild(self, run: str | None = None) -> dict[str, int]:
        """ResultRecorder.rebuild."""
        return self.recorder.rebuild(run)

    def sink_stats(self) -> dict[str, Any]:
        """ResultRecorder.sink_stats."""
        return self.recorder.sink_stats()

    def close(self, timeout: float | None = 30) -> None:
        """Flush (queueing owed points as the spool makes room), close the sink and the ledger.

        Args:
            timeout: seconds for the final flush.
        """
        try:
            self.report.close()
            self.recorder.close(timeout)
        finally:
            if self.job_id is not None:
                self.ledger.unlock_job(self.job_id)
            self.ledger.close()


class _Metrics:
    """Ray dashboard metrics of the writer (it sees every state change), and the recorder's
    ResultObserver. A no-op in a process where Ray is not initialised (`evalcluster eval` and
    `influx rebuild` run without Ray). Every series names the job (`job_id`)."""

    def __init__(self, job: str) -> None:
        ray = sys.modules.get("ray")
        self.job = job
        self.m = None
        if ray is not None and ray.is_initialized():
            from cluster._metrics import metrics

            self.m = metrics()

    def discovered(self, source: str, run: str) -> None:
        """A checkpoint new to the ledger."""
        if self.m is not None:
            self.m.checkpoints_discovered.inc(tags={"job_id": self.job, "source": source, "run": run})

    def scored(self, source: str, run: str) -> None:
        """A checkpoint scored (ResultObserver)."""
        if self.m is not None:
            self.m.checkpoints_scored.inc(tags={"job_id": self.job, "source": source, "run": run})

    def failed(self, source: str, run: str, state: str) -> None:
        """A checkpoint failure (state: failed or quarantined)."""
        if self.m is not None:
            self.m.checkpoints_failed.inc(tags={"job_id": self.job, "source": source, "run": run, "state": state})

    def adapter_effect(self, run_id: str, effect: Mapping[str, Any]) -> None:
        """A finished checkpoint's answers compared with the base's (ResultObserver)."""
        if self.m is not None:
            self.m.adapter_no_effect.set(1.0 if effect["no_effect"] else 0.0, tags={"job_id": self.job, "run": run_id})

    def last_scores(self, run_id: str, summary: Mapping[str, Mapping[str, Any]]) -> None:
        """A finished target's scores (ResultObserver): the run's last LEK, pass rate, exact rate,
        multiple-choice accuracy and bits per byte."""
        if self.m is None:
            return
        for name, gauge in (("heuristic.lek_score", self.m.last_lek), ("capability.passed", self.m.last_accuracy),
                            ("exact.correct", self.m.last_exact), ("choice.acc", self.m.last_choice),
                            ("bpb.bits_per_byte", self.m.last_bits_per_byte)):
            if name in summary and summary[name].get("mean") is not None:
                gauge.set(float(summary[name]["mean"]), tags={"job_id": self.job, "run": run_id})


class _ReportWarmer:
    """Computes and keeps runs' report figures (`warm_report`) in a thread of its own, on a read-only
    ledger connection, so the writer goes on taking samples meanwhile: after a base model's samples
    change, a run of 1,000 checkpoints takes over a minute to compare them all again. A run asked
    for again while it waits is computed once; what is left at close is left to the next report
    (which computes what it misses).

    Args:
        cfg: the app config (its ledger).
    """

    def __init__(self, cfg: AppConfig) -> None:
        self.cfg = cfg
        self._pending: dict[str, None] = {}  # runs to compute, in the order asked
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._busy = False  # a run is being computed
        self.done = 0
        """Runs computed so far (for tests and logs)."""

    def warm(self, run: str) -> None:
        """Compute and keep the run's figures soon."""
        with self._cv:
            if self._closed:
                return
            self._pending[run] = None
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="report-warmer", daemon=True)
                self._thread.start()
            self._cv.notify()

    def wait(self, timeout: float = 60) -> bool:
        """Wait until nothing is pending or being computed; whether that happened in time."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def _loop(self) -> None:
        from cluster._report import warm_report

        ledger = open_ledger(self.cfg, readonly=True)
        try:
            while True:
                with self._cv:
                    while not self._pending and not self._closed:
                        self._cv.wait()
                    if self._closed:
                        return
                    run = next(iter(self._pending))
                    del self._pending[run]
                    self._busy = True
                t0 = time.perf_counter()
                try:
                    warm_report(ledger, run)
                except Exception as e:  # noqa: BLE001 - the report computes what it misses; never fail the writer
                    log.warning("report figures of run %s not kept: %s", run, one_line(str(e)))
                log.debug("report figures of run %s in %.2fs", run, time.perf_counter() - t0)
                with self._cv:
                    self._busy = False
                    self.done += 1
                    self._cv.notify_all()
        finally:
            ledger.close()

    def close(self, timeout: float = 10) -> None:
        """Stop taking runs; wait up to `timeout` for the one being computed."""
        with self._cv:
            self._closed = True
            self._pending.clear()
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)


def writer_actor(cfg: AppConfig) -> Any:
    """The job's result writer, `evalcluster-writer:<job id>`, on the state node where the ledger is
    (a restarted writer comes back there and recovers from the ledger). It locks the ledger for the
    job (`Ledger.lock_for_job`): a second job on the same ledger is refused."""
    from cluster.runtime import current_job_id, job_actor, job_scoped, state_placement

    return job_actor(ResultWriter, job_scoped(WRITER_NAME), state_placement(cfg.cluster), cfg, current_job_id(),
                     max_task_retries=3, max_concurrency=1)


def job_writer(job_id: str | None = None) -> Any:
    """The handle of a job's writer (default: this job's), looked up by name. The job's other actors
    take it this way rather than as a constructor argument: Ray keeps a handle passed to a
    constructor in the object store, where a restarted actor may not find it again (Ray issue 53727)."""
    import ray

    from cluster.runtime import job_scoped

    return ray.get_actor(job_scoped(WRITER_NAME, job_id))


class LedgerClient:
    """The ledger as seen from another actor: the writer's methods, async."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.writer, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await method.remote(*args, **kwargs)

        return call


class WriterStore:
    """The runner's SampleStore for one target, recording through the writer actor (keys fetched
    up front; each record call is queued on the actor, whose calls run in order).

    Args:
        writer: the writer actor's handle.
        target: the target evaluated.
        done_keys: the keys recorded for it so far (`writer.sample_keys`).
    """

    def __init__(self, writer: Any, target: EvalTarget, done_keys: Iterable[str]) -> None:
        self.writer, self.target = writer, target
        self._done = set(done_keys)

    def sample_keys(self, target: str) -> set[str]:
        """The keys recorded for this store's target (none for another)."""
        return set(self._done) if target == self.target.id else set()

    def record_samples(self, records: list[dict[str, Any]]) -> Any:
        """Queue the records on the writer; returns its ObjectRef."""
        self._done.update(r["key"] for r in records)
        return self.writer.record_samples.remote(records, self.target)

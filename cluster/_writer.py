"""The single result writer: the one process that writes the ledger, and the owner of the sinks.

Every other actor reaches the ledger through `LedgerClient` (async calls to this actor). The
ledger is the source of truth: InfluxDB points are derived from what is recorded, written in the
same call, and spooled to disk if InfluxDB does not acknowledge them.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

from checkpoints import Checkpoint, Ledger, LedgerEntry
from cluster._points import TargetInfo, sample_points, summary_points

log = logging.getLogger("evalcluster.writer")
WRITER_NAME = "evalcluster-writer"


class ResultWriter:
    """Hosted as a named actor (max_concurrency=1: one writer, calls in order).

    Args:
        app_cfg: the AppConfig as a mapping (validated again here).
        config_path: the file it came from (relative paths resolve against it).
    """

    def __init__(self, app_cfg: Mapping[str, Any], config_path: str | None = None) -> None:
        from pathlib import Path

        from cluster.config import parse_config
        from evaluators.sinks import open_sink

        self.cfg = parse_config(dict(app_cfg), config_path or "config", Path(config_path) if config_path else None)
        path = self.cfg.resolve(self.cfg.sinks.ledger)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(path, max_attempts=self.cfg.max_attempts, backoff_s=self.cfg.retry_backoff_s)
        self.recovered = self.ledger.recover()  # checkpoints a dead coordinator left `evaluating`
        self.sink = open_sink(self.cfg)
        self.timestamps = self.cfg.sinks.influx.timestamps
        self.metrics = _Metrics()

    # ------------------------------------------------------------- checkpoints

    def upsert_many(self, checkpoints: list[Checkpoint], now: float | None = None) -> list[LedgerEntry]:
        before = {c.id for c in checkpoints if self.ledger.get(c.id) is not None}
        entries = self.ledger.upsert_many(checkpoints, now=now)
        for c in checkpoints:
            if c.id not in before:
                self.metrics.discovered(c.source, c.run)
        return entries

    def mark_staged(self, id: str, local_path: str, sha256: str | None = None, now: float | None = None) -> LedgerEntry:
        return self.ledger.mark_staged(id, local_path, sha256=sha256, now=now)

    def mark_evaluating(self, id: str, now: float | None = None) -> LedgerEntry:
        return self.ledger.mark_evaluating(id, now=now)

    def record_failure(self, id: str, reason: str, permanent: bool = False, now: float | None = None) -> LedgerEntry:
        entry = self.ledger.record_failure(id, reason, permanent=permanent, now=now)
        self.metrics.failed(entry.checkpoint.source, entry.checkpoint.run, entry.state)
        return entry

    def retry(self, id: str, now: float | None = None) -> LedgerEntry:
        return self.ledger.retry(id, now=now)

    def due(self, state: str, now: float | None = None, limit: int | None = None) -> list[LedgerEntry]:
        return self.ledger.due(state, now=now, limit=limit)

    def known_digests(self, source: str) -> dict:
        return self.ledger.known_digests(source)

    def get(self, id: str) -> LedgerEntry | None:
        return self.ledger.get(id)

    def list(self, source: str | None = None, run: str | None = None, state: str | None = None) -> list[LedgerEntry]:
        return self.ledger.list(source=source, run=run, state=state)

    def counts(self) -> dict[str, int]:
        return self.ledger.counts()

    def recovered_count(self) -> int:
        return self.recovered

    # ------------------------------------------------------------- samples

    def sample_keys(self, target: str) -> set[str]:
        return self.ledger.sample_keys(target)

    def return_evaluating(self) -> int:
        """Put checkpoints left `evaluating` (a stopped or dead coordinator's) back to `staged`."""
        return self.ledger.recover()

    def record_samples(self, records: list[dict[str, Any]], info: TargetInfo) -> int:
        """Record samples (idempotent by key) and send their points, in one call."""
        n = self.ledger.record_samples(records)
        points = [p for r in records for p in sample_points(r, info, self.timestamps)]
        if points:
            self._write(points)
        return n

    def finish_target(self, info: TargetInfo, checkpoint_id: str | None) -> dict[str, Any]:
        """All samples of a target are in: write its summary points, mark the checkpoint scored."""
        from evaluators import aggregate

        records = self.ledger.samples(info.target)
        self._write(summary_points(records, info, self.timestamps))
        if checkpoint_id is not None:
            entry = self.ledger.mark_scored(checkpoint_id)
            self.metrics.scored(entry.checkpoint.source, entry.checkpoint.run)
        summary = {name: fs.to_dict() for g in aggregate(records, by=()) for name, fs in g.fields.items()}
        self.metrics.last_scores(info.run_id, summary)
        return summary

    def samples(self, target: str) -> list[dict[str, Any]]:
        return self.ledger.samples(target)

    # ------------------------------------------------------------- sinks

    def _write(self, points: list[Any]) -> None:
        from evaluators.sinks import SpoolFull

        try:
            self.sink.write(points)
        except SpoolFull as e:
            # The samples are in the ledger; the points can be rebuilt from it. Say so loudly.
            log.error("InfluxDB spool is full; %d points not queued (rebuild them from the ledger): %s",
                      len(points), e)

    def flush(self, timeout: float | None = 30) -> bool:
        return self.sink.flush(timeout=timeout)

    def sink_stats(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self.sink.stats)

    def close(self) -> None:
        self.sink.close()
        self.ledger.close()


class _Metrics:
    """Ray dashboard metrics the writer records (it sees every state change)."""

    def __init__(self) -> None:
        from cluster._metrics import metrics

        self.m = metrics()

    def discovered(self, source: str, run: str) -> None:
        self.m.checkpoints_discovered.inc(tags={"source": source, "run": run})

    def scored(self, source: str, run: str) -> None:
        self.m.checkpoints_scored.inc(tags={"source": source, "run": run})

    def failed(self, source: str, run: str, state: str) -> None:
        self.m.checkpoints_failed.inc(tags={"source": source, "run": run, "state": state})

    def last_scores(self, run_id: str, summary: Mapping[str, Mapping[str, Any]]) -> None:
        for name, gauge in (("heuristic.lek_score", self.m.last_lek), ("capability.passed", self.m.last_accuracy),
                            ("exact.correct", self.m.last_exact)):
            if name in summary and summary[name].get("mean") is not None:
                gauge.set(float(summary[name]["mean"]), tags={"run": run_id})


def writer_actor(app_cfg: Any) -> Any:
    """The job's result writer (one per cluster; a restarted writer recovers from the ledger)."""
    import ray

    data = app_cfg.model_dump(mode="json")
    path = str(app_cfg.source_path) if app_cfg.source_path else None
    return (
        ray.remote(ResultWriter)
        .options(name=WRITER_NAME, get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=3,
                 max_concurrency=1)
        .remote(data, path)
    )


class LedgerClient:
    """The ledger as seen from another actor: the Ledger's methods, async, through the writer."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.writer, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await method.remote(*args, **kwargs)

        return call


class WriterStore:
    """The runner's SampleStore for one target, backed by the writer (keys fetched up front)."""

    def __init__(self, writer: Any, info: TargetInfo, done_keys: Iterable[str]) -> None:
        self.writer, self.info = writer, info
        self._done = set(done_keys)

    def sample_keys(self, target: str) -> set[str]:
        return set(self._done) if target == self.info.target else set()

    def record_samples(self, records: list[dict[str, Any]]) -> Any:
        self._done.update(r["key"] for r in records)
        return self.writer.record_samples.remote(records, self.info)

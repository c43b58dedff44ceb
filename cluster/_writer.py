"""The single result writer: the one process that writes the ledger, and the owner of the sinks.

Every other actor reaches the ledger through `LedgerClient` (async calls to this actor);
`evalcluster eval` uses the same class in its own process (`LocalWriterStore`). The ledger is
the source of truth: InfluxDB points are derived from what is recorded, written in the same
call, and spooled to disk if InfluxDB does not acknowledge them.

Nothing is lost when the spool is full (or the disk refuses it): before the points of a call go
to the spool the ledger marks them owed (`Ledger.owe_points`), and the mark is cleared once the
spool holds them. Owed points are re-derived from the ledger and queued again on the writer's
next calls and on `flush()`, once the spool has room; `rebuild()` (`evalcluster influx rebuild`)
re-derives every point. A derived point is always the same point (see cluster/_points.py), so
sending it again overwrites rather than duplicates.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Iterable, Mapping

from checkpoints import Checkpoint, LedgerEntry
from cluster._points import TargetInfo, base_info, derive_info, sample_points, summary_points

log = logging.getLogger("evalcluster.writer")
WRITER_NAME = "evalcluster-writer"
SUMMARY_KEY = "*summary"  # the owed entry of a target's summary points (sample keys contain '#')
_CHUNK = 256  # owed entries re-derived and queued per spool write
_RETRY_S = 1.0  # after the spool refused owed points, calls wait this long before trying again


def _owner_alive(owner: str) -> bool:
    """Whether the writer that marked points owed ("host:pid") still runs (then it sends them)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host's writer cannot share this SQLite file: take its entries over
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ResultWriter:
    """Hosted as a named actor (max_concurrency=1: one writer, calls in order), or used in-process
    by `evalcluster eval` (calls from several threads are serialised by a lock).

    Args:
        app_cfg: the AppConfig, or it as a mapping (validated again here).
        config_path: the file it came from (relative paths resolve against it).
        recover: this is the cluster's writer: put checkpoints a dead coordinator left
            `evaluating` back to `staged`, and send the points that writers which are gone left
            owed. False for a one-shot process beside a running job (`evalcluster eval`): it
            sends only its own.
    """

    def __init__(self, app_cfg: Any, config_path: str | None = None, *, recover: bool = True) -> None:
        from pathlib import Path

        from cluster.config import AppConfig, open_ledger, parse_config
        from evaluators.sinks import NullSink, open_sink

        if isinstance(app_cfg, AppConfig):
            self.cfg = app_cfg
        else:
            self.cfg = parse_config(dict(app_cfg), config_path or "config",
                                    Path(config_path) if config_path else None)
        self.ledger = open_ledger(self.cfg)
        # checkpoints a dead coordinator left `evaluating` (never from beside a running job)
        self.recovered = self.ledger.recover() if recover else 0
        self.sink = open_sink(self.cfg.sinks)
        self.timestamps = self.cfg.sinks.influx.timestamps
        self.metrics = _Metrics()
        self._lock = threading.RLock()
        self._tracked = not isinstance(self.sink, NullSink)  # no InfluxDB: no points to owe
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        self._take_over = recover
        self._noted: set[str] = set()
        self._underivable: set[str] = set()
        self._refusing = False
        self._retry_at = 0.0
        self._last_sent = 0  # points the last _send_owed queued
        self._owed = self._tracked and self.ledger.count_points_owed() > 0

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
        """Record samples (idempotent by key) and send their points, in one call.

        Args:
            records: SampleResult records.
            info: their target's InfluxDB naming.
        """
        with self._lock:
            self._send_owed()
            self._note(info)
            keys = [r["key"] for r in records if isinstance(r, dict) and isinstance(r.get("key"), str)]
            if self._tracked:
                self.ledger.owe_points(info.target, keys, self._owner)  # cleared once the spool has them
            n = self.ledger.record_samples(records)
            points = [p for r in records for p in sample_points(r, info, self.timestamps)]
            self._queue(points, info.target, keys)
            return n

    def finish_target(self, info: TargetInfo, checkpoint_id: str | None,
                      fingerprint: str | None = None) -> dict[str, Any]:
        """All samples of a target are in: write its summary points, mark the checkpoint scored.

        Args:
            info: the target's InfluxDB naming.
            checkpoint_id: its checkpoint (None for a base model or an `eval` target).
            fingerprint: record the target finished with this evaluation set-up, in the same
                call (a base model is then not evaluated again until the set-up changes).
        """
        from evaluators import aggregate

        with self._lock:
            self._send_owed()
            records = self.ledger.samples(info.target)
            if self._tracked:
                self.ledger.owe_points(info.target, [SUMMARY_KEY], self._owner)
            self.ledger.note_point_target(info.target, info.to_dict(), finished=True)
            self._noted.add(info.target)
            self._queue(summary_points(records, info, self.timestamps), info.target, [SUMMARY_KEY])
            if checkpoint_id is not None:
                entry = self.ledger.mark_scored(checkpoint_id)
                self.metrics.scored(entry.checkpoint.source, entry.checkpoint.run)
            if fingerprint is not None:
                self.ledger.mark_finished(info.target, fingerprint)
        summary = {name: fs.to_dict() for g in aggregate(records, by=()) for name, fs in g.fields.items()}
        self.metrics.last_scores(info.run_id, summary)
        return summary

    def samples(self, target: str) -> list[dict[str, Any]]:
        return self.ledger.samples(target)

    def finished_targets(self) -> dict[str, str]:
        """Targets recorded finished, with the fingerprint of the set-up they were finished with."""
        return self.ledger.finished()

    # ------------------------------------------------------------- sinks

    def _note(self, info: TargetInfo) -> None:
        """Record the target's naming once per writer life (`rebuild` and owed points need it)."""
        if info.target not in self._noted:
            self.ledger.note_point_target(info.target, info.to_dict())
            self._noted.add(info.target)

    def _queue(self, points: list[Any], target: str, keys: list[str]) -> None:
        """Put points in the spool; their owed entries are cleared once it holds them, and stay
        (to be re-derived later) if it refuses them."""
        from evaluators.sinks import SpoolError

        try:
            if points:
                self.sink.write(points)
        except SpoolError as e:  # full (SpoolFull), or the disk refused the write
            self._owed = True
            self._retry_at = time.monotonic() + _RETRY_S
            if not self._refusing:
                log.error("InfluxDB spool refused %d points of %s (%s); the ledger keeps them owed and they are "
                          "re-derived and sent when the spool has room (or by `evalcluster influx rebuild`)",
                          len(points), target, e)
            self._refusing = True
            return
        if self._tracked:
            self.ledger.settle_points(target, keys)

    def _mine(self, owner: str) -> bool:
        return owner == self._owner or (self._take_over and not _owner_alive(owner))

    def _send_owed(self, force: bool = False) -> int:
        """Re-derive the points this writer owes and queue them, as far as the spool takes them.

        Args:
            force: try even if the spool had no room a moment ago (flush does).

        Returns:
            how many owed entries of this writer are left (0: nothing owed).
        """
        if not self._owed:
            return 0
        if not force and time.monotonic() < self._retry_at:
            return -1  # the spool was full just now: do not re-derive on every call of an outage
        from evaluators.sinks import SpoolError

        by_target: dict[str, list[tuple[str, int]]] = {}
        for row in self.ledger.points_owed():
            if row["target"] not in self._underivable and self._mine(row["owner"]):
                by_target.setdefault(row["target"], []).append((row["key"], int(row["done"])))
        noted = self.ledger.point_targets() if by_target else {}
        total = sum(len(k) for k in by_target.values())
        settled = skipped = 0
        self._last_sent = 0
        for target, entries in by_target.items():
            i = 0
            try:
                records = {r["key"]: r for r in self.ledger.samples(target)}
                info = (TargetInfo.from_dict(noted[target]["info"]) if target in noted
                        else self._derived_info(target, list(records.values())))
                step = _CHUNK
                while i < len(entries):
                    chunk = entries[i:i + step]
                    points = [p for key, done in chunk for p in self._points_for(key, info, records)[done:]]
                    try:
                        if points:
                            self.sink.write(points)
                    except SpoolError:
                        if step > 1:
                            step = max(1, step // 4)
                            continue
                        # One entry whose points do not fit the room there is: queue what fits, and
                        # record how far, so the rest is sent later and the first part never twice.
                        key, done = chunk[0]
                        n = self._write_part(points)
                        self._last_sent += n
                        if n < len(points):
                            if n:
                                self.ledger.advance_points(target, key, done + n)
                            self._retry_at = time.monotonic() + _RETRY_S
                            return total - settled - skipped  # no more room; a later call goes on
                        points = []
                    self.ledger.settle_points(target, [k for k, _ in chunk])
                    settled += len(chunk)
                    i += len(chunk)
                    self._last_sent += len(points)
            except ValueError as e:  # a probe set that changed, a bad record: say so once, keep the entries
                self._underivable.add(target)
                skipped += len(entries) - i
                log.error("cannot re-derive the owed points of %s from the ledger (%s); they stay owed for "
                          "`evalcluster influx rebuild`", target, e)
        self._owed = False
        if self._refusing:
            log.warning("the InfluxDB spool has room again: every owed point was re-derived from the ledger and queued")
        self._refusing = False
        return 0

    def _write_part(self, points: list[Any]) -> int:
        """Queue as many of `points`, from the first, as the spool takes; returns how many."""
        from evaluators.sinks import SpoolError

        done, size = 0, max(1, len(points))
        while done < len(points):
            part = points[done:done + size]
            try:
                self.sink.write(part)
            except SpoolError:
                if size == 1:
                    break
                size = max(1, size // 2)
                continue
            done += len(part)
        return done

    def _points_for(self, key: str, info: TargetInfo, records: Mapping[str, Mapping[str, Any]]) -> list[Any]:
        """The points of one owed entry, derived from the ledger (always in the same order)."""
        if key == SUMMARY_KEY:
            return summary_points(list(records.values()), info, self.timestamps)
        if key in records:
            return sample_points(records[key], info, self.timestamps)
        return []  # never recorded (the call that owed it failed before): nothing to send

    def _derived_info(self, target: str, records: list[Mapping[str, Any]]) -> TargetInfo:
        """The naming of a target whose naming was never noted (a ledger older than the note)."""
        entry = self.ledger.get(target)
        if entry is None:
            if target.startswith("base:"):
                return base_info(target, target.split(":", 1)[1])
            return derive_info(target, records)
        try:
            model = self.cfg.source(entry.checkpoint.source).model
        except Exception:  # noqa: BLE001 - the source left the config; the model tag usually names it
            model = None
        return derive_info(target, records, entry.checkpoint, model)

    def flush(self, timeout: float | None = 30) -> bool:
        """Deliver what was written, and queue (then deliver) what is owed as the spool makes room.

        Args:
            timeout: seconds at most (None: as long as InfluxDB keeps answering).

        Returns:
            True when everything is acknowledged and nothing is owed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def left_s() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        with self._lock:
            if self._tracked and not self._owed and self.ledger.count_points_owed():
                self._owed = True  # left by another writer (a dead one, or an earlier eval)
            owed = self._send_owed(force=True)
            ok = self.sink.flush(timeout=left_s())
            while owed and ok:
                owed = self._send_owed(force=True)  # delivery made room
                ok = self.sink.flush(timeout=left_s())
                if owed and not self._last_sent:
                    break  # no progress although the spool was delivered
            return ok and not owed

    def rebuild(self, run: str | None = None) -> dict[str, int]:
        """Re-derive every point of the ledger (or of one run) and queue it through the sink.

        The points are the ones first written (same measurement, tags and timestamp), so InfluxDB
        overwrites rather than duplicates them. Summaries are written for targets that were
        finished. The owed entries of the targets rebuilt are cleared.

        Args:
            run: a run directory or run id (as `evalcluster report` takes it); None for all.

        Returns:
            {"targets", "samples", "points"} rebuilt.

        Raises:
            ValueError: no such run in the ledger.
            SpoolError: the spool stays full because InfluxDB does not take its points (run it
                again later; what was queued is sent meanwhile).
        """
        from evaluators.sinks import SpoolError

        with self._lock:
            noted = self.ledger.point_targets()
            entries = {e.id: e for e in self.ledger.list()}
            finished = self._finished_fallback(entries)
            plan: list[tuple[str, TargetInfo, bool, list[dict[str, Any]]]] = []
            known: set[str] = set()
            for t in self.ledger.targets():
                target = t["target"]
                records = self.ledger.samples(target)
                info = (TargetInfo.from_dict(noted[target]["info"]) if target in noted
                        else self._derived_info(target, records))
                entry = entries.get(target)
                names = {info.run_id} | ({entry.checkpoint.run, entry.checkpoint.run_id} if entry else set())
                known |= names
                if run is not None and run not in names:
                    continue
                done = noted[target]["finished"] if target in noted else target in finished
                plan.append((target, info, done, records))
            if run is not None and not plan:
                raise ValueError(f"no run {run!r} in the ledger {self.ledger.path} "
                                 f"(known: {', '.join(sorted(known)) or 'none'})")
            out = {"targets": 0, "samples": 0, "points": 0}
            stalled = False  # the last write took nothing although the spool had just been delivered
            for target, info, done, records in plan:
                points = [p for r in records for p in sample_points(r, info, self.timestamps)]
                if done:
                    points += summary_points(records, info, self.timestamps)
                i = 0
                while i < len(points):
                    chunk = points[i:i + _CHUNK]
                    n = self._write_part(chunk)
                    i += n
                    out["points"] += n
                    if n < len(chunk):
                        # The spool is full: make room by delivering what is queued. If InfluxDB does not
                        # take it, stop here (nothing is lost: the ledger still has every sample).
                        if not self.sink.flush(timeout=self.cfg.sinks.influx.timeout_s * 3) or (stalled and not n):
                            raise SpoolError(
                                f"the spool {self.cfg.resolve(self.cfg.sinks.spool_dir)} is full and InfluxDB does "
                                f"not take its points ({self.sink.stats.last_error or 'no answer'}): "
                                f"{out['points']} points were queued (the last of {target}); run "
                                "`evalcluster influx rebuild` again when it answers")
                        stalled = not n
                    else:
                        stalled = False
                if self._tracked:
                    self.ledger.settle_points(target)
                out["targets"] += 1
                out["samples"] += len(records)
            return out

    def _finished_fallback(self, entries: Mapping[str, LedgerEntry]) -> set[str]:
        """Targets known finished without a point-target note: scored checkpoints, and the finished
        targets the ledger records (when it has that record)."""
        from checkpoints import SCORED

        done = {id for id, e in entries.items() if e.state == SCORED}
        finished = getattr(self.ledger, "finished", None)
        if callable(finished):
            done |= set(finished())
        return done

    def sink_stats(self) -> dict[str, Any]:
        from dataclasses import asdict

        out = asdict(self.sink.stats)
        out["owed"] = self.ledger.count_points_owed() if self._tracked else 0
        return out

    def close(self, timeout: float | None = 30) -> None:
        """Flush (queueing owed points as the spool makes room), close the sink and the ledger.

        Args:
            timeout: seconds for the final flush.
        """
        with self._lock:
            try:
                self.flush(timeout)
            finally:
                self.sink.close(timeout=timeout)
                self.ledger.close()


class _Metrics:
    """Ray dashboard metrics the writer records (it sees every state change). A no-op in a process
    where Ray is not initialised (`evalcluster eval` starts without Ray)."""

    def __init__(self) -> None:
        ray = sys.modules.get("ray")
        self.m = None
        if ray is not None and ray.is_initialized():
            from cluster._metrics import metrics

            self.m = metrics()

    def discovered(self, source: str, run: str) -> None:
        if self.m is not None:
            self.m.checkpoints_discovered.inc(tags={"source": source, "run": run})

    def scored(self, source: str, run: str) -> None:
        if self.m is not None:
            self.m.checkpoints_scored.inc(tags={"source": source, "run": run})

    def failed(self, source: str, run: str, state: str) -> None:
        if self.m is not None:
            self.m.checkpoints_failed.inc(tags={"source": source, "run": run, "state": state})

    def last_scores(self, run_id: str, summary: Mapping[str, Mapping[str, Any]]) -> None:
        if self.m is None:
            return
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


class LocalWriterStore:
    """The runner's SampleStore for one target, backed by a ResultWriter in this process (what
    `evalcluster eval` records through: ledger rows and InfluxDB points, as the watch job's).

    Args:
        writer: the in-process ResultWriter.
        info: the target's InfluxDB naming.
    """

    def __init__(self, writer: ResultWriter, info: TargetInfo) -> None:
        self.writer, self.info = writer, info

    def sample_keys(self, target: str) -> set[str]:
        return self.writer.sample_keys(target)

    def record_samples(self, records: list[dict[str, Any]]) -> int:
        return self.writer.record_samples(records, self.info)

    def samples(self, target: str) -> list[dict[str, Any]]:
        return self.writer.samples(target)

"""The results path in one place: samples into the ledger, their InfluxDB points into the sink.

The ledger is the source of truth: InfluxDB points are derived from what is recorded (`_points.py`),
written in the same call, and spooled to disk if InfluxDB does not acknowledge them. Nothing is
lost when the spool is full (or the disk refuses it): the points are owed in the ledger and sent
as it makes room (`_owed.py`); `rebuild()` (`evalcluster influx rebuild`) re-derives every point.

`ResultRecorder` is a plain synchronous class: the watch job's writer actor hosts one (its calls
come one at a time), and `evalcluster eval` one in its own process (the runner's worker threads
call it through `store()`; a lock serialises them).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from typing import Any, Callable, Mapping, Protocol

from checkpoints import SCORED, Ledger, LedgerEntry, one_line
from evaluators._records import EvalTarget, current_samples
from evaluators._stats import NO_EFFECT, adapter_effect, aggregate
from evaluators.results._owed import CHUNK, OwedPoints
from evaluators.results._points import (
    Record,
    sample_points,
    summary_points,
    target_from_ledger,
    target_from_naming,
    target_naming,
)
from evaluators.sinks import Point, SinksConfig, SpoolError, open_sink, to_lines

log = logging.getLogger("evalcluster.writer")

SUMMARY_KEY = "*summary"  # the owed entry of a target's summary points (sample keys contain '#')


def _as_now(records: list[dict[str, Any]], target: EvalTarget) -> list[dict[str, Any]]:
    """The target's current samples (`current_samples`: its identity's, else its newest one's)."""
    return current_samples(records, target.identity or None)[0]


class ResultObserver(Protocol):
    """What a recorder reports as it records (the watch job's writer turns it into Ray metrics)."""

    def scored(self, source: str, run: str) -> None:
        """A checkpoint of this source and run has every sample scored and its summary written."""

    def last_scores(self, run_id: str, summary: Mapping[str, Mapping[str, Any]]) -> None:
        """A target of this run finished with these scores (field name -> FieldStats.to_dict())."""

    def adapter_effect(self, run_id: str, effect: Mapping[str, Any]) -> None:
        """A checkpoint of this run compared with its base (`evaluators.adapter_effect`)."""


class ResultRecorder:
    """Records samples in the ledger and sends their points, nothing lost and nothing twice.

    Args:
        ledger: the writable ledger (the caller opened it and closes it).
        sinks: the `sinks` section; the sink (InfluxDB through its spool, or none) is opened from it.
        source_models: source name -> its config model, to name a checkpoint whose naming was
            never noted (a ledger older than the note) and that has no model tag.
        take_over: this is the cluster's writer: also send the points that writers which are
            gone left owed. False for a one-shot process beside a running job (`evalcluster
            eval`): it sends only its own.
        observer: told when a checkpoint is scored and what a finished target scored.
    """

    def __init__(self, ledger: Ledger, sinks: SinksConfig, *, source_models: Mapping[str, str] | None = None,
                 take_over: bool = True, observer: ResultObserver | None = None) -> None:
        self.ledger = ledger
        self.sinks = sinks
        self.sink = open_sink(sinks)
        self.timestamps = sinks.influx.timestamps
        self.source_models = dict(source_models or {})
        self.observer = observer
        self.owed = OwedPoints(ledger, self.sink, take_over=take_over)
        self._lock = threading.RLock()
        self._noted: set[str] = set()

    def store(self, target: EvalTarget) -> "RecorderStore":
        """The runner's SampleStore for one target, recording through this recorder.

        Args:
            target: the target evaluated.
        """
        return RecorderStore(self, target)

    # ------------------------------------------------------------- samples

    def sample_keys(self, target: str) -> set[str]:
        """Keys of the complete samples recorded for a target (what a resumed run skips).

        Args:
            target: EvalTarget.id.
        """
        return self.ledger.sample_keys(target)

    def samples(self, target: str) -> list[dict[str, Any]]:
        """The sample records of a target.

        Args:
            target: EvalTarget.id.
        """
        return self.ledger.samples(target)

    def finished_targets(self) -> dict[str, str]:
        """Targets recorded finished, with the fingerprint of the set-up they were finished with."""
        return self.ledger.finished()

    def record_samples(self, records: list[dict[str, Any]], target: EvalTarget) -> int:
        """Record samples (idempotent by key) and send their points, in one call.

        Args:
            records: SampleResult records.
            target: their target.
        """
        with self._lock:
            self.owed.send(self._owed_points_of)
            self._note(target)
            keys = [r["key"] for r in records if isinstance(r, dict) and isinstance(r.get("key"), str)]
            self.owed.owe(target.id, keys)  # cleared once the spool has them
            n = self.ledger.record_samples(records)
            points = [p for r in records for p in sample_points(r, target, self.timestamps)]
            self.owed.queue(points, target.id, keys)
            return n

    def finish_target(self, target: EvalTarget, checkpoint_id: str | None,
                      fingerprint: str | None = None) -> dict[str, Any]:
        """All samples of a target are in: write its summary points, mark the checkpoint scored.

        Args:
            target: the target.
            checkpoint_id: its checkpoint (None for a base model or an `eval` target).
            fingerprint: record the target finished with this evaluation set-up, in the same
                call (a base model is then not evaluated again until the set-up changes).

        Returns:
            field name -> FieldStats.to_dict() over every sample of the target.
        """
        naming = target_naming(target)
        with self._lock:
            self.owed.send(self._owed_points_of)
            records = _as_now(self.ledger.samples(target.id), target)
            effect = self._adapter_effect(target, records)
            self.owed.owe(target.id, [SUMMARY_KEY])
            self.ledger.note_point_target(target.id, naming, finished=True)
            self._noted.add(target.id)
            self.owed.queue(summary_points(records, target, self.timestamps), target.id, [SUMMARY_KEY])
            if checkpoint_id is not None:
                entry = self.ledger.mark_scored(checkpoint_id)
                if self.observer is not None:
                    self.observer.scored(entry.checkpoint.source, entry.checkpoint.run)
            if fingerprint is not None:
                self.ledger.mark_finished(target.id, fingerprint)
        summary = {name: fs.to_dict() for g in aggregate(records, by=()) for name, fs in g.fields.items()}
        if self.observer is not None:
            self.observer.last_scores(str(naming["run_id"]), summary)
            if effect is not None:
                self.observer.adapter_effect(str(naming["run_id"]), effect)
        return summary

    def _adapter_effect(self, target: EvalTarget, records: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Compare an adapter target's greedy answers with its base's (same engine, same plan:
        `adapter_effect` pairs them); flag it in the ledger when none differs, clear the flag when
        one does."""
        if target.adapter is None:
            return None
        effect = adapter_effect(records, self.ledger.samples(f"base:{target.model}"))  # paired on the same engine
        if effect is not None:
            self.ledger.flag_target(target.id, NO_EFFECT if effect["no_effect"] else None, effect)
        return effect

    # ------------------------------------------------------------- naming

    def _note(self, target: EvalTarget) -> None:
        """Record the target's naming once per recorder life (`rebuild` and owed points need it)."""
        if target.id not in self._noted:
            self.ledger.note_point_target(target.id, target_naming(target))
            self._noted.add(target.id)

    def _named(self, target: str, records: list[Record], noted: Mapping[str, Mapping[str, Any]]) -> EvalTarget:
        """A recorded target as its points name it: from its noted naming, else re-derived from the
        ledger (a ledger older than the note)."""
        if target in noted:
            return target_from_naming(noted[target]["info"])
        entry = self.ledger.get(target)
        if entry is None:
            return target_from_ledger(target, records)
        return target_from_ledger(target, records, entry.checkpoint, self.source_models.get(entry.checkpoint.source))

    def _owed_points_of(self, target: str) -> Callable[[str], list[Point]]:
        """The points of each owed entry of a target, derived from the ledger (always in the same order)."""
        records = {r["key"]: r for r in self.ledger.samples(target)}
        named = self._named(target, list(records.values()), self.ledger.point_targets())

        def points_of(key: str) -> list[Point]:
            if key == SUMMARY_KEY:  # as finish_target wrote it: over the target's current samples
                return summary_points(_as_now(list(records.values()), named), named, self.timestamps)
            if key in records:
                return sample_points(records[key], named, self.timestamps)
            return []  # never recorded (the call that owed it failed before): nothing to send

        return points_of

    # ------------------------------------------------------------- delivery

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
            self.owed.notice_others()
            owed = self.owed.send(self._owed_points_of, force=True)
            ok = self.sink.flush(timeout=left_s())
            while owed and ok:
                owed = self.owed.send(self._owed_points_of, force=True)  # delivery made room
                ok = self.sink.flush(timeout=left_s())
                if owed and not self.owed.last_sent:
                    break  # no progress although the spool was delivered
            return ok and not owed

    def rebuild(self, run: str | None = None) -> dict[str, int]:
        """Re-derive every point of the ledger (or of one run) and queue it through the sink.

        The points are the ones first written (same measurement, tags and timestamp), so InfluxDB
        overwrites rather than duplicates them. Each target's current samples only
        (`evaluators.current_samples`): what an earlier identity of it answered is set aside.
        Summaries are written for targets that were finished. The owed entries of the targets
        rebuilt are cleared.

        Args:
            run: a run directory or run id (as `evalcluster report` takes it); None for all.

        Returns:
            {"targets", "samples", "points"} rebuilt, and "skipped": target -> why, for targets whose
            points cannot be derived (a damaged record): they are left out, the others rebuilt.

        Raises:
            ValueError: no such run in the ledger.
            SpoolError: the spool stays full because InfluxDB does not take its points (run it
                again later; what was queued is sent meanwhile).
        """
        with self._lock:
            plan = self._rebuild_plan(run)
            out: dict[str, Any] = {"targets": 0, "samples": 0, "points": 0, "skipped": {}}
            stalled = False  # the last write took nothing although the spool had just been delivered
            for target, named, done, all_records in plan:
                # As it is now: a sample superseded by the target's newer identity (or answer) would
                # overwrite the current one's point, which has the same measurement, tags and time.
                records = _as_now(all_records, named)
                try:
                    points = [p for r in records for p in sample_points(r, named, self.timestamps)]
                    if done:  # as finish_target wrote it
                        points += summary_points(records, named, self.timestamps)
                    to_lines(points)  # a point that cannot be written skips its target, not the rebuild
                except (ValueError, TypeError, KeyError) as e:
                    out["skipped"][target] = one_line(f"{type(e).__name__}: {e}")
                    log.error("rebuild: the points of %s cannot be derived (%s); the others go on", target, e)
                    continue
                i = 0
                while i < len(points):
                    chunk = points[i:i + CHUNK]
                    n = self.owed.write_part(chunk)
                    i += n
                    out["points"] += n
                    if n < len(chunk):
                        # The spool is full: make room by delivering what is queued. If InfluxDB does not
                        # take it, stop here (nothing is lost: the ledger still has every sample).
                        if not self.sink.flush(timeout=self.sinks.influx.timeout_s * 3) or (stalled and not n):
                            raise SpoolError(
                                f"the spool {self.sinks.spool_dir} is full and InfluxDB does "
                                f"not take its points ({self.sink.stats.last_error or 'no answer'}): "
                                f"{out['points']} points were queued (the last of {target}); run "
                                "`evalcluster influx rebuild` again when it answers")
                        stalled = not n
                    else:
                        stalled = False
                self.owed.settle(target)
                out["targets"] += 1
                out["samples"] += len(records)
            return out

    def _rebuild_plan(self, run: str | None) -> list[tuple[str, EvalTarget, bool, list[dict[str, Any]]]]:
        """(target id, its naming, whether it was finished, its records) of each target to rebuild."""
        noted = self.ledger.point_targets()
        entries = {e.id: e for e in self.ledger.list()}
        finished = self._finished_fallback(entries)
        plan: list[tuple[str, EvalTarget, bool, list[dict[str, Any]]]] = []
        known: set[str] = set()
        for t in self.ledger.targets():
            target = t["target"]
            records = self.ledger.samples(target)
            named = self._named(target, records, noted)
            entry = entries.get(target)
            names = {str(target_naming(named)["run_id"])} | (
                {entry.checkpoint.run, entry.checkpoint.run_id} if entry else set())
            known |= names
            if run is not None and run not in names:
                continue
            done = noted[target]["finished"] if target in noted else target in finished
            plan.append((target, named, done, records))
        if run is not None and not plan:
            raise ValueError(f"no run {run!r} in the ledger {self.ledger.path} "
                             f"(known: {', '.join(sorted(known)) or 'none'})")
        return plan

    def _finished_fallback(self, entries: Mapping[str, LedgerEntry]) -> set[str]:
        """Targets known finished without a point-target note: scored checkpoints, and the finished
        targets the ledger records."""
        return {id for id, e in entries.items() if e.state == SCORED} | set(self.ledger.finished())

    def sink_stats(self) -> dict[str, Any]:
        """The sink's SinkStats as a mapping, with "owed": the owed entries in the ledger."""
        out = asdict(self.sink.stats)
        out["owed"] = self.owed.count()
        return out

    def close(self, timeout: float | None = 30) -> None:
        """Flush (queueing owed points as the spool makes room) and close the sink (not the ledger).

        Args:
            timeout: seconds for the final flush.
        """
        with self._lock:
            try:
                self.flush(timeout)
            finally:
                self.sink.close(timeout=timeout)


class RecorderStore:
    """The runner's SampleStore for one target, recording through a ResultRecorder in this process
    (ledger rows and InfluxDB points, as the watch job's writer records them).

    Args:
        recorder: the recorder.
        target: the target evaluated.
    """

    def __init__(self, recorder: ResultRecorder, target: EvalTarget) -> None:
        self.recorder, self.target = recorder, target

    def sample_keys(self, target: str) -> set[str]:
        """Keys of the complete samples recorded for a target.

        Args:
            target: EvalTarget.id.
        """
        return self.recorder.sample_keys(target)

    def record_samples(self, records: list[dict[str, Any]]) -> int:
        """Record samples of this store's target and send their points.

        Args:
            records: SampleResult records.
        """
        return self.recorder.record_samples(records, self.target)

    def samples(self, target: str) -> list[dict[str, Any]]:
        """The sample records of a target.

        Args:
            target: EvalTarget.id.
        """
        return self.recorder.samples(target)

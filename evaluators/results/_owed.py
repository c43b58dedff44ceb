"""Points owed to the spool: nothing lost when it is full, nothing queued twice.

Before the points of a call go to the spool, the ledger marks their samples owed
(`Ledger.owe_points`); the mark is cleared once the spool holds them. If the spool refuses them
(full, or the disk refused the write) the marks stay, and `OwedPoints.send` re-derives the points
from the ledger and queues them as the spool makes room. An entry whose points fit only in part
records how many went in (`Ledger.advance_points`), so the rest is sent later and the first part
never twice. A derived point is always the same point (see `_points.py`), so sending one again
overwrites rather than duplicates it.

Each owed entry names its writer ("host:pid"): a writer sends its own, and the cluster's writer
(`take_over`) also those of writers that are gone; a one-shot process beside a running job
(`evalcluster eval`) leaves a live writer's entries to it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, Iterable

from checkpoints import Ledger
from evaluators.sinks import NullSink, Point, Sink, SpoolError

log = logging.getLogger("evalcluster.writer")
CHUNK = 256  # owed entries re-derived and queued per spool write
_RETRY_S = 1.0  # after the spool refused owed points, calls wait this long before trying again

# target -> (owed key -> the points of that entry, derived from the ledger, always in the same order).
# Raises ValueError when the target's points cannot be derived (a probe set that changed, a bad record).
Derive = Callable[[str], Callable[[str], list[Point]]]


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


class OwedPoints:
    """Writes points to the sink with the ledger's owed marks around them, and sends what is owed.

    Not thread-safe: the ResultRecorder calls it under its lock.

    Args:
        ledger: the writable ledger (its points_owed table).
        sink: where points go. With a NullSink (no InfluxDB) nothing is ever owed.
        take_over: also send the entries of writers that are gone.
    """

    def __init__(self, ledger: Ledger, sink: Sink, *, take_over: bool) -> None:
        self.ledger, self.sink = ledger, sink
        self.tracked = not isinstance(sink, NullSink)  # no InfluxDB: no points to owe
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.take_over = take_over
        self.last_sent = 0  # points the last `send` queued
        self._pending = self.tracked and ledger.count_points_owed() > 0
        self._underivable: set[str] = set()
        self._refusing = False
        self._retry_at = 0.0

    def count(self) -> int:
        """How many owed entries the ledger has (of every writer)."""
        return self.ledger.count_points_owed() if self.tracked else 0

    def owe(self, target: str, keys: list[str]) -> None:
        """Mark entries owed before their points are queued (cleared once the spool holds them).

        Args:
            target: the target id.
            keys: sample keys, or SUMMARY_KEY for the target's summary points.
        """
        if self.tracked:
            self.ledger.owe_points(target, keys, self.owner)

    def settle(self, target: str, keys: Iterable[str] | None = None) -> None:
        """Clear owed entries whose points the spool holds.

        Args:
            target: the target id.
            keys: its entries; None for all of them.
        """
        if self.tracked:
            self.ledger.settle_points(target, keys)

    def queue(self, points: list[Point], target: str, keys: list[str]) -> None:
        """Put points in the spool; their owed entries are cleared once it holds them, and stay
        (to be re-derived later) if it refuses them.

        Args:
            points: the points of the entries.
            target: the target id.
            keys: the entries `owe` marked.
        """
        try:
            if points:
                self.sink.write(points)
        except SpoolError as e:  # full (SpoolFull), or the disk refused the write
            self._pending = True
            self._retry_at = time.monotonic() + _RETRY_S
            if not self._refusing:
                log.error("InfluxDB spool refused %d points of %s (%s); the ledger keeps them owed and they are "
                          "re-derived and sent when the spool has room (or by `evalcluster influx rebuild`)",
                          len(points), target, e)
            self._refusing = True
            return
        self.settle(target, keys)

    def notice_others(self) -> None:
        """Look again for entries in the ledger (another writer's: a dead one, or an earlier eval)."""
        if self.tracked and not self._pending and self.ledger.count_points_owed():
            self._pending = True

    def _mine(self, owner: str) -> bool:
        return owner == self.owner or (self.take_over and not _owner_alive(owner))

    def send(self, derive: Derive, force: bool = False) -> int:
        """Re-derive the points this writer owes and queue them, as far as the spool takes them.

        Args:
            derive: how to derive an owed entry's points from the ledger.
            force: try even if the spool had no room a moment ago (flush does).

        Returns:
            how many owed entries of this writer are left (0: nothing owed; -1: not tried, the
            spool was full a moment ago).
        """
        if not self._pending:
            return 0
        if not force and time.monotonic() < self._retry_at:
            return -1  # the spool was full just now: do not re-derive on every call of an outage
        by_target: dict[str, list[tuple[str, int]]] = {}
        for row in self.ledger.points_owed():
            if row["target"] not in self._underivable and self._mine(row["owner"]):
                by_target.setdefault(row["target"], []).append((row["key"], int(row["done"])))
        total = sum(len(k) for k in by_target.values())
        settled = skipped = 0
        self.last_sent = 0
        for target, entries in by_target.items():
            i = 0
            try:
                points_of = derive(target)
                step = CHUNK
                while i < len(entries):
                    chunk = entries[i:i + step]
                    points = [p for key, done in chunk for p in points_of(key)[done:]]
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
                        n = self.write_part(points)
                        self.last_sent += n
                        if n < len(points):
                            if n:
                                self.ledger.advance_points(target, key, done + n)
                            self._retry_at = time.monotonic() + _RETRY_S
                            return total - settled - skipped  # no more room; a later call goes on
                        points = []
                    self.ledger.settle_points(target, [k for k, _ in chunk])
                    settled += len(chunk)
                    i += len(chunk)
                    self.last_sent += len(points)
            except ValueError as e:  # a probe set that changed, a bad record: say so once, keep the entries
                self._underivable.add(target)
                skipped += len(entries) - i
                log.error("cannot re-derive the owed points of %s from the ledger (%s); they stay owed for "
                          "`evalcluster influx rebuild`", target, e)
        self._pending = False
        if self._refusing:
            log.warning("the InfluxDB spool has room again: every owed point was re-derived from the ledger and queued")
        self._refusing = False
        return 0

    def write_part(self, points: list[Point]) -> int:
        """Queue as many of `points`, from the first, as the spool takes; returns how many.

        Args:
            points: the points, in order.
        """
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

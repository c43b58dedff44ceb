"""`InfluxSink`: points to InfluxDB (v1 or v2) through the durable spool.

Every `write()` appends the points to the spool and fsyncs before it returns, so a point the
caller was told is written survives a crash of this process; `write()` never touches the
network. A sender thread reads the spool in order and hands lines to the batching writer
(influxdb-client's WriteApi for v2, the httpx writer for v1); what the server acknowledges is
marked in the spool and deleted with its segment. When a batch fails after its retries the sink
is in an outage: it stops feeding the writer, reports the problem once, probes the server with
the oldest waiting batch (exponential backoff, at once on `flush()`), and when the server answers
it resumes from the oldest unacknowledged point. Points the server refuses as invalid (400) are
isolated one by one and kept in the spool's rejected.lp. At start the sink takes over segments
left by writers that are gone (crashed or closed during an outage) and sends them first.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Iterable

from evaluators.sinks._config import InfluxConfig, SinksConfig
from evaluators.sinks._lineprotocol import Point, to_lines
from evaluators.sinks._sink import SinkStats
from evaluators.sinks._spool import Record, Segment, Spool
from evaluators.sinks._transport import (
    Detected,
    Target,
    V1Writer,
    V2Writer,
    WriteFailure,
    backoff_s,
    detect_protocol,
    make_target,
    make_writer,
)


log = logging.getLogger("evaluators.sinks")

_ADOPT_EVERY_S = 30.0


class InfluxSink:
    """Writes points to InfluxDB through a durable spool; see the module docstring.

    Args:
        influx: sinks.influx (url, protocol, database/bucket, token, batching, retries).
        spool_dir: the spool directory (shared safely by several writers).
        spool_max_bytes: the bound on unacknowledged bytes in the spool directory.
        adopt: take over segments left by writers that are gone (default True).
    """

    def __init__(
        self, influx: InfluxConfig, spool_dir: Path | str, spool_max_bytes: int = 512 * 2**20, adopt: bool = True
    ) -> None:
        if not influx.url:
            raise ValueError("sinks.influx.url is not set: no InfluxDB to write to (set INFLUX_URL)")
        self._cfg = influx
        secret = influx.token()
        self._token: str | None = secret.get_secret_value() if secret is not None else None
        self._spool = Spool(Path(spool_dir), spool_max_bytes)
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        # counters (under _lock)
        self._written = self._sent = self._spooled = self._replayed = self._failed = self._adopted = 0
        self._last_error: str | None = None
        self._outage = False
        self._closed = False
        self._flush_gen = 0          # flush() calls so far
        self._flush_req = 0          # highest flush generation the sender has seen
        self._flush_failed = 0       # flushes up to this generation failed (a probe after them failed)
        self._sender_done = False
        # sender-thread state
        self._writer: V1Writer | V2Writer | None = None
        self.target: Target | None = None
        self.detected: Detected | None = None
        self._inflight: dict[bytes, deque[Record]] = defaultdict(deque)
        self._n_inflight = 0
        self._need_rewind = False
        self._probe_attempt = 0
        self._next_probe = 0.0
        self._reported: str | None = None
        self._window = max(4 * influx.batch_size, 1000)
        self._adopt_enabled = adopt
        self._last_adopt = 0.0
        if adopt:  # before the first flush() can look at the spool
            self._adopt()
        self._thread = threading.Thread(target=self._run, name="influx-sink", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, sinks: SinksConfig) -> "InfluxSink":
        """The sink the `sinks` section describes.

        Args:
            sinks: the section (paths absolute, as load_config makes them).
        """
        return cls(sinks.influx, sinks.spool_dir, sinks.spool_max_bytes)

    # ------------------------------------------------------------------ the caller's side

    def write(self, points: Iterable[Point]) -> None:
        """Append points to the spool (fsync'd) and return; the sender delivers them.

        Args:
            points: the points; all are validated before any is taken.

        Raises:
            PointError: a point cannot be written (nothing was taken).
            SpoolFull: the spool is at its bound (nothing was taken).
            SpoolError: the disk refused the write (nothing was taken) or the fsync (the points
                were appended and may still be delivered; writing them again is harmless).
        """
        lines = to_lines(points)
        if not lines:
            return
        with self._lock:
            if self._closed:
                raise RuntimeError("InfluxSink is closed")
            placed = self._spool.append(lines, sync=False)
            self._written += len(lines)
            if self._outage:
                self._spooled += len(lines)
                for seg, _, end in placed:
                    seg.delayed_upto = max(seg.delayed_upto, end)
        self._events.put(("data",))
        # Outside the lock, so writers in other threads share fsyncs (group commit).
        self._spool.sync(placed)

    def flush(self, timeout: float | None = None) -> bool:
        """Try to deliver everything written so far.

        Args:
            timeout: seconds to wait at most (None: as long as the server keeps answering).

        Returns:
            True when all of it is acknowledged; False if the server failed a write made after
            this call (the points wait in the spool) or the timeout passed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            with self._spool.lock:
                targets = [(seg, seg.end) for seg in self._spool.segments]
            self._flush_gen += 1
            gen = self._flush_gen
        self._events.put(("flush", gen))
        with self._cv:
            while True:
                if all(seg.ack_pos >= end or seg not in self._spool.segments for seg, end in targets):
                    return True
                if self._flush_failed >= gen or self._sender_done:
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left if left is not None else 1.0)

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush within `timeout`, stop, and release the spool; what is not acknowledged stays in
        the spool for the next sink or `evalcluster influx replay`.

        Args:
            timeout: seconds for the final flush (None: no limit).
        """
        if self._closed:
            return
        self.flush(timeout)
        with self._lock:
            self._closed = True
        self._events.put(("stop",))
        self._thread.join()
        left = self._spool.close()
        if left:
            log.warning(
                "%d points wait in the spool %s; the next run or `evalcluster influx replay` sends them",
                left, self._spool.dir,
            )

    def __enter__(self) -> "InfluxSink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stats(self) -> SinkStats:
        """Counts so far (see SinkStats)."""
        with self._lock:
            failed = self._failed + self._spool.damaged_records
            done = self._sent + self._replayed + failed
            return SinkStats(
                written=self._written, sent=self._sent, spooled=self._spooled, replayed=self._replayed,
                failed=failed, pending=self._written + self._adopted - done, adopted=self._adopted,
                last_error=self._last_error,
            )

    @property
    def spool_dir(self) -> Path:
        return self._spool.dir

    @property
    def protocol(self) -> str | None:
        """"v1" or "v2" once known (after the first contact with the server)."""
        return self.target.protocol if self.target else None

    def __repr__(self) -> str:
        proto = self.target.protocol if self.target else self._cfg.protocol
        return f"InfluxSink(url={self._cfg.endpoint!r}, protocol={proto!r}, spool={str(self._spool.dir)!r})"

    # ------------------------------------------------------------------ the sender thread

    def _run(self) -> None:
        try:
            if not self._connect():
                self._enter_outage(None)
            stopping = False
            while not stopping:
                timeout = 1.0
                if self._outage:
                    timeout = max(0.0, min(timeout, self._next_probe - time.monotonic()))
                try:
                    ev = self._events.get(timeout=timeout)
                except queue.Empty:
                    ev = None
                while ev is not None:
                    stopping |= self._handle(ev)
                    try:
                        ev = self._events.get_nowait()
                    except queue.Empty:
                        ev = None
                if stopping:
                    break
                if self._outage:
                    if time.monotonic() >= self._next_probe:
                        self._probe()
                else:
                    self._pump()
                    if self._adopt_enabled and time.monotonic() - self._last_adopt > _ADOPT_EVERY_S:
                        self._adopt()
            self._shutdown_writer()
        except Exception as e:  # noqa: BLE001 - the points are safe in the spool; say so and stop
            log.exception("InfluxDB sink stopped on an unexpected error; points stay in the spool %s", self._spool.dir)
            with self._lock:
                self._last_error = f"sink stopped: {type(e).__name__}: {e}"
        finally:
            with self._cv:
                self._sender_done = True
                self._cv.notify_all()

    def _handle(self, ev: tuple) -> bool:
        kind = ev[0]
        if kind == "ok":
            self._on_acked([self._take(line) for line in ev[1]])
        elif kind == "error":
            recs = [r for r in (self._take(line) for line in ev[1]) if r is not None]
            failure: WriteFailure = ev[2]
            if failure.kind == "reject":
                if self._isolate(recs):
                    self._need_rewind = True
            else:
                self._enter_outage(failure)
        elif kind == "flush":
            self._flush_req = max(self._flush_req, ev[1])
            if self._writer is not None:
                self._writer.flush()
            if self._outage:
                self._next_probe = time.monotonic()
        elif kind == "stop":
            return True
        return False

    def _take(self, line: bytes) -> Record | None:
        q = self._inflight.get(line)
        if not q:
            return None  # answered twice (resent while in flight): the first answer counted
        rec = q.popleft()
        if not q:
            del self._inflight[line]
        self._n_inflight -= 1
        rec.segment.outstanding.discard(rec.offset)
        return rec

    def _on_acked(self, recs: Iterable[Record | None]) -> None:
        touched: set[Segment] = set()
        sent = replayed = 0
        for rec in recs:
            if rec is None:
                continue
            seg = rec.segment
            if self._spool.ack(seg, rec.offset, rec.end):
                touched.add(seg)
                if seg.adopted or rec.offset < seg.delayed_upto:
                    replayed += 1
                else:
                    sent += 1
        for seg in touched:
            if seg in self._spool.segments:
                self._spool.save_ack(seg)
        self._spool.release_done()
        with self._cv:
            self._sent += sent
            self._replayed += replayed
            self._cv.notify_all()

    # ------------------------------------------------------------------ connecting and sending

    def _connect(self) -> bool:
        try:
            if self._cfg.protocol == "auto":
                self.detected = detect_protocol(self._cfg)
            else:
                self.detected = Detected(self._cfg.protocol, None, None, "set in sinks.influx.protocol")
            self.target = make_target(self._cfg, self.detected.protocol)
            self._writer = make_writer(self.target, self._token, self._cfg, self._cb_ok, self._cb_error)
        except WriteFailure as e:
            self._report(e.message)
            with self._lock:
                self._last_error = e.message
            return False
        log.info("InfluxDB sink: %s, protocol %s (%s)", self.target.where, self.detected.protocol, self.detected.reason)
        return True

    def _cb_ok(self, lines: list[bytes]) -> None:
        self._events.put(("ok", lines))

    def _cb_error(self, lines: list[bytes], failure: WriteFailure) -> None:
        self._events.put(("error", lines, failure))

    def _rewind(self) -> None:
        for seg in self._spool.segments:
            seg.read_pos = seg.ack_pos
        self._need_rewind = False

    def _read(self, n: int) -> list[Record]:
        out: list[Record] = []
        for seg in list(self._spool.segments):
            if len(out) >= n:
                break
            out.extend(self._spool.read(seg, n - len(out)))
        return out

    def _pump(self) -> None:
        if self._writer is None:
            return
        if self._need_rewind:
            self._rewind()
        room = self._window - self._n_inflight
        if room <= 0:
            return
        recs = self._read(room)
        if not recs:
            return
        for rec in recs:
            self._inflight[rec.line].append(rec)
            rec.segment.outstanding.add(rec.offset)
        self._n_inflight += len(recs)
        self._writer.submit([r.line for r in recs])

    def _probe(self) -> None:
        """In an outage: try the oldest waiting batch synchronously; resume if the server takes it."""
        if self._writer is None and not self._connect():
            self._probe_failed()
            return
        assert self._writer is not None
        self._rewind()
        recs = self._read(self._cfg.batch_size)
        if not recs:
            if self._n_inflight == 0:
                self._recover()
            else:
                self._next_probe = time.monotonic() + 0.2  # wait for the writer's answers
            return
        try:
            self._writer.write_sync([r.line for r in recs])
        except WriteFailure as e:
            if e.kind == "reject":
                if self._isolate(recs):
                    self._recover()
                return
            self._enter_outage(e)
            self._probe_failed()
            return
        self._on_acked(recs)
        self._recover()

    def _probe_failed(self) -> None:
        self._probe_attempt += 1
        self._next_probe = time.monotonic() + backoff_s(
            self._probe_attempt - 1, self._cfg.retry_interval_ms / 1000, self._cfg.max_retry_delay_ms / 1000
        )
        with self._cv:
            self._flush_failed = max(self._flush_failed, self._flush_req)
            self._cv.notify_all()

    def _isolate(self, recs: list[Record]) -> bool:
        """Send a refused batch point by point; keep the refused points in rejected.lp.

        Returns False if the server stopped answering meanwhile (then the sink is in an outage).
        """
        assert self._writer is not None
        rejected: list[tuple[Record, str]] = []
        for rec in recs:
            try:
                self._writer.write_sync([rec.line])
            except WriteFailure as e:
                if e.kind != "reject":
                    self._finish_rejects(rejected)
                    self._enter_outage(e)
                    return False
                rejected.append((rec, e.message))
                continue
            self._on_acked([rec])
        self._finish_rejects(rejected)
        return True

    def _finish_rejects(self, rejected: list[tuple[Record, str]]) -> None:
        if not rejected:
            return
        for rec, msg in rejected:
            self._spool.reject([rec.line], msg)
        touched = set()
        n = 0
        for rec, _ in rejected:
            if self._spool.ack(rec.segment, rec.offset, rec.end):
                touched.add(rec.segment)
                n += 1
        for seg in touched:
            self._spool.save_ack(seg)
        self._spool.release_done()
        log.error(
            "InfluxDB refused %d points as invalid (%s); they are kept in %s",
            len(rejected), rejected[0][1], self._spool.dir / "rejected.lp",
        )
        with self._cv:
            self._failed += n
            self._last_error = rejected[0][1]
            self._cv.notify_all()

    def _enter_outage(self, failure: WriteFailure | None) -> None:
        with self._lock:
            if not self._outage:
                self._outage = True
                with self._spool.lock:
                    for seg in self._spool.segments:
                        start = max(seg.delayed_upto, seg.ack_pos)
                        if not seg.adopted and seg.end > start:
                            self._spooled += self._spool.count_records(seg, start, seg.end)
                        seg.delayed_upto = max(seg.delayed_upto, seg.end)
                self._probe_attempt = 0
                self._next_probe = time.monotonic() + backoff_s(
                    0, self._cfg.retry_interval_ms / 1000, self._cfg.max_retry_delay_ms / 1000
                )
            if failure is not None:
                self._last_error = failure.message
        self._need_rewind = True
        if self._flush_req > self._flush_failed:
            self._next_probe = time.monotonic()  # a flush is waiting: try now, and fail it if that fails
        if failure is not None:
            self._report(failure.message)

    def _recover(self) -> None:
        with self._lock:
            was = self._outage
            self._outage = False
            waiting = self._written + self._adopted - self._sent - self._replayed - self._failed
        self._need_rewind = True
        self._probe_attempt = 0
        if was and self._reported is not None:
            where = self.target.where if self.target else self._cfg.endpoint
            tail = f"; sending the {waiting} points waiting in the spool" if waiting > 0 else ""
            log.warning("InfluxDB at %s answers again%s", where, tail)
        self._reported = None

    def _report(self, message: str) -> None:
        """Log a problem once (not once per retry), with where the points are."""
        if message == self._reported:
            return
        self._reported = message
        log.error("%s -- points wait in the spool %s and are sent when InfluxDB accepts them",
                  message, self._spool.dir)

    def _adopt(self) -> None:
        self._last_adopt = time.monotonic()
        segs = self._spool.adopt_orphans()
        n = sum(self._spool.count_records(s, s.ack_pos, s.end) for s in segs)
        if n:
            with self._lock:
                self._adopted += n
                self._spooled += n
            log.info("taking over %d points left in the spool %s by an earlier writer", n, self._spool.dir)

    def _shutdown_writer(self) -> None:
        if self._writer is None:
            return
        try:
            self._writer.close(timeout=self._cfg.timeout_s * 2, abandon=self._outage)
        except Exception as e:  # noqa: BLE001 - closing must not lose the acknowledgements below
            log.debug("closing the InfluxDB writer: %s", e)
        # Answers that arrived while closing still count (else they would be sent again next time).
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                break
            if ev[0] == "ok":
                self._on_acked([self._take(line) for line in ev[1]])

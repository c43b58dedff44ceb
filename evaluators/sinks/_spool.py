"""The durable spool: an fsync'd, append-only journal of points not yet acknowledged by InfluxDB.

Layout of the spool directory:
- `seg-<ns>-<pid>-<rand>.spool`: segments. Each record is `<crc32 hex8> <line protocol>\\n`. Every
  writer appends only to segments it created and holds `flock`ed for its lifetime, so several
  writers (threads, processes) never interleave. A crashed writer's locks vanish with it: its
  segments become orphans that the next sink (or `evalcluster influx replay`) takes over by
  locking them; a lock held by someone else means "live, leave it".
- `<segment>.ack`: how far the segment has been acknowledged (a byte offset with a checksum),
  rewritten after each acknowledged batch. It is not fsync'd on purpose: a stale value only
  resends points the server already has, and the same point (measurement, tags, timestamp)
  overwrites itself, so a replay never duplicates.
- `<segment>.corrupt`: a record whose checksum does not match, or the torn tail of a segment
  whose writer died inside an append (never reported written), kept for inspection, reported
  loudly.
- `rejected.lp`: points the server refused as invalid, each after a `# time error` comment line
  (valid line protocol: fix and re-send with curl if wanted).

A segment is deleted once every record in it is acknowledged and nobody appends to it any more.
The size bound counts unacknowledged bytes of every segment in the directory; at the bound
`append` raises `SpoolFull` and writes nothing (the caller keeps the points; the ledger has
their source), with a warning when 80 % is crossed.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from checkpoints import fsync_dir

log = logging.getLogger("evaluators.sinks")

SEGMENT_GLOB = "seg-*.spool"
REJECTED = "rejected.lp"
_HEADER = 9  # "xxxxxxxx "
_ACK = struct.Struct("<QI")
_READ_CHUNK = 1 << 20


class SpoolError(RuntimeError):
    """The spool directory cannot be used (permissions, disk full, ...)."""


class SpoolFull(SpoolError):
    """The spool reached `spool_max_bytes`; the points of this write were not taken."""


@dataclass(eq=False)
class Segment:
    """One segment file held (locked) by this process."""

    path: Path
    """The segment file."""
    fd: int
    """Its open descriptor (holding the lock)."""
    own: bool
    """Created by this process (appended to while active)."""
    adopted: bool
    """Taken over from a writer that is gone."""
    end: int
    """Bytes of complete records."""
    ack_pos: int
    """Every record before this offset is acknowledged."""
    read_pos: int
    """The next record the sender reads."""
    delayed_upto: int = 0
    """Records before this offset had to wait in the spool."""
    holes: dict[int, int] = field(default_factory=dict)
    """Acknowledged out of order: offset -> end."""
    outstanding: set[int] = field(default_factory=set)
    """Offsets handed to the writer, not answered yet."""
    ack_fd: int | None = None
    """The open `.ack` file, once written."""
    active: bool = False
    """The segment this process appends to now."""
    synced: int = 0
    """Bytes known to be on disk (fdatasync'd)."""
    closed: bool = False
    """Its descriptors are closed."""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def done(self) -> bool:
        return self.ack_pos >= self.end


@dataclass(frozen=True)
class Record:
    """A record read back from a segment."""

    segment: Segment
    """The segment it is in."""
    offset: int
    """Where it starts."""
    end: int
    """Where the next record starts."""
    line: bytes
    """The line protocol line (without the checksum and newline)."""


def encode(line: str) -> bytes:
    """One spool record for a line of line protocol."""
    b = line.encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(b), b)


class Spool:
    """The spool directory of one sink.

    Args:
        directory: where the segments live (created if missing).
        max_bytes: the bound on unacknowledged bytes in the whole directory.
        segment_bytes: a segment is closed for appends beyond this size (default: max_bytes / 8, 1..64 MiB).
    """

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int | None = None) -> None:
        self.dir = Path(directory)
        try:
            # Owner only, as the ledger: the points carry the run names and scores.
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"spool directory {self.dir}: cannot create it: {e.strerror}") from None
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise SpoolError(f"spool directory {self.dir}: not writable")
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or min(max(max_bytes // 8, 1 << 20), 64 << 20)
        self.lock = threading.RLock()
        self._sync_lock = threading.Lock()  # taken after `lock`, never the other way round
        self.segments: list[Segment] = []
        self._active: Segment | None = None
        self._foreign_cache: tuple[float, int] = (0.0, 0)
        self._warned = False
        self.damaged_records = 0  # records with a bad checksum (moved to .corrupt files)

    # ------------------------------------------------------------------ writing

    def append(self, lines: list[str], sync: bool = True) -> list[tuple[Segment, int, int]]:
        """Append records for `lines` (all or nothing) and fsync them.

        Args:
            lines: serialised points (already validated).
            sync: fsync before returning; False leaves it to a later `sync(placed)` (which lets
                concurrent writers share one fsync).

        Returns:
            [(segment, first offset, end offset)] of what was written.

        Raises:
            SpoolFull: the bound would be crossed; nothing was written.
            SpoolError: the disk refused the write; nothing was written.
        """
        data = b"".join(encode(ln) for ln in lines)
        if not data:
            return []
        with self.lock:
            used = self.usage()
            if used + len(data) > self.max_bytes:
                raise SpoolFull(
                    f"spool {self.dir} is full: {used:,} bytes of points wait for InfluxDB and "
                    f"spool_max_bytes is {self.max_bytes:,}; {len(lines)} points were not taken. Make "
                    "InfluxDB reachable (`evalcluster influx check`), run `evalcluster influx replay`, "
                    "or raise sinks.spool_max_bytes"
                )
            if not self._warned and used + len(data) > 0.8 * self.max_bytes:
                self._warned = True
                log.warning(
                    "spool %s is over 80%% full (%s of %s bytes wait for InfluxDB); writes fail at 100%%",
                    self.dir, f"{used + len(data):,}", f"{self.max_bytes:,}",
                )
            elif self._warned and used + len(data) < 0.5 * self.max_bytes:
                self._warned = False
            seg = self._active
            if seg is None or seg.end >= self.segment_bytes:
                seg = self._new_segment()
            start = seg.end
            try:
                n = os.write(seg.fd, data)
                if n != len(data):
                    raise OSError(errno.ENOSPC, f"short write ({n} of {len(data)} bytes)")
            except OSError as e:
                try:
                    os.ftruncate(seg.fd, start)
                except OSError:
                    pass
                raise SpoolError(f"spool {seg.path}: cannot append: {e.strerror or e}") from None
            seg.end = start + len(data)
            placed = [(seg, start, seg.end)]
        if sync:
            self.sync(placed)
        return placed

    def sync(self, placed: list[tuple[Segment, int, int]]) -> None:
        """fsync what `append(..., sync=False)` placed. Group commit: one fdatasync covers every
        append made before it started, so concurrent writers share it.

        Raises:
            SpoolError: the disk refused the fsync.
        """
        for seg, _, end in placed:
            with self._sync_lock:
                if seg.closed or seg.synced >= end:
                    continue  # deleted (then every record in it was acknowledged) or already covered
                upto = seg.end
                try:
                    os.fdatasync(seg.fd)
                except OSError as e:
                    raise SpoolError(f"spool {seg.path}: cannot fsync: {e.strerror or e}") from None
                seg.synced = max(seg.synced, upto)

    def _new_segment(self) -> Segment:
        if self._active is not None:
            self._active.active = False
        name = f"seg-{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(3)}.spool"
        tmp = self.dir / f".{name}.tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            # Locked before it gets its visible name, so nobody can take it for an orphan.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(tmp, self.dir / name)
            fsync_dir(self.dir)
        except OSError as e:
            raise SpoolError(f"spool {self.dir}: cannot create a segment: {e.strerror}") from None
        seg = Segment(self.dir / name, fd, own=True, adopted=False, end=0, ack_pos=0, read_pos=0, active=True)
        self.segments.append(seg)
        self._active = seg
        return seg

    # ------------------------------------------------------------------ taking over orphans

    def adopt_orphans(self) -> list[Segment]:
        """Take over the segments no live writer holds (their writer crashed or closed with points left).

        Returns:
            the newly adopted segments, oldest first.
        """
        got: list[Segment] = []
        with self.lock:
            mine = {s.name for s in self.segments}
            for path in sorted(self.dir.glob(SEGMENT_GLOB)):
                if path.name in mine:
                    continue
                try:
                    fd = os.open(path, os.O_RDWR)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    log.error("spool %s: cannot open: %s", path, e.strerror)
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)  # a live writer (or another replayer) holds it
                    continue
                try:
                    same = os.fstat(fd).st_ino == os.stat(path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # deleted (fully acknowledged) between our open and our lock
                    os.close(fd)
                    continue
                size = os.fstat(fd).st_size
                ack = min(_read_ack(path), size)
                seg = Segment(path, fd, own=False, adopted=True, end=size, ack_pos=ack, read_pos=ack, delayed_upto=size)
                self.segments.append(seg)
                got.append(seg)
            self.segments.sort(key=lambda s: s.name)
        return got

    # ------------------------------------------------------------------ reading

    def read(self, seg: Segment, max_records: int) -> list[Record]:
        """Up to `max_records` records from `seg.read_pos`, skipping acknowledged and outstanding ones.

        Advances `seg.read_pos`. A damaged record ends the segment: the bytes from there are moved
        to `<segment>.corrupt` and reported.
        """
        out: list[Record] = []
        with self.lock:
            end = seg.end
        pos = seg.read_pos
        size = _READ_CHUNK
        while len(out) < max_records and pos < end:
            chunk = os.pread(seg.fd, min(size, end - pos), pos)
            if not chunk:
                break
            i = 0
            while len(out) < max_records:
                nl = chunk.find(b"\n", i)
                if nl == -1:
                    break
                rec = chunk[i:nl]
                off = pos + i
                if len(rec) < _HEADER or rec[8:9] != b" " or not _crc_ok(rec):
                    self._bad_record(seg, off, pos + nl + 1, rec)
                elif not (off < seg.ack_pos or off in seg.holes or off in seg.outstanding):
                    out.append(Record(seg, off, pos + nl + 1, rec[_HEADER:]))
                i = nl + 1
            if i == 0:
                if pos + len(chunk) >= end:
                    seg.read_pos = pos
                    self._torn_tail(seg, pos)
                    return out
                size *= 2  # one record longer than the chunk
                continue
            pos += i
            seg.read_pos = pos
        return out

    def count_records(self, seg: Segment, start: int, end: int) -> int:
        """How many records lie in [start, end) and are not acknowledged yet."""
        n = 0
        pos = start
        while pos < end:
            chunk = os.pread(seg.fd, min(_READ_CHUNK, end - pos), pos)
            if not chunk:
                break
            n += chunk.count(b"\n")
            pos += len(chunk)
        return n - sum(1 for o in seg.holes if start <= o < end)

    def _bad_record(self, seg: Segment, offset: int, end: int, rec: bytes) -> None:
        # A complete line whose checksum does not match: keep it aside, skip it, say so.
        if offset < seg.ack_pos or offset in seg.holes:
            return
        corrupt = seg.path.with_name(seg.name + ".corrupt")
        _append_fsync(corrupt, rec + b"\n")
        self.damaged_records += 1
        self.ack(seg, offset, end)
        log.error("spool %s: a damaged record at byte %d (checksum mismatch) was moved to %s", seg.path, offset, corrupt)

    def _torn_tail(self, seg: Segment, offset: int) -> None:
        # An incomplete last record: its writer died inside write(), so it was never reported written.
        with self.lock:
            end = os.fstat(seg.fd).st_size
            tail = os.pread(seg.fd, end - offset, offset) if end > offset else b""
            corrupt = seg.path.with_name(seg.name + ".corrupt")
            _append_fsync(corrupt, tail)
            log.warning(
                "spool %s: an incomplete record at byte %d (a crash during an append); its %d bytes were moved to %s",
                seg.path, offset, len(tail), corrupt,
            )
            os.ftruncate(seg.fd, offset)
            seg.end = offset
            if seg.active:  # never append after damage
                seg.active = False
                self._active = None

    # ------------------------------------------------------------------ acknowledging

    def ack(self, seg: Segment, offset: int, end: int) -> bool:
        """Mark the record at `offset` acknowledged. Returns False if it already was."""
        seg.outstanding.discard(offset)
        if offset < seg.ack_pos or offset in seg.holes:
            return False
        if offset == seg.ack_pos:
            seg.ack_pos = end
            while seg.ack_pos in seg.holes:
                seg.ack_pos = seg.holes.pop(seg.ack_pos)
        else:
            seg.holes[offset] = end
        return True

    def save_ack(self, seg: Segment) -> None:
        """Persist `seg.ack_pos` (no fsync: a stale value only resends points, which overwrite themselves)."""
        if seg.ack_fd is None:
            seg.ack_fd = os.open(seg.path.with_name(seg.name + ".ack"), os.O_RDWR | os.O_CREAT, 0o600)
        packed = _ACK.pack(seg.ack_pos, zlib.crc32(struct.pack("<Q", seg.ack_pos)))
        os.pwrite(seg.ack_fd, packed, 0)

    def release_done(self) -> int:
        """Delete segments that are fully acknowledged and no longer appended to. Returns how many."""
        n = 0
        with self.lock:
            for seg in list(self.segments):
                if seg.done and not seg.active and not seg.outstanding:
                    self._delete(seg)
                    n += 1
        return n

    def _delete(self, seg: Segment) -> None:
        # Unlink while still holding the lock, so an adopter that opened it sees it is gone.
        for p in (seg.path, seg.path.with_name(seg.name + ".ack")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        self._close_seg(seg)
        self.segments.remove(seg)
        if self._active is seg:
            self._active = None

    def _close_seg(self, seg: Segment) -> None:
        if seg.ack_fd is not None:
            os.close(seg.ack_fd)
            seg.ack_fd = None
        with self._sync_lock:  # not while a sync() uses the fd
            seg.closed = True
            try:
                os.close(seg.fd)
            except OSError:
                pass

    def reject(self, lines: list[bytes], error: str) -> None:
        """Keep points the server refused as invalid in `rejected.lp`, after a comment saying why."""
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        comment = "# " + stamp + " " + error.replace("\n", " ")
        data = b"".join(comment.encode() + b"\n" + ln + b"\n" for ln in lines)
        fd = os.open(self.dir / REJECTED, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, data)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ accounting

    def usage(self) -> int:
        """Unacknowledged bytes in the whole directory (ours exactly, other writers' from their files)."""
        with self.lock:
            ours = sum(s.end - s.ack_pos for s in self.segments)
            names = {s.name for s in self.segments}
            t, foreign = self._foreign_cache
            if time.monotonic() - t > 0.5:
                foreign = 0
                for p in self.dir.glob(SEGMENT_GLOB):
                    if p.name in names:
                        continue
                    try:
                        size = p.stat().st_size
                    except FileNotFoundError:
                        continue
                    foreign += max(size - _read_ack(p), 0)
                self._foreign_cache = (time.monotonic(), foreign)
            return ours + foreign

    def close(self) -> int:
        """Release every segment: delete the fully acknowledged ones, unlock the rest (they become
        orphans for the next sink or `influx replay`). Returns how many records are left."""
        left = 0
        with self.lock:
            for seg in list(self.segments):
                seg.active = False
                seg.outstanding.clear()
                if seg.done:
                    self._delete(seg)
                    continue
                left += self.count_records(seg, seg.ack_pos, seg.end)
                self.save_ack(seg)
                self._close_seg(seg)
                self.segments.remove(seg)
            self._active = None
        return left


def _crc_ok(rec: bytes) -> bool:
    try:
        return int(rec[:8], 16) == zlib.crc32(rec[_HEADER:])
    except ValueError:
        return False


def _read_ack(seg_path: Path) -> int:
    try:
        raw = seg_path.with_name(seg_path.name + ".ack").read_bytes()
    except FileNotFoundError:
        return 0
    if len(raw) != _ACK.size:
        return 0
    pos, crc = _ACK.unpack(raw)
    return pos if crc == zlib.crc32(struct.pack("<Q", pos)) else 0


def _append_fsync(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def spool_status(directory: Path) -> dict[str, int]:
    """What waits in a spool directory, without taking anything over (for `influx check`).

    Returns:
        {"segments", "records", "bytes", "live_segments", "rejected"}; live segments are held by a
        running writer.
    """
    d = Path(directory)
    out = {"segments": 0, "records": 0, "bytes": 0, "live_segments": 0, "rejected": 0}
    if not d.is_dir():
        return out
    for p in sorted(d.glob(SEGMENT_GLOB)):
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                out["live_segments"] += 1
            size = os.fstat(fd).st_size
            ack = min(_read_ack(p), size)
            data = os.pread(fd, size - ack, ack)
        finally:
            os.close(fd)
        out["segments"] += 1
        out["records"] += data.count(b"\n")
        out["bytes"] += size - ack
    rej = d / REJECTED
    if rej.exists():
        out["rejected"] = sum(1 for ln in rej.read_bytes().splitlines() if ln and not ln.startswith(b"#"))
    return out

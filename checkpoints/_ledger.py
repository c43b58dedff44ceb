"""The ledger: every checkpoint's state and every sample, in one SQLite file (WAL).

One process writes (the cluster's result writer, or the CLI for one-shot runs); readers may open
the same file at the same time. Every write is an idempotent upsert, so replaying work after a
crash changes nothing. A failing checkpoint gets its own retry time on exponential backoff and is
quarantined after `max_attempts` failures (or at once for a permanent error); `due()` never
returns it before its time, so it cannot hold the others up.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from checkpoints._records import (
    DISCOVERED,
    EVALUATING,
    FAILED,
    QUARANTINED,
    SCORED,
    STAGED,
    STATES,
    Checkpoint,
    LedgerEntry,
)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS job_lock (one INTEGER PRIMARY KEY CHECK (one = 1), job TEXT NOT NULL, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    id            TEXT PRIMARY KEY,
    source        TEXT NOT NULL,
    run           TEXT NOT NULL,
    iteration     INTEGER NOT NULL,
    path          TEXT NOT NULL,
    dirname       TEXT NOT NULL,
    label         TEXT NOT NULL,
    run_id        TEXT NOT NULL,
    model_tag     TEXT NOT NULL,
    layout        TEXT NOT NULL,
    size          INTEGER NOT NULL,
    mtime         REAL NOT NULL,
    sha256        TEXT,
    config_path   TEXT,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    next_retry_at REAL,
    resume_state  TEXT,
    local_path    TEXT,
    discovered_at REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_state ON checkpoints (state, next_retry_at);
CREATE INDEX IF NOT EXISTS checkpoints_run ON checkpoints (source, run, iteration);
CREATE TABLE IF NOT EXISTS samples (
    key        TEXT PRIMARY KEY,
    target     TEXT NOT NULL,
    probe_id   TEXT NOT NULL,
    record     TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_target ON samples (target);
CREATE INDEX IF NOT EXISTS checkpoints_run_state ON checkpoints (run, state);
CREATE TABLE IF NOT EXISTS finished_targets (
    target      TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    finished_at REAL NOT NULL
);
"""

_CKPT_COLS = (
    "source", "run", "iteration", "path", "dirname", "label", "run_id", "model_tag", "layout",
    "size", "mtime", "sha256", "config_path",
)
_ROW_COLS = _CKPT_COLS + (
    "state", "attempts", "last_error", "next_retry_at", "resume_state", "local_path", "discovered_at", "updated_at",
)

# Per target and score field ("<scorer>.<field>", as evaluators flattens them): how many samples
# have it, their sum, and how many of them are pass/fail. Kept by triggers on `samples` in the
# transaction that writes the sample (a replaced sample takes its old values out), so `status`
# reads a run's means from a few rows instead of parsing every sample. A record that is not valid
# JSON to SQLite (a NaN score) is left out of the sums; its sample is stored all the same.
_FIELD_SUMS = """
CREATE TABLE IF NOT EXISTS target_fields (
    target TEXT NOT NULL, field TEXT NOT NULL, n INTEGER NOT NULL, total REAL NOT NULL, bools INTEGER NOT NULL,
    PRIMARY KEY (target, field)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS samples_fields_add AFTER INSERT ON samples WHEN json_valid(new.record) BEGIN
    INSERT INTO target_fields (target, field, n, total, bools)
    SELECT new.target, s.key || '.' || f.key, 1, f.value, f.type IN ('true', 'false')
    FROM json_each(new.record, '$.scores') AS s, json_each(s.value) AS f
    WHERE s.type = 'object' AND f.type IN ('integer', 'real', 'true', 'false')
    ON CONFLICT (target, field) DO UPDATE SET n = n + 1, total = total + excluded.total,
        bools = bools + excluded.bools;
END;
CREATE TRIGGER IF NOT EXISTS samples_fields_drop AFTER DELETE ON samples WHEN json_valid(old.record) BEGIN
    UPDATE target_fields SET n = n - 1, total = total - (
        SELECT f.value FROM json_each(old.record, '$.scores') AS s, json_each(s.value) AS f
        WHERE s.key || '.' || f.key = target_fields.field),
        bools = bools - (SELECT f.type IN ('true', 'false') FROM json_each(old.record, '$.scores') AS s,
                         json_each(s.value) AS f WHERE s.key || '.' || f.key = target_fields.field)
    WHERE target = old.target AND field IN (
        SELECT s.key || '.' || f.key FROM json_each(old.record, '$.scores') AS s, json_each(s.value) AS f
        WHERE s.type = 'object' AND f.type IN ('integer', 'real', 'true', 'false'));
END;
CREATE TRIGGER IF NOT EXISTS samples_fields_replace AFTER UPDATE OF record, target ON samples BEGIN
    UPDATE target_fields SET n = n - 1, total = total - (
        SELECT f.value FROM json_each(old.record, '$.scores') AS s, json_each(s.value) AS f
        WHERE s.key || '.' || f.key = target_fields.field),
        bools = bools - (SELECT f.type IN ('true', 'false') FROM json_each(old.record, '$.scores') AS s,
                         json_each(s.value) AS f WHERE s.key || '.' || f.key = target_fields.field)
    WHERE json_valid(old.record) AND target = old.target AND field IN (
        SELECT s.key || '.' || f.key FROM json_each(old.record, '$.scores') AS s, json_each(s.value) AS f
        WHERE s.type = 'object' AND f.type IN ('integer', 'real', 'true', 'false'));
    INSERT INTO target_fields (target, field, n, total, bools)
    SELECT new.target, s.key || '.' || f.key, 1, f.value, f.type IN ('true', 'false')
    FROM json_each(CASE WHEN json_valid(new.record) THEN new.record ELSE '{}' END, '$.scores') AS s,
         json_each(s.value) AS f
    WHERE s.type = 'object' AND f.type IN ('integer', 'real', 'true', 'false')
    ON CONFLICT (target, field) DO UPDATE SET n = n + 1, total = total + excluded.total,
        bools = bools + excluded.bools;
END;
"""

# Per target, a value that changes whenever one of its samples is written, replaced or deleted
# (a random 64-bit number, so a ledger made again from nothing never repeats an earlier one): what
# is computed from a target's samples (the report's statistics) is kept under it and is never
# read once the samples changed.
_VERSIONS = """
CREATE TABLE IF NOT EXISTS target_versions (
    target TEXT PRIMARY KEY, version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS samples_version_add AFTER INSERT ON samples BEGIN
    INSERT INTO target_versions (target, version) VALUES (new.target, random())
    ON CONFLICT (target) DO UPDATE SET version = excluded.version;
END;
CREATE TRIGGER IF NOT EXISTS samples_version_drop AFTER DELETE ON samples BEGIN
    INSERT INTO target_versions (target, version) VALUES (old.target, random())
    ON CONFLICT (target) DO UPDATE SET version = excluded.version;
END;
CREATE TRIGGER IF NOT EXISTS samples_version_replace AFTER UPDATE OF record, target ON samples BEGIN
    INSERT INTO target_versions (target, version) VALUES (old.target, random())
    ON CONFLICT (target) DO UPDATE SET version = excluded.version;
    INSERT INTO target_versions (target, version) VALUES (new.target, random())
    ON CONFLICT (target) DO UPDATE SET version = excluded.version;
END;
"""

# Where a failure in each state resumes when its retry time comes.
_RESUME = {DISCOVERED: DISCOVERED, STAGED: STAGED, EVALUATING: STAGED}


MAX_REASON_CHARS = 500


def one_line(text: object, limit: int = MAX_REASON_CHARS) -> str:
    """A failure reason as the ledger keeps it: one line (whitespace and control characters folded)
    and at most `limit` characters, so a hostile message (a file name, an exception's text) cannot
    break a table or fill the ledger.

    Args:
        text: the reason.
        limit: the longest reason kept.
    """
    line = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split()) or "unknown error"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _owner_only(path: Path) -> None:
    """Create the ledger's directory and file readable by the owner only (samples and prompts are in
    it), and take group/other access away from an older one and its WAL files."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if p.stat().st_mode & 0o077:
                os.chmod(p, 0o600)
        except FileNotFoundError:
            pass


class LedgerError(RuntimeError):
    """A ledger operation that cannot be done (unknown id, illegal state change, read-only...)."""


class LedgerNotReady(LedgerError):
    """A ledger file opened read-only before its writer created its tables."""


class LedgerLocked(LedgerError):
    """The ledger is held by another running job (`Ledger.lock_for_job`)."""


class Ledger:
    """Checkpoint states and samples in SQLite.

    Args:
        path: the SQLite file (created with its parent directory when writable).
        max_attempts: failures before a checkpoint is quarantined.
        backoff_s: the first retry delay; doubles with each failure.
        max_backoff_s: the cap on the retry delay.
        readonly: open for reading only (another process is the writer).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_attempts: int = 3,
        backoff_s: float = 30.0,
        max_backoff_s: float = 3600.0,
        readonly: bool = False,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.path = Path(path)
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.readonly = readonly
        self._lock = threading.RLock()
        if readonly:
            if not self.path.exists():
                raise LedgerError(f"ledger {self.path}: no such file")
            uri = f"file:{self.path.resolve()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False)
            # The writer creates the file a moment before its tables (one transaction, below): a
            # reader that comes in between says so rather than "no such table" on its first query.
            if self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'checkpoints'").fetchone() is None:
                self._db.close()
                raise LedgerNotReady(f"ledger {self.path}: no ledger tables in it yet (is a job creating it right now?)")
        else:
            _owner_only(self.path)
            self._db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk when it returns, as a point is once the spool's fsync returns
            # ("recorded" means the same on both sides). NORMAL would let the last commits of a power
            # loss go while their points are already spooled. Cost: one WAL fsync per commit (the
            # writer commits once per batch of samples, not per sample).
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript("BEGIN IMMEDIATE;\n" + _SCHEMA + "\nCOMMIT;")  # readers see all tables or none
            self._field_sums()
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout=30000")

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r}{', readonly' if self.readonly else ''})"

    def _field_sums(self) -> None:
        """Create the per-target field sums and their triggers; a ledger made before them gets
        its sums from the samples it holds, once."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                new = self._db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'target_fields'").fetchone() is None
                unversioned = self._db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'target_versions'").fetchone() is None
                for stmt in (_FIELD_SUMS.strip() + "\n" + _VERSIONS.strip()).split(";\nCREATE"):
                    self._db.execute(stmt if stmt.lstrip().startswith("CREATE") else "CREATE" + stmt)
                if unversioned:
                    self._db.execute("INSERT INTO target_versions (target, version) "
                                     "SELECT target, random() FROM samples GROUP BY target")
                if new:
                    self._db.execute(
                        "INSERT INTO target_fields (target, field, n, total, bools) "
                        "SELECT samples.target, s.key || '.' || f.key, COUNT(*), SUM(f.value), "
                        "SUM(f.type IN ('true', 'false')) FROM samples, json_each(samples.record, '$.scores') AS s, "
                        "json_each(s.value) AS f WHERE json_valid(samples.record) AND s.type = 'object' "
                        "AND f.type IN ('integer', 'real', 'true', 'false') GROUP BY 1, 2")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _write(self, fn: Any) -> Any:
        if self.readonly:
            raise LedgerError(f"ledger {self.path} is open read-only")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return out

    @staticmethod
    def _entry(row: sqlite3.Row) -> LedgerEntry:
        ck = Checkpoint(**{c: row[c] for c in _CKPT_COLS})
        return LedgerEntry(
            checkpoint=ck,
            state=row["state"],
            attempts=row["attempts"],
            last_error=row["last_error"],
            next_retry_at=row["next_retry_at"],
            resume_state=row["resume_state"],
            local_path=row["local_path"],
            discovered_at=row["discovered_at"],
            updated_at=row["updated_at"],
        )

    def _require(self, db: sqlite3.Connection, id: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM checkpoints WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise LedgerError(f"no checkpoint with id {id!r} in ledger {self.path}")
        return row

    # ------------------------------------------------------------------ checkpoints

    def upsert(self, checkpoint: Checkpoint, now: float | None = None) -> LedgerEntry:
        """Record a checkpoint as discovered; a known id keeps its state (idempotent).

        Args:
            checkpoint: the checkpoint; its id is the primary key.
            now: the time to record (default: time.time()).
        """
        return self.upsert_many([checkpoint], now)[0]

    def upsert_many(self, checkpoints: Iterable[Checkpoint], now: float | None = None) -> list[LedgerEntry]:
        """`upsert` for several checkpoints in one transaction.

        Args:
            checkpoints: the checkpoints.
            now: the time to record.
        """
        now = time.time() if now is None else now
        cks = list(checkpoints)
        cols = ", ".join(("id",) + _CKPT_COLS + ("state", "discovered_at", "updated_at"))
        marks = ", ".join("?" * (len(_CKPT_COLS) + 4))
        updates = ", ".join(f"{c} = excluded.{c}" for c in _CKPT_COLS if c != "sha256")
        sql = (
            f"INSERT INTO checkpoints ({cols}) VALUES ({marks}) ON CONFLICT(id) DO UPDATE SET {updates}, "
            "sha256 = COALESCE(checkpoints.sha256, excluded.sha256)"
        )

        def do(db: sqlite3.Connection) -> list[LedgerEntry]:
            out = []
            for ck in cks:
                db.execute(sql, [ck.id, *(getattr(ck, c) for c in _CKPT_COLS), DISCOVERED, now, now])
                out.append(self._entry(self._require(db, ck.id)))
            return out

        return self._write(do)

    def _transition(
        self, id: str, allowed: tuple[str, ...], new_state: str, now: float | None, **fields: Any
    ) -> LedgerEntry:
        now = time.time() if now is None else now

        def do(db: sqlite3.Connection) -> LedgerEntry:
            row = self._require(db, id)
            state = row["state"]
            ok = state in allowed or (
                state == FAILED and row["resume_state"] in allowed and FAILED not in allowed
            )
            if not ok:
                raise LedgerError(
                    f"checkpoint {id} ({row['label']}) is {state}"
                    + (f" ({row['last_error']})" if state == QUARANTINED and row["last_error"] else "")
                    + f"; cannot become {new_state} (allowed from: {', '.join(allowed)})"
                )
            sets = {"state": new_state, "updated_at": now, **fields}
            db.execute(
                f"UPDATE checkpoints SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?",
                [*sets.values(), id],
            )
            return self._entry(self._require(db, id))

        return self._write(do)

    def mark_staged(
        self, id: str, local_path: str | Path, sha256: str | None = None, now: float | None = None
    ) -> LedgerEntry:
        """discovered (or a due failure, or staged again after eviction) -> staged.

        Args:
            id: the checkpoint id.
            local_path: the staged directory on this node.
            sha256: the digest verified while staging (stored if the row had none).
            now: the time to record.
        """
        fields: dict[str, Any] = {"local_path": str(local_path), "next_retry_at": None}
        if sha256 is not None:
            with self._lock:
                row = self._db.execute("SELECT sha256 FROM checkpoints WHERE id = ?", (id,)).fetchone()
            if row is not None and row["sha256"] and row["sha256"] != sha256:
                raise LedgerError(
                    f"checkpoint {id}: staged bytes have sha256 {sha256[:12]}…, the ledger has {row['sha256'][:12]}…"
                    " (the file changed: it is a new version and gets a new id)"
                )
            fields["sha256"] = sha256
        return self._transition(id, (DISCOVERED, STAGED), STAGED, now, **fields)

    def mark_evaluating(self, id: str, now: float | None = None) -> LedgerEntry:
        """staged (or a due failure that resumes at staged) -> evaluating.

        Args:
            id: the checkpoint id.
            now: the time to record.
        """
        return self._transition(id, (STAGED, EVALUATING), EVALUATING, now, next_retry_at=None)

    def return_to_staged(self, id: str, reason: str, now: float | None = None) -> LedgerEntry:
        """evaluating -> staged with no attempt counted: it could not run for a reason that is not
        its own (its engine was down), and waits in the queue.

        Args:
            id: the checkpoint id.
            reason: why, one line (shown as its last error until it is scored).
            now: the time to record.
        """
        return self._transition(id, (EVALUATING,), STAGED, now, last_error=" ".join(reason.split()))

    def unstage(self, id: str, reason: str, now: float | None = None) -> LedgerEntry:
        """staged or evaluating -> discovered with no attempt counted: its staged copy cannot be
        served (its cache entry was evicted, or the adapter registry lost it), so it is staged and
        registered again rather than evaluated under a name its replicas do not know.

        Args:
            id: the checkpoint id.
            reason: why, one line (shown as its last error until it is scored).
            now: the time to record.
        """
        return self._transition(id, (STAGED, EVALUATING), DISCOVERED, now, local_path=None, next_retry_at=None,
                                last_error=one_line(reason))

    def reopen(self, id: str, reason: str, now: float | None = None) -> LedgerEntry:
        """scored -> staged: its results no longer describe what now serves its model (the base's
        weights, engine or settings changed behind the same name), so it is evaluated again.

        Args:
            id: the checkpoint id.
            reason: why, one line (shown as its last error until it is scored again).
            now: the time to record.
        """
        return self._transition(id, (SCORED,), STAGED, now, last_error=one_line(reason))

    def mark_scored(self, id: str, now: float | None = None) -> LedgerEntry:
        """evaluating -> scored.

        Args:
            id: the checkpoint id.
            now: the time to record.
        """
        return self._transition(id, (EVALUATING, SCORED), SCORED, now, last_error=None, next_retry_at=None)

    def record_failure(self, id: str, reason: str, permanent: bool = False, now: float | None = None) -> LedgerEntry:
        """Count a failure: failed with the next retry time on exponential backoff, or quarantined.

        Quarantine happens at once when `permanent` (a corrupt file, a shape mismatch) and after
        `max_attempts` failures otherwise.

        Args:
            id: the checkpoint id.
            reason: what went wrong, one line (kept as the quarantine reason).
            permanent: retrying cannot help.
            now: the time to record.
        """
        now = time.time() if now is None else now
        reason = one_line(reason)

        def do(db: sqlite3.Connection) -> LedgerEntry:
            row = self._require(db, id)
            state = row["state"]
            if state in (SCORED, QUARANTINED):
                raise LedgerError(f"checkpoint {id} ({row['label']}) is {state}; a failure cannot be recorded")
            resume = row["resume_state"] if state == FAILED else _RESUME[state]
            attempts = row["attempts"] + 1
            if permanent or attempts >= self.max_attempts:
                why = reason if permanent else f"{reason} (after {attempts} attempts)"
                sets = {"state": QUARANTINED, "attempts": attempts, "last_error": why, "next_retry_at": None,
                        "resume_state": resume, "updated_at": now}
            else:
                delay = min(self.backoff_s * 2 ** (attempts - 1), self.max_backoff_s)
                sets = {"state": FAILED, "attempts": attempts, "last_error": reason, "next_retry_at": now + delay,
                        "resume_state": resume, "updated_at": now}
            db.execute(
                f"UPDATE checkpoints SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?", [*sets.values(), id]
            )
            return self._entry(self._require(db, id))

        return self._write(do)

    def retry(self, id: str, now: float | None = None) -> LedgerEntry:
        """Send a checkpoint back to discovered, with its failure count cleared.

        Args:
            id: the checkpoint id (or a unique prefix of it).
            now: the time to record.
        """
        full = self.resolve_id(id)
        return self._transition(
            full, (DISCOVERED, STAGED, SCORED, FAILED, QUARANTINED), DISCOVERED, now,
            attempts=0, last_error=None, next_retry_at=None, resume_state=None,
        )

    def lock_for_job(self, job_id: str, running: Callable[[str], bool], now: float | None = None) -> None:
        """Hold this ledger for one job: one job writes a ledger at a time.

        Held already by `job_id` (a restarted writer of the same job): kept. Held by another job that
        still runs: LedgerLocked, one line naming the ledger and that job. Held by a job that is no
        longer running (it crashed without letting go): taken over.

        Args:
            job_id: the job taking it (a Ray job id).
            running: whether a job id still runs (asked of the holder only).
            now: the time to record.
        """
        now = time.time() if now is None else now

        def do(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT job FROM job_lock WHERE one = 1").fetchone()
            holder = row[0] if row is not None else None
            if holder is not None and holder != job_id and running(holder):
                return holder
            db.execute("INSERT OR REPLACE INTO job_lock (one, job, since) VALUES (1, ?, ?)", (job_id, now))
            return None

        holder = self._write(do)
        if holder is not None:
            raise LedgerLocked(f"ledger {self.path} is in use by running job {holder}: give this job its own "
                               f"sinks.ledger, or stop job {holder} first")

    def job_holding(self) -> str | None:
        """The job holding this ledger (`lock_for_job`), or None."""
        with self._lock:
            try:
                row = self._db.execute("SELECT job FROM job_lock WHERE one = 1").fetchone()
            except sqlite3.OperationalError:  # no lock table: never locked
                return None
        return row[0] if row is not None else None

    def unlock_job(self, job_id: str) -> None:
        """Let go of the ledger if `job_id` holds it (a job ending cleanly)."""

        def do(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM job_lock WHERE job = ?", (job_id,))

        self._write(do)

    def recover(self, now: float | None = None) -> int:
        """After a crash: put checkpoints left `evaluating` back to `staged`. Returns how many.

        Args:
            now: the time to record.
        """
        now = time.time() if now is None else now
        return self._write(
            lambda db: db.execute(
                "UPDATE checkpoints SET state = ?, updated_at = ? WHERE state = ?", (STAGED, now, EVALUATING)
            ).rowcount
        )

    def resolve_id(self, id_or_prefix: str) -> str:
        """The full id for an id or a unique prefix of one; LedgerError otherwise.

        Args:
            id_or_prefix: what the user typed.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM checkpoints WHERE id = ? OR id LIKE ? ESCAPE '\\' LIMIT 3",
                (id_or_prefix, id_or_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"),
            ).fetchall()
        ids = sorted({r["id"] for r in rows})
        if id_or_prefix in ids:
            return id_or_prefix
        if not ids:
            raise LedgerError(f"no checkpoint with id {id_or_prefix!r} in ledger {self.path}")
        if len(ids) > 1:
            raise LedgerError(f"id prefix {id_or_prefix!r} is ambiguous in ledger {self.path} ({', '.join(ids)}, ...)")
        return ids[0]

    def get(self, id: str) -> LedgerEntry | None:
        """The row for an id, or None.

        Args:
            id: the checkpoint id.
        """
        with self._lock:
            row = self._db.execute("SELECT * FROM checkpoints WHERE id = ?", (id,)).fetchone()
        return self._entry(row) if row else None

    def list(self, source: str | None = None, run: str | None = None, state: str | None = None) -> list[LedgerEntry]:
        """Rows, filtered, ordered by source, run and iteration.

        Args:
            source: only this source.
            run: only this run.
            state: only this state.
        """
        where, args = [], []
        for col, val in (("source", source), ("run", run), ("state", state)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = "SELECT * FROM checkpoints" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY source, run, iteration, discovered_at"
        with self._lock:
            return [self._entry(r) for r in self._db.execute(sql, args).fetchall()]

    def due(self, state: str = DISCOVERED, now: float | None = None, limit: int | None = None) -> list[LedgerEntry]:
        """What is ready for the step after `state`: rows in `state` plus failures due to resume there.

        Never-failed rows come first, then by run and iteration; quarantined rows never appear, and a
        failure before its retry time does not either.

        Args:
            state: discovered (to stage), staged (to evaluate) or evaluating.
            now: the time to compare retry times with.
            limit: at most this many rows.
        """
        if state not in (DISCOVERED, STAGED, EVALUATING):
            raise ValueError(f"due(state={state!r}): state must be one of discovered, staged, evaluating")
        now = time.time() if now is None else now
        sql = (
            "SELECT * FROM checkpoints WHERE state = ? OR (state = ? AND resume_state = ? AND next_retry_at <= ?) "
            "ORDER BY attempts, source, run, iteration" + (" LIMIT ?" if limit else "")
        )
        args: list[Any] = [state, FAILED, state, now] + ([limit] if limit else [])
        with self._lock:
            return [self._entry(r) for r in self._db.execute(sql, args).fetchall()]

    def known_digests(self, source: str) -> dict[tuple[str, int, float], str]:
        """(path, size, mtime) -> sha256 for every hashed checkpoint of a source (re-hashing skipped).

        Args:
            source: the source name.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT path, size, mtime, sha256 FROM checkpoints WHERE source = ? AND sha256 IS NOT NULL", (source,)
            ).fetchall()
        return {(r["path"], r["size"], r["mtime"]): r["sha256"] for r in rows}

    def counts(self) -> dict[str, int]:
        """How many checkpoints are in each state."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM checkpoints GROUP BY state").fetchall()
        out = {s: 0 for s in STATES}
        out.update({r["state"]: r["n"] for r in rows})
        return out

    def run_states(self) -> list[dict[str, Any]]:
        """Per run and state, how many checkpoints: {"source", "run", "run_id", "state", "n"}, in
        run order (one aggregate query; what `status` counts)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT run, state, MIN(source) AS source, MIN(run_id) AS run_id, COUNT(*) AS n "
                "FROM checkpoints GROUP BY run, state ORDER BY run, state").fetchall()
        return [dict(r) for r in rows]

    # ------------------------------------------------------------------ samples

    def record_samples(self, records: list[dict[str, Any]], now: float | None = None) -> int:
        """Upsert sample records by their "key"; all or nothing. Returns how many were written.

        Args:
            records: dicts with at least "key" (unique str), "target" (a checkpoint id or
                "base:<model>") and "probe_id"; stored verbatim as JSON.
            now: the time to record.
        """
        now = time.time() if now is None else now
        rows = []
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise ValueError(f"sample record {i}: expected a dict, got {type(rec).__name__}")
            for f in ("key", "target", "probe_id"):
                v = rec.get(f)
                if not isinstance(v, str) or not v:
                    raise ValueError(f"sample record {i}: field {f!r} must be a non-empty string, got {v!r}")
            try:
                text = json.dumps(rec, ensure_ascii=False, sort_keys=True)
            except (TypeError, ValueError) as e:
                raise ValueError(f"sample record {i} (key {rec['key']!r}) is not JSON-serialisable: {e}") from None
            rows.append((rec["key"], rec["target"], rec["probe_id"], text, now))
        if not rows:
            return 0

        def do(db: sqlite3.Connection) -> int:
            db.executemany(
                "INSERT INTO samples (key, target, probe_id, record, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET target = excluded.target, probe_id = excluded.probe_id, "
                "record = excluded.record, updated_at = excluded.updated_at",
                rows,
            )
            return len(rows)

        return self._write(do)

    def sample_keys(self, target: str) -> set[str]:
        """The keys of the samples recorded for a target (what a resumed run skips).

        A sample recorded without an answer (`"complete": false`, its generation failed) is left
        out, so a resumed run makes it again.

        Args:
            target: a checkpoint id or "base:<model>".
        """
        sql = ("SELECT key FROM samples WHERE target = ? "
               "AND coalesce(json_extract(record, '$.complete'), 1) != 0")
        with self._lock:
            return {r[0] for r in self._db.execute(sql, (target,))}

    def field_means(self, targets: Iterable[str] | None = None) -> dict[str, dict[str, tuple[float, int, bool]]]:
        """target -> field ("<scorer>.<field>") -> (mean, samples with it, pass/fail), from the
        sums the ledger keeps as samples are written: no sample is read.

        Args:
            targets: only these targets (default: every target).
        """
        sql = "SELECT target, field, n, total, bools FROM target_fields WHERE n > 0"
        args: list[Any] = []
        if targets is not None:
            ts = list(targets)
            sql += f" AND target IN ({', '.join('?' * len(ts))})"
            args = ts
        rows = self._kept_rows(sql, args)  # none yet in a ledger made before the sums: no means
        out: dict[str, dict[str, tuple[float, int, bool]]] = {}
        for r in rows:
            out.setdefault(r["target"], {})[r["field"]] = (r["total"] / r["n"], r["n"], r["bools"] == r["n"])
        return out

    def target_versions(self, targets: Iterable[str] | None = None) -> dict[str, int]:
        """target -> a value that changes whenever one of its samples is written, replaced or
        deleted (none for a target without samples): what was computed from a target's samples
        under one value is current while the value is.

        Args:
            targets: only these targets (default: every target).
        """
        sql, args = "SELECT target, version FROM target_versions", []
        if targets is not None:
            args = list(targets)
            sql += f" WHERE target IN ({', '.join('?' * len(args))})"
        return {r[0]: r[1] for r in self._kept_rows(sql, args)}  # none in an older ledger: nothing is current

    def _kept_rows(self, sql: str, args: list[Any]) -> list[sqlite3.Row]:
        """Rows of a table the triggers keep; none when the ledger was made before that table and is
        opened read-only (a writer creates it, with what the samples say, when it opens the ledger)."""
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as e:
                if "no such table" not in str(e):
                    raise
                return []

    def samples(self, target: str) -> list[dict[str, Any]]:
        """The sample records of a target, as stored, in key order.

        Args:
            target: a checkpoint id or "base:<model>".
        """
        with self._lock:
            rows = self._db.execute("SELECT record FROM samples WHERE target = ? ORDER BY key", (target,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    SCORE_KEYS = ("key", "target", "probe_set", "probe_id", "repeat", "scores", "failures", "complete")

    def sample_scores(self, target: str) -> list[dict[str, Any]]:
        """The sample records of a target cut down to what statistics read (`SCORE_KEYS`, and
        `provenance` with its model only), in key order: SQLite picks the parts out, so a report
        of a long run does not parse every prompt and answer.

        Args:
            target: a checkpoint id or "base:<model>".
        """
        sql = ("SELECT key, target, probe_id, record ->> '$.probe_set', record ->> '$.repeat', record -> '$.scores', "
               "record -> '$.failures', record ->> '$.complete', record ->> '$.provenance.model' "
               "FROM samples WHERE target = ? ORDER BY key")
        with self._lock:
            try:
                rows = self._db.execute(sql, (target,)).fetchall()
            except sqlite3.OperationalError as e:
                if "malformed JSON" not in str(e):
                    raise
                rows = None  # a record SQLite cannot read (a NaN score): Python's json can
        if rows is None:
            return [{**{k: r.get(k) for k in self.SCORE_KEYS},
                     "provenance": {"model": (r.get("provenance") or {}).get("model")}} for r in self.samples(target)]
        return [{"key": r[0], "target": r[1], "probe_set": r[3], "probe_id": r[2], "repeat": r[4],
                 "scores": json.loads(r[5]) if r[5] else {},
                 "failures": json.loads(r[6]) if r[6] and r[6] != "{}" else {},
                 "complete": None if r[7] is None else bool(r[7]), "provenance": {"model": r[8]}} for r in rows]

    def newest_samples(self, targets: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Each target's most recently written sample record (targets without samples are absent).

        Args:
            targets: checkpoint ids or "base:<model>".
        """
        ts = list(targets)
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(ts), 500):  # within SQLite's limit on bound parameters
            part = ts[i:i + 500]
            sql = (f"SELECT target, record, MAX(updated_at) FROM samples WHERE target IN ({', '.join('?' * len(part))}) "
                   "GROUP BY target")  # SQLite takes the other columns from the row with the maximum
            with self._lock:
                out.update((r[0], json.loads(r[1])) for r in self._db.execute(sql, part).fetchall())
        return out

    def targets(self) -> list[dict[str, Any]]:
        """One summary per target: samples, distinct probes, first and last write times."""
        with self._lock:
            rows = self._db.execute(
                "SELECT target, COUNT(*) AS samples, COUNT(DISTINCT probe_id) AS probes, "
                "MIN(updated_at) AS first_at, MAX(updated_at) AS last_at FROM samples GROUP BY target ORDER BY target"
            ).fetchall()
        return [dict(r) for r in rows]

    # ------------------------------------------------------------------ finished targets

    def mark_finished(self, target: str, fingerprint: str, now: float | None = None) -> None:
        """Record that every sample of a target is in and its summary was written.

        Checkpoints have the `scored` state for this; a base model has no checkpoint row, so
        without this a restarted job would finish it (and send its summary) again.

        Args:
            target: a checkpoint id or "base:<model>".
            fingerprint: what the target was evaluated with (probe sets, scorers, sampling); a
                later run with a different fingerprint evaluates it again.
            now: the time to record.
        """
        now = time.time() if now is None else now
        self._write(lambda db: db.execute(
            "INSERT INTO finished_targets (target, fingerprint, finished_at) VALUES (?, ?, ?) "
            "ON CONFLICT(target) DO UPDATE SET fingerprint = excluded.fingerprint, finished_at = excluded.finished_at",
            (target, fingerprint, now),
        ))

    def finished(self) -> dict[str, str]:
        """Every finished target and the fingerprint it was finished with."""
        with self._lock:
            try:
                rows = self._db.execute("SELECT target, fingerprint FROM finished_targets").fetchall()
            except sqlite3.OperationalError:  # a ledger made before the table, opened read-only
                return {}
        return {r[0]: r[1] for r in rows}

    # ------------------------------------------------------------------ flags on targets
    # Created on first use (older ledgers gain the table; read-only ones without it have no flags).

    def flag_target(self, target: str, flag: str | None, detail: dict[str, Any] | None = None,
                    now: float | None = None) -> None:
        """Set (or, with None, clear) a target's flag, e.g. "adapter had no effect".

        Args:
            target: a checkpoint id or another target id.
            flag: the flag, one line; None clears it.
            detail: what it rests on (stored as JSON).
            now: the time to record.
        """
        now = time.time() if now is None else now

        def do(db: sqlite3.Connection) -> None:
            db.execute("CREATE TABLE IF NOT EXISTS target_flags (target TEXT PRIMARY KEY, flag TEXT NOT NULL, "
                       "detail TEXT NOT NULL, updated_at REAL NOT NULL)")
            if flag is None:
                db.execute("DELETE FROM target_flags WHERE target = ?", (target,))
            else:
                db.execute("INSERT INTO target_flags (target, flag, detail, updated_at) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT(target) DO UPDATE SET flag = excluded.flag, detail = excluded.detail, "
                           "updated_at = excluded.updated_at", (target, one_line(flag), json.dumps(detail or {}), now))

        self._write(do)

    def target_flags(self) -> dict[str, dict[str, Any]]:
        """target -> {"flag", "detail"} for every flagged target."""
        rows = self._point_rows("SELECT target, flag, detail FROM target_flags ORDER BY target")
        return {r["target"]: {"flag": r["flag"], "detail": json.loads(r["detail"])} for r in rows}

    # ------------------------------------------------------------------ points for the sinks
    # Kept apart from the tables above (created on first use, so older ledgers gain them): what
    # the result recorder (evaluators.results) needs to re-derive InfluxDB points from the ledger.
    # `point_targets` names each target as InfluxDB knows it and says whether its summary was
    # written; `points_owed` lists the samples (and summaries, key "*summary") whose points are
    # not in the spool yet: marked before the spool write, cleared after it (`done` counts the
    # points of an entry already queued, when its points had to go in parts).

    @staticmethod
    def _point_tables(db: sqlite3.Connection) -> None:
        db.execute(
            "CREATE TABLE IF NOT EXISTS point_targets (target TEXT PRIMARY KEY, info TEXT NOT NULL, "
            "finished INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL)"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS points_owed (target TEXT NOT NULL, key TEXT NOT NULL, owner TEXT NOT NULL, "
            "since REAL NOT NULL, done INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (target, key))"
        )

    def _point_rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):
                    return []  # nothing was ever noted (an older or read-only ledger)
                raise

    def note_point_target(self, target: str, info: dict[str, Any], finished: bool = False,
                          now: float | None = None) -> None:
        """Record how a target is named in InfluxDB (and, once, that its summary was written).

        Args:
            target: a checkpoint id, "base:<model>" or an eval target id.
            info: its naming ({"target", "model", "run_id", "label", "iteration"}), stored as JSON.
            finished: every sample is in and the summary was written.
            now: the time to record.
        """
        now = time.time() if now is None else now
        text = json.dumps(info, sort_keys=True)

        def do(db: sqlite3.Connection) -> None:
            self._point_tables(db)
            db.execute(
                "INSERT INTO point_targets (target, info, finished, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(target) DO UPDATE SET info = excluded.info, "
                "finished = max(point_targets.finished, excluded.finished), updated_at = excluded.updated_at",
                (target, text, int(finished), now),
            )

        self._write(do)

    def point_targets(self) -> dict[str, dict[str, Any]]:
        """target -> {"info": the naming noted, "finished": bool}, for every noted target."""
        rows = self._point_rows("SELECT target, info, finished FROM point_targets ORDER BY target")
        return {r["target"]: {"info": json.loads(r["info"]), "finished": bool(r["finished"])} for r in rows}

    def owe_points(self, target: str, keys: Iterable[str], owner: str, now: float | None = None) -> int:
        """Mark the points of these samples (or "*summary") as not yet in the spool.

        Args:
            target: the target they belong to.
            keys: sample keys, or "*summary" for the target's summary points.
            owner: who will send them ("host:pid" of the writer).
            now: the time to record.
        """
        now = time.time() if now is None else now
        rows = [(target, k, owner, now) for k in keys]
        if not rows:
            return 0

        def do(db: sqlite3.Connection) -> int:
            self._point_tables(db)
            db.executemany(
                "INSERT INTO points_owed (target, key, owner, since) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(target, key) DO UPDATE SET owner = excluded.owner, done = 0",
                rows,
            )
            return len(rows)

        return self._write(do)

    def points_owed(self) -> list[dict[str, Any]]:
        """Every owed entry: {"target", "key", "owner", "since", "done"}, oldest first."""
        rows = self._point_rows("SELECT target, key, owner, since, done FROM points_owed ORDER BY since, target, key")
        return [dict(r) for r in rows]

    def advance_points(self, target: str, key: str, done: int) -> None:
        """Record that the first `done` points of an owed entry are in the spool (the rest are not).

        Args:
            target: the target.
            key: the sample key or "*summary".
            done: how many of its points (in derivation order) are queued.
        """
        def do(db: sqlite3.Connection) -> None:
            self._point_tables(db)
            db.execute("UPDATE points_owed SET done = ? WHERE target = ? AND key = ?", (int(done), target, key))

        self._write(do)

    def count_points_owed(self) -> int:
        """How many owed entries there are."""
        rows = self._point_rows("SELECT COUNT(*) FROM points_owed")
        return int(rows[0][0]) if rows else 0

    def settle_points(self, target: str, keys: Iterable[str] | None = None) -> int:
        """The points are in the spool now: clear their owed entries. Returns how many were cleared.

        Args:
            target: the target.
            keys: the sample keys (or "*summary"); None clears every entry of the target.
        """
        ks = None if keys is None else list(keys)
        if ks is not None and not ks:
            return 0

        def do(db: sqlite3.Connection) -> int:
            self._point_tables(db)
            if ks is None:
                return db.execute("DELETE FROM points_owed WHERE target = ?", (target,)).rowcount
            return sum(db.execute("DELETE FROM points_owed WHERE target = ? AND key = ?", (target, k)).rowcount
                       for k in ks)

        return self._write(do)

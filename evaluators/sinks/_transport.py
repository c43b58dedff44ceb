"""Talking to InfluxDB: protocol detection, the v1 and v2 batching writers, and error classification.

Both writers have the same shape: `submit(lines)` queues line-protocol lines (never blocks on the
network), batches go out by size or flush interval with retries and exponential backoff, and
`on_ok(lines)` / `on_error(lines, WriteFailure)` report what the server acknowledged. `write_sync`
sends one request without retries (used to probe a server after an outage and to isolate bad
points). v2 is influxdb-client's batching WriteApi; v1 (`/write?db=&rp=&precision=`) is the same
semantics over httpx.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Literal

import httpx

from evaluators.sinks._config import InfluxConfig

log = logging.getLogger("evaluators.sinks")

FailureKind = Literal["transient", "config", "reject"]
OnOk = Callable[[list[bytes]], None]
OnError = Callable[[list[bytes], "WriteFailure"], None]


class WriteFailure(Exception):
    """A write the server did not acknowledge.

    kind: "transient" (unreachable, timeout, 5xx, 429: retry later), "config" (bad token, missing
    database or bucket: retry after the user fixes it), "reject" (400/413/422: these points are bad).
    """

    def __init__(self, kind: FailureKind, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind: FailureKind = kind
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Target:
    """Where points go: the server, the protocol and the database (v1) or bucket and org (v2)."""

    url: str
    """The server's base URL (no trailing slash)."""
    protocol: Literal["v1", "v2"]
    """The write API spoken."""
    database: str | None
    """The v1 database."""
    retention_policy: str | None
    """The v1 retention policy (None: the database's default)."""
    bucket: str | None
    """The v2 bucket."""
    org: str | None
    """The v2 org."""

    @property
    def where(self) -> str:
        if self.protocol == "v1":
            rp = f", retention policy {self.retention_policy!r}" if self.retention_policy else ""
            return f"{self.url} (v1, database {self.database!r}{rp})"
        return f"{self.url} (v2, bucket {self.bucket!r}, org {self.org!r})"


def make_target(cfg: InfluxConfig, protocol: Literal["v1", "v2"]) -> Target:
    """The write target for `protocol`, or a `WriteFailure("config")` naming the missing setting.

    Args:
        cfg: sinks.influx.
        protocol: "v1" or "v2" (already detected).
    """
    url = cfg.endpoint
    if protocol == "v1":
        if not cfg.database:
            raise WriteFailure("config", "sinks.influx.database is not set; the v1 /write API needs a database")
        return Target(url, "v1", cfg.database, cfg.retention_policy, None, None)
    bucket = cfg.bucket or (
        (cfg.database + (f"/{cfg.retention_policy}" if cfg.retention_policy else "")) if cfg.database else None
    )
    if not bucket:
        raise WriteFailure("config", "sinks.influx.bucket (or database) is not set; the v2 write API needs a bucket")
    if not cfg.org:
        raise WriteFailure(
            "config",
            "sinks.influx.org is not set; the v2 write API needs an org (VictoriaMetrics and InfluxDB 3 accept any value)",
        )
    return Target(url, "v2", cfg.database, cfg.retention_policy, bucket, cfg.org)


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Detected:
    """What `/ping` said and which protocol was chosen, with the reason in words."""

    protocol: Literal["v1", "v2"]
    """The protocol chosen."""
    version: str | None
    """The server's X-Influxdb-Version (None: it sent none)."""
    build: str | None
    """The server's X-Influxdb-Build (None: it sent none)."""
    reason: str
    """Why this protocol, in words."""


def detect_protocol(cfg: InfluxConfig, timeout: float | None = None) -> Detected:
    """Choose v1 or v2: from the config, or from `/ping`'s X-Influxdb-Version header.

    1.x -> v1; 2.x, 3.x -> v2; no version header (VictoriaMetrics and other compatible servers speak
    both) -> v2 when a bucket and org are configured, else v1.

    Args:
        cfg: sinks.influx.
        timeout: seconds (default: cfg.timeout_s).

    Raises:
        WriteFailure: the server cannot be reached (kind "transient").
    """
    url = cfg.endpoint
    if not url:
        raise WriteFailure("config", "sinks.influx.url is not set (set INFLUX_URL)")
    version = build = None
    try:
        r = httpx.get(url + "/ping", timeout=timeout or cfg.timeout_s)
        version = r.headers.get("x-influxdb-version")
        build = r.headers.get("x-influxdb-build")
        if r.status_code >= 500:
            raise WriteFailure("transient", f"{url}/ping answered {r.status_code}", r.status_code)
    except httpx.HTTPError as e:
        raise WriteFailure("transient", f"cannot reach InfluxDB at {url}: {_describe_httpx(e)}") from None
    if cfg.protocol != "auto":
        return Detected(cfg.protocol, version, build, "set in sinks.influx.protocol")
    if version:
        v = version.lstrip("vV")
        if v.startswith("1."):
            return Detected("v1", version, build, f"detected from /ping: X-Influxdb-Version {version}")
        return Detected("v2", version, build, f"detected from /ping: X-Influxdb-Version {version}")
    if cfg.bucket and cfg.org:
        return Detected("v2", None, build, "chosen because /ping has no X-Influxdb-Version (VictoriaMetrics-like) "
                        "and a bucket and org are set")
    return Detected("v1", None, build, "chosen because /ping has no X-Influxdb-Version (VictoriaMetrics-like) "
                    "and no bucket and org are set")


# --------------------------------------------------------------------------- errors


def _describe_httpx(e: httpx.HTTPError) -> str:
    if isinstance(e, httpx.ConnectError):
        return f"connection failed ({e})" if str(e) else "connection refused"
    if isinstance(e, httpx.TimeoutException):
        return f"timed out ({type(e).__name__})"
    return f"{type(e).__name__}: {e}"


def classify_status(target: Target, status: int, body: str) -> WriteFailure:
    """Turn an HTTP error answer into a `WriteFailure` with a message a user can act on.

    Args:
        target: where the write went.
        status: the HTTP status.
        body: the response body (InfluxDB puts the reason there).
    """
    msg = _error_text(body)
    where = target.where
    if status in (401, 403):
        return WriteFailure(
            "config",
            f"InfluxDB at {where} refused the credentials ({status}: {msg}); check the token "
            "(sinks.influx.token_env / token_file; for InfluxDB 1.x write it as user:password)",
            status,
        )
    if status == 404:
        if "database not found" in msg:
            return WriteFailure(
                "config",
                f"database {target.database!r} does not exist on {target.url} ({msg}); create it: "
                f"CREATE DATABASE \"{target.database}\"",
                status,
            )
        if "bucket" in msg.lower():
            return WriteFailure("config", f"bucket {target.bucket!r} does not exist on {target.url} ({msg})", status)
        other = "v1" if target.protocol == "v2" else "v2"
        return WriteFailure(
            "config", f"{where}: the write endpoint was not found ({msg}); does this server speak {other}? "
            "set sinks.influx.protocol", status,
        )
    if status in (400, 413, 422):
        return WriteFailure("reject", f"InfluxDB at {where} rejected the points ({status}: {msg})", status)
    if status == 500 and "retention policy not found" in msg:
        return WriteFailure("config", f"{where}: {msg}; fix sinks.influx.retention_policy", status)
    if status == 429 or status >= 500:
        return WriteFailure("transient", f"InfluxDB at {where} answered {status}: {msg}", status)
    return WriteFailure("config", f"InfluxDB at {where} answered {status}: {msg}", status)


def _error_text(body: str | bytes | None) -> str:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    body = (body or "").strip()
    if body.startswith("{"):
        import json

        try:
            obj = json.loads(body)
            body = str(obj.get("error") or obj.get("message") or body)
        except (ValueError, AttributeError):
            pass
    return body.replace("\n", " ")[:300] or "no message"


def backoff_s(attempt: int, first_s: float, max_s: float) -> float:
    """Exponential backoff with jitter: attempt 0 -> [first, 2*first), doubling, capped at max_s.

    Args:
        attempt: 0 for the first retry.
        first_s: the first delay.
        max_s: the cap.
    """
    lo = min(first_s * (2**attempt), max_s)
    return min(lo * (1 + random.random()), max_s)


def _auth(token: str | None) -> tuple[dict[str, str], httpx.BasicAuth | None]:
    if not token:
        return {}, None
    if ":" in token:  # InfluxDB 1.x credentials, written user:password (as influxdb-client's v1 compat does)
        user, _, password = token.partition(":")
        return {}, httpx.BasicAuth(user, password)
    return {"Authorization": f"Token {token}"}, None


# --------------------------------------------------------------------------- v1


class V1Writer:
    """Batches lines and posts them to `/write?db=&rp=&precision=ns` with httpx, in order.

    Args:
        target: a v1 target.
        token: None, "user:password" (basic auth) or a token (`Authorization: Token`).
        cfg: batch size, flush interval, retries and timeouts come from sinks.influx.
        on_ok: called with the lines of each acknowledged batch.
        on_error: called with the lines of a batch that failed after its retries.
    """

    def __init__(self, target: Target, token: str | None, cfg: InfluxConfig, on_ok: OnOk, on_error: OnError) -> None:
        self.target = target
        headers, auth = _auth(token)
        self._client = httpx.Client(timeout=cfg.timeout_s, headers=headers, auth=auth)
        self._params = {"db": target.database, "precision": "ns"}
        if target.retention_policy:
            self._params["rp"] = target.retention_policy
        self._cfg = cfg
        self._on_ok = on_ok
        self._on_error = on_error
        self._queue: deque[bytes] = deque()
        self._oldest: float | None = None
        self._flush = False
        self._stop = threading.Event()
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="influx-v1-writer", daemon=True)
        self._thread.start()

    def submit(self, lines: list[bytes]) -> None:
        """Queue lines; they go out when a batch is full or the flush interval has passed."""
        with self._cv:
            if not self._queue:
                self._oldest = time.monotonic()
            self._queue.extend(lines)
            self._cv.notify()

    def flush(self) -> None:
        """Send what is queued now instead of waiting for the flush interval."""
        with self._cv:
            self._flush = True
            self._cv.notify()

    def write_sync(self, lines: list[bytes]) -> None:
        """One POST, no retries. Raises `WriteFailure`."""
        try:
            r = self._client.post(self.target.url + "/write", params=self._params, content=b"\n".join(lines))
        except httpx.HTTPError as e:
            raise WriteFailure("transient", f"cannot reach InfluxDB at {self.target.where}: {_describe_httpx(e)}") from None
        if r.status_code not in (200, 204):
            raise classify_status(self.target, r.status_code, r.text)

    def close(self, timeout: float = 10.0, abandon: bool = False) -> None:
        """Stop; lines still queued are not sent (they wait in the spool)."""
        self._stop.set()
        with self._cv:
            self._cv.notify()
        self._thread.join(timeout)
        self._client.close()

    def _next_batch(self) -> list[bytes] | None:
        interval = self._cfg.flush_interval_ms / 1000
        with self._cv:
            while not self._stop.is_set():
                if self._queue:
                    age = time.monotonic() - (self._oldest or time.monotonic())
                    if len(self._queue) >= self._cfg.batch_size or self._flush or age >= interval:
                        n = min(len(self._queue), self._cfg.batch_size)
                        batch = [self._queue.popleft() for _ in range(n)]
                        self._oldest = time.monotonic() if self._queue else None
                        if not self._queue:
                            self._flush = False
                        return batch
                    self._cv.wait(interval - age)
                else:
                    # A flush asked for while nothing is queued applies to what comes next: the
                    # sink asks before it hands over its newest lines.
                    self._cv.wait()
        return None

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            err = self._post_with_retries(batch)
            if err is None:
                self._on_ok(batch)
                continue
            # Fail what is queued behind it too, at once: the sink spools and replays them in order.
            with self._cv:
                rest = list(self._queue)
                self._queue.clear()
                self._oldest = None
            self._on_error(batch + rest, err)

    def _post_with_retries(self, batch: list[bytes]) -> WriteFailure | None:
        cfg = self._cfg
        attempt = 0
        while True:
            try:
                self.write_sync(batch)
                return None
            except WriteFailure as e:
                if e.kind != "transient" or attempt >= cfg.max_retries or self._stop.is_set():
                    return e
                log.debug("InfluxDB write failed (%s); retry %d of %d", e.message, attempt + 1, cfg.max_retries)
                if self._stop.wait(backoff_s(attempt, cfg.retry_interval_ms / 1000, cfg.max_retry_delay_ms / 1000)):
                    return e
                attempt += 1


# --------------------------------------------------------------------------- v2


class V2Writer:
    """influxdb-client's batching WriteApi (InfluxDB 2.x/3.x, Cloud, VictoriaMetrics).

    The WriteApi batches by size and flush interval and retries with exponential backoff; its
    success and error callbacks report each batch, whose body is split back into lines.

    Args: as `V1Writer`, with a v2 target.
    """

    def __init__(self, target: Target, token: str | None, cfg: InfluxConfig, on_ok: OnOk, on_error: OnError) -> None:
        from influxdb_client import InfluxDBClient, WriteOptions
        from influxdb_client.client.write_api import SYNCHRONOUS
        from reactivex.scheduler import ThreadPoolScheduler

        _quiet_client_logs(+1)
        self.target = target
        self._on_ok = on_ok
        self._on_error = on_error
        self._client = InfluxDBClient(url=target.url, token=token or None, org=target.org,
                                      timeout=int(cfg.timeout_s * 1000))
        # A scheduler of our own: WriteOptions' default one is shared by every WriteApi in the process.
        self._scheduler = ThreadPoolScheduler(max_workers=1)
        opts = WriteOptions(
            batch_size=cfg.batch_size, flush_interval=cfg.flush_interval_ms, jitter_interval=0,
            retry_interval=cfg.retry_interval_ms, max_retries=cfg.max_retries,
            max_retry_delay=cfg.max_retry_delay_ms, exponential_base=2,
            max_retry_time=max(cfg.max_retry_delay_ms * (cfg.max_retries + 1), 1000) + int(cfg.timeout_s * 1000) * (cfg.max_retries + 1),
            max_close_wait=int(cfg.timeout_s * 1000) * 2, write_scheduler=self._scheduler,
        )
        self._write_api = self._client.write_api(
            write_options=opts, success_callback=self._ok, error_callback=self._error,
        )
        self._sync_api = self._client.write_api(write_options=SYNCHRONOUS)

    def submit(self, lines: list[bytes]) -> None:
        """Queue lines into the WriteApi (it batches and sends them from its own threads)."""
        from influxdb_client import WritePrecision

        self._write_api.write(bucket=self.target.bucket, org=self.target.org, record=lines,
                              write_precision=WritePrecision.NS)

    def flush(self) -> None:
        """No-op: the WriteApi sends at its flush interval (its own flush() does nothing)."""

    def write_sync(self, lines: list[bytes]) -> None:
        """One synchronous write, no retries. Raises `WriteFailure`."""
        from influxdb_client import WritePrecision

        try:
            self._sync_api.write(bucket=self.target.bucket, org=self.target.org, record=b"\n".join(lines),
                                 write_precision=WritePrecision.NS)
        except Exception as e:  # noqa: BLE001 - every failure is classified below
            raise self.classify(e) from None

    def close(self, timeout: float = 10.0, abandon: bool = False) -> None:
        """Close the WriteApi and the client.

        Args:
            timeout: unused (the WriteApi waits up to its max_close_wait for batches in flight).
            abandon: drop the batches in flight instead of waiting for their retries (the server
                is down; the points are in the spool).
        """
        if abandon:
            # WriteApi.close() waits until its pipeline is disposed; disposing it first stops the
            # retries of batches that cannot succeed now. (No public API for this.)
            disposable = getattr(self._write_api, "_disposable", None)
            if disposable is not None:
                disposable.dispose()
        try:
            self._write_api.close()
            self._sync_api.close()
        finally:
            self._client.close()
            self._scheduler.executor.shutdown(wait=False)
            _quiet_client_logs(-1)

    def _ok(self, conf: tuple, data: bytes | str) -> None:
        self._on_ok(_split(data))

    def _error(self, conf: tuple, data: bytes | str, exc: Exception) -> None:
        self._on_error(_split(data), self.classify(exc))

    def classify(self, e: BaseException) -> WriteFailure:
        """Turn an influxdb-client / urllib3 exception into a `WriteFailure`."""
        from influxdb_client.rest import ApiException

        if isinstance(e, WriteFailure):
            return e
        if isinstance(e, ApiException) and e.status:
            return classify_status(self.target, int(e.status), e.body or e.reason or "")
        reason = getattr(e, "reason", None)
        text = f"{type(reason).__name__}: {reason}" if reason is not None else f"{type(e).__name__}: {e}"
        if "NewConnectionError" in text or "Connection refused" in text or "ConnectionRefused" in text:
            return WriteFailure("transient", f"cannot reach InfluxDB at {self.target.where}: connection refused")
        if isinstance(e, ValueError):
            return WriteFailure("config", f"influxdb-client refused the write to {self.target.where}: {e}")
        return WriteFailure("transient", f"write to {self.target.where} failed: {text[:300]}")


class _QuietWhileWriting(logging.Filter):
    """Drops the WriteApi's and urllib3's per-batch and per-retry log records while a V2Writer is
    open: the sink reports each problem once, with what to do, and those would repeat it per retry."""

    active = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.active <= 0:
            return True
        if record.name.startswith("urllib3"):
            return "/api/v2/write" not in record.getMessage()
        return record.levelno >= logging.CRITICAL


_QUIET = _QuietWhileWriting()
_QUIET_LOGGERS = ("influxdb_client.client.write_api", "influxdb_client.client.write.retry", "urllib3.connectionpool")


def _quiet_client_logs(delta: int) -> None:
    # A filter, not a level: InfluxDBClient() resets its loggers' levels every time it is made.
    _QUIET.active += delta
    for name in _QUIET_LOGGERS:
        lg = logging.getLogger(name)
        if _QUIET not in lg.filters:
            lg.addFilter(_QUIET)


def _split(data: bytes | str) -> list[bytes]:
    # One point per line is guaranteed by the serialiser (no line breaks inside a point).
    if isinstance(data, str):
        data = data.encode()
    return [ln for ln in data.split(b"\n") if ln]


def make_writer(target: Target, token: str | None, cfg: InfluxConfig, on_ok: OnOk, on_error: OnError) -> V1Writer | V2Writer:
    """The batching writer for `target.protocol`.

    Args:
        target: where to write.
        token: the secret (never logged).
        cfg: sinks.influx.
        on_ok: acknowledged lines.
        on_error: lines of a failed batch and why.
    """
    cls = V1Writer if target.protocol == "v1" else V2Writer
    return cls(target, token, cfg, on_ok, on_error)

"""`evalcluster influx check` and `evalcluster influx replay`, as functions."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from checkpoints import ConfigError
from evaluators.sinks._config import InfluxConfig
from evaluators.sinks._spool import spool_status
from evaluators.sinks._transport import (
    WriteFailure,
    _auth,
    _describe_httpx,
    classify_status,
    detect_protocol,
    make_target,
)


@dataclass(frozen=True)
class CheckLine:
    """One line of `influx check`: what was checked, whether it is fine, and the detail."""

    name: str
    """What was checked ("url", "reachable", "auth", "spool", ...)."""
    ok: bool
    """Whether it is fine."""
    detail: str
    """What was found, in words."""

    def __str__(self) -> str:
        return f"{self.name + ':':<11} {'ok  ' if self.ok else 'FAIL'}  {self.detail}"


def check_influx(influx: InfluxConfig, spool_dir: Path, spool_max_bytes: int) -> list[CheckLine]:
    """Check reachability, protocol, auth and the database or bucket, and report the spool.

    Writes no points: an empty write tells whether the credentials and the database/bucket are
    accepted.

    Args:
        influx: sinks.influx.
        spool_dir: the (resolved) spool directory.
        spool_max_bytes: its bound.

    Returns:
        one CheckLine per check; everything is fine when all are ok.
    """
    lines: list[CheckLine] = []
    lines.append(_spool_line(spool_dir, spool_max_bytes))
    if not influx.url:
        return [CheckLine("url", False, "sinks.influx.url is not set (set INFLUX_URL)")] + lines
    url = influx.endpoint
    out = [CheckLine("url", True, url)]
    try:
        secret = influx.token()
    except ConfigError as e:
        return out + [CheckLine("token", False, str(e))] + lines
    token = secret.get_secret_value() if secret is not None else None
    t0 = time.perf_counter()
    try:
        detected = detect_protocol(influx)
    except WriteFailure as e:
        return out + [CheckLine("reachable", False, e.message)] + lines
    ms = (time.perf_counter() - t0) * 1000
    server = f"InfluxDB {detected.version}" + (f" ({detected.build})" if detected.build else "") if detected.version \
        else "no X-Influxdb-Version header (VictoriaMetrics or another compatible server)"
    out.append(CheckLine("reachable", True, f"/ping answered in {ms:.0f} ms: {server}"))
    try:
        target = make_target(influx, detected.protocol)
    except WriteFailure as e:
        return out + [CheckLine("protocol", False, f"{detected.protocol} ({detected.reason}) but {e.message}")] + lines
    out.append(CheckLine("protocol", True, f"{detected.protocol} ({detected.reason})"))
    headers, auth = _auth(token)
    if target.protocol == "v1":
        params = {"db": target.database, "precision": "ns"}
        if target.retention_policy:
            params["rp"] = target.retention_policy
        endpoint, what = "/write", f"database {target.database!r}"
    else:
        params = {"org": target.org, "bucket": target.bucket, "precision": "ns"}
        endpoint, what = "/api/v2/write", f"bucket {target.bucket!r}"
    try:
        r = httpx.post(url + endpoint, params=params, content=b"", headers=headers, auth=auth, timeout=influx.timeout_s)
    except httpx.HTTPError as e:
        return out + [CheckLine("auth", False, f"empty write to {url}{endpoint} failed: {_describe_httpx(e)}")] + lines
    who = "token accepted" if token else "no token configured; the server asked for none"
    if r.status_code in (200, 204):
        out.append(CheckLine("auth", True, who))
        out.append(CheckLine("database" if target.protocol == "v1" else "bucket", True, f"{what} accepts writes"))
    elif r.status_code == 400 and target.protocol == "v2":
        # Some v2 servers refuse an empty body; ask the buckets API instead.
        out.extend(_v2_bucket_lines(url, target.bucket or "", target.org or "", headers, influx.timeout_s, who))
    else:
        failure = classify_status(target, r.status_code, r.text)
        if r.status_code in (401, 403):
            out.append(CheckLine("auth", False, failure.message))
            out.append(CheckLine("database" if target.protocol == "v1" else "bucket", False,
                                 "not checked (authentication failed)"))
        else:
            out.append(CheckLine("auth", True, who))
            out.append(CheckLine("database" if target.protocol == "v1" else "bucket", False, failure.message))
    return out + lines


def _v2_bucket_lines(url: str, bucket: str, org: str, headers: dict, timeout: float, who: str) -> list[CheckLine]:
    try:
        r = httpx.get(url + "/api/v2/buckets", params={"name": bucket.split("/")[0], "org": org},
                      headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        return [CheckLine("bucket", False, f"/api/v2/buckets failed: {_describe_httpx(e)}")]
    if r.status_code in (401, 403):
        return [CheckLine("auth", False, f"{url} refused the token ({r.status_code})"),
                CheckLine("bucket", False, "not checked (authentication failed)")]
    if r.status_code == 200:
        found = bool(r.json().get("buckets"))
        return [CheckLine("auth", True, who),
                CheckLine("bucket", found, f"bucket {bucket!r} " + ("exists" if found else f"does not exist in org {org!r}"))]
    return [CheckLine("auth", True, who), CheckLine("bucket", False, f"/api/v2/buckets answered {r.status_code}: {r.text[:200]}")]


def _spool_line(spool_dir: Path, spool_max_bytes: int) -> CheckLine:
    st = spool_status(spool_dir)
    detail = (f"{st['records']} points wait in {spool_dir} ({st['bytes']:,} of {spool_max_bytes:,} bytes, "
              f"{st['segments']} segment files, {st['live_segments']} held by running writers)")
    if st["rejected"]:
        detail += f"; {st['rejected']} refused points in {Path(spool_dir) / 'rejected.lp'}"
    return CheckLine("spool", st["bytes"] < spool_max_bytes, detail)


def replay_spool(influx: InfluxConfig, spool_dir: Path, spool_max_bytes: int, timeout: float | None = None) -> dict:
    """Send what waits in the spool (segments no running writer holds) and report counts.

    Args:
        influx: sinks.influx.
        spool_dir: the (resolved) spool directory.
        spool_max_bytes: its bound.
        timeout: seconds at most (None: as long as the server keeps answering).

    Returns:
        {"found", "replayed", "failed", "left", "live_segments", "error", "where"}.
    """
    from evaluators.sinks._influx import InfluxSink

    sink = InfluxSink(influx, spool_dir, spool_max_bytes, adopt=True)
    try:
        sink.flush(timeout)
    finally:
        sink.close(timeout=0)
    st = sink.stats
    after = spool_status(spool_dir)
    return {
        "found": st.adopted,
        "replayed": st.replayed + st.sent,
        "failed": st.failed,
        "left": st.pending,
        "live_segments": after["live_segments"],
        "error": st.last_error if st.pending else None,
        "where": sink.target.where if sink.target else influx.endpoint,
    }

"""`evalcluster watch | status | report | submit`: the main job and what it produced."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from cluster.cli import add_config_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="watch the sources; evaluate, score and stream every new checkpoint")
    add_config_arg(p)
    p.add_argument("--once", action="store_true", help="evaluate what the sources hold now, then exit")
    p.add_argument("--address", help="a running Ray cluster (default: the config's cluster.address)")
    p.set_defaults(func=watch)

    p = sub.add_parser("status", help="per run: checkpoints scored / pending / failed / quarantined, last scores")
    add_config_arg(p)
    p.add_argument("--address", help="Ray dashboard URL, to show the state of submitted jobs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=status)

    p = sub.add_parser("report", help="write an HTML report of a run's learning curves")
    add_config_arg(p)
    p.add_argument("run", nargs="?", help="run directory or run id (default: every run)")
    p.add_argument("--out", type=Path, required=True, help="the .html file to write")
    p.set_defaults(func=report)

    p = sub.add_parser("submit", help="submit `watch` or `eval` as a Ray job (ray job submit semantics)")
    add_config_arg(p)
    p.add_argument("--address", default=None,
                   help="the cluster's dashboard URL (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("job", nargs=argparse.REMAINDER, help="-- watch|eval [args...]")
    p.set_defaults(func=submit)


HEARTBEAT_S = 60.0

# --------------------------------------------------------------------------- watch


def watch(args: argparse.Namespace) -> int:
    import threading

    from rich.console import Console

    from cluster._job import install_stop_handlers, run_watch
    from cluster.config import load_config

    cfg = load_config(args.config)
    console = Console(stderr=True)
    stop = threading.Event()
    install_stop_handlers(stop)

    last = {"line": "", "at": 0.0}

    def on_poll(st: dict) -> None:
        c = st["counts"]
        srcs = "  ".join(f"{r['source']}: +{r['new']} new, {r['pending']} incomplete"
                         + (f", ERROR {r['error']}" if r["error"] else "") for r in st["sources"])
        running = ", ".join(st["coordinator"]["running"]) or "idle"
        line = (f"{srcs}  | ledger: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if v)
                + f"  | evaluating: {running}")
        # A line per change, and a heartbeat a minute: job logs stay readable at a 1 s poll interval.
        now = time.monotonic()
        if line != last["line"] or now - last["at"] >= HEARTBEAT_S:
            console.print(f"[dim]poll {st['polls']}[/dim]  {line}")
            last.update(line=line, at=now)

    console.print(f"watching {len(cfg.sources)} source(s) every {1 if args.once else cfg.poll_interval_s:g}s "
                  f"({'once' if args.once else 'until stopped'})")
    res = run_watch(cfg, once=args.once, address=args.address, on_poll=on_poll, stop=stop)
    console.print(f"done in {res.duration_s:.0f}s after {res.polls} polls: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(res.counts.items()) if v)
                  + (f"; stopped by signal, {res.stop_report.get('returned_to_staged', 0)} returned to the queue"
                     if res.stopped_by_signal else ""))
    if not cfg.sinks.influx.enabled:
        console.print("influx: not configured (results are in the ledger; `evalcluster report` charts them)")
    elif res.sink.get("written"):
        console.print(f"influx: {res.sink.get('sent', 0)} points sent, {res.sink.get('spooled', 0)} spooled"
                      + (f", last error: {res.sink['last_error']}" if res.sink.get("last_error") else ""))
    _print_curves(cfg)
    return 0


def _print_curves(cfg, run: str | None = None) -> None:
    from checkpoints import Ledger
    from cluster._report import curve_table, learning_curves, table_console

    path = cfg.resolve(cfg.sinks.ledger)
    if not path.exists():
        return
    ledger = Ledger(path, readonly=True)
    console = table_console()
    try:
        for curve in learning_curves(ledger, run):
            console.print(curve_table(curve))
    finally:
        ledger.close()


# --------------------------------------------------------------------------- status


def status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from checkpoints import Ledger
    from cluster._report import MAIN_FIELDS, _fmt, learning_curves
    from cluster.config import load_config

    cfg = load_config(args.config)
    path = cfg.resolve(cfg.sinks.ledger)
    if not path.exists():
        raise FileNotFoundError(f"no ledger at {path} yet: run `evalcluster watch` first")
    ledger = Ledger(path, readonly=True)
    try:
        curves = learning_curves(ledger)
        entries = ledger.list()
    finally:
        ledger.close()
    runs = []
    for c in curves:
        states: dict[str, int] = {}
        for e in entries:
            if e.checkpoint.run == c.run:
                states[e.state] = states.get(e.state, 0) + 1
        last = next((p for p in reversed(c.checkpoints) if p.state == "scored"), None)
        runs.append({"run": c.run, "run_id": c.run_id, "model": c.model, "states": states,
                     "last": None if last is None else {"label": last.label, "iteration": last.iteration,
                                                        **{f: _fmt(last.fields.get(f)) for f in MAIN_FIELDS
                                                           if f in last.fields}},
                     "best": c.best.label if c.best else None})
    jobs = _ray_jobs(args.address)
    if args.json:
        print(json.dumps({"runs": runs, "jobs": jobs}, indent=2))
        return 0
    console = Console()
    t = Table(title=f"runs in {path}", title_justify="left")
    for col in ("run", "scored", "pending", "failed", "quarantined", "last scored", *MAIN_FIELDS.values(), "best"):
        t.add_column(col)
    for r in runs:
        s = r["states"]
        pending = s.get("discovered", 0) + s.get("staged", 0) + s.get("evaluating", 0)
        last = r["last"] or {}
        t.add_row(r["run"], str(s.get("scored", 0)), str(pending), str(s.get("failed", 0)),
                  str(s.get("quarantined", 0)), last.get("label", "-"),
                  *[last.get(f, "-") for f in MAIN_FIELDS], r["best"] or "-")
    console.print(t)
    if jobs is not None:
        jt = Table(title="Ray jobs", title_justify="left")
        for col in ("job", "status", "entrypoint", "started"):
            jt.add_column(col)
        for j in jobs:
            jt.add_row(j["id"], j["status"], j["entrypoint"][:60], j["started"])
        console.print(jt)
    return 0


def _dashboard(address: str | None) -> str:
    return address or os.environ.get("RAY_ADDRESS", "").replace("ray://", "http://") or "http://127.0.0.1:8265"


def _ray_jobs(address: str | None) -> list[dict] | None:
    """The cluster's jobs, or None when no dashboard answers there."""
    import datetime as dt

    import httpx

    url = _dashboard(address)
    try:
        httpx.get(url + "/api/version", timeout=2).raise_for_status()
    except httpx.HTTPError:
        return None
    from ray.job_submission import JobSubmissionClient

    out = []
    for j in JobSubmissionClient(url).list_jobs():
        started = dt.datetime.fromtimestamp(j.start_time / 1000).isoformat(timespec="seconds") if j.start_time else "-"
        out.append({"id": j.submission_id or j.job_id or "?", "status": str(j.status.value if hasattr(j.status, "value") else j.status),
                    "entrypoint": j.entrypoint, "started": started})
    return out


# --------------------------------------------------------------------------- report


def report(args: argparse.Namespace) -> int:
    from checkpoints import Ledger
    from cluster._report import learning_curves, write_html
    from cluster.config import load_config

    cfg = load_config(args.config)
    path = cfg.resolve(cfg.sinks.ledger)
    if not path.exists():
        raise FileNotFoundError(f"no ledger at {path} yet: run `evalcluster watch` first")
    ledger = Ledger(path, readonly=True)
    try:
        curves = learning_curves(ledger, args.run)
    finally:
        ledger.close()
    out = write_html(curves, args.out, title=f"evalcluster: {args.run or 'all runs'}")
    for c in curves:
        best = f", best so far: {c.best.label}" if c.best else ""
        print(f"{c.run}: {len(c.checkpoints)} checkpoints{best}")
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- submit


def submit(args: argparse.Namespace) -> int:
    from cluster._submit import follow_job, submit_job

    job = [a for a in args.job if a != "--"]
    if not job or job[0] not in ("watch", "eval"):
        raise ValueError("say what to submit after `--`: `evalcluster submit -- watch [--once]` or `-- eval ...`")
    url = _dashboard(args.address)
    job_id = submit_job(args.config, job, address=url)
    print(f"job {job_id} submitted; dashboard: {url}/#/jobs/{job_id}", flush=True)
    if args.no_wait:
        return 0
    final = follow_job(url, job_id)
    print(f"job {job_id}: {final}")
    return 0 if final == "SUCCEEDED" else 1


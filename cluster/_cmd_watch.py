"""`evalcluster watch`: the main job. Watch the sources; evaluate, score and stream every new checkpoint."""

from __future__ import annotations

import argparse
import time

from cluster.cli import add_config_arg

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="watch the sources; evaluate, score and stream every new checkpoint")
    add_config_arg(p)
    p.add_argument("--once", action="store_true", help="evaluate what the sources hold now, then exit")
    p.add_argument("--address", help="a running Ray cluster (default: the config's cluster.address)")
    p.set_defaults(func=watch)


HEARTBEAT_S = 60.0


def watch(args: argparse.Namespace) -> int:
    import threading

    from rich.console import Console
    from rich.text import Text

    from cluster._job import install_stop_handlers, run_watch
    from cluster._terminal import cell, plain
    from cluster._report import print_curves
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
            console.print(Text(f"poll {st['polls']}", style="dim") + Text("  ") + cell(line))  # errors name paths: text
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
    print_curves(cfg)
    for model, why in res.failed_bases.items():
        console.print(f"[red]base model {model}: evaluation given up: {why}[/red]")
    for source, why in res.unreachable_sources.items():
        console.print(f"source {plain(source)}: could not be read: {plain(why)}", style="red", markup=False)
    return 1 if res.failed_bases or res.unreachable_sources else 0

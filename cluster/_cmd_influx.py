"""`evalcluster influx check`, `evalcluster influx replay` and `evalcluster influx rebuild`."""

from __future__ import annotations

import argparse

from cluster.cli import add_config_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("influx", help="InfluxDB: check the connection, replay the spool")
    isub = p.add_subparsers(dest="influx_command", metavar="SUBCOMMAND", required=True)
    c = isub.add_parser("check", help="reachability, protocol, auth, database or bucket, and what waits in the spool")
    add_config_arg(c)
    c.set_defaults(func=check)
    r = isub.add_parser("replay", help="send the points waiting in the spool and print counts")
    add_config_arg(r)
    r.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="give up after S seconds (default: as long as InfluxDB keeps answering)")
    r.set_defaults(func=replay)
    b = isub.add_parser("rebuild", help="re-derive every point from the ledger (or one run's) and send them; "
                                        "a rebuilt point is the point first written, so nothing is duplicated")
    add_config_arg(b)
    b.add_argument("--run", default=None, metavar="RUN", help="only this run (a run directory or run id)")
    b.add_argument("--timeout", type=float, default=120, metavar="S",
                   help="wait at most S seconds for InfluxDB to acknowledge them (default 120)")
    b.set_defaults(func=rebuild)


def check(args: argparse.Namespace) -> int:
    """Print one line per check; exit 1 if any failed."""
    import logging

    from cluster.config import load_config
    from evaluators.sinks import check_influx

    logging.getLogger("evaluators.sinks").setLevel(logging.CRITICAL)
    cfg = load_config(args.config)
    lines = check_influx(cfg.sinks.influx, cfg.resolve(cfg.sinks.spool_dir), cfg.sinks.spool_max_bytes)
    for line in lines:
        print(line)
    return 0 if all(line.ok for line in lines) else 1


def replay(args: argparse.Namespace) -> int:
    """Drain the spool; exit 1 if points are left."""
    import logging

    from cluster.config import load_config
    from evaluators.sinks import replay_spool

    # The one-line summary below says what happened; the sink's own log lines would repeat it.
    logging.getLogger("evaluators.sinks").setLevel(logging.CRITICAL)
    cfg = load_config(args.config)
    if not cfg.sinks.influx.enabled:
        raise ValueError("sinks.influx.url is not set: nowhere to replay the spool to (set INFLUX_URL)")
    spool = cfg.resolve(cfg.sinks.spool_dir)
    res = replay_spool(cfg.sinks.influx, spool, cfg.sinks.spool_max_bytes, timeout=args.timeout)
    print(f"spool {spool}: found {res['found']} points, replayed {res['replayed']} to {res['where']}, "
          f"{res['failed']} refused as invalid (kept in rejected.lp), {res['left']} left")
    if res["live_segments"]:
        print(f"{res['live_segments']} segment files are held by running writers; they send their own points")
    if res["left"]:
        print(f"not replayed: {res['error']}")
        return 1
    return 0


def rebuild(args: argparse.Namespace) -> int:
    """Re-derive the ledger's points and send them through the sink; exit 1 if some wait."""
    import logging

    from cluster._terminal import plain
    from cluster._writer import ResultWriter
    from cluster.config import load_config

    logging.getLogger("evaluators.sinks").setLevel(logging.CRITICAL)
    cfg = load_config(args.config)
    if not cfg.sinks.influx.enabled:
        raise ValueError("sinks.influx.url is not set: nowhere to send the rebuilt points (set INFLUX_URL)")
    ledger = cfg.resolve(cfg.sinks.ledger)
    if not ledger.exists():
        raise ValueError(f"ledger {ledger}: no such file (nothing was recorded yet; sinks.ledger in the config)")
    writer = ResultWriter(cfg, recover=False)  # beside a running job: leaves its checkpoints alone
    try:
        res = writer.rebuild(run=args.run)
        ok = writer.flush(timeout=args.timeout)
        st = writer.sink_stats()
    finally:
        writer.close(timeout=0)
    where = writer.sink.target.where if getattr(writer.sink, "target", None) else cfg.sinks.influx.endpoint
    print(f"ledger {ledger}: {res['targets']} targets, {res['samples']} samples -> {res['points']} points "
          f"rebuilt; {st['sent'] + st['replayed']} acknowledged by {where}, {st['pending']} wait in the spool")
    for target, why in res["skipped"].items():
        print(plain(f"skipped {target}: its points cannot be derived: {why}"))
    if not ok:
        print(f"not all acknowledged: {st['last_error'] or 'timed out'} (they wait in the spool; "
              "`evalcluster influx replay` sends them)")
        return 1
    return 1 if res["skipped"] else 0

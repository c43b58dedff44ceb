"""`evalcluster config check`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect the config file")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    c = csub.add_parser("check", help="validate a config file and print a summary")
    c.add_argument("file", nargs="?", type=Path, default=None, help="default: ./ray_config.yaml")
    c.set_defaults(func=check)


def check(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from cluster.config import load_config

    cfg = load_config(args.file)
    console = Console()
    console.print(f"[bold]{cfg.source_path}[/bold]: valid")
    console.print(
        f"cluster: address={cfg.cluster.address}  serve=http://{cfg.cluster.serve.host}:{cfg.cluster.serve.port}"
        f"  node kinds={', '.join(cfg.cluster.node_kinds) or 'none'}"
    )
    t = Table(title="models", title_justify="left")
    for col in ("name", "engine", "path / url", "resources", "replicas", "max ongoing", "adapters"):
        t.add_column(col)
    for m in cfg.models:
        where = str(getattr(m, "path", "") or m.options.base_url)  # type: ignore[union-attr]
        res = ", ".join(f"{k}={v:g}" for k, v in m.resources.items()) or "-"
        reps = f"{m.autoscaling.min_replicas}..{m.autoscaling.max_replicas}" if m.autoscaling else str(m.replicas)
        t.add_row(m.name, m.engine, where, res, reps, str(m.max_ongoing_requests),
                  f"≤{m.max_adapters_per_replica}" if m.adapters else "no")
    console.print(t)
    t = Table(title="checkpoint sources", title_justify="left")
    for col in ("name", "kind", "where", "layout", "model"):
        t.add_column(col)
    for s in cfg.sources:
        where = str(s.path) if s.kind == "local" else f"{s.user}@{s.host}:{s.port}{s.base}"
        t.add_row(s.name, s.kind, where, s.layout, s.model)
    console.print(t)
    influx = cfg.sinks.influx
    console.print(
        f"probes: {', '.join(cfg.probes.sets)} ×{cfg.probes.repeats}   scorers: {', '.join(cfg.scorers)}"
        f"   judge: {cfg.judge.model or 'none'}"
    )
    console.print(
        f"budgets: {'up to ' if cfg.budgets.adaptive else ''}{cfg.budgets.per_endpoint}/endpoint"
        f"{' (adaptive)' if cfg.budgets.adaptive else ''}, judge {cfg.budgets.judge}, "
        f"{cfg.budgets.checkpoints} checkpoints at once   poll: {cfg.poll_interval_s:g}s"
    )
    console.print(
        f"ledger: {cfg.sinks.ledger}   influx: "
        + (f"{influx.endpoint} ({influx.protocol}, {influx.timestamps} timestamps)" if influx.enabled else "off (set INFLUX_URL)")
    )
    return 0

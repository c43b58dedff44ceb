"""`evalcluster report`: an HTML report of a run's (or every run's) learning curves."""

from __future__ import annotations

import argparse
from pathlib import Path

from cluster.cli import add_config_arg

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write an HTML report of a run's learning curves")
    add_config_arg(p)
    p.add_argument("run", nargs="?", help="run directory or run id (default: every run)")
    p.add_argument("--out", type=Path, required=True, help="the .html file to write")
    p.set_defaults(func=report)


def report(args: argparse.Namespace) -> int:
    from cluster._report import learning_curves, write_html
    from cluster.config import load_config, open_ledger

    cfg = load_config(args.config)
    with open_ledger(cfg, readonly=True) as ledger:
        curves = learning_curves(ledger, args.run)
    out = write_html(curves, args.out, title=f"evalcluster: {args.run or 'all runs'}")
    for c in curves:
        best = f", best so far: {c.best.label}" if c.best else ""
        print(f"{c.run}: {len(c.checkpoints)} checkpoints{best}")
    print(f"wrote {out}")
    return 0

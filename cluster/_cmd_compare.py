"""`evalcluster compare`: two scores files, old vs new per model and field, paired on prompt ids."""

from __future__ import annotations

import argparse
from pathlib import Path

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare two scores files (old, new)")
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=compare)


def compare(args: argparse.Namespace) -> int:
    from evaluators import compare_outputs, read_scorer_output

    old, new = read_scorer_output(args.old), read_scorer_output(args.new)
    table = compare_outputs(old, new)
    if args.json:
        import json

        print(json.dumps(table, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    from cluster._terminal import fmt

    console = Console()
    for model, rows in table.items():
        t = Table(title=f"Model: {model}", title_justify="left")
        for col in ("metric", "old", "new", "delta", "paired 95% CI", "pairs", "McNemar p"):
            t.add_column(col, justify="left" if col == "metric" else "right")
        for r in rows:
            ci = f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]" if r.get("ci_low") is not None else ""
            t.add_row(r["field"], fmt(r["old"], 2), fmt(r["new"], 2),
                      f"{r['delta']:+.2f}" if r["delta"] is not None else "-", ci, str(r.get("n_pairs", "-")),
                      f"{r['mcnemar_p']:.3g}" if "mcnemar_p" in r else "")
        console.print(t)
    return 0

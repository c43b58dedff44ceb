"""`evalcluster status`: per run, checkpoints scored / pending / failed / quarantined and the last
scores; the cluster's Ray jobs when a dashboard answers."""

from __future__ import annotations

import argparse
import json

from cluster.cli import add_config_arg

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="per run: checkpoints scored / pending / failed / quarantined, last scores")
    add_config_arg(p)
    p.add_argument("--address", help="Ray dashboard URL, to show the state of submitted jobs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=status)


def status(args: argparse.Namespace) -> int:
    from rich.table import Table

    from cluster._report import MAIN_FIELDS, _fmt, learning_curves
    from cluster._submit import ray_jobs
    from cluster._terminal import cell, table_console
    from cluster.config import load_config, open_ledger

    cfg = load_config(args.config)
    with open_ledger(cfg, readonly=True) as ledger:
        curves = learning_curves(ledger)
        entries = ledger.list()
    runs = []
    for c in curves:
        states: dict[str, int] = {}
        quarantined = []
        for e in entries:
            if e.checkpoint.run == c.run:
                states[e.state] = states.get(e.state, 0) + 1
                if e.state == "quarantined":
                    quarantined.append({"id": e.id, "label": e.checkpoint.label, "reason": e.last_error or ""})
        last = next((p for p in reversed(c.checkpoints) if p.state == "scored"), None)
        runs.append({"run": c.run, "run_id": c.run_id, "model": c.model, "states": states,
                     "last": None if last is None else {"label": last.label, "iteration": last.iteration,
                                                        **{f: _fmt(last.fields.get(f)) for f in MAIN_FIELDS
                                                           if f in last.fields}},
                     "best": c.best.label if c.best else None, "verdict": c.verdict, "flags": c.flags,
                     "set_aside": c.set_aside, "quarantined": quarantined})
    jobs = ray_jobs(args.address)
    if args.json:
        print(json.dumps({"runs": runs, "jobs": jobs}, indent=2))
        return 0
    console = table_console()
    # Run names and labels come from the sources' file names, reasons from errors: cells, not markup.
    t = Table(title=cell(f"runs in {ledger.path}"), title_justify="left")
    for col in ("run", "scored", "pending", "failed", "quarantined", "last scored", *MAIN_FIELDS.values(), "best"):
        t.add_column(col, overflow="fold")  # a long run name wraps whole, never cut short
    for r in runs:
        s = r["states"]
        pending = s.get("discovered", 0) + s.get("staged", 0) + s.get("evaluating", 0)
        last = r["last"] or {}
        t.add_row(cell(r["run"]), str(s.get("scored", 0)), str(pending), str(s.get("failed", 0)),
                  str(s.get("quarantined", 0)), cell(last.get("label", "-")),
                  *[last.get(f, "-") for f in MAIN_FIELDS], cell(r["best"] or "-"))
    console.print(t)
    for r in runs:
        console.print(cell(f"{r['run']}: {r['verdict']}"), soft_wrap=True)
        for target, flag in sorted(r["flags"].items()):
            console.print(cell(f"  {target}: {flag} (every greedy or seeded answer equals the base's)"), soft_wrap=True)
        for target, why in sorted(r["set_aside"].items()):
            for reason, n in sorted(why.items()):
                console.print(cell(f"  {target}: {n} earlier samples set aside: {reason} changed"), soft_wrap=True)
    reasons = [(r["run"], q) for r in runs for q in r["quarantined"]]
    if reasons:
        console.print(cell(f"quarantined ({len(reasons)}; `evalcluster checkpoints retry ID` sends one back):"))
        for run, q in reasons:  # one line each: the ledger keeps a reason as one line
            console.print(cell(f"  {q['id']}  {run} {q['label']}: {q['reason']}"), soft_wrap=True)
    if jobs is not None:
        jt = Table(title="Ray jobs", title_justify="left")
        for col in ("job", "status", "entrypoint", "started"):
            jt.add_column(col)
        for j in jobs:
            jt.add_row(cell(j["id"]), j["status"], cell(j["entrypoint"][:60]), j["started"])
        console.print(jt)
    return 0

"""`evalcluster status`: per run, checkpoints scored / pending / failed / quarantined and the last
scores; the cluster's Ray jobs when a dashboard answers."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cluster.cli import add_config_arg

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="per run: checkpoints scored / pending / failed / quarantined, last scores")
    add_config_arg(p)
    p.add_argument("--address", help="Ray dashboard URL, to show the state of submitted jobs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=status)


def _runs(ledger: Any) -> list[dict[str, Any]]:
    """Per run: checkpoints per state, the last scored checkpoint's scores (with intervals) and the
    best so far. Aggregate queries and the ledger's score sums: a long run costs a few rows, and
    only the last scored checkpoint's samples are read."""
    from cluster._report import MAIN_FIELDS, _fmt, best_key
    from evaluators import aggregate

    runs: dict[str, dict[str, Any]] = {}
    for r in ledger.run_states():
        run = runs.setdefault(r["run"], {"run": r["run"], "run_id": r["run_id"], "states": {}, "last": None,
                                         "best": None, "quarantined": []})
        run["states"][r["state"]] = r["n"]
    scored: dict[str, list[Any]] = {}
    for e in ledger.list(state="scored"):
        scored.setdefault(e.checkpoint.run, []).append(e)
    means = ledger.field_means([e.id for es in scored.values() for e in es])
    for run, es in scored.items():
        last = max(es, key=lambda e: e.checkpoint.iteration)
        fields = aggregate(ledger.sample_scores(last.id), by=())
        stats = fields[0].fields if fields else {}
        runs[run]["last"] = {"label": last.checkpoint.label, "iteration": last.checkpoint.iteration,
                             **{f: _fmt(stats.get(f)) for f in MAIN_FIELDS if f in stats}}
        candidates = [e for e in es if means.get(e.id)]
        if candidates:
            best = max(candidates, key=lambda e: best_key({f: m[0] for f, m in means[e.id].items()},
                                                          e.checkpoint.iteration))
            runs[run]["best"] = best.checkpoint.label
    for e in ledger.list(state="quarantined"):
        runs[e.checkpoint.run]["quarantined"].append({"id": e.id, "label": e.checkpoint.label,
                                                      "reason": e.last_error or ""})
    return [runs[r] for r in sorted(runs)]


def status(args: argparse.Namespace) -> int:
    from cluster._report import MAIN_FIELDS
    from cluster._submit import ray_jobs
    from cluster._terminal import Col, cell, fit_table, table_console
    from cluster.config import load_config, open_ledger

    cfg = load_config(args.config)
    with open_ledger(cfg, readonly=True) as ledger:
        runs = _runs(ledger)
    jobs = ray_jobs(args.address)
    if args.json:
        print(json.dumps({"runs": runs, "jobs": jobs}, indent=2))
        return 0
    console = table_console()
    short = {"capability.passed": "cap.", "heuristic.lek_score": "LEK", "exact.correct": "exact"}
    # Narrow headings: four letters each for the counts (a title line says what they are).
    cols = [Col("run", whole=True), Col("scored", "done", right=True), Col("pending", "wait", right=True),
            Col("failed", "fail", right=True), Col("quarantined", "quar", right=True),
            Col("last scored", "last", optional=True),
            *[Col(name, short[f], right=True, optional=f == "exact.correct") for f, name in MAIN_FIELDS.items()],
            Col("best", optional=True)]
    rows = []
    for r in runs:
        s = r["states"]
        pending = s.get("discovered", 0) + s.get("staged", 0) + s.get("evaluating", 0)
        last = r["last"] or {}
        # Compact forms for a narrow terminal: a score without its interval, a label by its iteration.
        rows.append([r["run"], str(s.get("scored", 0)), str(pending), str(s.get("failed", 0)),
                     str(s.get("quarantined", 0)), (last.get("label", "-"), _at(last.get("label", "-"))),
                     *[(last.get(f, "-"), last.get(f, "-").split(" [")[0]) for f in MAIN_FIELDS],
                     (r["best"] or "-", _at(r["best"] or "-"))])
    # Run names and labels come from the sources' file names, reasons from errors: cells, not markup.
    console.print(fit_table(f"runs in {ledger.path}", cols, rows, console.width))
    reasons = [(r["run"], q) for r in runs for q in r["quarantined"]]
    if reasons:
        console.print(cell(f"quarantined ({len(reasons)}; `evalcluster checkpoints retry ID` sends one back):"))
        for run, q in reasons:  # one line each: the ledger keeps a reason as one line
            console.print(cell(f"  {q['id']}  {run} {q['label']}: {q['reason']}"), soft_wrap=True)
    if jobs is not None:
        jcols = [Col("job"), Col("status"), Col("entrypoint", optional=True), Col("started", optional=True)]
        jrows = [[j["id"], j["status"], j["entrypoint"][:60], j["started"]] for j in jobs]
        console.print(fit_table("Ray jobs", jcols, jrows, console.width))
    return 0


def _at(label: str) -> str:
    """A checkpoint label's iteration part ("S135 @0000030" -> "@0000030"): what tells the
    checkpoints of one run apart, in a narrow terminal."""
    return "@" + label.rsplit("@", 1)[1] if "@" in label else label

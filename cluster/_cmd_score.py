"""`evalcluster score`: answered prompts (go-ml Response JSONL) -> go-ml's ScorerOutput JSON,
plus counts and intervals."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cluster.cli import add_config_arg

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score answered prompts (go-ml Response JSONL) and write a scores file")
    p.add_argument("input", type=Path, help="JSONL: {id, prompt, response, model, domain?, correct_answer?, ...}")
    p.add_argument("--suites", default="all",
                   help="comma-separated: heuristic, exact, semantic, content, standard (or all; default all; "
                        "judge suites need --judge)")
    p.add_argument("--judge", metavar="MODEL", default=None, help="a model name from the config to judge with")
    p.add_argument("--concurrency", type=int, default=4, help="judge calls in flight (default 4)")
    p.add_argument("--output", "-o", type=Path, default=None, help="write the scores file here (default: print averages)")
    add_config_arg(p)
    p.set_defaults(func=score)


def _print_averages(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from cluster._terminal import ci_text, fmt

    console = Console()
    for model, fields in sorted(doc["model_stats"].items()):
        c = doc["counts"].get(model, {})
        t = Table(title=f"{model}: {c.get('prompts', 0)} prompts, {c.get('judge_failures', 0)} judge failures",
                  title_justify="left")
        for col in ("field", "mean [95% CI]", "n", "failures"):
            t.add_column(col, justify="left" if col == "field" else "right")
        for name, f in sorted(fields.items()):
            t.add_row(name, fmt(f["mean"]) + ci_text(f), str(f["n"]), str(f["failures"]))
        console.print(t)


def score(args: argparse.Namespace) -> int:
    import asyncio

    from cluster._plan import judge_spec
    from cluster._terminal import Bar
    from evaluators import read_responses, resolve_scorers, score_responses, scorer_output, write_scorer_output

    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
    responses = read_responses(args.input)
    engines: dict[str, Any] = {}
    judge = None
    if args.judge:
        from cluster.config import load_config
        from deployments import open_engine

        cfg = load_config(args.config)
        engines[args.judge] = open_engine(cfg.model(args.judge))
        judge = judge_spec(cfg, args.judge).open(engines[args.judge], asyncio.Semaphore(args.concurrency))
    scorers = resolve_scorers(args.suites, judge)  # fails on a bad suite name before anything starts

    async def run() -> list:
        try:
            for e in engines.values():
                await e.start()
            with Bar("scoring") as bar:
                return await score_responses(responses, args.suites, judge, args.concurrency, progress=bar,
                                             source=args.input.name)
        finally:
            for e in engines.values():
                await e.close()

    results = asyncio.run(run())
    doc = scorer_output(results, scorers, judge_model=args.judge or "")
    if args.output:
        write_scorer_output(args.output, doc)
        print(f"scores written to {args.output} ({len(results)} prompts)", file=sys.stderr)
    else:
        _print_averages(doc)
    return 0

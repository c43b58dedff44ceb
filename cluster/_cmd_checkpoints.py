"""`evalcluster checkpoints list|retry`: what the sources hold, with its ledger state; retry a checkpoint."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from cluster.cli import add_config_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoints", help="list checkpoints on the sources; retry a failed one")
    csub = p.add_subparsers(dest="checkpoints_command", metavar="SUBCOMMAND", required=True)

    ls = csub.add_parser("list", help="list the checkpoints of a source (with their ledger state)")
    add_config_arg(ls)
    where = ls.add_mutually_exclusive_group()
    where.add_argument("--source", help="a source name from the config (default: every source)")
    where.add_argument("--path", type=Path, help="a local base directory instead of a configured source")
    ls.add_argument("--layout", choices=("mlx", "peft"), default="mlx", help="layout under --path (default mlx)")
    ls.add_argument("--hash", action="store_true", help="compute sha256 of checkpoints the ledger does not know")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=list_checkpoints)

    rt = csub.add_parser("retry", help="send a failed or quarantined checkpoint back to discovered")
    add_config_arg(rt)
    rt.add_argument("id", help="the checkpoint id (or a unique prefix), as `checkpoints list` shows it")
    rt.set_defaults(func=retry_checkpoint)



async def _rows(args: argparse.Namespace, cfg: Any) -> list[dict[str, Any]]:
    from checkpoints import LocalSource, checkpoints_from_listing, layout_spec, source_from_config, spec_from_config
    from cluster.config import ledger_exists, open_ledger

    if args.path is not None:
        if not args.path.is_dir():
            raise FileNotFoundError(f"--path {args.path}: not a directory")
        pairs = [(LocalSource(args.path, name="local"), layout_spec(args.layout))]
    else:
        if cfg is None:
            raise FileNotFoundError("no config file: pass --config FILE, or --path DIR --layout mlx|peft")
        scs = [cfg.source(args.source)] if args.source else list(cfg.sources)
        if not scs:
            raise ValueError(f"{cfg.source_path}: no sources configured")
        pairs = [(source_from_config(sc), spec_from_config(sc)) for sc in scs]
    ledger = open_ledger(cfg, readonly=True) if cfg is not None and ledger_exists(cfg) else None
    rows: list[dict[str, Any]] = []
    try:
        for source, spec in pairs:
            try:
                listing = await source.list(spec.name_globs(), spec.max_depth())
                cks = checkpoints_from_listing(listing.entries, spec, source.name, source.base)
                known = _known(ledger, source.name)
                digests: dict[str, str] = {}
                if args.hash:
                    todo = [c for c in cks if _match(known, c) is None]
                    base = source.base.rstrip("/") + "/"
                    got = await source.hash([c.path[len(base):] for c in todo])
                    digests = {base + rel: d for rel, d in got.items()}
                for c in cks:
                    entry = _match(known, c)
                    sha = entry.checkpoint.sha256 if entry else digests.get(c.path)
                    c2 = c.with_sha256(sha) if sha else c
                    rows.append({
                        "source": c.source, "run": c.run, "label": c.label, "iteration": c.iteration,
                        "state": entry.state if entry else None, "sha256": sha, "size": c.size, "mtime": c.mtime,
                        "path": c.path, "id": c2.id if sha else None,
                        "last_error": entry.last_error if entry else None,
                    })
            finally:
                await source.close()
    finally:
        if ledger is not None:
            ledger.close()
    return rows


def _known(ledger: Any, source: str) -> dict[tuple[str, int], list[Any]]:
    out: dict[tuple[str, int], list[Any]] = {}
    if ledger is None:
        return out
    for e in ledger.list(source=source):
        out.setdefault((e.checkpoint.run, e.checkpoint.iteration), []).append(e)
    return out


def _match(known: dict[tuple[str, int], list[Any]], c: Any) -> Any:
    """The ledger row for the bytes now at this path (same path, size and mtime), if any."""
    for e in known.get((c.run, c.iteration), []):
        if e.checkpoint.path == c.path and e.checkpoint.size == c.size and e.checkpoint.mtime == c.mtime:
            return e
    return None


def list_checkpoints(args: argparse.Namespace) -> int:
    from cluster.config import ConfigError, default_config_exists, load_config

    try:
        cfg = (load_config(args.config) if args.config is not None or args.path is None or default_config_exists()
               else None)
    except ConfigError:
        if args.config is not None or args.path is None:
            raise
        cfg = None  # --path needs no config; a broken default one only costs the ledger states
    rows_ = asyncio.run(_rows(args, cfg))
    if args.json:
        print(json.dumps(rows_, indent=2))
        return 0
    from cluster._terminal import Col, fit_table, table_console

    console = table_console()
    cols = [Col("source", optional=True), Col("run", whole=True), Col("label"), Col("iteration", "iter.", right=True, optional=True),
            Col("state"), Col("sha256", optional=True), Col("size", right=True, optional=True), Col("id")]
    rows = [[r["source"], r["run"], r["label"], str(r["iteration"]), r["state"] or "-", (r["sha256"] or "-")[:12],
             f"{r['size']:,}", r["id"] or "-"] for r in rows_]
    # Names come from the source's file names: fit_table makes them cells, never markup.
    console.print(fit_table(f"{len(rows_)} checkpoints", cols, rows, console.width))
    return 0


def retry_checkpoint(args: argparse.Namespace) -> int:
    from cluster._terminal import plain
    from cluster.config import load_config, open_ledger

    cfg = load_config(args.config)
    with open_ledger(cfg, create=False) as ledger:
        before = ledger.get(ledger.resolve_id(args.id))
        e = ledger.retry(args.id)
    print(plain(f"{e.id} ({e.checkpoint.label}, {e.checkpoint.run}): {before.state if before else '?'} -> {e.state}"))
    return 0


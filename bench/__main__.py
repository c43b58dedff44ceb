"""`python -m bench [NAME ...] [--quick]`: run the benchmarks, print the table, write bench/RESULTS.md."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import sys
import time
import traceback
from pathlib import Path

from bench._common import Row, machine, table, versions

# In the order they run; each is bench/<name>.py with run(quick) -> list[Row].
BENCHMARKS = ["scorers", "sink", "discovery", "engines", "concurrency", "serve", "loglik", "ledger", "client_cpu", "peers"]
RESULTS = Path(__file__).with_name("RESULTS.md")
# Hand-maintained explanations (where the time goes, why a figure is what it is), appended to RESULTS.md.
NOTES = Path(__file__).with_name("NOTES.md")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("names", nargs="*", help=f"subset of: {', '.join(BENCHMARKS)}")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run, not for RESULTS.md)")
    args = ap.parse_args(argv)
    names = args.names or BENCHMARKS
    rows: list[Row] = []
    failed: list[str] = []
    t0 = time.perf_counter()
    for name in names:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"bench.{name}":
                print(f"[bench] {name}: not written yet", file=sys.stderr)
                failed.append(f"{name} (missing)")
                continue
            raise
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            got = module.run(quick=args.quick)
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(name)
            continue
        rows.extend(got)
        print(f"[bench] {name}: {len(got)} rows in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    text = table(rows)
    print(text)
    if not args.names and not args.quick:
        RESULTS.write_text(
            f"# Benchmark results\n\nReproduce: `make bench` (runs `python -m bench`).\n\n"
            f"- date: {dt.datetime.now().isoformat(timespec='seconds')}\n- machine: {machine()}\n"
            f"- versions: {versions()}\n"
            f"- wall time: {time.perf_counter() - t0:.0f} s\n"
            + (f"- failed: {', '.join(failed)}\n" if failed else "")
            + f"\n{text}\n"
            + (f"\n{NOTES.read_text()}" if NOTES.exists() else "")
        )
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

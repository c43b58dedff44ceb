"""Client CPU per request: `evalcluster eval` against a plain httpx loop, on the same sweep (the 23
capability probes x 4 repeats = 92 chats, max_tokens 128, concurrency 4, one llama.cpp server).

Both run as processes of their own, one after the other, rounds alternating the order; CPU is the
process's user + system time (os.wait4), interpreter start and imports included, divided by the
requests made. `evalcluster eval` runs as a user runs it: streaming, scoring (heuristic, exact,
capability), the ledger, the progress bar off (no terminal). The floor posts the same chats
without streaming and parses the JSON reply. Equal work: the server's tokens_predicted counter
per run is in the note.

`python -m bench.client_cpu [--quick] [--url URL]` (default: starts its own llama.cpp server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import Row, table

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of a command run to its end."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}: {err[-2000:]}")
    return wall, ru.ru_utime + ru.ru_stime


def floor_main(url: str, repeats: int) -> None:
    """The floor, as its own process: 23 x repeats chats at concurrency 4 with httpx."""
    from bench.peers import _floor_async

    n = asyncio.run(_floor_async(url, repeats))
    print(n)


def measure(url: str, rounds: int, repeats: int) -> list[Row]:
    from bench.peers import eval_args, eval_config, probes, tokens_predicted

    n = len(probes()) * repeats
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    env.pop("COLUMNS", None)
    got: dict[str, list[tuple[float, float, float]]] = {"floor": [], "eval": []}
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as d:
        cfg = eval_config(Path(d) / "eval.yaml", url)
        cmds = {
            "floor": [sys.executable, "-m", "bench.client_cpu", "--floor", url, "--repeats", str(repeats)],
            "eval": [sys.executable, "-m", "cluster.cli", "eval", "--config", str(cfg),
                     *[a for a in eval_args(repeats) if a != "--no-ledger"]],
        }
        for r in range(rounds):
            for name in (["floor", "eval"] if r % 2 == 0 else ["eval", "floor"]):
                before = tokens_predicted(url)
                wall, cpu = _run(cmds[name], env)
                got[name].append((wall, cpu, tokens_predicted(url) - before))
                if name == "eval":
                    (Path(d) / "ledger.sqlite").unlink(missing_ok=True)  # the same work each round
    med = {k: (statistics.median(w for w, _, _ in v), statistics.median(c for _, c, _ in v),
               statistics.median(t for _, _, t in v)) for k, v in got.items()}
    ratio_cpu = statistics.median(e[1] / f[1] for e, f in zip(got["eval"], got["floor"]))
    ratio_wall = statistics.median(e[0] / f[0] for e, f in zip(got["eval"], got["floor"]))
    return [
        Row("client_cpu", f"floor (httpx, no streaming): CPU per request, {n} requests", med["floor"][1] / n * 1000,
            "ms", note=f"wall {med['floor'][0]:.1f} s; {med['floor'][2]:.0f} tokens predicted"),
        Row("client_cpu", f"`evalcluster eval`: CPU per request, {n} requests", med["eval"][1] / n * 1000, "ms",
            ratio_cpu, "floor", f"wall {med['eval'][0]:.1f} s; {med['eval'][2]:.0f} tokens predicted; "
                                "streaming, 3 scorers, ledger"),
        Row("client_cpu", f"`evalcluster eval`: wall time, {n} requests", med["eval"][0], "s", ratio_wall, "floor"),
    ]


def run(quick: bool = False) -> list[Row]:
    from bench.peers import REPEATS, llama_server

    with tempfile.TemporaryDirectory(prefix="bench-cpu-srv-") as d, llama_server(Path(d) / "llama.log") as url:
        return measure(url, 1 if quick else 3, 1 if quick else REPEATS)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m bench.client_cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--url", help="a running llama.cpp server (default: start one)")
    ap.add_argument("--floor", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.floor:
        floor_main(args.floor, args.repeats)
    elif args.url:
        print(table(measure(args.url, args.rounds, args.repeats)))
    else:
        print(table(run(quick=args.quick)))

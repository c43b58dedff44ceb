"""Discovery: listing 10,000 checkpoints over SSH on loopback, one command vs go-ml's `ls` per directory.

Both run against the same OpenSSH sshd (tests/_servers.py) on 127.0.0.1, over one kept asyncssh
connection, and must find the same files:
- ours: `SSHSource.list()`: one remote `find -printf` for the whole base;
- go-ml: `ls -d <base>/adapters-*`, then per run `ls -d <dir>/gemma-3-*` and
  `ls <dir>/*_adapters.safetensors` (1 + 2 x runs commands), sequentially, as go-ml did.
go-ml also started a new `ssh` process (new TCP + key exchange) for every command; that variant is
measured too, with the system ssh client and the same key and known_hosts.

Run alone: `python -m bench.discovery [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench._common import Row, table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def make_tree(base: Path, runs: int, per_run: int) -> int:
    """go-ml's MLX layout: runs x per_run tiny checkpoint files, a config and a rolling file each."""
    n = 0
    for r in range(runs):
        d = base / f"adapters-1b-run{r:04d}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text("{}")
        (d / "adapters.safetensors").write_bytes(b"rolling")
        for i in range(1, per_run + 1):
            (d / f"{i * 100:07d}_adapters.safetensors").write_bytes(b"x" * 16)
            n += 1
    return n


async def goml_listing(run_cmd, base: str) -> tuple[set[str], int]:
    """go-ml's DiscoverCheckpoints command sequence (paths are safe here, so unquoted as in go-ml)."""
    cmds = 0
    out = await run_cmd(f"ls -d {base}/adapters-* 2>/dev/null")
    cmds += 1
    dirs = [l for l in out.splitlines() if l.strip()]
    found: set[str] = set()
    for d in dirs:
        sub = await run_cmd(f"ls -d {d}/gemma-3-* 2>/dev/null")
        cmds += 1
        targets = [l for l in sub.splitlines() if l.strip()] or [d]
        for t in targets:
            files = await run_cmd(f"ls {t}/*_adapters.safetensors 2>/dev/null")
            cmds += 1
            found |= {f[len(base) + 1:] for f in files.splitlines() if f.strip()}
    return found, cmds


async def _bench(quick: bool) -> list[Row]:
    import asyncssh

    from _servers import SSHD
    from checkpoints import SSHSource, layout_spec

    runs, per_run = (20, 100) if quick else (100, 100)
    rounds = 1 if quick else 5
    goml_rounds = 1 if quick else 2  # go-ml's listing takes minutes on this machine
    tmp = Path(tempfile.mkdtemp(prefix="bench-discovery-"))
    server = None
    rows: list[Row] = []
    try:
        base = tmp / "lem"
        n = make_tree(base, runs, per_run)
        server = SSHD(tmp / "sshd").start()
        spec = layout_spec("mlx")
        src = SSHSource(server.host, server.port, server.user, server.key, server.known_hosts, str(base), name="bench")
        conn = await asyncssh.connect(server.host, server.port, username=server.user, client_keys=[str(server.key)],
                                      known_hosts=str(server.known_hosts), config=None)

        async def run_on_conn(cmd: str) -> str:
            res = await conn.run(cmd, check=False)
            return str(res.stdout)

        async def run_new_ssh(cmd: str) -> str:
            proc = await asyncio.create_subprocess_exec(
                "ssh", "-p", str(server.port), "-i", str(server.key), "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "ConnectTimeout=10",
                f"{server.user}@{server.host}", cmd,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            out, _ = await proc.communicate()
            return out.decode()

        # warm up both paths (connection, remote shell start-up, page cache)
        await src.list(spec.name_globs(), spec.max_depth())
        await run_on_conn("true")

        ours, theirs, fresh = [], [], []
        ours_files: set[str] = set()
        goml_files: set[str] = set()
        cmds = ours_rt = 0
        for i in range(rounds):
            rt0 = src.round_trips
            t = time.perf_counter()
            listing = await src.list(spec.name_globs(), spec.max_depth())
            ours.append(time.perf_counter() - t)
            ours_rt = src.round_trips - rt0
            ours_files = {e.relpath for e in listing.entries if spec.matches(e.relpath)}
            if i < goml_rounds:  # interleaved, so both see the same machine load
                t = time.perf_counter()
                goml_files, cmds = await goml_listing(run_on_conn, str(base))
                theirs.append(time.perf_counter() - t)
        assert ours_files == goml_files and len(ours_files) == n, (len(ours_files), len(goml_files), n)

        fresh_runs = 1
        t = time.perf_counter()
        fresh_files, _ = await goml_listing(run_new_ssh, str(base))
        fresh.append(time.perf_counter() - t)
        assert fresh_files == ours_files

        # First discovery of an existing run: two polls, the second also hashes all n files remotely.
        from checkpoints import Poller

        poller = Poller(src, spec)
        t = time.perf_counter()
        await poller.poll()
        first = await poller.poll()
        discover_s = time.perf_counter() - t
        assert len(first.new) == n

        # The cost of one command on this server (shell start-up: root's ~/.bashrc runs pyenv init).
        t = time.perf_counter()
        for _ in range(5):
            await run_on_conn("true")
        per_cmd = (time.perf_counter() - t) / 5

        o, g, f = statistics.median(ours), statistics.median(theirs), statistics.median(fresh)
        where = (f"sshd on 127.0.0.1; {n:,} checkpoints in {runs} runs; one remote command costs "
                 f"{per_cmd * 1000:.0f} ms here (mostly the remote shell's start-up)")
        rows += [
            Row("discovery", f"list {n:,} checkpoints over SSH: one find command", o, "s",
                ratio=g / o, versus=f"go-ml ls per directory ({cmds} commands), same connection",
                note=f"{where}; medians of {rounds} (ours) and {goml_rounds} (go-ml) runs; ours is one round trip: "
                     f"find + ~{n * 60 / 1e6:.1f} MB of names"),
            Row("discovery", "round trips per listing", float(ours_rt), "commands", ratio=cmds / ours_rt,
                versus="go-ml: 1 + 2 x runs", note="go-ml's cost grows with the number of run directories"),
            Row("discovery", f"list {n:,} checkpoints, go-ml as it ran (new ssh process per command)", f, "s",
                ratio=f / o, versus="ours (one find command)",
                note=f"{fresh_runs} run; each command pays ssh start-up, TCP and key exchange, and the remote shell"),
            Row("discovery", f"first discovery of {n:,} existing checkpoints (2 polls, sha256 of each on the host)",
                discover_s, "s", ratio=discover_s / o, versus="one listing",
                note="once per source start-up; later polls cost one listing"),
        ]
        await src.close()
        conn.close()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def run(quick: bool = False) -> list[Row]:
    """Measure listing 10,000 (quick: 2,000) checkpoints over SSH, ours vs go-ml's approach.

    Args:
        quick: fewer checkpoints and one round.
    """
    return asyncio.run(_bench(quick))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m bench.discovery")
    ap.add_argument("--quick", action="store_true")
    print(table(run(ap.parse_args().quick)))

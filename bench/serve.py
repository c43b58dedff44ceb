"""Serve overhead: the same short chat requests direct to a llama.cpp engine, through the Serve
handle (ServeTextModel) and through the OpenAI HTTP ingress, at concurrency 1 and 16.

Each mode has its own llama.cpp server with the same model and slots; the modes run one after the
other, in rotated order over several rounds, and each figure is the median over rounds.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench._common import Row

ROOT = Path(__file__).resolve().parent.parent
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name a colour."}]
MAX_TOKENS = 8


async def _drive(call, n: int, concurrency: int) -> tuple[float, list[float]]:
    """Run `n` calls with `concurrency` in flight; (wall seconds, per-request latencies)."""
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []

    async def one() -> None:
        async with sem:
            t = time.perf_counter()
            await call()
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return time.perf_counter() - t0, lat


def run(quick: bool = False) -> list[Row]:
    from cluster.runtime import prepare_env

    prepare_env(owned=True)
    return asyncio.run(_run(quick))


async def _run(quick: bool) -> list[Row]:
    import httpx
    import ray

    from cluster.config import ClusterConfig, NodeKind, parse_config
    from cluster.runtime import start_or_connect
    from deployments import GenOpts, Message, collect, open_engine
    from cluster.runtime import deploy_app
    from deployments._serve import ServeTextModel

    sys.path.insert(0, str(ROOT / "tests"))
    from _servers import free_port

    port = free_port()
    model = {"name": "smollm2", "engine": "llamacpp", "path": str(GGUF), "resources": {"llamacpp": 1},
             "max_ongoing_requests": 64, "max_queued_requests": -1, "options": {"parallel": 4, "ctx_size": 4096}}
    cfg = parse_config({"cluster": {"serve": {"port": port}}, "models": [model],
                        "staging": {"cache_dir": tempfile.mkdtemp(prefix="bench-serve-")}}, "bench")
    rt = start_or_connect(ClusterConfig(address="local", dashboard=False, num_cpus=4,
                                        node_kinds={"b": NodeKind(resources={"llamacpp": 2})}, local_node_kind="b"))
    rows: list[Row] = []
    engine = open_engine(model)
    await engine.start()
    try:
        url, _ = deploy_app(cfg)
        handle_model = ServeTextModel("smollm2")
        msgs = [Message(**m) for m in MESSAGES]
        opts = GenOpts(temperature=0, max_tokens=MAX_TOKENS, seed=0)
        http = httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64))
        body = {"model": "smollm2", "messages": MESSAGES, "temperature": 0, "max_tokens": MAX_TOKENS, "seed": 0}

        async def direct() -> None:
            await collect(engine.chat(msgs, opts))

        async def via_handle() -> None:
            await collect(handle_model.chat(msgs, opts))

        async def via_http() -> None:
            r = await http.post("/v1/chat/completions", json=body)
            r.raise_for_status()

        modes = {"direct engine": direct, "Serve handle": via_handle, "HTTP ingress": via_http}
        for fn in modes.values():  # warm every path (connections, replica, slots)
            await _drive(fn, 8, 4)
        rounds = 2 if quick else 3
        for concurrency, n in ((1, 10 if quick else 30), (16, 32 if quick else 96)):
            got: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
            names = list(modes)
            for r in range(rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    wall, lat = await _drive(modes[name], n, concurrency)
                    got[name].append((n / wall, statistics.median(lat)))
            base_rps = statistics.median(x[0] for x in got["direct engine"])
            base_lat = statistics.median(x[1] for x in got["direct engine"])
            for name in names:
                rps = statistics.median(x[0] for x in got[name])
                lat = statistics.median(x[1] for x in got[name])
                note = ""
                if name != "direct engine":
                    note = f"+{(lat - base_lat) * 1000:.1f} ms median latency vs direct"
                rows.append(Row("serve", f"{name}, concurrency {concurrency}: requests/s", rps, "req/s",
                                rps / base_rps, "direct engine", note))
                rows.append(Row("serve", f"{name}, concurrency {concurrency}: median latency", lat * 1000, "ms",
                                lat / base_lat, "direct engine"))
        await http.aclose()
    finally:
        from ray import serve

        serve.shutdown()
        await engine.close()
        rt.shutdown()
        if ray.is_initialized():
            ray.shutdown()
    return rows


if __name__ == "__main__":
    from bench._common import table

    print(table(run(quick="--quick" in sys.argv)))

"""Peers: evalcluster side by side with inspect_ai, lm-evaluation-harness and a direct-httpx floor.

Throughput: the 23 capability probes x 4 repeats (92 chats), system prompt, temperature 0,
max_tokens 128, concurrency 4, through ONE llama.cpp server (4 slots, loopback). Each tool is a
whole process timed from start to exit (the floor runs in this process); rounds rotate the order;
figures are medians and ratios are medians of per-round ratios to the floor. The server's
`llamacpp:tokens_predicted_total` delta per run shows every tool did the same work.

Checkpoint sweep: 4 LoRA checkpoints x 23 probes: `evalcluster watch --once` (adapter-grouped,
concurrent) against one inspect_ai run per checkpoint on its own llama.cpp server with `--lora`.
Memory and interop: `evalcluster serve` (local Ray cluster, one llama.cpp replica): PSS of its
process tree idle and while inspect_ai and lm-eval run the same task files unchanged against it.

The peers live in bench/.venv-peers (`make bench` creates it); their task files are in
bench/peers_tasks/, their data is written from `evaluators.load_probe_set("capability")` at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from bench._common import Row, drop_work_dir, resend_unanswered

GROUP = "peers"
ROOT = Path(__file__).resolve().parent.parent
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PEERS_BIN = ROOT / "bench" / ".venv-peers" / "bin"
TASKS = ROOT / "bench" / "peers_tasks"
PY = sys.executable
EVALCLUSTER = [PY, "-m", "cluster.cli"]
SYSTEM = "You are a helpful assistant."  # evalcluster's default probes.system_prompt
REPEATS = 4
MAX_TOKENS = 128
CONCURRENCY = 4
SLOTS = 4
ADAPTERS = 4
TOOL_TIMEOUT_S = 1200
# One decode thread: with 2 threads on 2 cores, any client (or neighbour) process that takes a core
# stalls llama.cpp's thread barrier (measured: 0.95 tok/s instead of ~100), which would charge a
# tool's own CPU use many times over. One thread leaves a core to the tools.
THREADS = 1


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from _servers import free_port

    return free_port()


def _wait_http(url: str, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s ({url})")


def _tree(pid: int) -> list:
    import psutil

    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


def _stop(procs: list, timeout: float = 30) -> None:
    """SIGTERM the given psutil processes (by PID), then SIGKILL what is left."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


@contextlib.contextmanager
def llama_server(log: Path, lora: Path | None = None) -> Iterator[str]:
    """A llama.cpp server on SmolLM2 (4 slots, metrics on, 127.0.0.1); yields its base URL."""
    port = _free_port()
    cmd = [PY, "-m", "deployments._llamacpp_server", "-m", str(GGUF), "--port", str(port), "-np", str(SLOTS),
           "-c", str(1024 * SLOTS), "-t", str(THREADS), "--metrics"] + (["--lora", str(lora)] if lora else [])
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/health", 180, "llama.cpp server", proc)
        yield url
    finally:
        _stop(_tree(proc.pid))


def tokens_predicted(url: str) -> float:
    """The server's `llamacpp:tokens_predicted_total` counter."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    m = re.search(r"^llamacpp:tokens_predicted_total\s+(\S+)", text, re.M)
    if not m:
        raise RuntimeError(f"{url}/metrics has no llamacpp:tokens_predicted_total")
    return float(m.group(1))


def run_tool(name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> float:
    """Run one tool as a whole process; its wall time in seconds (stdout/stderr go to `log`)."""
    full_env = dict(os.environ, **(env or {}))
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=cwd or ROOT)
        try:
            rc = proc.wait(TOOL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _stop(_tree(proc.pid))
            raise RuntimeError(f"{name} took longer than {TOOL_TIMEOUT_S}s (log: {log})") from None
        except BaseException:  # interrupted: leave no tool running
            _stop(_tree(proc.pid))
            raise
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"{name} exited with status {rc} (log: {log}):\n{tail}")
    return wall


class PSSSampler:
    """Samples the PSS of a process tree in a thread; `peak` is the largest sum seen."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_mb(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PSSSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tree_pss_mb(pid: int) -> float:
    """Sum of PSS (MB) over a process and all its descendants."""
    import psutil

    total = 0
    for p in _tree(pid):
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total / 2**20


# --------------------------------------------------------------------------- task data


def probes() -> list:
    """The capability probes (the one source of truth for every tool)."""
    from evaluators import load_probe_set

    return list(load_probe_set("capability").probes)


def write_task_files(work: Path, repeats: int = REPEATS) -> dict[str, Path]:
    """The peers' task files and data in `work`: inspect's JSONL + task, lm-eval's yaml + JSONL."""
    ps = probes()
    rows = [{"id": p.id, "prompt": p.prompt, "expected": p.expected or ""} for p in ps]
    inspect_dir, lmeval_dir = work / "inspect", work / "lmeval"
    inspect_dir.mkdir(parents=True, exist_ok=True)
    lmeval_dir.mkdir(parents=True, exist_ok=True)
    inspect_data = inspect_dir / "probes.jsonl"
    inspect_data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(TASKS / "capability_inspect.py", inspect_dir / "capability_inspect.py")
    # lm-eval has no epochs for generate_until through an API model: one row per probe and repeat.
    lm_rows = [dict(r, id=f"{r['id']}#{k}") for r in rows for k in range(repeats)]
    (lmeval_dir / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lm_rows))
    shutil.copy(TASKS / "capability_lmeval.yaml", lmeval_dir / "capability_lmeval.yaml")
    return {"inspect_task": inspect_dir / "capability_inspect.py", "inspect_data": inspect_data,
            "lmeval_dir": lmeval_dir}


def inspect_cmd(files: dict[str, Path], model: str, log_dir: Path, epochs: int = REPEATS,
                limit: int | None = None) -> list[str]:
    """`inspect eval` of the capability task through the OpenAI-compatible provider (run it in the
    task's directory: inspect takes only relative task paths)."""
    cmd = [str(PEERS_BIN / "inspect"), "eval", files["inspect_task"].name, "--model", f"openai-api/bench/{model}",
           "-T", f"probes={files['inspect_data']}", "-T", f"system={SYSTEM}", "--epochs", str(epochs),
           "--max-connections", str(CONCURRENCY), "--temperature", "0", "--max-tokens", str(MAX_TOKENS),
           "--display", "none", "--log-dir", str(log_dir), "--log-format", "json"]
    return cmd + (["--limit", str(limit)] if limit else [])


def inspect_env(base_url: str) -> dict[str, str]:
    return {"BENCH_BASE_URL": base_url + "/v1", "BENCH_API_KEY": "none", "INSPECT_LOG_LEVEL": "warning"}


def lmeval_cmd(files: dict[str, Path], base_url: str, model: str, out: Path, limit: int | None = None) -> list[str]:
    """`lm_eval` with `local-chat-completions`, `num_concurrent` = the concurrency."""
    args = (f"model={model},base_url={base_url}/v1/chat/completions,num_concurrent={CONCURRENCY},"
            "tokenized_requests=False,max_retries=3,timeout=600")
    cmd = [str(PEERS_BIN / "lm_eval"), "--model", "local-chat-completions", "--model_args", args,
           "--tasks", "evalcluster_capability", "--include_path", str(files["lmeval_dir"]),
           "--apply_chat_template", "--system_instruction", SYSTEM, "--output_path", str(out), "--log_samples"]
    return cmd + (["--limit", str(limit)] if limit else [])


LMEVAL_ENV = {"OPENAI_API_KEY": "none", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false"}


def eval_config(path: Path, base_url: str) -> Path:
    """An evalcluster config whose model is the shared llama.cpp server (engine `openai`)."""
    import yaml

    cfg = {
        "models": [{"name": "smollm2", "engine": "openai",
                    "options": {"base_url": base_url + "/v1", "model": "smollm2", "timeout_s": 600}}],
        "probes": {"sets": ["capability"], "system_prompt": SYSTEM, "temperature": 0, "max_tokens": MAX_TOKENS},
        "sinks": {"ledger": str(path.parent / "ledger.sqlite"), "spool_dir": str(path.parent / "spool")},
        "staging": {"cache_dir": str(path.parent / "cache")},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def eval_args(repeats: int) -> list[str]:
    """`evalcluster eval` arguments for the sweep (no ledger, no judge: the same work as the peers)."""
    return ["--model", "smollm2", "--probes", "capability", "--repeats", str(repeats), "--max-tokens",
            str(MAX_TOKENS), "--concurrency", str(CONCURRENCY), "--no-ledger", "--no-judge"]


# --------------------------------------------------------------------------- floor


async def _floor_async(base_url: str, repeats: int) -> int:
    import httpx

    sem = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, trust_env=False) as client:

        async def one(prompt: str) -> int:
            async with sem:
                r = await resend_unanswered(lambda: client.post("/v1/chat/completions", json={
                    "model": "smollm2", "temperature": 0, "max_tokens": MAX_TOKENS,
                    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]}))
                r.raise_for_status()
                return int(r.json()["usage"]["completion_tokens"])

        got = await asyncio.gather(*(one(p.prompt) for p in probes() for _ in range(repeats)))
    return len(got)


def floor(base_url: str, repeats: int) -> float:
    """23 x `repeats` direct chat requests at concurrency 4 with httpx (in this process); wall seconds."""
    t0 = time.perf_counter()
    n = asyncio.run(_floor_async(base_url, repeats))
    assert n == len(probes()) * repeats
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- ray head (for submit)


@dataclass
class RayHead:
    url: str
    temp_dir: str
    env: dict[str, str] = field(default_factory=dict)

    def pids(self) -> list:
        import psutil

        procs = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(self.temp_dir in part for part in p.info["cmdline"] or []):
                    procs += _tree(p.info["pid"])
        return procs


@contextlib.contextmanager
def ray_head(work: Path) -> Iterator[RayHead]:
    """A `ray start --head` cluster on loopback (stopped by PID, like tests/test_submit.py)."""
    temp_dir = tempfile.mkdtemp(prefix="rayp-", dir="/tmp")  # short: socket paths must fit 107 bytes
    port, dash, metrics = _free_port(), _free_port(), _free_port()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{Path(PY).parent}:{os.environ['PATH']}")
    head = RayHead(f"http://127.0.0.1:{dash}", temp_dir, env)
    try:
        subprocess.run([str(Path(PY).parent / "ray"), "start", "--head", f"--port={port}",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
                        "--num-cpus=4", "--dashboard-agent-listen-port=0", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                       check=True, env=env, capture_output=True, timeout=300)
        _wait_http(head.url + "/api/version", 180, "the Ray dashboard")
        yield head
    finally:
        _stop(head.pids())
        shutil.rmtree(temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------- throughput


def throughput(work: Path, rounds: int, repeats: int = REPEATS) -> list[Row]:
    """Every tool on the same server, rounds in rotated order; rows with medians and ratios to the floor."""
    files = write_task_files(work, repeats)
    log = work / "throughput.log"
    times: dict[str, list[float]] = {}
    tokens: dict[str, list[float]] = {}
    failures: dict[str, list[str]] = {}
    with llama_server(work / "llama-throughput.log") as url, ray_head(work) as head:
        cfg = eval_config(work / "eval.yaml", url)
        tools: dict[str, Callable[[], float]] = {
            "floor": lambda: floor(url, repeats),
            "inspect_ai": lambda: run_tool("inspect_ai", inspect_cmd(files, "smollm2", work / "inspect-logs", repeats),
                                           log, inspect_env(url), cwd=files["inspect_task"].parent),
            "lm-eval": lambda: run_tool("lm-eval", lmeval_cmd(files, url, "smollm2", work / "lmeval-out"),
                                        log, LMEVAL_ENV, cwd=files["lmeval_dir"]),
            "evalcluster eval (cold)": lambda: run_tool(
                "evalcluster eval", EVALCLUSTER + ["eval", "--config", str(cfg), *eval_args(repeats)], log),
            "evalcluster submit (running cluster)": lambda: run_tool(
                "evalcluster submit", EVALCLUSTER + ["submit", "--config", str(cfg), "--address", head.url, "--",
                                                     "eval", *eval_args(repeats)], log, head.env),
        }
        # Warm the server's model pages and slots once, outside the timings.
        if rounds > 1:
            asyncio.run(_floor_async(url, 1))
        names = list(tools)
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                before = tokens_predicted(url)
                print(f"[peers] round {r + 1}/{rounds}: {name} ...", file=sys.stderr, flush=True)
                try:
                    wall = tools[name]()
                except RuntimeError as e:  # one tool failing a round must not lose the other rows
                    if name == "floor":
                        raise
                    failures.setdefault(name, []).append(str(e).splitlines()[-1][:200])
                    wall = math.nan
                times.setdefault(name, []).append(wall)
                tokens.setdefault(name, []).append(tokens_predicted(url) - before)
    rows = [Row(GROUP, f"floor: direct httpx, {len(probes()) * repeats} chats at concurrency {CONCURRENCY}",
                statistics.median(times["floor"]), "s", None, "",
                f"{MAX_TOKENS} max tokens, temperature 0, system prompt; one llama.cpp server, {SLOTS} slots; "
                f"tokens predicted per run {_fmt_tokens(tokens['floor'])}; in-process (no interpreter start)")]
    floor_tokens = statistics.median(tokens["floor"])
    for name in names[1:]:
        ok = [(t, f) for t, f in zip(times[name], times["floor"]) if not math.isnan(t)]
        failed = f"; FAILED {len(failures[name])} of {rounds} rounds: {failures[name][0]}" if name in failures else ""
        # Equal work, checked on the server's own counter: greedy answers shift a little with batch
        # composition, so compare per token too when the totals differ.
        work = statistics.median(tokens[name]) / floor_tokens if floor_tokens else math.nan
        per_token = (statistics.median(t / f for t, f in ok) / work) if ok and work == work and work > 0 else None
        equal = ("equal work" if abs(work - 1) <= 0.05 else "UNEQUAL work") + f" ({work:.2f}x the floor's tokens"
        equal += f", {per_token:.2f}x the floor per token)" if per_token is not None else ")"
        rows.append(Row(GROUP, f"{name}: wall time, same sweep", statistics.median(t for t, _ in ok) if ok else math.nan,
                        "s", statistics.median(t / f for t, f in ok) if ok else None, "floor (same round)",
                        f"whole process; {equal}; tokens predicted per run {_fmt_tokens(tokens[name])}; "
                        f"rounds {', '.join(f'{t:.0f}' for t in times[name])} s{failed}"))
    return rows


def _fmt_tokens(xs: list[float]) -> str:
    return "/".join(f"{x:.0f}" for x in xs)


# --------------------------------------------------------------------------- checkpoint sweep


def make_checkpoints(run_dir: Path, n: int) -> list[Path]:
    """`n` MLX LoRA checkpoints of SmolLM2 in go-ml's layout (tests/test_watch.py's writer)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_watch import write_checkpoint

    return [write_checkpoint(run_dir, 100 * (i + 1), seed=31 + i) for i in range(n)]


def watch_config(path: Path, runs: Path, replicas: int = 1) -> Path:
    """The sweep's `watch` config; its ledger, spool and cache beside `path`. Each replica is one
    llama.cpp server with the peer's settings (slots, context, one decode thread)."""
    import yaml

    cfg = {
        "cluster": {"address": "local", "dashboard": False, "num_cpus": 4, "serve": {"port": _free_port()},
                    "temp_dir": tempfile.mkdtemp(prefix="rayw-", dir="/tmp"),
                    "node_kinds": {"bench": {"resources": {"llamacpp": 2}}}, "local_node_kind": "bench"},
        "models": [{"name": "smollm2", "engine": "llamacpp", "path": str(GGUF), "resources": {"llamacpp": 1},
                    "replicas": replicas, "max_adapters_per_replica": ADAPTERS,
                    # The peer's server keeps llama.cpp's default, the prompt cache on (evalcluster's
                    # default is off, for repeatable answers): the same engine settings on both sides.
                    "options": {"parallel": SLOTS, "ctx_size": 1024 * SLOTS, "threads": THREADS, "cache_prompt": True}}],
        "sources": [{"name": "runs", "kind": "local", "path": str(runs), "layout": "mlx", "model": "smollm2",
                     "adapter_meta": [{"prefix": "smol", "tag": "smollm2-135m", "short": "S"}]}],
        "probes": {"sets": ["capability"], "system_prompt": SYSTEM, "temperature": 0, "max_tokens": MAX_TOKENS},
        "scorers": ["heuristic", "exact", "capability"],
        "budgets": {"per_endpoint": CONCURRENCY * replicas, "checkpoints": 2},
        "staging": {"cache_dir": str(path.parent / "cache")},
        "sinks": {"ledger": str(path.parent / "ledger.sqlite"), "spool_dir": str(path.parent / "spool")},
        "poll_interval_s": 1,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def ledger_tokens(ledger: Path) -> tuple[int, int]:
    """(samples, completion tokens) a run recorded: its engine work, as the servers counted it."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as db:
        n, tokens = db.execute("SELECT count(*), sum(json_extract(record, '$.usage.completion_tokens')) "
                               "FROM samples").fetchone()
    return int(n), int(tokens or 0)


SWEEP_REPLICAS = (1, 2)  # one server, as the peer has; two (this 2-core node's both cores), which it cannot


def sweep(work: Path) -> list[Row]:
    """4 checkpoints x 23 probes: `evalcluster watch --once` (one replica, then two) against
    inspect_ai once per checkpoint and base on its own llama.cpp server; tokens checked both sides."""
    from checkpoints import convert

    files = write_task_files(work)
    runs = work / "runs"
    ckpts = make_checkpoints(runs / "adapters-smol-sweep", ADAPTERS)
    loras = [convert(c, work / "gguf" / f"ck{i}.gguf", "gguf", base=GGUF) for i, c in enumerate(ckpts)]
    log = work / "sweep.log"
    import yaml

    def peer_once_per_checkpoint() -> tuple[float, int]:
        # The base model too: evalcluster evaluates it as the reference for deltas, so equal work.
        t0, tokens = time.perf_counter(), 0.0
        for lora in [None, *loras]:
            with llama_server(work / "llama-sweep.log", lora=lora) as url:
                run_tool("inspect_ai", inspect_cmd(files, "smollm2", work / "inspect-sweep", epochs=1), log,
                         inspect_env(url), cwd=files["inspect_task"].parent)
                tokens += tokens_predicted(url)  # a fresh server per target: its whole count is this target's
        return time.perf_counter() - t0, int(tokens)

    def evalcluster_watch(replicas: int) -> tuple[float, int, int]:
        cfg = watch_config(work / f"ours-{replicas}" / "watch.yaml", runs, replicas)
        temp_dir = yaml.safe_load(cfg.read_text())["cluster"]["temp_dir"]
        try:
            wall = run_tool("evalcluster watch", EVALCLUSTER + ["watch", "--once", "--config", str(cfg)], log,
                            {"RAY_USAGE_STATS_ENABLED": "0"})
        finally:
            _stop(RayHead("", temp_dir).pids())  # anything the run left behind
            shutil.rmtree(temp_dir, ignore_errors=True)
        return (wall, *ledger_tokens(cfg.parent / "ledger.sqlite"))

    ours = {}
    for replicas in SWEEP_REPLICAS:
        print(f"[peers] sweep: evalcluster watch --once, {replicas} replica(s) ...", file=sys.stderr, flush=True)
        ours[replicas] = evalcluster_watch(replicas)
    print("[peers] sweep: inspect_ai per checkpoint ...", file=sys.stderr, flush=True)
    theirs, their_tokens = peer_once_per_checkpoint()
    want = (ADAPTERS + 1) * len(probes())
    rows = []
    for replicas, (wall, samples, tokens) in ours.items():
        incomplete = f"; ONLY {samples} of {want} samples recorded" if samples != want else ""
        servers = "one llama.cpp replica" if replicas == 1 else f"{replicas} llama.cpp replicas (one per core)"
        rows.append(Row(
            GROUP, f"checkpoint sweep: {ADAPTERS} adapters + base x {len(probes())} probes, evalcluster watch "
                   f"--once, {replicas} replica{'s' if replicas > 1 else ''}",
            wall, "s", wall / theirs, f"inspect_ai once per checkpoint and base ({theirs:.0f} s)",
            f"evalcluster: local Ray cluster + Serve + {servers}, each with the adapters, {SLOTS} slots and "
            f"{THREADS} decode thread, the prompt cache on as on the peer's server (MLX->GGUF conversion included), "
            f"{CONCURRENCY * replicas} in flight at most, "
            f"2 checkpoints at a time; peer: a llama.cpp server with the same settings and --lora per checkpoint "
            f"(GGUF conversion done beforehand, not timed) + one inspect process; {ADAPTERS + 1} targets each "
            f"(the base too); work: {samples} samples, {tokens} tokens generated against the peer's servers' "
            f"{their_tokens} (tokens_predicted_total){incomplete}"))
    return rows


# --------------------------------------------------------------------------- memory + interop


def serve_config(path: Path, adapters: Path) -> Path:
    import yaml

    cfg = {
        "cluster": {"address": "local", "dashboard": False, "num_cpus": 4, "serve": {"port": _free_port()},
                    "temp_dir": tempfile.mkdtemp(prefix="rays-", dir="/tmp"),
                    "node_kinds": {"bench": {"resources": {"llamacpp": 2}}}, "local_node_kind": "bench"},
        "models": [{"name": "smollm2", "engine": "llamacpp", "path": str(GGUF), "resources": {"llamacpp": 1},
                    "adapter_dirs": [str(adapters)], "max_ongoing_requests": 64, "max_queued_requests": -1,
                    "options": {"parallel": SLOTS, "ctx_size": 1024 * SLOTS, "threads": THREADS}}],
        "staging": {"cache_dir": str(path.parent / "cache")},
        "sinks": {"ledger": str(path.parent / "ledger.sqlite"), "spool_dir": str(path.parent / "spool")},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _inspect_ok(log_dir: Path) -> tuple[bool, str]:
    logs = sorted(log_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return False, "no log"
    doc = json.loads(logs[-1].read_text())
    outs = [s.get("output", {}).get("completion", "") for s in doc.get("samples", [])]
    return doc.get("status") == "success" and bool(outs) and all(outs), f"{len(outs)} samples"


def _lmeval_ok(out_dir: Path) -> tuple[bool, str]:
    files = sorted(out_dir.rglob("samples_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not files:
        return False, "no samples file"
    rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    outs = [r.get("resps", [[""]])[0][0] for r in rows]
    return bool(outs) and all(outs), f"{len(outs)} samples"


def serve_memory_interop(work: Path) -> list[Row]:
    """`evalcluster serve`: PSS idle and under load; inspect_ai and lm-eval against it (base + adapter)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _adapters import SMOLLM2_DIMS, gguf_lora_for

    files = write_task_files(work)
    adapters = work / "adapters"
    adapters.mkdir(exist_ok=True)
    gguf_lora_for(SMOLLM2_DIMS, adapters / "ck1", seed=41, std_b=0.1, modules=("q_proj", "v_proj", "o_proj"))
    cfg = serve_config(work / "serve.yaml", adapters)
    import yaml

    data = yaml.safe_load(cfg.read_text())
    port, temp_dir = data["cluster"]["serve"]["port"], data["cluster"]["temp_dir"]
    log = work / "serve.log"
    rows: list[Row] = []
    with open(log, "ab") as out:
        proc = subprocess.Popen(EVALCLUSTER + ["serve", "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/v1/models", 300, "evalcluster serve", proc)
        deadline = time.monotonic() + 120
        while "press Ctrl-C" not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # let start-up settle before the idle reading
        idle = tree_pss_mb(proc.pid)
        n_procs = len(_tree(proc.pid))
        outcomes: list[tuple[str, bool, str]] = []
        with PSSSampler(proc.pid) as sampler:
            for model in ("smollm2", "smollm2:ck1"):
                tag = model.replace(":", "_")
                ok, what = False, ""
                try:
                    run_tool("inspect_ai", inspect_cmd(files, model, work / f"interop-inspect-{tag}", epochs=1,
                                                       limit=8), log, inspect_env(url), cwd=files["inspect_task"].parent)
                    ok, what = _inspect_ok(work / f"interop-inspect-{tag}")
                except RuntimeError as e:
                    what = str(e).splitlines()[0]
                outcomes.append((f"inspect_ai -> evalcluster serve, model {model}", ok, what))
                ok, what = False, ""
                try:
                    run_tool("lm-eval", lmeval_cmd(files, url, model, work / f"interop-lmeval-{tag}", limit=8), log,
                             LMEVAL_ENV, cwd=files["lmeval_dir"])
                    ok, what = _lmeval_ok(work / f"interop-lmeval-{tag}")
                except RuntimeError as e:
                    what = str(e).splitlines()[0]
                outcomes.append((f"lm-eval -> evalcluster serve, model {model}", ok, what))
        rows.append(Row(GROUP, "memory: evalcluster serve, one llama.cpp replica, idle", idle, "MB", None, "",
                        f"PSS summed over {n_procs} processes (driver, Ray GCS/raylet/workers, Serve controller/"
                        "proxy/replica, llama.cpp server); dashboard off"))
        rows.append(Row(GROUP, "memory: evalcluster serve, under load (peak)", sampler.peak, "MB",
                        sampler.peak / idle if idle else None, "idle",
                        "sampled each second while inspect_ai and lm-eval ran against it (concurrency 4)"))
        for name, ok, what in outcomes:
            rows.append(Row(GROUP, f"interop: {name}", 1.0 if ok else 0.0, "ok", None, "",
                            f"task files unchanged from bench/peers_tasks, --limit 8, temperature 0; {what}"))
    finally:
        _stop(_tree(proc.pid), timeout=60)
        _stop(RayHead("", temp_dir).pids())
        shutil.rmtree(temp_dir, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- run


def check_peers() -> None:
    for exe in ("inspect", "lm_eval"):
        if not (PEERS_BIN / exe).exists():
            raise RuntimeError(f"{PEERS_BIN / exe} is missing: run `make bench` (it creates bench/.venv-peers)")


def run(quick: bool = False) -> list[Row]:
    """All peer comparisons; rounds: 3 (quick: 1)."""
    check_peers()
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    rows: list[Row] = []
    try:
        # quick (a smoke run, not for RESULTS.md): one round of one repeat.
        rows += throughput(work / "throughput", rounds=1 if quick else 3, repeats=1 if quick else REPEATS)
        rows += serve_memory_interop(work / "serve")
        rows += sweep(work / "sweep")
    finally:
        drop_work_dir(work, GROUP)
    return rows


if __name__ == "__main__":
    from bench._common import table

    print(table(run(quick="--quick" in sys.argv)))

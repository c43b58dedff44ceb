"""llama.cpp as a TextModel: llama.cpp's own server in child processes, spoken to over loopback HTTP.

The server is xllamacpp's (`python -m deployments._llamacpp_server`) or a `llama-server` binary
(options.server_binary, for ROCm/CUDA builds); both take the same flags. Each server binds
127.0.0.1 on a free port, writes its log to a file, and is watched: when its process exits
without being asked to, the request in flight fails with EngineUnavailable naming the exit, the
server is restarted, and the next request waits for it (up to start_timeout_s). More than
max_restarts crashes in a minute leave it down, and requests fail at once.

Adapters: one server per replica holds the base and every loaded adapter (`--lora-init-without-apply`,
so none is applied by default), and each request names its adapter in llama.cpp's per-request
`lora` list: its own at `lora_scale`, every other one at 0. llama.cpp loads LoRAs only at start-up,
so loading an adapter the server lacks starts a replacement server with the new set (the LRU's
evictions dropped), moves new requests to it once it is healthy, and stops the old one when its
last request finishes: nothing in flight is dropped, and the base weights are loaded once per
replica, not once per adapter (on a GPU, one copy in VRAM instead of 1 + max_adapters). A replica
passes the adapters registered after the one asked for (`load_adapter(..., along=...)`), so the
replacement holds the next checkpoints too: a 4-checkpoint sweep started 3 servers per replica,
not 5 (the last checkpoint registered after the first load). The slots are taken in turns by LoRA
configuration (deployments._llamacpp_turns), because the server batches only requests of the
same one. Measured on xllamacpp 2026.10.11549, SmolLM2-135M Q4_1, 2 cores:
- a replacement server is healthy 1.3 s after its start;
- greedy answers of the base and two adapters through one server equal those of a server holding
  only that adapter (or none), one at a time and 12 at once in any order, prompt cache on or off;
  the earlier per-adapter design was chosen when an older build reused a slot's cached prompt
  across LoRA configurations, which this build no longer does. Two requests of the same adapter in
  one batch can still part after a dozen tokens, as on any server with parallel slots;
- a request without a `lora` list gets every adapter at its start-up scale (an answer that is
  neither the base's nor any adapter's), so every request here sends the whole list;
- throughput (bench/engines.py, 32-token greedy chats, 4 in flight): one model alone (the base
  before any checkpoint arrives, the last checkpoint of a sweep) decodes 1.75x faster on one
  server, which has every core, than on its own server among 5 with cores // 5 threads each; but
  with several adapters decoding at once a server each is 15-25% faster on CPU, because llama.cpp
  batches only requests of the same LoRA configuration, so one server takes turns between them.
  That mode stays (`adapter_servers: each`), for CPU nodes under mixed traffic; on a GPU it costs
  a copy of the weights per server;
- threads: that server now takes every core but one (`server_threads`): on 2 cores with 2
  threads, the replica, Serve and the clients took CPU from the decode threads, which wait for each
  other every step: `evalcluster demo` 284 s with 2 threads, 166 s with 1 (2026-12-04).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal, Sequence

from pydantic import SecretStr

from checkpoints import AdapterError, GGUFModel, is_gguf_file, read_gguf_model, validate_gguf_lora
from deployments._children import die_with_parent
from deployments._engine import OPTIONAL_OPTIONS, Engine, Request, package_version, text_sha256
from deployments._llamacpp_turns import MAX_WAIT_S, SlotTurns
from deployments._openai_http import HEALTH_TIMEOUT_S, OpenAIClient, build_request, stream_tokens
from deployments._textmodel import (
    EngineError,
    EngineUnavailable,
    GenOpts,
    Message,
    ModelInfo,
    RequestRejected,
    Token,
    TokenScore,
)

log = logging.getLogger(__name__)

CRASH_WINDOW_S = 60.0
STOP_GRACE_S = 10.0
HTTP_SPARE_THREADS = 4        # HTTP threads beyond the slots, for /health, /metrics, /slots
PROGRESS_IS_HEALTH_S = 10.0   # a token streamed this recently counts as a passed health check
IDEMPOTENT_ATTEMPTS = 3        # tries of a request that changes nothing (scoring, tokenizing)
API_KEY_ENV = "LLAMA_API_KEY"  # where llama-server (and deployments._llamacpp_server) read their key
_live_pids: set[int] = set()


def _cores() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@atexit.register
def _kill_leftovers() -> None:
    """An interpreter that exits without closing its engines stops their servers now (a killed one
    takes them with it: see deployments._children)."""
    for pid in list(_live_pids):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _last_run(path: Path) -> str:
    """The log of the latest start only (each start appends a `=== ... starting:` header)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[text.rfind("\n=== ") :]


def _exit_text(rc: int | None) -> str:
    if rc is None:
        return "is gone"
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


class _Process:
    """One run of a server process: its port, HTTP client and exit."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, client: OpenAIClient) -> None:
        self.proc = proc
        self.port = port
        self.client = client
        self.exited = asyncio.Event()
        self.watcher: asyncio.Task | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


class LlamaServer:
    """A llama.cpp server for the base model and a set of adapters: started, watched, restarted, stopped.

    Args:
        label: what it serves, for messages ("base", "base and 2 adapters").
        argv: the command line without --port (added per start).
        parallel: the server's slots: requests sent to it at once.
        log_path: the file the server's output goes to.
        start_timeout_s: how long a start (or a request waiting for a restart) may take.
        max_restarts: crashes within a minute after which the server stays down.
        timeout_s: HTTP read timeout for requests.
        adapters: the adapters loaded at start-up, in the order of their ids in a request's `lora`
            list, each with the file fingerprint it was validated with.
        on_restart: called when a crash starts a restart (which a replacement server may make moot:
            stopping this one cancels it).
        turn_wait_s: the longest a request waits at a free slot for its LoRA configuration's turn.
    """

    def __init__(
        self, label: str, argv: list[str], log_path: Path, *, parallel: int, start_timeout_s: float,
        max_restarts: int, timeout_s: float = 600.0, adapters: dict[Path, tuple] | None = None,
        on_restart: Callable[[], None] | None = None, turn_wait_s: float = MAX_WAIT_S,
    ) -> None:
        self.on_restart = on_restart
        self.label = label
        self.adapters: dict[Path, tuple] = dict(adapters or {})
        # The server's own key (it reads LLAMA_API_KEY from its environment, never from argv, which
        # every local user can read): loopback is no boundary, and without it any local process
        # could send requests or change an adapter's scale (/lora-adapters) mid-evaluation. Only
        # /health and /models answer without it.
        self._api_key = SecretStr(secrets.token_urlsafe(32))
        # At most `parallel` requests reach the process; the rest wait here, taking turns by LoRA
        # configuration (deployments._llamacpp_turns). Past its slots llama.cpp parks each request
        # on an HTTP thread, and once those run out even /health goes unanswered and Serve kills a
        # replica that is only busy.
        self._gate = SlotTurns(parallel, turn_wait_s)
        # Short requests (tokenize, detokenize) pass by the slots but not past the spare HTTP threads:
        # a burst of them (a loglikelihood batch tokenises every pair at once) would otherwise
        # take every thread, and the server drops the connections it cannot serve.
        self._short_gate = asyncio.Semaphore(max(1, HTTP_SPARE_THREADS - 2))
        self.last_progress = 0.0  # monotonic time of the last event streamed from the process
        self.argv = argv
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.max_restarts = max_restarts
        self.timeout_s = timeout_s
        self.current: _Process | None = None
        self.ready = asyncio.Event()
        self.down_reason: str | None = None  # set when the server is left down
        self.in_flight = 0
        self.restarts = 0
        self._crashes: collections.deque[float] = collections.deque()
        self._stopping = False
        self._restarting: asyncio.Task | None = None

    def __repr__(self) -> str:
        pid = self.current.pid if self.current else None
        return f"<LlamaServer {self.label} pid={pid} in_flight={self.in_flight}>"

    @property
    def pid(self) -> int | None:
        """The live server process id (None while down)."""
        c = self.current
        return c.pid if c is not None and not c.exited.is_set() else None

    @property
    def port(self) -> int | None:
        return self.current.port if self.current else None

    # ------------------------------------------------------------------ start / stop

    async def start(self) -> None:
        """Start the process and wait until /health answers; raise EngineError with the log tail."""
        self._stopping = False
        for attempt in range(3):
            port = _free_port()
            try:
                await self._spawn(port)
                return
            except _PortTaken:
                log.warning("llama.cpp server %s: port %d was taken, trying another", self.label, port)
        raise EngineError(f"llama.cpp server for {self.label}: could not bind a free loopback port; log: {self.log_path}")

    async def _spawn(self, port: int) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [*self.argv, "--port", str(port)]
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            logf.flush()
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, env={**os.environ, API_KEY_ENV: self._api_key.get_secret_value()},
                preexec_fn=die_with_parent(),  # no server outlives its replica, even a SIGKILLed one
            )
        _live_pids.add(proc.pid)
        # One connection per request: the server's HTTP library closes a kept-alive connection after
        # a few requests, and a request sent on it meanwhile gets no answer (measured: 59 of 400
        # scoring requests, each resent after a 2 s wait); a loopback connect costs ~0.1 ms.
        client = OpenAIClient(
            f"http://127.0.0.1:{port}", api_key=self._api_key, timeout_s=self.timeout_s, connect_timeout_s=5.0,
            max_retries=0, name=f"llama.cpp server for {self.label}", keep_alive=False,
        )
        p = _Process(proc, port, client)
        p.watcher = asyncio.create_task(self._watch(p), name=f"llamacpp-watch-{proc.pid}")
        try:
            await self._until_healthy(p)
        except BaseException:
            # Failed, timed out or cancelled (e.g. close() during a restart): leave no process behind.
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await asyncio.shield(client.aclose())
            raise
        self.current = p
        self.down_reason = None
        self.ready.set()
        log.info("llama.cpp server for %s: pid %d on 127.0.0.1:%d", self.label, proc.pid, port)

    async def _until_healthy(self, p: _Process) -> None:
        """Poll /health until it answers; raise when the process exits or the start times out."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if p.exited.is_set():
                run = _last_run(self.log_path).lower()
                if "couldn't bind" in run or "address already in use" in run:
                    raise _PortTaken()
                raise EngineError(
                    f"llama.cpp server for {self.label} {_exit_text(p.proc.returncode)} while starting: "
                    f"{_tail(self.log_path)} (log: {self.log_path})"
                )
            try:
                await p.client.get_json("/health", retries=False, timeout_s=HEALTH_TIMEOUT_S)
                return
            except EngineError:
                pass
            if time.monotonic() > deadline:
                raise EngineError(
                    f"llama.cpp server for {self.label} not healthy after {self.start_timeout_s:g} s: "
                    f"{_tail(self.log_path)} (log: {self.log_path})"
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(p.exited.wait(), 0.1)

    async def _watch(self, p: _Process) -> None:
        """Wait for the process to exit; an exit nobody asked for is a crash: restart."""
        rc = await p.proc.wait()
        _live_pids.discard(p.pid)
        p.exited.set()
        if self._stopping or p is not self.current:
            return  # asked to stop, or it never became the current process (its start failed)
        self.ready.clear()
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > CRASH_WINDOW_S:
            self._crashes.popleft()
        what = f"llama.cpp server for {self.label} (pid {p.pid}) {_exit_text(rc)}"
        with contextlib.suppress(OSError), open(self.log_path, "a") as logf:
            logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {what}\n")
        await p.client.aclose()
        if len(self._crashes) > self.max_restarts:
            self.down_reason = f"{what}; {len(self._crashes)} crashes within a minute, left down (log: {self.log_path})"
            log.error("%s", self.down_reason)
            self.ready.set()  # wake waiters: they see down_reason
            return
        log.warning("%s; restarting (log: %s)", what, self.log_path)
        if self.on_restart is not None:
            self.on_restart()
        self._restarting = asyncio.current_task()
        try:
            await self.start()
            self.restarts += 1
        except EngineError as e:
            self.down_reason = f"{what}; the restart failed: {e}"
            log.error("%s", self.down_reason)
            self.ready.set()
        finally:
            self._restarting = None

    async def _terminate(self, p: _Process) -> None:
        if p.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(p.exited.wait(), STOP_GRACE_S)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.proc.kill()
                await p.exited.wait()
        await p.client.aclose()

    async def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after a grace period). Idempotent."""
        self._stopping = True
        self.ready.clear()
        restarting = self._restarting
        if restarting is not None and restarting is not asyncio.current_task():
            restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await restarting
        p, self.current = self.current, None
        if p is not None:
            await self._terminate(p)
            if p.watcher is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await p.watcher
        self.down_reason = self.down_reason or "stopped"
        self.ready.set()

    # ------------------------------------------------------------------ requests

    async def wait_ready(self) -> _Process:
        """The running process, waiting for a restart in progress; EngineUnavailable if down."""
        if not self.ready.is_set():
            try:
                await asyncio.wait_for(self.ready.wait(), self.start_timeout_s)
            except asyncio.TimeoutError:
                raise EngineUnavailable(
                    f"llama.cpp server for {self.label} is not back after {self.start_timeout_s:g} s "
                    f"(log: {self.log_path})"
                ) from None
        p = self.current
        if self.down_reason is not None or p is None:
            raise EngineUnavailable(self.down_reason or f"llama.cpp server for {self.label} is down")
        return p

    async def events(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's SSE events; a crash mid-request becomes a clear EngineUnavailable."""
        for attempt in (0, 1):
            streamed = False
            async with self._gate.turn(tuple(e["scale"] for e in body.get("lora") or ())):
                p = await self.wait_ready()
                try:
                    async for ev in p.client.stream_events(path, body):
                        streamed = True
                        self.last_progress = time.monotonic()
                        yield ev
                    return
                except RequestRejected:
                    raise  # the request's fault (e.g. longer than the context): the server is fine
                except EngineError as e:
                    failure = e
            # Outside the gate: waiting for a restart must not hold a slot others could use.
            # A dying process drops the connection a moment before its exit is seen.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(p.exited.wait(), 2.0)
            if not p.exited.is_set():
                raise failure
            if self._stopping:
                raise EngineUnavailable(f"llama.cpp server for {self.label} was stopped during the request") from failure
            if not streamed and attempt == 0:
                # It died before sending anything (e.g. killed while idle): nothing to undo,
                # so wait for the restart and send the request once more.
                log.info("llama.cpp server for %s died before answering; resending after the restart", self.label)
                continue
            raise EngineUnavailable(
                f"llama.cpp server for {self.label} (pid {p.pid}) {_exit_text(p.proc.returncode)} during the "
                f"request; it is being restarted, retry the request (log: {self.log_path})"
            ) from failure

    async def call(self, path: str, body: dict[str, Any]) -> Any:
        """A short POST (/tokenize, /detokenize) and its JSON reply, a few at a time. These change
        nothing on the server, so one dropped connection (a keep-alive connection the server closed
        as it was reused) is sent again."""
        for attempt in range(IDEMPOTENT_ATTEMPTS):
            async with self._short_gate:
                p = await self.wait_ready()
                try:
                    return await p.client.request_json("POST", path, body)
                except EngineUnavailable:
                    if attempt == IDEMPOTENT_ATTEMPTS - 1 or p.exited.is_set():
                        raise
        raise AssertionError("unreachable")

    async def healthy(self) -> bool:
        """Alive and streaming tokens now, or else answering GET /health."""
        p = self.current
        if p is None or p.exited.is_set() or self.down_reason is not None:
            return False
        if time.monotonic() - self.last_progress < PROGRESS_IS_HEALTH_S:
            return True  # a saturated CPU can delay /health; tokens flowing is the better sign
        try:
            await p.client.get_json("/health", retries=False, timeout_s=HEALTH_TIMEOUT_S)
        except EngineError:
            return False
        return True

    async def slots(self) -> list[dict[str, Any]]:
        """The server's /slots: one entry per parallel slot, with `is_processing`."""
        p = await self.wait_ready()
        return await p.client.get_json("/slots", retries=False, timeout_s=HEALTH_TIMEOUT_S)


class _PortTaken(Exception):
    pass


class LlamaCppEngine(Engine):
    """A GGUF model on llama.cpp's server, with GGUF LoRA adapters chosen per request (one server for all).

    `from_config` (Engine's) builds it from a LlamaCppModel, whose `options` fields are keywords here.

    Args:
        name: the model's name.
        model_path: the base model's .gguf.
        parallel: the server's slots (requests decoded together).
        ctx_size: context tokens per slot (the server gets ctx_size * parallel).
        adapter_servers: "one" server for the base and every adapter, or a server for "each"
            adapter besides the base's (see the module docstring and `server_threads`).
        threads: CPU threads per server (default: see `server_threads`).
        n_gpu_layers: layers to offload (-1: all; ignored by CPU builds).
        server_binary: a `llama-server` to run instead of xllamacpp's.
        start_timeout_s: how long a server start may take.
        log_dir: where server logs go (default: a temp dir removed at close).
        max_restarts: crashes in a minute before a server is left down.
        cache_prompt: reuse cached prompt prefixes (faster; greedy output then depends on what
            ran before, so it is off by default).
        lora_scale: the scale a request's adapter is applied with (0 serves the base).
        turn_wait_s: the longest a request waits at a free slot for its adapter's turn (0: first
            come, first served; see deployments._llamacpp_turns).
        system_prompt / adapters / max_adapters: see Engine.
    """

    kind = "llamacpp"
    supported_options = OPTIONAL_OPTIONS  # all of them: top_k, top_p, repeat_penalty, stop, seed, adapter
    drain_after_stop = True  # the server ends at the same stop sequence and reports its usage

    def __init__(
        self,
        name: str,
        model_path: Path,
        *,
        parallel: int = 4,
        ctx_size: int = 4096,
        adapter_servers: Literal["one", "each"] = "one",
        threads: int | None = None,
        n_gpu_layers: int = -1,
        server_binary: Path | None = None,
        start_timeout_s: float = 60.0,
        log_dir: Path | None = None,
        max_restarts: int = 5,
        cache_prompt: bool = False,
        lora_scale: float = 1.0,
        turn_wait_s: float = MAX_WAIT_S,
        system_prompt: str | None = None,
        adapters: bool = True,
        max_adapters: int = 4,
    ) -> None:
        super().__init__(name, system_prompt=system_prompt, adapters=adapters, max_adapters=max_adapters)
        self.model_path = Path(model_path)
        self.parallel = parallel
        self.ctx_size = ctx_size
        self.threads = threads
        if adapter_servers not in ("one", "each"):
            raise EngineError(f"adapter_servers must be 'one' or 'each', not {adapter_servers!r}")
        self.adapter_servers = adapter_servers
        self.loads_adapter_sets = adapter_servers == "one"  # a new adapter means a new server
        self.n_gpu_layers = n_gpu_layers
        self.server_binary = Path(server_binary).expanduser() if server_binary else None
        self.start_timeout_s = start_timeout_s
        self.max_restarts = max_restarts
        self.cache_prompt = cache_prompt
        self.lora_scale = lora_scale
        self.turn_wait_s = turn_wait_s
        self._log_dir_given = Path(log_dir).expanduser() if log_dir else None
        self.log_dir: Path | None = None
        self.server: LlamaServer | None = None  # the one new requests go to (the base's, with "each")
        self._adapter_servers: dict[Path, LlamaServer] = {}  # adapter_servers "each": one per adapter
        self._retired: set[LlamaServer] = set()  # replaced, stopped once their last request ends
        self._generation = 0  # servers started, for their log files' names
        # Crashes its servers were restarted after, a replaced server's included (a server replaced
        # while it restarts has its restart cancelled: the replacement is the new process).
        self.restarts = 0
        self._bg: set[asyncio.Task] = set()
        self._model: GGUFModel | None = None

    # ------------------------------------------------------------------ servers

    def _argv(self, adapters: Sequence[Path]) -> list[str]:
        if self.server_binary is not None:
            head = [str(self.server_binary)]
        else:
            head = [sys.executable, "-m", "deployments._llamacpp_server"]
        argv = [
            *head,
            "-m", str(self.model_path),
            "--host", "127.0.0.1",
            "-c", str(self.ctx_size * self.parallel),
            "-np", str(self.parallel),
            "-t", str(self.server_threads),
            "-ngl", str(self.n_gpu_layers),
            # HTTP threads beyond the slots: /health and /metrics must answer while every slot decodes.
            "--threads-http", str(self.parallel + HTTP_SPARE_THREADS),
            "--slots", "--metrics", "--no-webui",
        ]
        if adapters:
            argv.append("--lora-init-without-apply")  # applied only where a request's `lora` says
            for path in adapters:
                argv += ["--lora", str(path)]
        return argv

    def _new_server(self, adapters: dict[Path, tuple]) -> LlamaServer:
        assert self.log_dir is not None
        n = len(adapters)
        if self.adapter_servers == "each" and n == 1:
            label = str(next(iter(adapters)))
        else:
            label = "base" if not n else f"base and {n} adapter{'s' if n > 1 else ''}"
        # The engine's pid in the name: a given log_dir is shared by every replica on the node.
        log_path = self.log_dir / f"server-{os.getpid()}-{self._generation}.log"
        self._generation += 1
        return LlamaServer(
            label, self._argv(list(adapters)), log_path, parallel=self.parallel,
            start_timeout_s=self.start_timeout_s, max_restarts=self.max_restarts, adapters=adapters,
            on_restart=self._count_restart, turn_wait_s=self.turn_wait_s,
        )

    def _count_restart(self) -> None:
        self.restarts += 1

    def server_for(self, adapter: str | os.PathLike[str] | None = None) -> LlamaServer:
        """The server new requests for an adapter (None: the base) go to, e.g. to read its pid.

        Args:
            adapter: a loaded adapter's path, or None.
        """
        server = self.server
        if server is None:
            raise EngineUnavailable(f"llamacpp engine {self.name!r} is not started")
        if adapter is None:
            return server
        path = Path(adapter).expanduser().absolute()
        server = self._adapter_servers.get(path, server)
        if path not in server.adapters:
            raise EngineError(f"adapter {adapter} is not loaded in {self.name!r}")
        return server

    def _lora(self, server: LlamaServer, adapter: Path | None) -> list[dict[str, Any]] | None:
        """A request's `lora` list: its adapter at lora_scale, every other one the server holds at 0."""
        if not server.adapters:
            return None
        return [{"id": i, "scale": float(self.lora_scale) if path == adapter else 0.0}
                for i, path in enumerate(server.adapters)]

    # ------------------------------------------------------------------ lifecycle

    async def _start(self) -> None:
        if not self.model_path.is_file():
            raise EngineError(f"model file {self.model_path} does not exist")
        if not is_gguf_file(self.model_path):
            raise EngineError(f"model file {self.model_path}: not a GGUF file")
        if self.server_binary is not None and not os.access(self.server_binary, os.X_OK):
            raise EngineError(f"server_binary {self.server_binary} is not an executable file")
        if self._log_dir_given is not None:
            self.log_dir = self._log_dir_given
            self.log_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.log_dir = Path(tempfile.mkdtemp(prefix=f"evalcluster-llamacpp-{self.name}-"))
        self.server = self._new_server({})
        await self.server.start()

    async def _close(self) -> None:
        servers = [s for s in (self.server, *self._adapter_servers.values(), *self._retired) if s is not None]
        self._adapter_servers.clear()
        self._retired.clear()
        await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)
        for t in list(self._bg):
            t.cancel()
        self.server = None
        if self._log_dir_given is None and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    @property
    def server_threads(self) -> int:
        """CPU threads per server: `threads`, or by default every core this process may use but one
        when one server answers for the base and all its adapters; with a server for each adapter,
        the cores shared equally among the base's and max_adapters adapter servers. llama.cpp's
        threads wait for each other after every step, so one that loses its core to another
        process stalls them all (measured on 2 cores: 3 servers of 2 threads decoded 12-16 tokens/s
        in all, of 1 thread 90). The core left over runs what feeds the server: this replica, Serve,
        the evaluating clients, and a replacement server while its predecessor drains (measured:
        `evalcluster demo` on 2 cores took 284 s with 2 threads, 166 s with 1)."""
        if self.threads:
            return self.threads
        cores = _cores()
        if self.adapter_servers == "one" or not self.adapters_enabled:
            return max(1, cores - 1)
        return max(1, cores // min(1 + self.max_adapters, cores))

    async def _health(self) -> bool:
        return self.server is not None and await self.server.healthy()

    async def _info(self) -> ModelInfo:
        model = await self._base_model()
        extra: dict[str, Any] = {
            "parallel": self.parallel,
            "threads": self.server_threads,
            "server": str(self.server_binary) if self.server_binary else "xllamacpp",
            "server_pid": self.server.pid if self.server else None,
            "server_adapters": [str(path) for path in self.server.adapters] if self.server else [],
            "adapter_servers": self.adapter_servers,
            "adapter_pids": {str(path): s.pid for path, s in self._adapter_servers.items()},
            "retiring_pids": sorted(pid for s in self._retired if (pid := s.pid) is not None),
            "restarts": self.restarts,
            "log_dir": str(self.log_dir),
        }
        return ModelInfo(
            self.name, self.kind, architecture=model.architecture, context_length=self.ctx_size,
            quantization=model.file_type, adapters=self.loaded_adapters, extra=extra, slots=self.parallel,
        )

    def engine_version(self) -> str:
        if self.server_binary is not None:
            return ""  # its build is read back from /props (settings "build_info")
        return package_version("xllamacpp")

    async def _settings_in_effect(self) -> dict[str, Any]:
        """Read back from the server's /props (context per slot, the weights' file type, the chat
        template, the build); the LoRA scale (sent with each request), prompt cache and system
        prompt this engine sets."""
        server = self.server_for(None)
        p = await server.wait_ready()
        props = await p.client.get_json("/props", retries=False, timeout_s=HEALTH_TIMEOUT_S)
        gen = props.get("default_generation_settings") or {}
        template = props.get("chat_template") or ""
        out: dict[str, Any] = {
            "n_ctx": gen.get("n_ctx"),
            "model_ftype": props.get("model_ftype"),
            "chat_template_sha256": text_sha256(template) if template else "",
            "build_info": props.get("build_info"),
            "lora_scale": float(self.lora_scale),
            "cache_prompt": self.cache_prompt,
            "system_prompt": self.system_prompt,
        }
        return out

    async def _base_model(self) -> GGUFModel:
        if self._model is None:
            self._model = await asyncio.to_thread(self._read_base_model)
        return self._model

    def _read_base_model(self) -> GGUFModel:
        """The base GGUF's architecture and shapes; a damaged file is this engine's error, not an adapter's."""
        try:
            return read_gguf_model(self.model_path)
        except AdapterError as e:
            raise EngineError(f"model file {e.path}: {e.why}") from None

    # ------------------------------------------------------------------ adapters

    def validate_adapter(self, path: Path) -> None:
        """A GGUF LoRA whose tensors fit the base model (see checkpoints' validate_gguf_lora)."""
        if self._model is None:
            self._model = self._read_base_model()
        validate_gguf_lora(path, self._model)

    async def _load_adapter(self, path: Path, along: Sequence[Path] = ()) -> None:
        """Start a server holding the loaded adapters, this one and `along`, and move new requests
        to it (with adapter_servers "each": a server of its own, `along` ignored).

        Engine.load_adapter calls this under its adapter lock, with the LRU's evictions already
        out of `_loaded` and `along` cut to the room left, so the new set is at most max_adapters.
        A server that already holds this very file (loaded along with an earlier one, or evicted
        from the LRU and asked for again) is kept as it is."""
        assert self.server is not None
        fingerprint = self._validated[path]
        if self.adapter_servers == "each":
            server = self._new_server({path: fingerprint})
            await server.start()
            self._adapter_servers[path] = server
            return
        if self.server.adapters.get(path) == fingerprint:
            return
        adapters = {p: self._validated[p] for p in self._loaded if p != path}
        adapters[path] = fingerprint
        adapters.update((p, self._validated[p]) for p in along)
        new = self._new_server(adapters)
        await new.start()  # on failure the current server goes on serving what it holds
        old, self.server = self.server, new
        log.info("llama.cpp server for %s: now %s (pid %s), replacing pid %s", self.name, new.label, new.pid, old.pid)
        await self._retire(old)

    async def _unload_adapter(self, path: Path) -> None:
        """With one server, nothing to stop: it keeps the file until the next load replaces it
        (requests for it, which Engine.load_adapter would load again, are still answered right
        meanwhile). An adapter's own server stops, once its last request finishes."""
        server = self._adapter_servers.pop(path, None)
        if server is not None:
            await self._retire(server)

    async def _retire(self, server: LlamaServer) -> None:
        """Stop a server no new request goes to: now if it is idle, else at its last release."""
        if server.in_flight:
            self._retired.add(server)
        else:
            await server.stop()

    def _release(self, server: LlamaServer) -> None:
        server.in_flight -= 1
        if server in self._retired and server.in_flight == 0:
            self._retired.discard(server)
            task = asyncio.get_running_loop().create_task(server.stop())
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)

    # ------------------------------------------------------------------ requests

    async def _acquire(self, adapter: Path | None) -> LlamaServer:
        """The server for a request (the current one, holding its adapter), counted in flight until `_release`."""
        server = self.server
        if server is None:
            raise EngineUnavailable(f"llamacpp engine {self.name!r} is not started")
        if adapter is not None:
            server = self._adapter_servers.get(adapter, server)
            if adapter not in server.adapters:
                # Replaced by a server without it (or evicted) between the load and now: load it again.
                await self.load_adapter(adapter)
                server = self.server_for(adapter)
        server.in_flight += 1
        return server

    async def _stream(self, req: Request) -> AsyncIterator[Token]:
        server = await self._acquire(req.adapter)
        try:
            path, body = build_request(req, None, "llamacpp", cache_prompt=self.cache_prompt)
            if (lora := self._lora(server, req.adapter)) is not None:
                body["lora"] = lora
            async for tok in stream_tokens(server.events("/v1" + path, body), req.is_chat):
                yield tok
        finally:
            self._release(server)

    # ------------------------------------------------------------------ loglikelihood
    #
    # llama.cpp's server has no prompt logprobs (its completions return logprobs of generated tokens
    # only). What it does return, with n_probs and post_sampling_probs false, is each emitted token's
    # logprob under the model's raw distribution (before any sampler). So the continuation is made
    # the only thing the server can emit: a grammar of its exact token ids (`<[id]>`, one per token)
    # forces every step, greedy sampling picks the one allowed token, and the logprobs reported are
    # llama.cpp's own numbers for those tokens, computed as it decodes them. A logit_bias could only
    # force one fixed token for the whole request, and a grammar of the continuation's *text* would
    # let the server pick another tokenisation of it: neither scores the tokens asked for.

    @property
    def score_window(self) -> int:
        return self.ctx_size

    async def _tokenize(self, text: str) -> list[int]:
        reply = await self.server_for(None).call("/tokenize", {"content": text, "add_special": False, "parse_special": True})
        return [int(t) for t in reply["tokens"]]

    async def _token_texts(self, ids: list[int]) -> list[str]:
        server = self.server_for(None)
        unique = sorted(set(ids))
        replies = await asyncio.gather(*(server.call("/detokenize", {"tokens": [t]}) for t in unique))
        text = {t: str(r.get("content", "")) for t, r in zip(unique, replies)}
        return [text[i] for i in ids]

    async def _chat_ids(self, messages: list[Message]) -> list[int]:
        """The server's own rendering of the chat, tokenised as the server tokenises it for a chat.

        /apply-template parses a body as /v1/chat/completions does (the same function), so sending
        it the very body `_stream` sends renders the prompt that request is generated from; the
        server then tokenises a chat's prompt with special tokens added (a BOS where the model
        wants one) and parsed, as asked here. (Measured: the ids' count equals the server's
        prompt_tokens for the same chat.)"""
        _, body = build_request(Request(GenOpts(), messages=messages), None, "llamacpp", cache_prompt=self.cache_prompt)
        server = self.server_for(None)  # the template is the base model's, whatever adapter a request takes
        rendered = await server.call("/apply-template", body)
        reply = await server.call("/tokenize", {"content": rendered["prompt"], "add_special": True, "parse_special": True})
        return [int(t) for t in reply["tokens"]]

    async def _eot_id(self) -> int:
        model = await self._base_model()
        if model.eos_token_id is None:
            raise EngineError(f"model file {self.model_path} names no tokenizer.ggml.eos_token_id to score a text without context")
        return model.eos_token_id

    async def _score(self, ids: list[int], start: int, adapter: Path | None, top_n: int) -> list[TokenScore]:
        forced = ids[start:]
        body = {
            "prompt": ids[:start], "n_predict": len(forced), "n_probs": max(top_n, 1), "post_sampling_probs": False,
            "temperature": 0.0, "grammar": "root ::= " + " ".join(f"<[{t}]>" for t in forced),
            "cache_prompt": self.cache_prompt, "stream": True,
        }
        server = await self._acquire(adapter)
        if (lora := self._lora(server, adapter)) is not None:
            body["lora"] = lora
        try:
            for attempt in range(IDEMPOTENT_ATTEMPTS):
                # Scoring changes nothing on the server: a connection dropped before the answer
                # (a keep-alive connection the server closed as it was reused) is sent again.
                probs: list[dict[str, Any]] = []
                try:
                    async for ev in server.events("/completion", body):
                        probs.extend(ev.get("completion_probabilities") or ())
                    break
                except EngineUnavailable:
                    if attempt == IDEMPOTENT_ATTEMPTS - 1 or server.pid is None:
                        raise
                    log.info("llama.cpp server for %s dropped a scoring request; sending it again", server.label)
                except EngineError as e:
                    if "empty grammar stack" not in str(e):
                        raise
                    # A control token (<|im_end|>, ...) has no text for the grammar to accept: the
                    # forced decoding that makes these numbers exact cannot emit it.
                    raise RequestRejected(
                        f"llama.cpp server for {server.label}: {e}",
                        "llama.cpp cannot score a special token (such as an end-of-turn token) in the scored part "
                        "of a request; score text without special tokens",
                    ) from None
        finally:
            self._release(server)
        got = [int(p["id"]) for p in probs]
        if got != forced:
            raise EngineError(
                f"llama.cpp server for {server.label} emitted tokens {got[:8]} instead of the forced {forced[:8]} "
                "(an end-of-generation token inside the continuation ends it early)"
            )
        out = []
        for p in probs:
            top = [(int(t["id"]), float(t["logprob"])) for t in p.get("top_logprobs") or ()]
            lp = float(p["logprob"])
            out.append(TokenScore(int(p["id"]), lp, not top or lp >= top[0][1], top[:top_n]))
        return out

"""Real servers for the tests, on loopback, in temp dirs, stopped by PID.

Each server can be stopped and started again on the same port and data (the outage tests do
that). A missing binary raises `MissingBinary` with the install step; fixtures never skip.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from deployments._children import die_with_parent

APT_HINT = "sudo apt-get install -y influxdb victoria-metrics openssh-server  (or run .ci/run)"


class MissingBinary(RuntimeError):
    pass


def require_binary(path: str, package: str) -> str:
    found = shutil.which(path) or (path if os.path.exists(path) else None)
    if not found:
        raise MissingBinary(f"{path} not found: install Debian package {package!r}: {APT_HINT}")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s" + (f": {last}" if last else ""))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass
class ManagedProcess:
    """A server process we start, and stop by its PID (never by name)."""

    name: str
    argv: list[str]
    log_path: Path
    ready: Callable[[], bool]
    env: dict[str, str] | None = None
    start_timeout: float = 20.0
    proc: subprocess.Popen | None = field(default=None, init=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def start(self) -> "ManagedProcess":
        if self.pid:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        # Dies with the test process however it ends (an interrupted or killed pytest leaves no influxd).
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        log.close()

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {tail}")
            return self.ready()

        wait_until(up, self.start_timeout, self.name)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


# --------------------------------------------------------------------------- InfluxDB 1.x


@dataclass
class InfluxV1:
    """InfluxDB 1.6.7 (Debian `influxdb`): the v1 API (/write, /query).

    `host` is the HTTP bind address; `command_prefix` runs influxd through another command
    (tests/_netns.py: `nsenter` into a namespace of its own, with that namespace's address).
    """

    root: Path
    port: int = field(default_factory=free_port)
    rpc_port: int = field(default_factory=free_port)
    process: ManagedProcess | None = None
    host: str = "127.0.0.1"
    command_prefix: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "InfluxV1":
        binary = require_binary("influxd", "influxdb")
        if self.process is None:
            d = self.root
            for sub in ("meta", "data", "wal"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            conf = d / "influxdb.conf"
            conf.write_text(
                f"""reporting-enabled = false
bind-address = "127.0.0.1:{self.rpc_port}"
[meta]
  dir = "{d}/meta"
[data]
  dir = "{d}/data"
  wal-dir = "{d}/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[http]
  enabled = true
  bind-address = "{self.host}:{self.port}"
  log-enabled = false
[ifql]
  enabled = false
[logging]
  level = "warn"
"""
            )
            self.process = ManagedProcess(
                "influxd", [*self.command_prefix, binary, "run", "-config", str(conf)], d / "influxd.log",
                ready=lambda: httpx.get(self.url + "/ping", timeout=0.5).status_code == 204,
            )
        self.process.start()
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def query(self, q: str, db: str | None = None, epoch: str = "ns") -> dict:
        params = {"q": q, "epoch": epoch}
        if db:
            params["db"] = db
        r = httpx.post(self.url + "/query", params=params, timeout=10)
        r.raise_for_status()
        return r.json()

    def create_database(self, db: str) -> None:
        self.query(f'CREATE DATABASE "{db}"')


# --------------------------------------------------------------------------- VictoriaMetrics


@dataclass
class VictoriaMetrics:
    """VictoriaMetrics (Debian `victoria-metrics`): the InfluxDB v2 write API and its export API.

    Retention is long because go-ml's iteration-mode timestamps start at 2025-02-15, and dedup
    is on so a point written twice (a replay after a lost acknowledgement) is stored once.
    """

    root: Path
    port: int = field(default_factory=free_port)
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "VictoriaMetrics":
        binary = require_binary("victoria-metrics", "victoria-metrics")
        if self.process is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self.process = ManagedProcess(
                "victoria-metrics",
                [binary, f"-storageDataPath={self.root / 'data'}", f"-httpListenAddr=127.0.0.1:{self.port}",
                 "-retentionPeriod=100y", "-search.latencyOffset=0s", "-dedup.minScrapeInterval=1ms",
                 "-loggerLevel=WARN"],
                self.root / "vm.log",
                ready=lambda: httpx.get(self.url + "/health", timeout=0.5).status_code == 200,
            )
        self.process.start()
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def export(self, match: str = '{__name__=~".+"}') -> list[dict]:
        """Every series matching `match`, as VictoriaMetrics' JSON-lines export gives it."""
        import json

        httpx.post(self.url + "/internal/force_flush", timeout=10)
        r = httpx.get(self.url + "/api/v1/export", params={"match[]": match}, timeout=10)
        r.raise_for_status()
        return [json.loads(line) for line in r.text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- Prometheus


@dataclass
class Prometheus:
    """Prometheus (Debian `prometheus`) on loopback, scraping the targets a file_sd file lists (Ray
    writes one: `prom_metrics_service_discovery.json` in its temp dir)."""

    root: Path
    sd_file: Path
    port: int = field(default_factory=free_port)
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Prometheus":
        binary = require_binary("prometheus", "prometheus")
        if self.process is None:
            self.root.mkdir(parents=True, exist_ok=True)
            conf = self.root / "prometheus.yml"
            conf.write_text(f"""global:
  scrape_interval: 2s
  evaluation_interval: 2s
scrape_configs:
  - job_name: ray
    file_sd_configs:
      - files: ["{self.sd_file}"]
        refresh_interval: 2s
""")
            self.process = ManagedProcess(
                "prometheus",
                [binary, f"--config.file={conf}", f"--storage.tsdb.path={self.root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                self.root / "prometheus.log",
                ready=lambda: httpx.get(self.url + "/-/ready", timeout=0.5).status_code == 200,
            )
        self.process.start()
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def query(self, promql: str) -> list[dict]:
        """The result vector of an instant PromQL query."""
        r = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]


# --------------------------------------------------------------------------- SSH


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@dataclass
class SSHD:
    """OpenSSH's sshd (Debian `openssh-server`) on 127.0.0.1 with a temp host key.

    `key` logs in as the current user; `known_hosts` trusts exactly this server's host key.
    `host` is the listen address; `command_prefix` runs sshd through another command
    (tests/_netns.py: `nsenter` into a namespace of its own, with that namespace's address).
    """

    root: Path
    port: int = field(default_factory=free_port)
    process: ManagedProcess | None = None
    host: str = "127.0.0.1"
    command_prefix: list[str] = field(default_factory=list)

    @property
    def user(self) -> str:
        import getpass

        return getpass.getuser()

    @property
    def key(self) -> Path:
        return self.root / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def host_public_key(self) -> str:
        return (self.root / "host_ed25519.pub").read_text().strip()

    def start(self) -> "SSHD":
        binary = require_binary("/usr/sbin/sshd", "openssh-server")
        if self.process is None:
            d = self.root
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
            _keygen(d / "host_ed25519")
            _keygen(self.key)
            shutil.copy(d / "client_ed25519.pub", d / "authorized_keys")
            # OpenSSH and asyncssh look a host up as `[host]:port`, and as plain `host` on port 22.
            name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
            self.known_hosts.write_text(f"{name} {self.host_public_key}\n")
            (d / "sshd_config").write_text(
                f"""ListenAddress {self.host}
Port {self.port}
HostKey {d}/host_ed25519
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
MaxStartups 100:30:200
MaxSessions 100
Subsystem sftp internal-sftp
# A session's shell then skips the user's ~/.bashrc (bash reads it under sshd only at level 1):
# root's here runs `pyenv rehash`, which waits 60 s on a lock that a session killed mid-rehash (a
# server restart in a test) leaves behind: every SSH command took a minute after that.
SetEnv SHLVL=1
LogLevel ERROR
"""
            )
            Path("/run/sshd").mkdir(parents=True, exist_ok=True)
            subprocess.run([binary, "-t", "-f", str(d / "sshd_config")], check=True)
            self.process = ManagedProcess(
                "sshd", [*self.command_prefix, binary, "-D", "-e", "-f", str(d / "sshd_config")], d / "sshd.log",
                ready=lambda: port_open(self.port, self.host),
            )
        self.process.start()
        return self

    def sessions(self) -> list[int]:
        """PIDs of sshd's per-connection children (each open client connection has one)."""
        import psutil

        if self.process is None or self.process.pid is None:
            return []
        return [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]

    def stop(self) -> None:
        """Stop the listener and every open session, as a real server restart does.

        SIGTERM to the listener alone leaves each connection's child running (a client's kept
        connection would not notice), so the children are killed too, by PID.
        """
        import psutil

        if self.process is None or self.process.pid is None:
            return
        # Listed before the listener goes (they are reparented after), killed after it went (no
        # new session can start in between).
        kids = psutil.Process(self.process.pid).children(recursive=True)
        self.process.stop()
        for k in kids:
            try:
                k.kill()  # psutil checks the process is still the one listed (no PID reuse)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(kids, timeout=5)


class AsyncSSHServer:
    """asyncssh's in-process SSH + SFTP server, on its own event loop in a thread.

    Commands run through the real shell (`/bin/sh -c`); SFTP sees the real file system. Fast:
    connect in milliseconds, no root needed.
    """

    host = "127.0.0.1"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="asyncssh-server", daemon=True)
        self._server = None

    @property
    def user(self) -> str:
        import getpass

        return getpass.getuser()

    @property
    def key(self) -> Path:
        return self.root / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    def start(self) -> "AsyncSSHServer":
        import asyncssh

        self.root.mkdir(parents=True, exist_ok=True)
        if not self.key.exists():
            client = asyncssh.generate_private_key("ssh-ed25519")
            client.write_private_key(str(self.key))
            client.write_public_key(str(self.key) + ".pub")
            self._host_key = asyncssh.generate_private_key("ssh-ed25519")
            self._authorized = asyncssh.import_authorized_keys(client.export_public_key().decode())
        if not self._thread.is_alive():
            self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.known_hosts.write_text(
            f"[127.0.0.1]:{self.port} {self._host_key.export_public_key().decode().strip()}\n"
        )
        return self

    async def _listen(self) -> None:
        import asyncssh

        async def handle(process: "asyncssh.SSHServerProcess") -> None:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", process.command or "true",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            out, err = await proc.communicate()
            process.stdout.write(out.decode(errors="surrogateescape"))
            process.stderr.write(err.decode(errors="surrogateescape"))
            process.exit(proc.returncode or 0)

        self._server = await asyncssh.listen(
            "127.0.0.1", self.port, server_host_keys=[self._host_key],
            authorized_client_keys=self._authorized, process_factory=handle,
            sftp_factory=True, allow_scp=True, encoding="utf-8",
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)

    def shutdown(self) -> None:
        self.stop()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

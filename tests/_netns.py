"""A real multi-node Ray cluster on one machine: every node in its own network, mount, PID and
UTS namespace, joined by a veth bridge the test makes (issue 15, "The test cluster").

Topology (one harness; ``<id>`` is 6 random hex digits, every name below carries it)::

      root namespace: the test process; no interface, address or route of ours
      ──────────────────────────────────────────────────────────────────────────────────────────
                      netns ecn-<id>-sw ("switch"): bridge br0, no address
               ┌───────────┬──────────┴─┬─────────────┬──────────────┬──────────────┐
              v1          v2           v3           v200           v201           v202  (ports on br0)
               │           │            │             │              │              │
             eth0        eth0         eth0          eth0           eth0           eth0
           …-head      …-node-a     …-node-b      …-trainer      …-influx       …-client
         198.18.0.1    198.18.0.2   198.18.0.3    198.18.0.200   198.18.0.201   198.18.0.202
         ray head      ray worker   ray worker    OpenSSH sshd   influxd 1.x    (no daemon:
         GCS :6379     {"llamacpp"  {"mlx": 1}    :22            :8086           `ray job
         dash :8265     : 8}                                                      submit`)

      198.18.0.0/24 (in the 198.18.0.0/15 benchmarking range) on a bridge that only the test's
      namespaces are plugged into. No namespace has a default route: nothing leaves the bridge.
      The root namespace has no interface on it, so nothing there reaches a node (its packets to
      198.18.0.x follow the machine's own default route out; on this sandbox the gateway accepts
      any TCP connect, so a connect() from the root namespace "succeeds" without reaching us).

The names are ``ecn-<id>-<host>`` (namespaces), ``/tmp/ecnet-<id>/`` (files); the service hosts
(trainer, influx, client) are made on first use (:meth:`NetnsCluster.sshd`, :meth:`influx`,
:meth:`add_service_host`). The test process's own sockets can join any namespace for a block
(:func:`in_netns`: setns(2) on the calling thread), e.g. to query InfluxDB or the dashboard.

Each namespace also has ``lo`` up (its own loopback: a 127.0.0.1 listener in one namespace is
invisible in every other one), its own hostname (UTS) and an /etc/hosts listing every host.

Disks. Every host has a host-side directory ``/tmp/ecnet-<id>/<name>/``:

- a **Ray node** runs in a private mount namespace where that directory is bind-mounted over
  ``/tmp`` (and a fresh tmpfs over ``/dev/shm``): Ray's temp dir (``/tmp/ray``, the default, short
  enough for unix socket paths), the staging cache, the node's HOME (``/tmp/home``) and anything
  else written under ``/tmp`` are the node's own. The test (root namespace) reads them all at
  ``/tmp/ecnet-<id>/<node>/...`` (see :meth:`NetnsCluster.host_path`); a node sees only its own.
- a **service host** (sshd, influxd, a client) gets an empty tmpfs over ``/tmp`` with only its own
  directory mounted back at the *same* path, so paths are the same inside and outside (the
  servers' config files written by the test name paths that exist for the server), and it sees no
  other host's files either.

The venv and the code under /work/main are shared, as an image would be.

Processes. A Ray node is ``setpriv --pdeathsig KILL -- ip netns exec NS unshare --mount --pid
--fork --mount-proc --uts --kill-child -- sh -c '<mounts>; exec ray start --block ...'``:

- ``ip netns exec`` and ``unshare`` exec in place, so the ``Popen`` PID *is* the ``unshare``;
  ``--fork`` makes its child PID 1 of a new PID namespace: ``ray start --block`` (which keeps
  GCS, raylet, dashboard, agents and workers as its descendants).
- ``--kill-child``: the ``unshare`` dying SIGKILLs PID 1; PID 1 dying makes the kernel SIGKILL
  every process in the PID namespace. So one PID (:meth:`NetnsCluster.kill_node`) kills the whole
  node (raylet, GCS, workers, drivers and commands run there), as a power cut would.
- ``setpriv --pdeathsig KILL``: the ``unshare`` dies with the test process's main thread, so
  even a SIGKILLed pytest leaves no Ray process running (namespaces and dirs then remain: the next
  harness removes them at start, see below).
- Commands "on" a node (:meth:`run`, :meth:`popen`, :meth:`python`) go through ``nsenter`` into
  the node's network, mount, PID and UTS namespaces (the PID namespace too: its /proc is the
  node's), with ``setpriv --pdeathsig KILL`` so killing the returned ``Popen`` kills the command.
- A service host has a holder process (``sleep infinity`` in a private mount + UTS namespace,
  no PID namespace) that :class:`_servers.SSHD` / :class:`_servers.InfluxV1` join with ``nsenter``
  as a command prefix, so their PIDs are the servers' own (their ``stop()`` works as on loopback).

Teardown (:meth:`NetnsCluster.teardown`; idempotent) runs from the fixture's finalizer, from
``atexit`` and from a SIGTERM/SIGHUP handler (Ctrl-C is a KeyboardInterrupt: pytest runs the
finalizer, and atexit runs anyway). It stops the servers, SIGKILLs every node's ``unshare`` and PID
1, then SIGKILLs every process left in any of the harness's network namespaces (``ip netns pids``:
processes are found by the namespace they are in, never by name; ``ray stop`` is never used, as
it would stop every Ray cluster on the machine), waits for them to be gone, deletes the node
namespaces and the switch (which removes every veth and the bridge), and removes
``/tmp/ecnet-<id>``. At start, :func:`sweep_leftovers` removes what an earlier crashed harness
left: namespaces named ``ecn-<id>-*`` and dirs ``/tmp/ecnet-<id>`` whose owner process (PID and
start time, recorded in ``/tmp/ecnet-<id>/_owner.json`` before any namespace is made) is gone.

Ray flags, and why:

- ``--node-ip-address=198.18.0.N``: the node's own address (Ray would otherwise guess it with a
  UDP "connect" to 8.8.8.8, which fails here: no default route).
- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is removed from the nodes' and drivers' environment
  (tests/conftest.py sets it to 0 for the loopback tests). In Ray 2.60 it is
  ``ray_constants.ENABLE_RAY_CLUSTER``: when 0, ``services.get_node_ip_address()`` returns
  127.0.0.1 (so a head advertises loopback) and ``ray start --address=...`` (a worker) aborts
  with "Multi-node Ray clusters are not supported on Windows and OSX".
- ``--resources`` JSON per node (head: none by default, it is the state node; ``node-a``
  ``{"llamacpp": 8}``; ``node-b`` ``{"mlx": 1}``); Ray adds ``node:<ip>`` to each node itself.
- ``--dashboard-host=<head ip>``: the dashboard (Jobs API, state API) listens on the head's
  address, so ``ray job submit`` / the Jobs SDK work from any namespace on the bridge. Fixed
  ports (GCS 6379, dashboard 8265) are fine: every node has its own address and port space.
- ``--num-cpus`` small (2 by default), ``--object-store-memory`` 200 MB per node (the machine has
  2 cores and 24 GB shared by every node and by other tests), ``--disable-usage-stats`` and
  ``RAY_USAGE_STATS_ENABLED=0`` (no network anyway), ``RAY_AUTH_MODE=disabled`` (or ``token``
  with a shared ``RAY_AUTH_TOKEN``: ``auth="token"``).
- ``RAY_health_check_period_ms=1000``, ``RAY_health_check_failure_threshold=3`` on the head
  (``fast_failure_detection``): a killed node is marked DEAD in seconds instead of ~15-30 s.
- ``--temp-dir=/tmp/ray`` (Ray's default, stated): under the node's private /tmp, so every
  node has its own session dir and socket paths stay short.
- ``--block``: ``ray start`` stays in the foreground as the node's PID 1; when one of its
  components dies (e.g. the raylet, :meth:`NetnsCluster.kill_raylet`) it stops the others and
  exits, and the node is gone as a whole.

What listens where (``ss -Hltunp`` in each namespace, see :meth:`NetnsCluster.listeners`): the
GCS, raylet, core workers and the agents' gRPC servers bind ``*``/``0.0.0.0`` (every address of
the namespace); the dashboard binds the ``--dashboard-host``; the dashboard agent's HTTP port
(52365) and the Ray Client server (10001, head) bind the node address *and* 127.0.0.1. In a
namespace of its own, a loopback listener is reachable from that namespace only.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import SSHD, InfluxV1, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.prefix) / "bin"
PYTHON = str(VENV_BIN / "python")
RAY = str(VENV_BIN / "ray")

PREFIX = "ecn"  # network namespaces: ecn-<id>-<host>
DIR_PREFIX = "ecnet"  # host dirs: /tmp/ecnet-<id>/
BASE_DIR = Path("/tmp")
SUBNET = "198.18.0"  # /24 out of 198.18.0.0/15
NETMASK = 24
GCS_PORT = 6379
DASHBOARD_PORT = 8265
SERVICE_FIRST = 200  # service hosts from 198.18.0.200 up; Ray nodes .1 - .199
_NS_RE = re.compile(rf"^{PREFIX}-([0-9a-f]{{6}})-")
_DIR_RE = re.compile(rf"^\.?{DIR_PREFIX}-([0-9a-f]{{6}})(\.partial)?$")

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

HostKind = Literal["head", "worker", "service"]


class NetnsUnavailable(RuntimeError):
    """`ip netns` (or unshare/nsenter/setpriv, or root) is missing: the fixture fails with this."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class NodeSpec:
    """A Ray node to start: its name, its resources (JSON for `--resources`) and CPUs."""

    name: str
    resources: dict[str, float] = field(default_factory=dict)
    num_cpus: int = 2


DEFAULT_NODES: tuple[NodeSpec, ...] = (
    NodeSpec("head", {}),
    NodeSpec("node-a", {"llamacpp": 8}),
    NodeSpec("node-b", {"mlx": 1}),
)


@dataclass
class Host:
    """One namespace on the test network: a Ray node (head / worker) or a service host."""

    name: str
    kind: HostKind
    ip: str
    netns: str
    veth: str  # its port on the bridge, in the switch namespace
    dir: Path  # host-side private directory (a Ray node's /tmp; a service host's own dir)
    log: Path
    resources: dict[str, float] = field(default_factory=dict)
    num_cpus: int = 0
    proc: subprocess.Popen | None = None  # the `unshare` (Ray node) or the holder (service)
    init_pid: int | None = None  # host PID of what nsenter targets (PID 1 of a Ray node)
    started_at: float = 0.0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass(frozen=True)
class Listener:
    """One listening socket as `ss -Hltunp` shows it inside a namespace."""

    host: str
    proto: str  # tcp / udp
    address: str
    port: int
    process: str
    pid: int | None

    @property
    def loopback(self) -> bool:
        return self.address.startswith(("127.", "::ffff:127.")) or self.address == "::1"

    def __str__(self) -> str:
        addr = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.host:>8} {self.proto} {addr}:{self.port} {self.process}({self.pid})"


# --------------------------------------------------------------------------- small helpers


def _sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): a PID plus this names a process.
    None when there is no such process (or only its zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _kill(pid: int | None, sig: int = signal.SIGKILL) -> None:
    if pid:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def netns_list() -> list[str]:
    r = _sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    """Every process whose network namespace is `ns` (by namespace, never by name)."""
    r = _sh("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split()]


@contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the block with the *calling thread* in network namespace `ns` (setns(2)).

    Sockets made inside the block (httpx, socket.create_connection) belong to `ns` and keep
    working there after the block; processes started inside the block start in `ns`. The mount
    namespace is not changed: files are the test's. The thread always comes back.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - would leave the thread lost
                err = ctypes.get_errno()
                raise SystemExit(f"could not return to the root network namespace: {os.strerror(err)}")
    finally:
        os.close(own)
        os.close(target)


def check_tools() -> None:
    """Raise NetnsUnavailable with the reason if this machine cannot run the harness at all
    (the namespace operations themselves are checked when the switch is made)."""
    if sys.platform != "linux":
        raise NetnsUnavailable(f"network namespaces are Linux only (this is {sys.platform})")
    if os.geteuid() != 0:
        raise NetnsUnavailable(f"`ip netns` needs root (running as uid {os.geteuid()})")
    for tool in ("ip", "unshare", "nsenter", "setpriv", "mount", "ss"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"`{tool}` not found (Debian: iproute2 / util-linux / mount)")


def _remove_harness(hid: str, namespaces: Sequence[str], *dirs: Path) -> None:
    """Kill every process in the namespaces, delete them (switch last), remove the dirs."""
    pids = {p for ns in namespaces for p in netns_pids(ns)}
    for p in pids:
        _kill(p)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(netns_pids(ns) for ns in namespaces):
        time.sleep(0.05)
    switch = [ns for ns in namespaces if ns.endswith("-sw")]
    for ns in [ns for ns in namespaces if ns not in switch] + switch:
        _sh("ip", "netns", "del", ns, check=False)
    for d in dirs:
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)


def sweep_leftovers() -> list[str]:
    """Remove what earlier harnesses left after a crash: namespaces `ecn-<id>-*` and dirs
    `/tmp/ecnet-<id>` whose owner (PID + start time in `_owner.json`) no longer runs. A harness
    still running (another pytest here) is left alone. Returns the ids removed."""
    namespaces: dict[str, list[str]] = {}
    dirs: dict[str, list[Path]] = {}
    for ns in netns_list():
        m = _NS_RE.match(ns)
        if m:
            namespaces.setdefault(m.group(1), []).append(ns)
    for d in BASE_DIR.iterdir():
        m = _DIR_RE.match(d.name)
        if m and d.is_dir():
            dirs.setdefault(m.group(1), []).append(d)
    removed = []
    for hid in sorted(set(namespaces) | set(dirs)):
        owner_alive = False
        for d in dirs.get(hid, []):
            try:
                owner = json.loads((d / "_owner.json").read_text())
                owner_alive |= _proc_start_time(int(owner["pid"])) == owner["start_time"]
            except (OSError, ValueError, KeyError):
                # No owner record: it is written before any namespace exists, so this harness
                # crashed; unless it is a dir being made right now.
                owner_alive |= d.name.endswith(".partial") and time.time() - d.stat().st_mtime < 60
        if owner_alive:
            continue  # another harness, still running
        _remove_harness(hid, namespaces.get(hid, []), *dirs.get(hid, []))
        removed.append(hid)
    return removed


# --------------------------------------------------------------------------- teardown on signals

_LIVE: set["NetnsCluster"] = set()
_LIVE_LOCK = threading.Lock()
_PREVIOUS_HANDLERS: dict[int, Any] = {}


def _teardown_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for c in live:
        c.teardown()


def _on_signal(signum: int, frame: Any) -> None:
    _teardown_all()
    previous = _PREVIOUS_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    else:  # SIG_DFL / SIG_IGN: behave as if we had not been here
        signal.signal(signum, previous)
        if previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)


_ATEXIT: list[bool] = []


def _install_handlers() -> None:
    if not _ATEXIT:
        atexit.register(_teardown_all)
        _ATEXIT.append(True)
    if _PREVIOUS_HANDLERS or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        _PREVIOUS_HANDLERS[sig] = signal.getsignal(sig)
        signal.signal(sig, _on_signal)


# --------------------------------------------------------------------------- the cluster


class NetnsCluster:
    """A Ray cluster of real `ray start` nodes, each in its own namespaces, plus service hosts.

    Make one with :meth:`start` (or the `netns_cluster` fixture); everything it starts is torn
    down by :meth:`teardown` (also from atexit and SIGTERM).
    """

    def __init__(self, *, auth: Literal["disabled", "token"] = "disabled",
                 object_store_mb: int = 200, fast_failure_detection: bool = True,
                 extra_env: Mapping[str, str] | None = None) -> None:
        check_tools()
        self.swept = sweep_leftovers()
        self.id = secrets.token_hex(3)
        self.root = BASE_DIR / f"{DIR_PREFIX}-{self.id}"
        # The owner record first, and the dir appears with it (rename): a namespace or a dir
        # without one is a crashed harness's (sweep_leftovers), never one being made.
        partial = BASE_DIR / f".{DIR_PREFIX}-{self.id}.partial"
        partial.mkdir(mode=0o755)
        (partial / "_owner.json").write_text(json.dumps(
            {"pid": os.getpid(), "start_time": _proc_start_time(os.getpid()), "created": time.time()}))
        (partial / "_logs").mkdir()
        partial.rename(self.root)
        self.hosts_file = self.root / "_hosts"
        self.switch = f"{PREFIX}-{self.id}-sw"
        self.hosts: dict[str, Host] = {}
        self.auth = auth
        self.auth_token = secrets.token_hex(32) if auth == "token" else None
        self.object_store_mb = object_store_mb
        self.fast_failure_detection = fast_failure_detection
        self.extra_env = dict(extra_env or {})
        self.timings: dict[str, float] = {}
        self._sshd: SSHD | None = None
        self._influx: InfluxV1 | None = None
        self._torn_down = False
        self._lock = threading.RLock()
        with _LIVE_LOCK:
            _LIVE.add(self)
        _install_handlers()
        try:  # the switch doubles as the check that namespaces, bridges and veths work here
            for what, argv in (
                ("`ip netns add`", ["ip", "netns", "add", self.switch]),
                ("a bridge in a namespace", ["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"]),
                ("a veth pair in a namespace", ["ip", "-n", self.switch, "link", "add", "vprobe", "type", "veth",
                                                "peer", "name", "vprobe1"]),
                ("deleting a veth", ["ip", "-n", self.switch, "link", "del", "vprobe"]),
                ("bringing the bridge up", ["ip", "-n", self.switch, "link", "set", "br0", "up"]),
            ):
                r = _sh(*argv, check=False)
                if r.returncode != 0:
                    raise NetnsUnavailable(f"{what} failed: {' '.join(argv)}: {r.stderr.strip() or r.returncode}")
        except BaseException:
            self.teardown()
            raise

    # ------------------------------------------------------------------ construction

    @classmethod
    def start(cls, nodes: Sequence[NodeSpec] = DEFAULT_NODES, *, timeout: float = 180,
              **kwargs: Any) -> "NetnsCluster":
        """Make the network and start every node at once (workers retry until the GCS is up);
        return when the dashboard answers and every node is ALIVE."""
        t0 = time.monotonic()
        c = cls(**kwargs)
        try:
            head, *workers = nodes
            c._add_ray_host(head, "head")
            for spec in workers:
                c._add_ray_host(spec, "worker")
            c.timings["network_s"] = time.monotonic() - t0
            c.wait_alive([n.name for n in nodes], timeout=timeout)
            c.timings["startup_s"] = time.monotonic() - t0
        except BaseException:
            c.teardown()
            raise
        return c

    def _next_ip(self, service: bool) -> str:
        used = {int(h.ip.rsplit(".", 1)[1]) for h in self.hosts.values()}
        candidates = range(SERVICE_FIRST, 255) if service else range(1, SERVICE_FIRST)
        return f"{SUBNET}.{next(i for i in candidates if i not in used)}"

    def _make_host(self, name: str, kind: HostKind, ip: str | None = None) -> Host:
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", name):
            raise ValueError(f"host name {name!r}: lowercase letters, digits and '-'")
        ip = ip or self._next_ip(kind == "service")
        ns = f"{PREFIX}-{self.id}-{name}"
        veth = f"v{ip.rsplit('.', 1)[1]}"
        d = self.root / name
        d.mkdir()
        host = Host(name, kind, ip, ns, veth, d, self.root / "_logs" / f"{name}.log")
        self.hosts[name] = host
        _sh("ip", "netns", "add", ns)
        # The pair is made inside the switch with its peer created straight in the host's
        # namespace: no interface ever appears in the root namespace.
        _sh("ip", "-n", self.switch, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _sh("ip", "-n", self.switch, "link", "set", veth, "master", "br0", "up")
        _sh("ip", "-n", ns, "addr", "add", f"{ip}/{NETMASK}", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        self._write_hosts_file()
        return host

    def _write_hosts_file(self) -> None:
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{h.ip} {h.name}" for h in self.hosts.values()]
        # In place (same inode): the namespaces bind-mount this very file over /etc/hosts.
        with open(self.hosts_file, "a+") as f:
            f.seek(0)
            f.truncate()
            f.write("\n".join(lines) + "\n")

    # ------------------------------------------------------------------ Ray nodes

    def node_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of every process on a node (Ray's, drivers', run()'s)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTEST_", "RAY_")) and k not in ("TMPDIR", "TEMP", "TMP")}
        env.update(
            PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
            VIRTUAL_ENV=str(VENV_BIN.parent),
            HOME="/tmp/home",  # under the node's /tmp: each node has its own home (caches, ~/.ray)
            TMPDIR="/tmp",
            RAY_USAGE_STATS_ENABLED="0",
            RAY_AUTH_MODE=self.auth,
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        # Keep the caller's RAY_* tuning except the single-node switch and the address.
        for k, v in os.environ.items():
            if k.startswith("RAY_") and k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS",
                                                  "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
                env.setdefault(k, v)
        if self.auth_token:
            env["RAY_AUTH_TOKEN"] = self.auth_token
        env.update(self.extra_env)
        env.update(extra or {})
        return env

    def _ray_argv(self, host: Host) -> list[str]:
        argv = [RAY, "start", "--block", f"--node-ip-address={host.ip}", f"--num-cpus={host.num_cpus}",
                f"--resources={json.dumps(host.resources)}", f"--object-store-memory={self.object_store_mb * 10**6}",
                "--disable-usage-stats", "--temp-dir=/tmp/ray"]
        if host.kind == "head":
            argv += ["--head", f"--port={GCS_PORT}", f"--dashboard-host={host.ip}", f"--dashboard-port={DASHBOARD_PORT}"]
        else:
            argv += [f"--address={self.gcs_address}"]
        return argv

    def _add_ray_host(self, spec: NodeSpec, kind: HostKind, ip: str | None = None) -> Host:
        if kind == "head" and any(h.kind == "head" for h in self.hosts.values()):
            raise ValueError("the cluster has a head")
        host = self._make_host(spec.name, kind, ip or (f"{SUBNET}.1" if kind == "head" else None))
        host.resources, host.num_cpus = dict(spec.resources), spec.num_cpus
        self._start_ray(host)
        return host

    def _start_ray(self, host: Host) -> None:
        """Start (or restart) the node's `ray start --block` as PID 1 of fresh namespaces."""
        env = self.node_env()
        if host.kind == "head" and self.fast_failure_detection:
            env.setdefault("RAY_health_check_period_ms", "1000")
            env.setdefault("RAY_health_check_timeout_ms", "1000")
            env.setdefault("RAY_health_check_failure_threshold", "3")
            env.setdefault("RAY_health_check_initial_delay_ms", "1000")
        if host.kind == "worker":
            # Started together with the head, a worker waits for the GCS: Ray's default window
            # is ~20 s (20 tries), too short for a head starting on 2 loaded cores.
            env.setdefault("RAY_gcs_server_port_wait_time_s", "120")
        (host.dir / "home").mkdir(exist_ok=True)
        script = " && ".join([
            f"mount --bind {self.hosts_file} /etc/hosts",
            f"mount --bind {host.dir} /tmp",
            "mount -t tmpfs -o size=1g,mode=1777 tmpfs /dev/shm",
            f"hostname {host.name}",
            f"cd {ROOT}",
            "exec " + subprocess.list2cmdline(self._ray_argv(host)),
        ])
        argv = ["setpriv", "--pdeathsig", "KILL", "--", "ip", "netns", "exec", host.netns,
                "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc",
                "--uts", "--kill-child", "--", "/bin/sh", "-c", script]
        with open(host.log, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            host.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, cwd="/", start_new_session=True)
        host.started_at = time.monotonic()
        host.init_pid = None
        # PID 1 of the node is the unshare's only child: wait for the fork.
        deadline = time.monotonic() + 10
        while (init := self._init_of(host)) is None:  # raises if the unshare exited
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host.name}: no PID 1 after 10 s: {self.log_tail(host.name)}")
            time.sleep(0.01)
        host.init_pid = init

    def _init_of(self, host: Host) -> int | None:
        if host.proc is None or host.proc.poll() is not None:
            raise RuntimeError(f"{host.name} exited ({host.proc and host.proc.returncode}): {self.log_tail(host.name)}")
        kids = _children(host.proc.pid)
        return kids[0] if kids else None

    def add_node(self, name: str, resources: Mapping[str, float] | None = None, num_cpus: int = 2,
                 *, ip: str | None = None, wait: bool = True, timeout: float = 120) -> Host:
        """A new worker node joining the running cluster (its own namespace, address and dir)."""
        host = self._add_ray_host(NodeSpec(name, dict(resources or {}), num_cpus), "worker", ip)
        if wait:
            self.wait_alive([name], timeout=timeout)
        return host

    def restart_node(self, name: str, *, wait: bool = True, timeout: float = 120) -> Host:
        """Start a killed node again: same namespace, address and dir; a new Ray node id."""
        host = self.hosts[name]
        if host.alive:
            raise RuntimeError(f"{name} is running")
        self._start_ray(host)
        if wait:
            self.wait_alive([name], timeout=timeout)
        return host

    def kill_node(self, name: str, timeout: float = 15) -> list[int]:
        """SIGKILL the node by PID (the unshare and PID 1; the kernel kills the rest of its PID
        namespace) and wait until no process is left in its network namespace. Returns the PIDs
        that were there."""
        host = self.hosts[name]
        pids = netns_pids(host.netns)
        _kill(host.init_pid)
        if host.proc is not None:
            _kill(host.proc.pid)
            try:
                host.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        wait_until(lambda: not netns_pids(host.netns), timeout, f"{name}'s processes to be gone")
        return pids

    def kill_raylet(self, name: str) -> int:
        """SIGKILL only the node's raylet (by its PID, found among the processes in the node's
        namespace). `ray start --block` (PID 1) then sees a component die and stops the rest, so
        the node goes away as a whole, a few seconds later than with :meth:`kill_node`."""
        raylets = [pid for pid, cmd in self.processes(name).items() if cmd.split(" ", 1)[0].endswith("/raylet")]
        if len(raylets) != 1:
            raise RuntimeError(f"{name}: expected one raylet, found {raylets}: {self.processes(name)}")
        _kill(raylets[0])
        return raylets[0]

    # ------------------------------------------------------------------ addresses

    @property
    def head(self) -> Host:
        return next(h for h in self.hosts.values() if h.kind == "head")

    @property
    def nodes(self) -> list[Host]:
        """The Ray nodes (head first), not the service hosts."""
        return [h for h in self.hosts.values() if h.kind != "service"]

    @property
    def node_names(self) -> list[str]:
        return [h.name for h in self.nodes]

    def ip(self, name: str) -> str:
        return self.hosts[name].ip

    @property
    def gcs_address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    def host_path(self, name: str, inside: str | os.PathLike = "/tmp") -> Path:
        """Where a path under a Ray node's /tmp is, seen from the test (root namespace); for a
        service host, the same path (its dir is mounted at the same place)."""
        host = self.hosts[name]
        p = Path(inside)
        if host.kind == "service":
            return p
        rel = p.relative_to("/tmp")
        return host.dir / rel

    # ------------------------------------------------------------------ running things on a host

    def _enter(self, name: str, cwd: str) -> list[str]:
        host = self.hosts[name]
        if not host.alive or host.init_pid is None:
            raise RuntimeError(f"{name} is not running")
        flags = ["-n", "-m", "-u"] + (["-p"] if host.kind != "service" else [])
        return ["setpriv", "--pdeathsig", "KILL", "--", "nsenter", "-t", str(host.init_pid), *flags,
                f"--wd={cwd}", "--", "setpriv", "--pdeathsig", "KILL", "--"]

    def popen(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, *,
              cwd: str = str(ROOT), **kwargs: Any) -> subprocess.Popen:
        """Start `argv` inside host `name` (its network, mount, UTS and, on a Ray node, PID
        namespace), with the node environment plus `env` (RAY_ADDRESS set to the GCS). Killing
        the returned Popen kills the command (parent-death signal); killing the node kills it."""
        full_env = self.node_env({"RAY_ADDRESS": self.gcs_address} if self.nodes else {})
        host = self.hosts[name]
        if host.kind == "service":  # its /tmp is its own dir only; HOME goes there
            (host.dir / "home").mkdir(exist_ok=True)
            full_env.update(HOME=str(host.dir / "home"), TMPDIR=str(host.dir))
        full_env.update(env or {})
        return subprocess.Popen([*self._enter(name, cwd), *argv], env=full_env, **kwargs)

    def run(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, *,
            timeout: float = 120, check: bool = True, cwd: str = str(ROOT),
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run `argv` inside host `name` to completion; text output captured."""
        with self.popen(name, argv, env, cwd=cwd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
            try:
                out, err = p.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
        r = subprocess.CompletedProcess(list(argv), p.returncode, out, err)
        if check and r.returncode != 0:
            raise RuntimeError(f"on {name}: {' '.join(argv)[:200]} exited {r.returncode}\n"
                               f"--- stdout\n{out[-3000:]}\n--- stderr\n{err[-5000:]}")
        return r

    def python(self, name: str, code: str, env: Mapping[str, str] | None = None, *,
               timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Python snippet with the venv's Python inside host `name` (a Ray driver when it
        calls `ray.init()`: RAY_ADDRESS is the GCS)."""
        return self.run(name, [PYTHON, "-c", code], env, timeout=timeout, check=check)

    def python_json(self, name: str, code: str, env: Mapping[str, str] | None = None, *,
                    timeout: float = 180) -> Any:
        """Like :meth:`python`; the snippet calls `emit(obj)` once and this returns obj."""
        prelude = "import json as _j\ndef emit(obj):\n    print('@@ecnet ' + _j.dumps(obj), flush=True)\n"
        r = self.python(name, prelude + code, env, timeout=timeout)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("@@ecnet ")]
        if not lines:
            raise RuntimeError(f"on {name}: the snippet emitted nothing\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return json.loads(lines[-1][len("@@ecnet "):])

    # ------------------------------------------------------------------ state

    def ray_nodes_state(self, timeout: float = 5) -> list[dict[str, Any]]:
        """Ray's node table from the dashboard's state API (asked from the head's namespace):
        each node's `node_ip`, `state` (ALIVE / DEAD), `resources_total`, `node_id`."""
        import httpx

        headers = {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}
        with in_netns(self.head.netns):
            r = httpx.get(f"{self.dashboard_url}/api/v0/nodes", params={"limit": 1000, "detail": "true"},
                          headers=headers, timeout=timeout, trust_env=False)
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]

    def alive_ips(self) -> set[str]:
        return {n["node_ip"] for n in self.ray_nodes_state() if n["state"] == "ALIVE"}

    def wait_alive(self, names: Sequence[str], timeout: float = 120) -> None:
        """Until every named node is ALIVE in Ray's node table; records in `timings` how long
        each took from its `ray start` (`alive_<name>_s`)."""
        pending = {self.hosts[n].ip: self.hosts[n] for n in names}
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while pending:
            for h in pending.values():
                self._init_of(h)  # a node that exited fails now, with its log
            try:
                alive = self.alive_ips()
            except Exception as e:  # noqa: BLE001 - the dashboard is not up yet
                alive, last = set(), e
            for ip in alive & set(pending):
                h = pending.pop(ip)
                self.timings[f"alive_{h.name}_s"] = round(time.monotonic() - h.started_at, 2)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"Ray nodes {', '.join(h.name for h in pending.values())} not ALIVE after "
                                   f"{timeout:.0f} s" + (f" (last: {last})" if last else "") + "\n"
                                   + "\n".join(f"--- {h.name}\n{self.log_tail(h.name)}" for h in pending.values()))
            if pending:
                time.sleep(0.2)

    def wait_dead(self, name: str, timeout: float = 60) -> None:
        ip = self.hosts[name].ip

        def dead() -> bool:
            states = [n["state"] for n in self.ray_nodes_state() if n["node_ip"] == ip]
            return bool(states) and "ALIVE" not in states

        wait_until(dead, timeout, f"Ray to mark {name} dead", interval=0.25)

    def pids(self, name: str) -> list[int]:
        """Every process in host `name`'s network namespace (host PIDs)."""
        return netns_pids(self.hosts[name].netns)

    def processes(self, name: str) -> dict[int, str]:
        """PID -> command line of every process on host `name` (e.g. to kill just its raylet)."""
        out = {}
        for pid in self.pids(name):
            try:
                out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                pass
        return out

    def listeners(self, name: str) -> list[Listener]:
        """What listens where in host `name`'s network namespace (`ss -Hltunp`)."""
        r = _sh("ip", "netns", "exec", self.hosts[name].netns, "ss", "-Hltunp")
        out = []
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) < 5:
                continue
            proto, local = parts[0], parts[4]
            addr, _, port = local.rpartition(":")
            addr = addr.strip("[]").split("%")[0]
            m = re.search(r'\("([^"]+)",pid=(\d+)', line)
            out.append(Listener(name, proto, addr, int(port) if port.isdigit() else 0,
                                m.group(1) if m else "?", int(m.group(2)) if m else None))
        return sorted(out, key=lambda x: (x.proto, x.address, x.port))

    def log_tail(self, name: str, n: int = 3000) -> str:
        try:
            return self.hosts[name].log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ service hosts

    def add_service_host(self, name: str, ip: str | None = None) -> Host:
        """A host outside Ray: its own network namespace and address, a private mount namespace
        where /tmp is an empty tmpfs with only the host's own dir mounted back at the same path.
        A holder process (`sleep infinity`) keeps the mount namespace for nsenter."""
        host = self._make_host(name, "service", ip)
        script = " && ".join([
            f"mount --bind {self.hosts_file} /etc/hosts",
            "mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm",
            "mkdir /dev/shm/.own",
            f"mount --bind {host.dir} /dev/shm/.own",
            "mount -t tmpfs -o size=64m,mode=1777 tmpfs /tmp",
            f"mkdir -p {host.dir}",
            f"mount --move /dev/shm/.own {host.dir}",
            f"hostname {name}",
            "exec sleep infinity",
        ])
        argv = ["setpriv", "--pdeathsig", "KILL", "--", "ip", "netns", "exec", host.netns,
                "unshare", "--mount", "--propagation", "private", "--uts", "--", "/bin/sh", "-c", script]
        with open(host.log, "ab") as log:
            host.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd="/", start_new_session=True)
        host.init_pid = host.proc.pid  # unshare execs sh, sh execs sleep: one PID throughout

        def holding() -> bool:
            if host.proc.poll() is not None:
                raise RuntimeError(f"{name}'s holder exited: {self.log_tail(name)}")
            return Path(f"/proc/{host.proc.pid}/cmdline").read_bytes().startswith(b"sleep")

        wait_until(holding, 10, f"{name}'s namespaces")
        return host

    def service_prefix(self, name: str) -> list[str]:
        """Command prefix that runs a server inside service host `name` with its own PID (exec,
        no fork) and dies with the test process."""
        host = self.hosts[name]
        return ["setpriv", "--pdeathsig", "KILL", "--", "nsenter", "-t", str(host.init_pid), "-n", "-m", "-u", "--"]

    def sshd(self, name: str = "trainer") -> SSHD:
        """The training host: OpenSSH sshd on <its ip>:22 in a namespace of its own (started on
        first use). Its files are under `host_path(name)`/`.root`; clients need `key` and
        `known_hosts` copied to their node (:meth:`copy_to`)."""
        with self._lock:
            if self._sshd is None:
                host = self.add_service_host(name)
                server = SSHD(host.dir / "sshd", port=22, host=host.ip, command_prefix=self.service_prefix(name))
                with in_netns(host.netns):  # the readiness probe connects from there
                    server.start()
                self._sshd = server
            return self._sshd

    def influx(self, name: str = "influx") -> InfluxV1:
        """InfluxDB 1.x on <its ip>:8086 in a namespace of its own (started on first use). From
        the test, query it inside `with cluster.in_netns(name):`."""
        with self._lock:
            if self._influx is None:
                host = self.add_service_host(name)
                server = InfluxV1(host.dir / "influxdb", port=8086, rpc_port=8088, host=host.ip,
                                  command_prefix=self.service_prefix(name))
                with in_netns(host.netns):
                    server.start()
                self._influx = server
            return self._influx

    def client(self, name: str = "client") -> Host:
        """A host on the network outside Ray (made on first use): where an operator's
        `ray job submit` / `evalcluster submit` runs (:meth:`run`)."""
        with self._lock:
            return self.hosts[name] if name in self.hosts else self.add_service_host(name)

    def in_netns(self, name: str):  # noqa: ANN201 - a context manager
        """The test thread's sockets in host `name`'s network (e.g. httpx to the dashboard)."""
        return in_netns(self.hosts[name].netns)

    def copy_to(self, name: str, src: str | os.PathLike, inside: str) -> str:
        """Copy a file from the test's file system to `inside` (under /tmp) on Ray node `name`."""
        dst = self.host_path(name, inside)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        return inside

    def copy_to_all(self, src: str | os.PathLike, inside: str) -> str:
        """:meth:`copy_to` every Ray node (e.g. the SSH key and known_hosts for the sources)."""
        for h in self.nodes:
            self.copy_to(h.name, src, inside)
        return inside

    # ------------------------------------------------------------------ teardown

    def teardown(self) -> None:
        """Stop everything by PID, delete every namespace (and so every link), remove the dir.
        Idempotent; safe from a signal handler, atexit and a fixture finalizer."""
        with self._lock:
            if self._torn_down:
                return
            self._torn_down = True
            t0 = time.monotonic()
            for server in (self._sshd, self._influx):
                if server is not None:
                    try:
                        server.stop()
                    except Exception:  # noqa: BLE001 - everything gets SIGKILL below anyway
                        pass
            for h in self.hosts.values():
                _kill(h.init_pid)
                if h.proc is not None:
                    _kill(h.proc.pid)
            namespaces = [h.netns for h in self.hosts.values()] + [self.switch]
            _remove_harness(self.id, namespaces, self.root)
            for h in self.hosts.values():
                if h.proc is not None:
                    try:
                        h.proc.wait(5)
                    except subprocess.TimeoutExpired:
                        pass
            self.timings["teardown_s"] = time.monotonic() - t0
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def __enter__(self) -> "NetnsCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.teardown()


# --------------------------------------------------------------------------- the fixture


@pytest.fixture(scope="module")
def netns_cluster() -> Iterator[NetnsCluster]:
    """Head (state node, no engine resources) + node-a `{"llamacpp": 8}` + node-b `{"mlx": 1}`,
    each a real `ray start` in its own namespaces. `.sshd()` / `.influx()` add the training host
    and InfluxDB on demand. Fails (never skips) when `ip netns` cannot be used here."""
    try:
        cluster = NetnsCluster.start()
    except NetnsUnavailable as e:
        pytest.fail(f"the namespaced Ray cluster cannot run here: {e}")
    try:
        yield cluster
    finally:
        cluster.teardown()

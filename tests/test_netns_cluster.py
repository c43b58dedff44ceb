"""The namespaced test cluster itself (tests/_netns.py): real `ray start` nodes with their own
addresses and disks, the training host and InfluxDB in namespaces of their own, and a teardown
that leaves nothing behind (also when the test process is killed).

Runs as root (`ip netns`); if namespaces cannot be made here the fixture fails with the reason.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _netns import (  # noqa: E402
    PYTHON,
    NetnsCluster,
    NodeSpec,
    _proc_start_time,
    in_netns,
    netns_cluster,  # noqa: F401 - the fixture
    netns_list,
    sweep_leftovers,
)
from _servers import wait_until  # noqa: E402

pytestmark = [pytest.mark.cluster]

ROOT = Path(__file__).resolve().parent.parent


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


ROOT_LINKS_AT_IMPORT = _root_links()


def _say(capsys: pytest.CaptureFixture, text: str) -> None:
    """Print to the terminal even under capture (the listing belongs in the test output)."""
    with capsys.disabled():
        print("\n" + text, flush=True)


def _root_route_dev(ip: str) -> str:
    """The interface the root namespace would send a packet to `ip` through."""
    out = subprocess.run(["ip", "-o", "route", "get", ip], capture_output=True, text=True, check=True).stdout
    return out.split(" dev ", 1)[1].split()[0]


def _connect(ip: str, port: int, timeout: float = 1.0) -> int:
    """0 when a TCP connection succeeds, else the errno."""
    with socket.socket() as s:
        s.settimeout(timeout)
        return s.connect_ex((ip, port))


# --------------------------------------------------------------------------- the nodes


def test_three_nodes_one_cluster(netns_cluster: NetnsCluster, capsys) -> None:
    c = netns_cluster
    _say(capsys, f"netns cluster {c.id}: startup {c.timings['startup_s']:.1f} s "
                 f"(network {c.timings['network_s']:.2f} s; each node ALIVE after "
                 + ", ".join(f"{h.name} {c.timings[f'alive_{h.name}_s']:.1f} s" for h in c.nodes) + "); nodes "
                 + ", ".join(f"{h.name}={h.ip} {h.resources}" for h in c.nodes))
    assert c.node_names == ["head", "node-a", "node-b"]
    assert len({h.netns for h in c.nodes}) == 3

    # Asked from a driver inside the network (the head's namespaces), not from the test.
    got = c.python_json("head", textwrap.dedent("""
        import ray
        ray.init()
        emit({"driver_ip": ray.util.get_node_ip_address(),
              "nodes": [{"ip": n["NodeManagerAddress"], "alive": n["Alive"], "resources": n["Resources"],
                         "id": n["NodeID"]} for n in ray.nodes()]})
    """))
    alive = [n for n in got["nodes"] if n["alive"]]
    assert len(alive) == 3, got
    ips = sorted(n["ip"] for n in alive)
    assert ips == ["198.18.0.1", "198.18.0.2", "198.18.0.3"], ips
    assert got["driver_ip"] == "198.18.0.1"
    res = {n["ip"]: n["resources"] for n in alive}
    assert res["198.18.0.2"].get("llamacpp") == 8 and "mlx" not in res["198.18.0.2"]
    assert res["198.18.0.3"].get("mlx") == 1 and "llamacpp" not in res["198.18.0.3"]
    assert "llamacpp" not in res["198.18.0.1"] and "mlx" not in res["198.18.0.1"]
    assert "node:__internal_head__" in res["198.18.0.1"]

    # The root namespace has no interface of ours, so no path into the test network: a packet
    # to 198.18.0.1 from here leaves by the machine's own default route (this sandbox's gateway
    # accepts any TCP connection, so a connect() from here "succeeds" without reaching us).
    assert _root_links() == ROOT_LINKS_AT_IMPORT
    assert _root_route_dev(c.head.ip) in ROOT_LINKS_AT_IMPORT
    # The nodes have no route out: only their /24.
    routes = c.run("node-a", ["ip", "-4", "route"]).stdout.strip().splitlines()
    assert routes == ["198.18.0.0/24 dev eth0 proto kernel scope link src 198.18.0.2"], routes
    with c.in_netns("node-a"):
        assert _connect("192.0.2.1", 80) == errno.ENETUNREACH  # e.g. the machine's gateway
        assert _connect("8.8.8.8", 53) == errno.ENETUNREACH


def test_tasks_pinned_to_each_node_have_their_own_ip_and_tmp(netns_cluster: NetnsCluster, capsys) -> None:
    c = netns_cluster
    names = {h.ip: h.name for h in c.nodes}
    got = c.python_json("head", textwrap.dedent(f"""
        import os, socket, ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        ray.init()
        names = {names!r}
        ids = {{n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}}

        def pin(ip):
            return NodeAffinitySchedulingStrategy(ids[ip], soft=False)

        @ray.remote(num_cpus=0)
        def write(name):
            path = f"/tmp/ecnet-probe-{{name}}.txt"
            with open(path, "w") as f:
                f.write(name + " " + ray.util.get_node_ip_address())
            return {{"ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(), "path": path,
                    "session": os.path.realpath("/tmp/ray/session_latest"),
                    "tmp": sorted(os.listdir("/tmp"))}}

        @ray.remote(num_cpus=0)
        def look(paths):
            return {{p: os.path.exists(p) for p in paths}}

        @ray.remote(num_cpus=0)
        def where():
            return ray.util.get_node_ip_address()

        wrote = {{name: ray.get(write.options(scheduling_strategy=pin(ip)).remote(name)) for ip, name in names.items()}}
        paths = [w["path"] for w in wrote.values()]
        seen = {{name: ray.get(look.options(scheduling_strategy=pin(ip)).remote(paths)) for ip, name in names.items()}}
        by_resource = {{r: ray.get(where.options(resources={{r: 1}}).remote()) for r in ("llamacpp", "mlx")}}
        emit({{"wrote": wrote, "seen": seen, "by_resource": by_resource}})
    """))
    lines = []
    for ip, name in names.items():
        w = got["wrote"][name]
        assert w["ip"] == ip and w["hostname"] == name, w
        lines.append(f"{name}: task ip {w['ip']}, hostname {w['hostname']}, /tmp = {w['tmp']}")
        # From the root namespace: the file is in this node's private dir and in no other's.
        for other in c.nodes:
            on_disk = c.host_path(other.name, w["path"])
            assert on_disk.exists() == (other.name == name), (name, other.name, on_disk)
        assert c.host_path(name, w["path"]).read_text() == f"{name} {ip}"
        # From the nodes: each sees its own file only.
        assert got["seen"][name] == {p: (p == w["path"]) for p in got["seen"][name]}, got["seen"][name]
        # Ray's session dir is the node's own too.
        assert w["session"].startswith("/tmp/ray/session_")
        assert (c.host_path(name, w["session"]) / "logs").is_dir()
    assert got["by_resource"] == {"llamacpp": "198.18.0.2", "mlx": "198.18.0.3"}
    _say(capsys, "\n".join(lines))


def test_listeners_per_namespace_and_no_loopback_leak(netns_cluster: NetnsCluster, capsys) -> None:
    c = netns_cluster
    c.sshd()
    c.influx()
    hosts = list(c.hosts.values())
    listeners = {h.name: c.listeners(h.name) for h in hosts}
    _say(capsys, "ss -Hltunp in each namespace (host PIDs):\n"
         + "\n".join(str(l) for h in hosts for l in listeners[h.name]))
    own_pids = {h.name: set(c.pids(h.name)) for h in hosts}
    for h in hosts:
        assert listeners[h.name], f"nothing listens on {h.name}"
        for l in listeners[h.name]:
            # A concrete address is the host's own or its loopback: never another host's.
            assert l.address in ("*", "0.0.0.0", "::", "::ffff:0.0.0.0", h.ip, f"::ffff:{h.ip}", "127.0.0.1",
                                 "::ffff:127.0.0.1", "::1"), l
            assert l.pid in own_pids[h.name], l
    # Each namespace's loopback is its own: a loopback listener elsewhere is refused here.
    for h in hosts:
        for l in listeners[h.name]:
            if not l.loopback or l.proto != "tcp":
                continue
            for other in hosts:
                if other is h or any(o.port == l.port for o in listeners[other.name]):
                    continue
                with in_netns(other.netns):
                    assert _connect("127.0.0.1", l.port) == errno.ECONNREFUSED, (l, other.name)
    # The root namespace: none of the harness's processes listens there.
    root_ss = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    ours = set().union(*own_pids.values())
    assert not [ln for ln in root_ss.splitlines() if any(f"pid={p}," in ln for p in ours)]
    # The ports that must be reachable across nodes are: the GCS, the dashboard, the servers.
    with c.in_netns("node-b"):
        assert _connect(c.head.ip, 6379) == 0
        assert _connect(c.head.ip, 8265) == 0
        assert _connect(c.ip("trainer"), 22) == 0
        assert _connect(c.ip("influx"), 8086) == 0


def test_job_submit_from_a_client_namespace(netns_cluster: NetnsCluster) -> None:
    """`ray job submit` through the dashboard on the head's address, from a host outside Ray."""
    c = netns_cluster
    c.client()
    code = "import ray; ray.init(); print('job-driver-on', ray.util.get_node_ip_address())"
    r = c.run("client", [str(Path(PYTHON).parent / "ray"), "job", "submit", f"--address={c.dashboard_url}",
                         "--", "python", "-c", code], timeout=180)
    assert "job-driver-on 198.18.0.1" in r.stdout, r.stdout[-2000:]
    assert "succeeded" in r.stdout


# --------------------------------------------------------------------------- the other hosts


def test_sshd_and_influxd_hosts(netns_cluster: NetnsCluster) -> None:
    c = netns_cluster
    sshd, influx = c.sshd(), c.influx()
    trainer, flx = c.hosts["trainer"], c.hosts["influx"]
    assert len({trainer.netns, flx.netns, c.head.netns}) == 3
    assert sshd.host == trainer.ip and influx.url == f"http://{flx.ip}:8086"
    assert sshd.process.pid in c.pids("trainer") and influx.process.pid in c.pids("influx")
    assert sshd.process.pid not in c.pids("head")

    # A checkpoint-like file on the training host, read over SSH from the head's namespace.
    run_dir = trainer.dir / "runs" / "adapters-x"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "0000100_adapters.safetensors").write_bytes(b"weights")
    key = c.copy_to("head", sshd.key, "/tmp/ssh/id")
    known = c.copy_to("head", sshd.known_hosts, "/tmp/ssh/known_hosts")
    os.chmod(c.host_path("head", key), 0o600)
    r = c.run("head", ["ssh", "-i", key, "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                       "-o", "BatchMode=yes", f"{sshd.user}@{sshd.host}",
                       f"hostname; cat {run_dir}/0000100_adapters.safetensors"], timeout=30)
    assert r.stdout.split() == ["trainer", "weights"], r

    # InfluxDB: written from the head's namespace, read back from the test (in its namespace).
    with c.in_netns("influx"):
        influx.create_database("ecnet")
    c.python("head", textwrap.dedent(f"""
        import urllib.request
        req = urllib.request.Request("{influx.url}/write?db=ecnet", data=b"probe,node=head value=1i 1000000000",
                                     method="POST")
        assert urllib.request.urlopen(req, timeout=5).status == 204
    """), timeout=30)
    with c.in_netns("influx"):
        res = influx.query("SELECT * FROM probe", db="ecnet")
    assert res["results"][0]["series"][0]["values"] == [[1000000000, "head", 1]], res

    # Disks: the influx data dir and the trainer's files exist on their hosts only.
    data = influx.root / "data"
    assert data.is_dir()
    assert c.run("influx", ["test", "-d", str(data)], check=False).returncode == 0
    for node in ("head", "node-a", "node-b"):
        for path in (data, run_dir, influx.root, trainer.dir):
            assert c.run(node, ["test", "-e", str(path)], check=False).returncode == 1, (node, path)
    # ... and the training host sees no node's disk nor the influx host's.
    for path in (c.head.dir, data, c.host_path("node-a")):
        assert c.run("trainer", ["test", "-e", str(path)], check=False).returncode == 1, path
    # Nor can the root namespace: it has no interface on the test network.
    assert _root_route_dev(flx.ip) in ROOT_LINKS_AT_IMPORT and _root_route_dev(trainer.ip) in ROOT_LINKS_AT_IMPORT


def test_killing_a_node_by_pid_makes_ray_mark_it_dead(netns_cluster: NetnsCluster, capsys) -> None:
    c = netns_cluster
    before = c.processes("node-a")
    assert any("raylet" in cmd for cmd in before.values()), before
    started = {pid: _proc_start_time(pid) for pid in before}
    t0 = time.monotonic()
    killed = c.kill_node("node-a")
    assert set(before) <= set(killed)
    # One PID took the whole node: raylet, agents, workers, all gone (a PID the kernel has given to
    # a new process since, on this busy machine, is not one of them: same PID, same start time).
    assert c.pids("node-a") == []
    assert not [pid for pid, t in started.items() if t is not None and _proc_start_time(pid) == t]
    c.wait_dead("node-a", timeout=60)
    dead_after = time.monotonic() - t0
    nodes = c.python_json("head", "import ray\nray.init()\n"
                                  "emit({n['NodeManagerAddress']: n['Alive'] for n in ray.nodes()})")
    assert nodes["198.18.0.2"] is False and nodes["198.18.0.1"] and nodes["198.18.0.3"], nodes
    # The node comes back on the same address and disk, as a new Ray node.
    t1 = time.monotonic()
    c.restart_node("node-a", timeout=120)
    back_after = time.monotonic() - t1
    states = [n["state"] for n in c.ray_nodes_state() if n["node_ip"] == "198.18.0.2"]
    assert sorted(states) == ["ALIVE", "DEAD"], states
    # Only node-b's raylet killed: `ray start --block` (its PID 1) stops the rest of the node.
    t2 = time.monotonic()
    c.kill_raylet("node-b")
    c.wait_dead("node-b", timeout=60)
    wait_until(lambda: not c.pids("node-b"), 30, "node-b's processes to exit after its raylet")
    raylet_dead_after = time.monotonic() - t2
    assert not c.hosts["node-b"].alive
    _say(capsys, f"node-a: {len(killed)} processes killed by PID; Ray marked it DEAD after {dead_after:.1f} s; "
                 f"restarted and ALIVE after {back_after:.1f} s. node-b: raylet killed, node DEAD and "
                 f"all its processes gone after {raylet_dead_after:.1f} s")


# --------------------------------------------------------------------------- teardown


def _harness_processes(c: NetnsCluster) -> list[tuple[int, int | None]]:
    pids = {p for h in c.hosts.values() for p in c.pids(h.name)}
    pids |= {h.proc.pid for h in c.hosts.values() if h.proc is not None and h.proc.poll() is None}
    return [(p, _proc_start_time(p)) for p in sorted(pids)]


def _assert_gone(hid: str, root: Path, procs: list[tuple[int, int | None]]) -> None:
    assert not [ns for ns in netns_list() if ns.startswith(f"ecn-{hid}-")], netns_list()
    assert _root_links() == ROOT_LINKS_AT_IMPORT
    still = [p for p, st in procs if st is not None and _proc_start_time(p) == st]
    assert not still, {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in still}
    assert not root.exists()


_CHILD = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {tests!r})
    from _netns import NetnsCluster, NodeSpec
    c = NetnsCluster.start([NodeSpec("head", {{}}, 1)])
    c.add_service_host("client")
    pids = sorted({{p for h in c.hosts.values() for p in c.pids(h.name)}} | {{h.proc.pid for h in c.hosts.values()}})
    print(json.dumps({{"id": c.id, "root": str(c.root), "pids": pids}}), flush=True)
    time.sleep(600)
""")


def _child_harness() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=str(Path(__file__).parent))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _child_ready(p: subprocess.Popen) -> dict:
    line = p.stdout.readline()
    if not line:
        p.kill()
        raise AssertionError(f"the child harness did not start: {p.stderr.read()[-3000:]}")
    info = json.loads(line)
    info["procs"] = [(pid, _proc_start_time(pid)) for pid in info["pids"]]
    return info


def test_sigterm_and_crash_leave_nothing() -> None:
    """Two harnesses in child processes (started together): SIGTERM tears one down; SIGKILL
    kills the other's nodes (parent-death signals) and the next sweep removes what it left."""
    terminated, crashed = _child_harness(), _child_harness()
    try:
        p, info = terminated, _child_ready(terminated)
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == -signal.SIGTERM
        _assert_gone(info["id"], Path(info["root"]), info["procs"])

        p, info = crashed, _child_ready(crashed)
        p.kill()
        p.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_proc_start_time(pid) == st for pid, st in info["procs"]):
            time.sleep(0.1)
        assert not [pid for pid, st in info["procs"] if _proc_start_time(pid) == st], "processes outlived SIGKILL"
        assert [ns for ns in netns_list() if ns.startswith(f"ecn-{info['id']}-")]  # left behind ...
        assert info["id"] in sweep_leftovers()  # ... and swept
        _assert_gone(info["id"], Path(info["root"]), info["procs"])
    finally:  # whatever failed above, the children's harnesses go (SIGTERM: their own teardown)
        for child in (terminated, crashed):
            if child.poll() is None:
                child.terminate()
                child.wait(60)


def test_teardown_leaves_nothing(netns_cluster: NetnsCluster, capsys) -> None:
    """Last: tear the module's cluster down (the fixture's own teardown is then a no-op)."""
    c = netns_cluster
    procs = _harness_processes(c)
    assert len(procs) > 10  # the Ray nodes left, sshd, influxd, the holders
    c.teardown()
    _assert_gone(c.id, c.root, procs)
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert c.root.name not in out
    _say(capsys, f"teardown of {len(procs)} processes, {len(c.hosts) + 1} namespaces: {c.timings['teardown_s']:.2f} s")


def test_token_auth_across_namespaced_nodes(capsys) -> None:
    """Ray's token auth (RAY_AUTH_MODE=token, one RAY_AUTH_TOKEN for every node) works between
    nodes with their own addresses: a driver on a worker node joins, a wrong token is refused,
    and the dashboard answers 401 without the token. (Runs after the module's cluster is gone.)"""
    import httpx

    t0 = time.monotonic()
    with NetnsCluster.start([NodeSpec("head", {}, 1)], auth="token") as c:
        started = time.monotonic() - t0
        c.add_node("node-a", {"llamacpp": 8}, num_cpus=1)
        added = c.timings["alive_node-a_s"]
        got = c.python_json("node-a", "import ray\nray.init()\n"
                                      "emit([ray.util.get_node_ip_address(), "
                                      "sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])])")
        assert got == ["198.18.0.2", ["198.18.0.1", "198.18.0.2"]]
        # (RAY_gcs_server_port_wait_time_s: give up after 2 tries, not Ray's 20.)
        bad = c.python("node-a", "import ray\nray.init()", env={"RAY_AUTH_TOKEN": "0" * 64,
                       "RAY_gcs_server_port_wait_time_s": "2"}, check=False, timeout=120)
        assert bad.returncode != 0 and "token" in bad.stderr.lower(), bad.stderr[-2000:]
        with c.in_netns("node-a"):
            assert httpx.get(f"{c.dashboard_url}/api/v0/nodes", timeout=5).status_code == 401
        assert len(c.ray_nodes_state()) == 2  # the harness's own queries carry the token
    _say(capsys, f"token-auth cluster: head up in {started:.1f} s, add_node ALIVE after {added:.1f} s")

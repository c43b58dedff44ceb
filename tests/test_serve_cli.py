"""`evalcluster serve` as a user runs it: starts its own loopback cluster, answers, stops on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.engines, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def test_serve_command_starts_answers_and_stops_cleanly(smollm2_gguf, tmp_path):
    import psutil

    sys.path.insert(0, str(Path(__file__).parent))
    from _servers import free_port

    port = free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        f"cluster: {{address: local, dashboard: false, dashboard_port: {free_port()}, "
        f"node_kinds: {{cpu: {{resources: {{llamacpp: 2}}}}}}, local_node_kind: cpu}}\n"
        f"models: [{{name: smollm2, engine: llamacpp, path: {smollm2_gguf}, resources: {{llamacpp: 1}}, "
        f"options: {{parallel: 2, ctx_size: 2048}}}}]\n"
        f"staging: {{cache_dir: {tmp_path / 'cache'}}}\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--config", str(cfg), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, RAY_TMPDIR="/tmp"), start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("press Ctrl-C"):
                break
        out = "".join(lines)
        assert f"at http://127.0.0.1:{port}/v1" in out, out[-3000:]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "smollm2", "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
        children = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        assert children, "the local cluster's processes should be children of the command"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, rest[-3000:]
        assert "shutting down" in rest
        time.sleep(2)
        alive = [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"processes left running after shutdown: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_serve_detach_leaves_the_app_on_a_running_cluster(ray_head, smollm2_gguf, tmp_path):
    """`serve --address ADDR --detach` deploys on a `ray start --head` cluster and exits; the app
    keeps answering from the cluster's processes; `serve shutdown` there then stops its engines."""
    import psutil

    from _servers import free_port, port_open, wait_until

    port = free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        f"cluster: {{address: local, serve: {{port: {free_port()}}}}}\n"
        f"models: [{{name: smollm2, engine: llamacpp, path: {smollm2_gguf}, resources: {{llamacpp: 1}}, "
        f"options: {{parallel: 1, ctx_size: 1024}}}}]\n"
        f"staging: {{cache_dir: {tmp_path / 'cache'}}}\n"
    )
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--config", str(cfg), "--address", ray_head.gcs_address,
           "--port", str(port), "--detach"]
    r = subprocess.run(cmd, cwd=ROOT, env=ray_head.env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert f"at http://127.0.0.1:{port}/v1" in r.stdout, out[-4000:]
    assert f"detached: smollm2 and the endpoint ('evalcluster') keep running on {ray_head.gcs_address}" in r.stdout, \
        out[-4000:]
    assert "press Ctrl-C" not in r.stdout
    # The command is gone; the app answers from the cluster.
    url = f"http://127.0.0.1:{port}"
    ids = {m["id"] for m in httpx.get(url + "/v1/models", timeout=60).json()["data"]}
    assert "smollm2" in ids
    reply = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": "smollm2", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "What is the capital of France?"}]})
    assert reply.status_code == 200 and "Paris" in reply.json()["choices"][0]["message"]["content"], reply.text
    info = httpx.get(url + "/v1/models/smollm2", timeout=60).json()["info"]
    replica, server = psutil.Process(info["pid"]), psutil.Process(info["extra"]["server_pid"])
    raylet = replica.parent()  # workers rename their command line; their raylet names the cluster
    assert ray_head.temp_dir in " ".join(raylet.cmdline()), "the replica should be a worker of the head cluster"
    assert server.ppid() == replica.pid

    down = subprocess.run([str(Path(sys.executable).parent / "serve"), "shutdown", "--address",
                           ray_head.dashboard_url, "--yes"], env=ray_head.env, capture_output=True, text=True,
                          timeout=300)
    assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]
    gone, alive = psutil.wait_procs([server, replica], timeout=120)
    assert not alive, f"still running after `serve shutdown`: {alive}"
    wait_until(lambda: not port_open(port), 120, "the Serve HTTP proxy going away")

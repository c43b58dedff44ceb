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

"""The demo's quiet terminal: Ray's and Serve's log lines (and Python warnings) go to a file,
evalcluster's own lines stay on the terminal, nothing is lost or written twice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import logging, sys, warnings
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
serve = logging.getLogger("ray.serve")
serve.addHandler(logging.StreamHandler(sys.stderr))  # as Serve sets itself up
serve.propagate = False
from cluster.runtime import ray_logs_to_file
path = Path(sys.argv[1])
ray_logs_to_file(path)
ray_logs_to_file(path)  # again after Serve started: no second handler
logging.getLogger("ray.serve").warning("serve line")
logging.getLogger("ray._private.worker").warning("ray child line")
logging.getLogger("evalcluster.job").warning("our line")
warnings.warn("a library warning")
"""


def test_ray_log_lines_go_to_the_file_and_ours_stay(tmp_path):
    log = tmp_path / "logs" / "ray.log"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "our line" in r.stderr
    for line in ("serve line", "ray child line", "a library warning"):
        assert line not in r.stderr + r.stdout
    text = log.read_text()
    assert [line in text for line in ("serve line", "ray child line", "a library warning")] == [True] * 3
    assert text.count("serve line") == 1 and "our line" not in text

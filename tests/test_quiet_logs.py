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
from cluster.runtime import ray_logs_to_file
path = Path(sys.argv[1])
ray_logs_to_file(path)  # before anything imported Serve (which sets up its own terminal handler)
from ray import serve  # noqa: the job's own first use of Serve comes after
logging.getLogger("ray.serve").info("serve line")  # as Serve says what it deploys, before the call below
ray_logs_to_file(path)  # again after Serve started: no second handler
logging.getLogger("ray.serve").info("serve line after")
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
    assert text.count("serve line\n") == 1 and text.count("serve line after") == 1 and "our line" not in text

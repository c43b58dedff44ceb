"""`python -m deployments._llamacpp_server`: llama.cpp's own HTTP server from the xllamacpp wheel.

The llama.cpp engine runs this as a child process (so a crash is a process exit it can see and
recover from). It takes the same flags as a `llama-server` binary, so the engine builds one
command line for both, and reads its API key from LLAMA_API_KEY as llama-server does. It binds the
given host (the engine passes 127.0.0.1), runs until SIGTERM or SIGINT, and dies with its parent
(PR_SET_PDEATHSIG on Linux): the engine arms that for every server it starts (deployments._children),
and this module arms it again for itself, so it also dies with a wrapper script that starts it
without `exec`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the engine's process goes away, however it goes."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() == 1:  # the parent died before prctl
        os._exit(1)


def parser() -> argparse.ArgumentParser:
    """The llama-server flags the engine uses."""
    ap = argparse.ArgumentParser(prog="python -m deployments._llamacpp_server")
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    ap.add_argument("-np", "--parallel", type=int, default=1)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--threads-http", type=int, default=-1)
    ap.add_argument("--lora", action="append", default=[])
    ap.add_argument("--lora-scaled", nargs=2, action="append", default=[], metavar=("FNAME", "SCALE"))
    ap.add_argument("--lora-init-without-apply", action="store_true")
    ap.add_argument("--slots", action="store_true")
    ap.add_argument("--metrics", action="store_true")
    ap.add_argument("--no-webui", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _die_with_parent()
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = args.model
    p.hostnames = [args.host]
    p.port = args.port
    p.n_ctx = args.ctx_size
    p.n_parallel = args.parallel
    p.cpuparams.n_threads = args.threads or max(1, os.cpu_count() or 1)
    p.n_gpu_layers = args.n_gpu_layers
    p.n_threads_http = args.threads_http
    p.endpoint_slots = args.slots
    p.endpoint_metrics = args.metrics
    key = os.environ.get("LLAMA_API_KEY", "").strip()  # as llama-server: from the environment, not argv
    if key:
        p.api_keys = [key]
    if args.no_webui:
        p.ui = False
    adapters = []
    for path, scale in [(path, 1.0) for path in args.lora] + [(path, float(s)) for path, s in args.lora_scaled]:
        info = xlc.CommonAdapterLoraInfo()
        info.path = path
        info.scale = scale
        adapters.append(info)
    p.lora_adapters = adapters
    p.lora_init_without_apply = args.lora_init_without_apply
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        server = xlc.Server(p)
    except Exception as e:  # noqa: BLE001 - the reason is in the log above; exit now
        # A plain exit would wait on llama.cpp's threads: leave at once with a status.
        print(f"evalcluster: llama.cpp server failed to start: {e}", flush=True)
        os._exit(2)
    print(f"evalcluster: llama.cpp server listening on {server.listening_address}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    print("evalcluster: stopping", flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip C++ teardown of the HTTP threads: the process is going away anyway


if __name__ == "__main__":
    raise SystemExit(main())

"""`evalcluster serve`: the models of the config behind one OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import signal
import threading

from cluster.cli import add_config_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the config's models on an OpenAI-compatible endpoint")
    add_config_arg(p)
    p.add_argument("--address", help="a running Ray cluster (default: the config's cluster.address)")
    p.add_argument("--host", help="HTTP bind address (default: cluster.serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default: cluster.serve.port)")
    p.add_argument("--detach", action="store_true",
                   help="leave the app running and exit (needs a cluster this command did not start)")
    p.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from cluster.runtime import current_job_id, delete_serve_apps, deploy_app, start_or_connect, undeploy_app

    cfg = load_config(args.config)
    address = args.address or cfg.cluster.address
    if args.detach and address == "local":
        raise ValueError("--detach needs --address of a running cluster (a local cluster ends with this command)")
    rt = start_or_connect(cfg.cluster, address=address)
    stop = threading.Event()
    try:
        from deployments import APP_NAME, DETACHED

        # Detached, the models are claimed in the name of `serve --detach`, which no job's end
        # gives back: they stay deployed for the endpoint whatever jobs come and go.
        job = DETACHED if args.detach else current_job_id()
        url, n_adapters = deploy_app(cfg, host=args.host, port=args.port, job=job)
        models = ", ".join(m.name for m in cfg.models)
        print(f"serving {models} (+{n_adapters} adapters) at {url}/v1", flush=True)
        if rt.dashboard_url:
            print(f"ray dashboard: {rt.dashboard_url}", flush=True)
        if args.detach:
            print(f"detached: {models} and the endpoint ({APP_NAME!r}) keep running on {rt.address}", flush=True)
            return 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print("press Ctrl-C to stop", flush=True)
        stop.wait()
        print("shutting down ...", flush=True)
        if rt.owned:
            delete_serve_apps()
        else:
            undeploy_app(cfg, job)  # the models no other job still uses
    finally:
        if rt.owned:
            rt.shutdown()
    return 0

"""The watch → evaluate → score → stream job: the driver that starts the actors and watches them.

    watchers (one per source) --stage--> ledger <--record-- coordinator --Serve--> engines
                                           ^ the result writer owns it, and the InfluxDB sink

The driver creates the job's writer (which locks the job's ledger), claims and deploys the models
(shared with other jobs that define them identically), creates one watcher per source and the
coordinator (each named for the job: `<name>:<ray job id>`), then polls the sources every `poll_interval_s`. It keeps the
coordinator running (a killed coordinator is restarted by Ray, and the driver restarts its loop).
SIGTERM or Ctrl-C stops it cleanly: running evaluations are cancelled (no half samples) and
their checkpoints go back to `staged`; the next run resumes from the ledger.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from pathlib import Path

    from cluster.config import AppConfig

log = logging.getLogger("evalcluster.job")


@dataclass
class WatchResult:
    """How a watch run ended."""

    polls: int = 0
    """Source polls made."""
    counts: dict[str, int] = field(default_factory=dict)
    """Checkpoints per ledger state at the end."""
    stopped_by_signal: bool = False
    """SIGTERM / Ctrl-C ended it."""
    stop_report: dict[str, Any] = field(default_factory=dict)
    """What the coordinator cancelled and put back in the queue when it stopped."""
    sink: dict[str, Any] = field(default_factory=dict)
    """InfluxDB sink counters (written, sent, spooled, ...)."""
    failed_bases: dict[str, str] = field(default_factory=dict)
    """Model -> why its base model's evaluation was given up (a `--once` run then fails)."""
    unreachable_sources: dict[str, str] = field(default_factory=dict)
    """Source -> its last poll error, for sources a `--once` run could not read by its end (it then fails)."""
    duration_s: float = 0.0
    """Wall time."""


def run_watch(
    cfg: AppConfig,
    *,
    once: bool = False,
    address: str | None = None,
    on_poll: Callable[[dict[str, Any]], None] | None = None,
    stop: threading.Event | None = None,
    max_idle_polls_with_pending: int = 30,
    ray_log: "Path | None" = None,
) -> WatchResult:
    """Run the job until stopped (or, with `once`, until everything found now is evaluated).

    Args:
        cfg: the AppConfig.
        once: poll until the sources are stable, evaluate what they hold, then return.
        address: a Ray cluster to use (default: the config's cluster.address).
        on_poll: called after each poll with a status dict (for the CLI's progress line).
        stop: an event that ends the loop (set by SIGTERM / Ctrl-C when run from the CLI).
        max_idle_polls_with_pending: with `once`, give up on files still being written after this many polls.
        ray_log: send Ray's and Serve's own log lines to this file, and keep the workers' output
            off the terminal (it stays in the Ray session's logs): the terminal is the caller's.
    """
    import ray

    from checkpoints import DISCOVERED
    from cluster._coordinator import coordinator_actor
    from cluster._watcher import watcher_actor
    from cluster._writer import writer_actor
    from cluster._budgets import budgets_actor
    from cluster.runtime import deploy_app, ray_logs_to_file, start_or_connect, state_placement, undeploy_app
    from deployments import registry

    t0 = time.monotonic()
    stop = stop or threading.Event()
    result = WatchResult()
    if ray_log is not None:
        ray_logs_to_file(ray_log)
    rt = start_or_connect(cfg.cluster, address=address, log_to_driver=ray_log is None)
    if _stop_handlers_for is not None and threading.current_thread() is threading.main_thread():
        # ray.init replaced our SIGTERM handler with its own (exit at once, mid-sample: the
        # command died with SIGABRT in the SIGTERM test): put ours back, so SIGTERM finishes cleanly.
        install_stop_handlers(_stop_handlers_for)
    deployed = False
    try:
        # The ledger first: a job whose ledger another running job holds is refused before it
        # claims or deploys anything.
        writer = writer_actor(cfg)
        # The cluster's registry and budgets actors (the deploy's first calls) start their processes
        # beside the writer's instead of after it: each is ~1.5 s of imports (2 cores, measured).
        registry(state_placement(cfg.cluster))
        budgets_actor(cfg)
        try:
            ray.get(writer.counts.remote())  # created and the ledger open (and locked) before anything uses it
        except ray.exceptions.RayActorError as e:
            raise _writer_refused(e) from None
        # The watchers' and the coordinator's processes start (~1.5 s of imports each) while Serve
        # deploys; nothing is asked of them until it is up.
        watchers = {s.name: watcher_actor(cfg, s.name) for s in cfg.sources}
        coordinator = coordinator_actor(cfg)
        deployed = True
        url, _ = deploy_app(cfg, access_log=False)
        if ray_log is not None:
            ray_logs_to_file(ray_log)  # Serve's handlers, added as it started
        log.info("serving at %s", url)
        ray.get([w.register_staged.remote() for w in watchers.values()])
        # The base models' evaluations start now, while the first poll stages and converts what the
        # sources hold (they waited for it: ~40 s of a three-checkpoint run's start on 2 cores).
        _coordinator_call(coordinator.ensure_running)
        interval = 1.0 if once else cfg.poll_interval_s
        polls_with_only_pending = 0
        while not stop.is_set():
            reports = ray.get([w.poll_once.remote() for w in watchers.values()])
            result.polls += 1
            _coordinator_call(coordinator.ensure_running)
            counts = ray.get(writer.counts.remote())
            coord = _coordinator_call(coordinator.status) or {"running": [], "restarting": True}
            status = {"polls": result.polls, "sources": reports, "counts": counts, "coordinator": coord, "url": url}
            result.failed_bases = dict(coord.get("base_failed") or {})
            if on_poll is not None:
                on_poll(status)
            if once:
                pending = sum(r["pending"] for r in reports)
                unreachable = {r["source"]: r["error"] for r in reports if r["error"]}
                result.unreachable_sources = unreachable
                idle = bool(_coordinator_call(coordinator.idle)) and not any(r["staged"] or r["new"] for r in reports)
                if idle:  # one sent back to be staged (its copy could not be served) is staged on the next poll
                    idle = not any(e.checkpoint.source not in unreachable
                                   for e in ray.get(writer.due.remote(DISCOVERED)))
                if idle and (pending == 0 or polls_with_only_pending >= max_idle_polls_with_pending) \
                        and (not unreachable or result.polls >= 3):
                    break
                polls_with_only_pending = polls_with_only_pending + 1 if idle and pending else 0
            stop.wait(interval)
        result.stopped_by_signal = stop.is_set()
        for _ in range(5):  # a coordinator that died just now is back after Ray restarts it
            report = _coordinator_call(coordinator.stop)
            if report is not None:
                result.stop_report = report
                break
        ray.get(writer.flush.remote(30))
        result.sink = ray.get(writer.sink_stats.remote())
        result.counts = ray.get(writer.counts.remote())
        for w in watchers.values():
            ray.get(w.close.remote())
        ray.kill(coordinator, no_restart=True)
        for w in watchers.values():
            ray.kill(w, no_restart=True)
        ray.get(writer.close.remote())
        ray.kill(writer, no_restart=True)
    finally:
        if deployed and not rt.owned:
            try:  # the models no other job (or `serve --detach`) still uses
                gone = undeploy_app(cfg)
                if gone:
                    log.info("undeployed %s: no other job uses them", ", ".join(gone))
            except Exception as e:  # noqa: BLE001 - the claims of a job that ended are dropped anyway
                log.warning("giving back the models failed: %s", e)
        if rt.owned:
            from cluster.runtime import delete_serve_apps

            try:
                delete_serve_apps()
            finally:
                rt.shutdown()
    result.duration_s = time.monotonic() - t0
    return result


def _writer_refused(e: Exception) -> Exception:
    """The one-line reason the job's writer could not start (another job holds the ledger), from
    the error Ray reports for its constructor."""
    from checkpoints import LedgerLocked

    text = str(e)
    marker = "LedgerLocked: "
    if marker in text:
        return LedgerLocked(text[text.rindex(marker) + len(marker):].strip().splitlines()[0])
    return e


def _coordinator_call(method: Any, *args: Any) -> Any:
    """Call a coordinator method; None if it died meanwhile (Ray restarts it: the next poll
    reaches its new life, and `ensure_running` resumes its work)."""
    import ray
    from ray.exceptions import RayActorError

    try:
        return ray.get(method.remote(*args))
    except RayActorError as e:
        log.warning("the coordinator is restarting (%s); carrying on", type(e).__name__)
        return None


_stop_handlers_for: threading.Event | None = None  # the event install_stop_handlers set up


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM and Ctrl-C set `stop` (the loop then shuts down cleanly); a second Ctrl-C aborts.

    `run_watch` installs them again once Ray is up (ray.init takes SIGTERM over).
    """
    global _stop_handlers_for
    _stop_handlers_for = stop
    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("signal %d: finishing cleanly (in-flight samples are returned to the queue)", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)

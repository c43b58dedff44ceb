"""A checkpoint watcher per source: discover complete checkpoints, stage them, register them.

Named `evalcluster-watcher:<source>` and restartable: its state is in the ledger (a restarted
watcher takes files the ledger already hashed at first sight) and in the node-local cache.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("evalcluster.watcher")


def watcher_name(source: str) -> str:
    return f"evalcluster-watcher:{source}"


class CheckpointWatcher:
    """Hosted as an async actor. `poll_once` is one discovery + staging pass.

    Args:
        app_cfg: the AppConfig as a mapping.
        config_path: the file it came from.
        source: the name of the source to watch.
    """

    def __init__(self, app_cfg: Mapping[str, Any], config_path: str | None, source: str) -> None:
        import ray

        from checkpoints import Poller, source_from_config, spec_from_config, stager_from_config
        from cluster._writer import WRITER_NAME, LedgerClient
        from cluster.config import parse_config

        self.cfg = parse_config(dict(app_cfg), config_path or "config", Path(config_path) if config_path else None)
        self.scfg = self.cfg.source(source)
        self.model = self.cfg.model(self.scfg.model)
        self.base_path = self.cfg.resolve(self.model.path) if getattr(self.model, "path", None) else None
        self.source = source_from_config(self.scfg)
        self.ledger = LedgerClient(ray.get_actor(WRITER_NAME))
        self.poller = Poller(self.source, spec_from_config(self.scfg), ledger=self.ledger)
        self.stager = stager_from_config(self.cfg.staging)
        self.node_id = ray.get_runtime_context().get_node_id()
        self._registry = None
        self.last_error: str | None = None
        self.polls = 0
        # Kept after a later poll succeeds (last_error is cleared), so an outage stays visible.
        self.poll_errors = 0
        self.last_poll_error: str | None = None

    async def poll_once(self) -> dict[str, Any]:
        """Discover, stage what is due, register staged adapters. Never raises for one bad checkpoint."""
        from checkpoints import stage_pending

        out: dict[str, Any] = {"source": self.scfg.name, "new": 0, "pending": 0, "staged": 0, "failed": 0,
                               "quarantined": 0, "error": None}
        try:
            result = await self.poller.poll()
        except Exception as e:  # noqa: BLE001 - an unreachable source is retried next poll
            self.last_error = self.last_poll_error = out["error"] = f"{type(e).__name__}: {e}"
            self.poll_errors += 1
            log.warning("polling source %s failed: %s", self.scfg.name, e)
            return out
        self.polls += 1
        self.last_error = None
        out["pending"] = len(result.pending)
        if result.new:
            await self.ledger.upsert_many(result.new)
            out["new"] = len(result.new)
        report = await stage_pending(
            self.ledger, self.stager, {self.scfg.name: self.source},
            {self.scfg.name: self.base_path} if self.base_path else None, only=self.scfg.name,
        )
        out["failed"], out["quarantined"] = len(report.failed), len(report.quarantined)
        for staged in report.staged:
            try:
                await asyncio.to_thread(self._prepare, staged)
                out["staged"] += 1
            except Exception as e:  # noqa: BLE001 - a checkpoint the engine cannot take is quarantined
                await self.ledger.record_failure(staged.checkpoint.id, f"cannot prepare adapter for "
                                                 f"{self.model.engine}: {e}", permanent=True)
                out["quarantined"] += 1
        return out

    async def register_staged(self) -> int:
        """Register every staged checkpoint of this source (after a restart of the registry)."""
        from checkpoints import STAGED

        n = 0
        for entry in await self.ledger.list(source=self.scfg.name, state=STAGED):
            staged = self.stager.lookup(entry.checkpoint)
            if staged is not None:
                await asyncio.to_thread(self._prepare, staged)
                n += 1
        return n

    def _prepare(self, staged: Any) -> None:
        """Convert to the engine's format now (validating it; the replica finds it cached) and register."""
        import ray

        from checkpoints import native_adapter_dir, prepare_adapter, sha256_tree
        from deployments import AdapterEntry, registry

        tree = sha256_tree(staged.path)
        out = native_adapter_dir(self.cfg.staging.serve_cache_dir, self.model.engine, tree)  # where the replica looks
        if self.base_path is not None:
            prepare_adapter(staged.path, self.model.engine, self.base_path, out)
        if self._registry is None:
            self._registry = registry()
        ck = staged.checkpoint
        ray.get(self._registry.register.remote(AdapterEntry(
            self.model.name, ck.id, str(staged.path), tree, self.node_id,
            {"run": ck.run, "iteration": ck.iteration, "label": ck.label, "sha256": ck.sha256},
        )))

    async def status(self) -> dict[str, Any]:
        """Polls that succeeded, polls that failed (and the last failure), connections made."""
        return {"source": self.scfg.name, "polls": self.polls, "last_error": self.last_error,
                "poll_errors": self.poll_errors, "last_poll_error": self.last_poll_error,
                "connects": getattr(self.source, "connects", None)}

    async def close(self) -> None:
        await self.source.close()


def watcher_actor(app_cfg: Any, source: str) -> Any:
    import ray

    data = app_cfg.model_dump(mode="json")
    path = str(app_cfg.source_path) if app_cfg.source_path else None
    return (
        ray.remote(CheckpointWatcher)
        .options(name=watcher_name(source), get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=0)
        .remote(data, path, source)
    )

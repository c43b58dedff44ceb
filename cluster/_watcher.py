"""A checkpoint watcher per source: discover complete checkpoints, stage them, register them.

Named `evalcluster-watcher:<source>:<job id>` (each job its own) and restartable: its state is in the ledger (a restarted
watcher takes files the ledger already hashed at first sight) and in the node-local cache.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from checkpoints import StagedCheckpoint
    from cluster.config import AppConfig

log = logging.getLogger("evalcluster.watcher")


def watcher_name(source: str) -> str:
    return f"evalcluster-watcher:{source}"


class CheckpointWatcher:
    """Hosted as an async actor. `poll_once` is one discovery + staging pass.

    Args:
        cfg: the app config.
        source: the name of the source to watch.
    """

    def __init__(self, cfg: AppConfig, source: str) -> None:
        import ray

        from checkpoints import Poller, source_from_config, spec_from_config, stager_from_config
        from cluster._writer import LedgerClient, job_writer
        self.cfg = cfg
        self.scfg = self.cfg.source(source)
        self.model = self.cfg.model(self.scfg.model)
        self.base_path = self.cfg.resolve(self.model.path) if getattr(self.model, "path", None) else None
        self.source = source_from_config(self.scfg)
        self.ledger = LedgerClient(job_writer())  # the job that started this actor
        self.poller = Poller(self.source, spec_from_config(self.scfg), ledger=self.ledger,
                             hash_bytes=self.scfg.hash_bytes_per_poll)
        self.stager = stager_from_config(self.cfg.staging)
        self.node_id = ray.get_runtime_context().get_node_id()
        self._registry = None
        self.last_error: str | None = None
        self.polls = 0
        # Kept after a later poll succeeds (last_error is cleared), so an outage stays visible.
        self.poll_errors = 0
        self.last_poll_error: str | None = None
        self._refused: set[str] = set()  # paths the poller will not take (logged once)

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
        for r in result.refused:
            if r.path not in self._refused:  # said once per file, not every poll
                self._refused.add(r.path)
                log.warning("source %s: %r not taken: %s", self.scfg.name, r.path, r.reason)
        if result.new:
            await self.ledger.upsert_many(result.new)
            out["new"] = len(result.new)
        report = await stage_pending(
            self.ledger, self.stager, {self.scfg.name: self.source},
            {self.scfg.name: self.base_path} if self.base_path else None, only=self.scfg.name,
            prepare=self._prepare_staged,
        )
        out.update(staged=len(report.staged), failed=len(report.failed), quarantined=len(report.quarantined))
        return out

    async def _prepare_staged(self, staged: StagedCheckpoint) -> None:
        """Converted and registered before the ledger marks it staged: the coordinator takes only
        checkpoints its replicas can serve, and names each by the digest of the files they serve
        (before, one taken while it was still being registered was named by its weights alone,
        and the same checkpoint resumed by a later job looked new). Ray failing to reach the
        registry (restarting, timed out) is not the checkpoint's fault: retried after a backoff."""
        from ray.exceptions import RayError, RayTaskError

        from checkpoints import AdapterError, StagingDeferred

        try:
            await asyncio.to_thread(self._prepare, staged)
        except RayError as e:
            if isinstance(e, RayTaskError):  # the registry itself refused it: about this adapter
                raise AdapterError(staged.checkpoint.path, f"cannot be registered: {e.cause}") from e
            raise StagingDeferred(f"{staged.checkpoint.path}: the adapter registry could not be reached: "
                                  f"{type(e).__name__}: {e}") from e
        except Exception as e:  # noqa: BLE001 - a checkpoint the engine cannot take is quarantined
            raise AdapterError(staged.checkpoint.path, f"cannot be prepared for {self.model.engine}: {e}") from e

    async def register_staged(self) -> int:
        """Register every staged checkpoint of this source (after a restart of the registry). One
        whose cache entry is gone stays unregistered: the coordinator sends it back to be staged."""
        from checkpoints import STAGED

        n = 0
        for entry in await self.ledger.list(source=self.scfg.name, state=STAGED):
            staged = self.stager.lookup(entry.local_path, entry.checkpoint) if entry.local_path else None
            if staged is not None:
                await asyncio.to_thread(self._prepare, staged)
                n += 1
        return n

    def _prepare(self, staged: StagedCheckpoint) -> None:
        """Convert to the engine's format now (validating it; a replica on this node finds it cached)
        and register it: its bytes go to the registry on the state node, from where replicas on
        any node pull them."""
        import ray

        from checkpoints import native_adapter_dir, prepare_adapter
        from cluster.runtime import state_placement
        from deployments import adapter_files, entry_for, registry

        ck = staged.checkpoint
        entry = entry_for(self.model.name, ck.id, Path(staged.path),
                          {"run": ck.run, "iteration": ck.iteration, "label": ck.label, "sha256": ck.sha256})
        if self.base_path is not None:
            out = native_adapter_dir(self.cfg.staging.serve_cache_dir, self.model.engine, entry.sha256)
            prepare_adapter(staged.path, self.model.engine, self.base_path, out)
        if self._registry is None:
            self._registry = registry(state_placement(self.cfg.cluster))
        ray.get(self._registry.register.remote(entry, adapter_files(Path(staged.path))))

    async def status(self) -> dict[str, Any]:
        """Polls that succeeded, polls that failed (and the last failure), connections made."""
        return {"source": self.scfg.name, "polls": self.polls, "last_error": self.last_error,
                "poll_errors": self.poll_errors, "last_poll_error": self.last_poll_error,
                "connects": getattr(self.source, "connects", None)}

    async def close(self) -> None:
        await self.source.close()


def watcher_actor(cfg: AppConfig, source: str) -> Any:
    """A source's watcher for this job, on the node its `resources` name (the node that holds a
    local source's path), else on the state node; it writes through the job's writer
    (`writer_actor`, started before it).

    Args:
        cfg: the app config.
        source: the source's name.
    """
    from cluster.runtime import job_actor, job_scoped, source_placement

    return job_actor(CheckpointWatcher, job_scoped(watcher_name(source)),
                     source_placement(cfg.cluster, cfg.source(source)), cfg, source, max_task_retries=0)

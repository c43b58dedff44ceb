"""Which adapters a base model can serve, and their bytes.

A named Ray actor (one per cluster, on the state node) maps `base:adapter` names to adapters it
keeps on its own node's disk. Whoever registers an adapter (the watch job's watcher for a staged
checkpoint, `evalcluster serve` for the config's `adapter_dirs`) sends its files in the call; the
registry checks them against the sha256 they were registered with, stores them, and records the
entry in an index beside them. A replica on any node pulls the files through the actor into its
node-local cache, checked against the sha256 again. So no node ever reads a path on another
node's disk, and a restarted registry (Ray brings it back on the same node) finds its index and
files where it left them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from checkpoints import fsync_dir, fsync_file, replacing, sha256_tree

log = logging.getLogger(__name__)

REGISTRY_NAME = "evalcluster-adapters"
INDEX = "index.json"
MODELS = "models.json"
DETACHED = "serve-detached"  # the holder `evalcluster serve --detach` claims in: never gone


class ModelClaimError(ValueError):
    """A job defines a model differently from the running job(s) that hold it."""


@dataclass
class ModelClaim:
    """A served model as the cluster knows it: its definition and the jobs that use it."""

    name: str
    """The model's name (`models[].name`)."""
    definition: dict[str, Any]
    """What decides its answers: engine, weights (path, size, mtime), options."""
    config: dict[str, Any]
    """The whole model section of the job that deployed it (replicas, max_ongoing_requests, ...)."""
    jobs: list[str] = field(default_factory=list)
    """The jobs that claim it (Ray job ids, or `serve-detached`)."""

    @property
    def generation_limit(self) -> int:
        """Generation requests the deployment takes at once: max_ongoing_requests x replicas."""
        scaling = self.config.get("autoscaling") or {}
        replicas = int(scaling.get("max_replicas") or self.config.get("replicas") or 1)
        return int(self.config.get("max_ongoing_requests") or 1) * replicas


@dataclass
class AdapterEntry:
    """An adapter as registered."""

    base: str
    """The base model's name (the config's `models[].name`)."""
    name: str
    """The adapter's name; clients ask for `base:name`."""
    sha256: str
    """`sha256_tree` of the adapter (a file, or a directory's names and bytes): checked on arrival at
    the registry and at every replica; names its copies and conversions."""
    file_name: str = ""
    """The file's name when the adapter is one file ("" for a directory)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """What the registering side knows of it (run, iteration, label, file digest)."""

    @property
    def model_id(self) -> str:
        """The multiplexed model id clients use: `base:name`."""
        return f"{self.base}:{self.name}"


def adapter_files(path: Path) -> dict[str, bytes]:
    """An adapter's files by name relative to it (a file adapter: its own name), to register.

    Args:
        path: the adapter file or directory.
    """
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def entry_for(base: str, name: str, path: Path, meta: dict[str, Any] | None = None) -> AdapterEntry:
    """The entry an adapter on this node's disk is registered with.

    Args:
        base: the base model's name.
        name: the adapter's name.
        path: the adapter file or directory.
        meta: what the caller knows of it.
    """
    return AdapterEntry(base, name, sha256_tree(path), path.name if path.is_file() else "", dict(meta or {}))


def write_verified(files: dict[str, bytes], entry: AdapterEntry, dest: Path) -> Path:
    """Write an adapter's files under `dest` (atomically: all or nothing) after checking them against
    the entry's sha256; returns the adapter's path there (the file, or the directory).

    Args:
        files: relative name -> bytes.
        entry: what they must hash to.
        dest: the directory to create (left as it is if it exists: same digest, same bytes).
    """
    target = dest / entry.file_name if entry.file_name else dest
    if dest.exists():
        return target
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".part-"))
    try:
        for rel, data in files.items():
            p = (tmp / rel).resolve()
            if tmp.resolve() not in p.parents:
                raise ValueError(f"adapter {entry.model_id}: file name {rel!r} leaves the adapter's directory")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            fsync_file(p)
        got = sha256_tree(tmp / entry.file_name if entry.file_name else tmp)
        if got != entry.sha256:
            raise ValueError(f"adapter {entry.model_id}: the bytes that arrived have sha256 {got[:12]}, "
                             f"expected {entry.sha256[:12]}")
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def running_job_ids() -> set[str]:
    """The Ray jobs (hex ids) whose driver still runs: the GCS job table, which answers without a
    dashboard."""
    import ray._private.state as gcs_state

    return {j["JobID"] for j in gcs_state.jobs() if not j["IsDead"]}


# Engine options that change how a server is run or reached, not what it answers.
_NOT_OUTPUT = {"log_dir", "start_timeout_s", "max_restarts", "timeout_s", "max_retries", "connect_timeout_s",
               "backoff_base_s", "backoff_max_s", "retry_after_max_s", "api_key_env", "api_key_file"}


def model_definition(model: Any, path: Path | None = None) -> dict[str, Any]:
    """What decides a model's answers, to compare two jobs' definitions of one name: the engine, the
    weights (path, size and mtime) and the engine options.

    Args:
        model: a ModelConfig.
        path: its weights resolved on this node (default: `model.path` when it has one).
    """
    options = {k: v for k, v in model.options.model_dump(mode="json").items() if k not in _NOT_OUTPUT}
    out: dict[str, Any] = {"engine": model.engine, "options": options,
                           "system_prompt": model.system_prompt}
    weights = path if path is not None else getattr(model, "path", None)
    if weights is not None:
        weights = Path(weights)
        out["path"] = str(weights)
        if weights.exists():
            st = weights.stat()
            out["size"], out["mtime"] = st.st_size, st.st_mtime
    return out


def ray_session_dir() -> Path:
    """This node's Ray session directory: the place for a detached actor's state, which lives as
    long as the cluster, as the actor does."""
    import ray

    return Path(ray._private.worker.global_worker.node.get_session_dir_path())


class AdapterRegistry:
    """The registry's state, on its node's disk under `root`; hosted by `registry()`.

    Args:
        root: where the adapters and the index are kept (default: `evalcluster/adapters` in this
            node's Ray session directory).
    """

    def __init__(self, root: str | None = None) -> None:
        self.root = Path(root) if root else ray_session_dir() / "evalcluster" / "adapters"
        self.root.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, AdapterEntry] = {}
        index = self.root / INDEX
        if index.exists():
            for d in json.loads(index.read_text()):
                e = AdapterEntry(**d)
                self._entries[e.model_id] = e
            log.info("adapter registry: %d adapters from %s", len(self._entries), index)

        self._models: dict[str, ModelClaim] = {}
        if (self.root / MODELS).exists():
            self._models = {d["name"]: ModelClaim(**d) for d in json.loads((self.root / MODELS).read_text())}

    # ----------------------------------------------------------------- the model table

    def claim_model(self, job: str, name: str, definition: dict[str, Any],
                    config: dict[str, Any] | None = None) -> tuple[ModelClaim, bool]:
        """Claim model `name` for `job`: shared (refcounted by job) when its definition is the one
        the cluster serves; ModelClaimError naming the model, the job holding it and the fields
        that differ when it is not. Jobs that are gone are dropped first.

        Returns the claim and whether this job's definition is new to the cluster (then it deploys it).

        Args:
            job: the claiming Ray job id (or DETACHED).
            name: the model's name.
            definition: `model_definition(...)` of the job's model section.
            config: the job's whole model section (kept when it is the first holder).
        """
        self._drop_gone_jobs()
        claim = self._models.get(name)
        others = [j for j in claim.jobs if j != job] if claim is not None else []
        if claim is not None and others and claim.definition != definition:
            differ = sorted(k for k in set(definition) | set(claim.definition)
                            if definition.get(k) != claim.definition.get(k))
            raise ModelClaimError(f"model {name!r} is already served with another definition by running job "
                                  f"{others[0]} (differs in: {', '.join(differ)}); rename this job's model or "
                                  f"define it identically")
        # No other holder: this job's definition is the one served (a job may redefine its own model).
        fresh = not others and (claim is None or job not in claim.jobs or claim.definition != definition
                                or claim.config != (config or {}))
        if fresh:
            claim = ModelClaim(name, dict(definition), dict(config or {}), [])
            self._models[name] = claim
        if job not in claim.jobs:
            claim.jobs.append(job)
        self._save_models()
        return claim, fresh

    def release_models(self, job: str, names: list[str] | None = None) -> list[str]:
        """Drop `job`'s claims (of `names` only, when given); returns the models no one claims any
        more (to undeploy)."""
        unused = []
        for claim in self._models.values():
            if job in claim.jobs and (names is None or claim.name in names):
                claim.jobs.remove(job)
                if not claim.jobs:
                    unused.append(claim.name)
        self._save_models()
        return unused

    def models(self) -> list[ModelClaim]:
        """The model table (claims with no job left are listed with `jobs` empty)."""
        return [ModelClaim(c.name, dict(c.definition), dict(c.config), list(c.jobs)) for c in self._models.values()]

    def _drop_gone_jobs(self) -> None:
        """Drop the claims of jobs that no longer run (a crashed job never released its own)."""
        jobs = {j for c in self._models.values() for j in c.jobs if j != DETACHED}
        if not jobs:
            return
        running = running_job_ids()
        for c in self._models.values():
            gone = [j for j in c.jobs if j != DETACHED and j not in running]
            if gone:
                log.info("model %s: dropping the claims of jobs that ended: %s", c.name, ", ".join(gone))
                c.jobs = [j for j in c.jobs if j not in gone]

    def _save_models(self) -> None:
        with replacing(self.root / MODELS) as tmp:
            tmp.write_text(json.dumps([asdict(c) for c in self._models.values()]))

    def _blob(self, entry: AdapterEntry) -> Path:
        return self.root / "blobs" / entry.sha256

    def register(self, entry: AdapterEntry, files: dict[str, bytes]) -> None:
        """Keep an adapter's files (checked against `entry.sha256`) and serve them as `base:name`.

        Args:
            entry: the adapter's entry.
            files: its files by relative name (`adapter_files`).
        """
        write_verified(files, entry, self._blob(entry))
        self._entries[entry.model_id] = entry
        with replacing(self.root / INDEX) as tmp:
            tmp.write_text(json.dumps([asdict(e) for e in self._entries.values()]))

    def resolve(self, base: str, name: str) -> AdapterEntry | None:
        """The entry of `base:name`, or None."""
        return self._entries.get(f"{base}:{name}")

    def list(self, base: str | None = None) -> list[AdapterEntry]:
        """Every entry (of one base model)."""
        return [e for e in self._entries.values() if base is None or e.base == base]

    def read_files(self, base: str, name: str) -> dict[str, bytes]:
        """The adapter's files by relative name, for a replica to copy."""
        entry = self._entries[f"{base}:{name}"]
        blob = self._blob(entry)
        return adapter_files(blob / entry.file_name if entry.file_name else blob)


def registry(placement: dict[str, Any] | None = None) -> Any:
    """The cluster's registry actor, created on first use.

    Args:
        placement: Ray actor options that put it on the state node (the first job to create it
            decides; see cluster.runtime.state_placement).
    """
    import ray

    return (
        ray.remote(AdapterRegistry)
        .options(name=REGISTRY_NAME, get_if_exists=True, lifetime="detached", num_cpus=0, max_restarts=-1,
                 max_task_retries=3,  # every method is idempotent: a call a crash cut off is made again
                 **(placement or {}))
        .remote()
    )


async def local_copy(entry: AdapterEntry, reg: Any, cache_dir: Path) -> Path:
    """The adapter on this node: a copy pulled from the registry (once per digest), checked on arrival.

    Args:
        entry: the registered entry.
        reg: the registry actor.
        cache_dir: this node's cache of pulled adapters.
    """
    dest = cache_dir / entry.sha256
    if dest.exists():
        return dest / entry.file_name if entry.file_name else dest
    files: dict[str, bytes] = await reg.read_files.remote(entry.base, entry.name)
    return write_verified(files, entry, dest)

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

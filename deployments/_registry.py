"""Which adapters a base model can serve, and where their files are.

A named Ray actor (one per cluster) maps `base:adapter` names to adapter files. The watch job
registers every staged checkpoint; `evalcluster serve` registers the adapter directories listed
in the config. A replica on another node pulls the files through the actor (adapters are small)
into its node-local cache, checked against the sha256.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checkpoints import fsync_file, sha256_tree

REGISTRY_NAME = "evalcluster-adapters"


@dataclass
class AdapterEntry:
    """An adapter as registered.

    Args:
        base: the base model's name (the config's `models[].name`).
        name: the adapter's name; clients ask for `base:name`.
        path: the adapter's file or directory on node `node_id`.
        sha256: `sha256_tree` of `path` ("" if unknown): names its pulled copy and its conversions.
        node_id: the Ray node holding `path` ("": whichever node finds `path` on its own disk).
        meta: what the watcher knows of the checkpoint (run, iteration, label, file digest).
    """

    base: str
    name: str
    path: str
    sha256: str = ""
    node_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        """The multiplexed model id clients use: `base:name`."""
        return f"{self.base}:{self.name}"


class AdapterRegistry:
    """The registry's state; hosted as a named, detached-for-the-job Ray actor by `registry()`."""

    def __init__(self) -> None:
        self._entries: dict[str, AdapterEntry] = {}

    def register(self, entry: AdapterEntry) -> None:
        self._entries[entry.model_id] = entry

    def resolve(self, base: str, name: str) -> AdapterEntry | None:
        return self._entries.get(f"{base}:{name}")

    def list(self, base: str | None = None) -> list[AdapterEntry]:
        return [e for e in self._entries.values() if base is None or e.base == base]

    def read_files(self, base: str, name: str) -> dict[str, bytes]:
        """The adapter's files by relative name, for a replica on another node."""
        entry = self._entries[f"{base}:{name}"]
        root = Path(entry.path)
        if root.is_file():
            return {root.name: root.read_bytes()}
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def registry() -> Any:
    """The cluster's registry actor, created on first use."""
    import ray

    return (
        ray.remote(AdapterRegistry)
        .options(name=REGISTRY_NAME, get_if_exists=True, lifetime="detached", num_cpus=0, max_restarts=-1)
        .remote()
    )


async def local_copy(entry: AdapterEntry, reg: Any, cache_dir: Path) -> Path:
    """A path to the adapter on this node: the registered path, or a verified copy pulled from it."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    if entry.node_id in ("", here) and os.path.exists(entry.path):
        return Path(entry.path)
    dest = cache_dir / (entry.sha256 or hashlib.sha256(entry.model_id.encode()).hexdigest())
    single = dest / Path(entry.path).name
    if dest.exists():
        return single if single.is_file() else dest
    files: dict[str, bytes] = await reg.read_files.remote(entry.base, entry.name)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".part-"))
    for rel, data in files.items():
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        fsync_file(p)
    is_file = len(files) == 1 and Path(entry.path).name in files and "/" not in next(iter(files))
    got = sha256_tree(tmp / Path(entry.path).name if is_file else tmp)
    if entry.sha256 and got != entry.sha256:
        raise ValueError(f"adapter {entry.model_id}: copy from node {entry.node_id} has sha256 {got[:12]}, "
                         f"expected {entry.sha256[:12]}")
    os.replace(tmp, dest)
    return dest / Path(entry.path).name if is_file else dest

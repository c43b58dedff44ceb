"""The config sections checkpoints own: `sources` (where runs write checkpoints) and `staging`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from checkpoints._configbase import StrictModel

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class AdapterMetaRule(StrictModel):
    """One row of go-ml's AdapterMeta table: a run-directory prefix and what it names."""

    prefix: str
    tag: str
    short: str


class SourceConfig(StrictModel):
    """Where a training run writes its checkpoints: a local directory or a directory over SSH."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["local", "ssh"] = "local"
    path: Path | None = None
    host: str | None = None
    port: int = Field(22, ge=1, le=65535)
    user: str | None = None
    key: Path | None = None
    known_hosts: Path | None = None
    base: str | None = None
    layout: Literal["mlx", "peft"] = "mlx"
    glob: str | None = None
    iteration_pattern: str | None = None
    marker: str | None = None
    model: str
    adapter_meta: list[AdapterMetaRule] = Field(default_factory=list)
    connect_timeout_s: float = Field(10, gt=0)
    # Where its watcher runs: Ray resources of the node that holds `path` (a local source) or
    # that may reach `host` (an SSH source). Empty: the state node.
    resources: dict[str, float] = Field(default_factory=dict)
    # One listing command over SSH (its hashing included); one file's hashing on the host is
    # killed after half of it (a file that cannot be read in time is skipped, not waited on).
    command_timeout_s: float = Field(120, gt=0)
    # Bytes of new checkpoints hashed per poll: a first poll of a large base is hashed over several
    # polls (each listing still returns, and what was hashed is kept) instead of timing out whole.
    hash_bytes_per_poll: int = Field(2 * 2**30, ge=1)

    @model_validator(mode="after")
    def _kind_fields(self) -> "SourceConfig":
        if self.kind == "local" and self.path is None:
            raise ValueError("a local source needs `path`")
        if self.kind == "ssh":
            missing = [k for k in ("host", "user", "base", "known_hosts") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"an ssh source needs {', '.join(missing)}")
        if self.iteration_pattern is not None:
            try:
                rx = re.compile(self.iteration_pattern)
            except re.error as e:
                raise ValueError(f"iteration_pattern is not a valid regex: {e}") from None
            if rx.groups < 1:
                raise ValueError("iteration_pattern needs one capture group for the iteration")
        return self


class StagingConfig(StrictModel):
    """The node-local cache staged checkpoints (and their engine-native forms) are kept in."""

    cache_dir: Path = Path(".evalcluster/cache")
    max_bytes: int = Field(20 * 2**30, ge=1)
    retries: int = Field(3, ge=0)

    @property
    def serve_cache_dir(self) -> Path:
        """Where a node's replicas keep the adapters they pulled and converted (see
        `native_adapter_dir`): inside the cache, one directory for all of them."""
        return self.cache_dir / "serve"

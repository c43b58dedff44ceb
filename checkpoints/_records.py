"""The records the checkpoints package hands around: a checkpoint, a listed file, a ledger row."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Literal

Layout = Literal["mlx", "peft"]

# Ledger states. `failed` goes back to its `resume_state` when its retry time comes;
# `quarantined` stays until someone runs `evalcluster checkpoints retry ID`.
DISCOVERED = "discovered"
STAGED = "staged"
EVALUATING = "evaluating"
SCORED = "scored"
FAILED = "failed"
QUARANTINED = "quarantined"
STATES = (DISCOVERED, STAGED, EVALUATING, SCORED, FAILED, QUARANTINED)


def checkpoint_id(source: str, run: str, iteration: int, sha256: str | None) -> str:
    """The stable id of (source, run, iteration, sha256): new bytes at the same path, new id.

    Args:
        source: the source name from the config.
        run: the run directory relative to the source's base.
        iteration: the training iteration.
        sha256: hex digest of the adapter file (None before hashing: a provisional id).
    """
    h = hashlib.sha256("\0".join((source, run, str(iteration), sha256 or "")).encode("utf-8", "surrogateescape"))
    return "ck-" + h.hexdigest()[:20]


@dataclass(frozen=True)
class Checkpoint:
    """One adapter checkpoint of one training run, as found on a source.

    Args:
        source: the source's name in the config.
        run: the run directory relative to the base (may contain "/").
        iteration: the training iteration parsed from the path.
        path: the adapter file's full path on the source.
        dirname: the directory holding the adapter file, relative to the base (go-ml's Dirname).
        label: go-ml's "<short> @<iteration digits as written>", e.g. "G27 @0001000".
        run_id: go-ml's "<stem>-capability-auto".
        model_tag: go-ml's model tag from the AdapterMeta table.
        layout: "mlx" or "peft".
        size: bytes of the adapter file.
        mtime: its modification time (seconds since the epoch).
        sha256: hex digest of the adapter file; None until hashed.
        config_path: the adapter_config.json beside it on the source, if any.
    """

    source: str
    run: str
    iteration: int
    path: str
    dirname: str
    label: str
    run_id: str
    model_tag: str
    layout: Layout
    size: int
    mtime: float
    sha256: str | None = None
    config_path: str | None = None

    @property
    def id(self) -> str:
        """Stable for (source, run, iteration, sha256)."""
        return checkpoint_id(self.source, self.run, self.iteration, self.sha256)

    def with_sha256(self, sha256: str) -> "Checkpoint":
        """The same checkpoint with its digest set (and so its final id).

        Args:
            sha256: hex digest of the adapter file.
        """
        return replace(self, sha256=sha256)


@dataclass(frozen=True)
class FileEntry:
    """A regular file under a source's base: path relative to the base, size, mtime."""

    relpath: str
    size: int
    mtime: float


@dataclass
class Listing:
    """What one listing round trip returned: the files, and the digests asked for."""

    entries: list[FileEntry]
    sha256: dict[str, str] = field(default_factory=dict)  # relpath -> hex digest


@dataclass(frozen=True)
class LedgerEntry:
    """A checkpoint's row in the ledger.

    Args:
        checkpoint: the checkpoint itself.
        state: one of STATES.
        attempts: failures so far.
        last_error: the last failure's reason (the quarantine reason when quarantined).
        next_retry_at: when a failed checkpoint is due again (epoch seconds), else None.
        resume_state: the state a failed checkpoint goes back to when due.
        local_path: the staged directory on this node, once staged.
        discovered_at: first seen (epoch seconds).
        updated_at: last state change (epoch seconds).
    """

    checkpoint: Checkpoint
    state: str
    attempts: int = 0
    last_error: str | None = None
    next_retry_at: float | None = None
    resume_state: str | None = None
    local_path: str | None = None
    discovered_at: float = 0.0
    updated_at: float = 0.0

    @property
    def id(self) -> str:
        return self.checkpoint.id

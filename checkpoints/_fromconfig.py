"""The checkpoints objects a config section describes: sources with their pollers, and the stager."""

from __future__ import annotations

from typing import Sequence

from checkpoints._config import SourceConfig, StagingConfig
from checkpoints._discovery import Poller
from checkpoints._layouts import spec_from_config
from checkpoints._ledger import Ledger
from checkpoints._sources import source_from_config
from checkpoints._staging import Stager


def pollers_from_config(sources: Sequence[SourceConfig], ledger: Ledger | None = None) -> list[Poller]:
    """One Poller per source (its own connection, its layout).

    Args:
        sources: the `sources` entries to poll.
        ledger: lets pollers reuse digests recorded before a restart.
    """
    return [Poller(source_from_config(sc), spec_from_config(sc), ledger, sc.hash_bytes_per_poll) for sc in sources]


def stager_from_config(staging: StagingConfig) -> Stager:
    """The node-local Stager at `staging.cache_dir` with its size bound and retries.

    Args:
        staging: the `staging` section.
    """
    return Stager(staging.cache_dir, staging.max_bytes, retries=staging.retries)

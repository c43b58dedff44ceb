"""Checkpoints: sources (local, SSH), layouts and discovery, the ledger, staging, adapter formats.

    source = source_from_config(cfg.source("m3"), cfg.resolve)
    poller = Poller(source, spec_from_config(cfg.source("m3")))
    new = (await poller.poll()).new            # complete checkpoints, sha256 set
    ledger.upsert_many(new)
    staged = await Stager(cache_dir, max_bytes).stage(source, ckpt)
    adapter = prepare_adapter(staged.path, "llamacpp", base_gguf, out_dir)
"""

from checkpoints._discovery import DiscoveryReport, Pending, Poller, PollResult, discover_once
from checkpoints._layouts import (
    CONFIG_NAME,
    LayoutSpec,
    MetaRule,
    adapter_meta,
    checkpoints_from_listing,
    layout_spec,
    spec_from_config,
)
from checkpoints._ledger import Ledger, LedgerError
from checkpoints._records import (
    DISCOVERED,
    EVALUATING,
    FAILED,
    QUARANTINED,
    SCORED,
    STAGED,
    STATES,
    Checkpoint,
    FileEntry,
    LedgerEntry,
    Listing,
    checkpoint_id,
)
from checkpoints._sources import (
    HostKeyError,
    LocalSource,
    Source,
    SourceError,
    SourceUnavailable,
    SSHSource,
    sha256_file,
    source_from_config,
)

__all__ = [
    "CONFIG_NAME",
    "DISCOVERED",
    "EVALUATING",
    "FAILED",
    "QUARANTINED",
    "SCORED",
    "STAGED",
    "STATES",
    "Checkpoint",
    "DiscoveryReport",
    "FileEntry",
    "HostKeyError",
    "LayoutSpec",
    "Ledger",
    "LedgerEntry",
    "LedgerError",
    "Listing",
    "LocalSource",
    "MetaRule",
    "Pending",
    "PollResult",
    "Poller",
    "SSHSource",
    "Source",
    "SourceError",
    "SourceUnavailable",
    "adapter_meta",
    "checkpoint_id",
    "checkpoints_from_listing",
    "discover_once",
    "layout_spec",
    "sha256_file",
    "source_from_config",
    "spec_from_config",
]

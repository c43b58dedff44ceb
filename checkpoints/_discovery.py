"""Discovery: poll a source and return the checkpoints that are new AND complete.

A checkpoint is complete when its adapter file and its adapter_config.json are present and
unchanged in size and mtime across two consecutive observations, or, when the layout names a
marker file, as soon as the marker exists. A file still being written changes between polls and
is never returned.

Each poll costs one round trip to the source in the steady state: the listing command also
hashes (before listing) the files that the previous poll saw for the first time, so a file that
is unchanged at this poll gets its sha256 from the same command. Only checkpoints that complete by
marker, or that the previous poll did not ask to hash, cost a second round trip for their digests.
"""

from __future__ import annotations

import inspect

import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from checkpoints._layouts import CONFIG_NAME, LayoutSpec, checkpoints_from_listing
from checkpoints._records import Checkpoint, FileEntry
from checkpoints._sources import Source, SourceError

log = logging.getLogger(__name__)

Signature = tuple[int, float, tuple[int, float] | None]


@dataclass(frozen=True)
class Pending:
    """A checkpoint seen but not taken yet, and why."""

    path: str
    reason: str


@dataclass
class PollResult:
    """One poll: the new complete checkpoints, the ones still waiting, and what it cost."""

    new: list[Checkpoint]
    pending: list[Pending]
    listed: int
    round_trips: int
    seconds: float
    refused: list[Pending] = field(default_factory=list)
    """Checkpoints that will not be taken as they are (a path that is not UTF-8), with the reason."""


class Poller:
    """Polls one source with one layout; remembers what it saw and what it returned.

    With a ledger, a file the ledger already holds with the same path, size and mtime (it was
    complete and hashed before a restart) is taken at first sight with the recorded digest, so a
    restart neither waits a poll nor hashes every old checkpoint again.

    Hashing is bounded: at most `hash_bytes` of checkpoints are hashed per poll (at least one file),
    so a first poll of a large base is hashed over several polls, each listing still returning what
    the source holds; a checkpoint not hashed yet waits, and is hashed first at the next poll.

    Args:
        source: a LocalSource or SSHSource.
        spec: the layout.
        ledger: a Ledger to look up digests of files seen before (optional).
        hash_bytes: bytes of checkpoints hashed per poll.
    """

    def __init__(self, source: Source, spec: LayoutSpec, ledger: Any = None, hash_bytes: int = 2 * 2**30) -> None:
        self.source = source
        self.spec = spec
        self.ledger = ledger
        self.hash_bytes = hash_bytes
        self._prev: dict[str, Signature] = {}
        self._to_hash: list[str] = []
        self._emitted: set[str] = set()
        # relpath -> (its signature when hashed, its digest): an unchanged file is not hashed again
        self._hashed: dict[str, tuple[Signature, str]] = {}

    def _rel(self, path: str) -> str:
        base = self.source.base.rstrip("/")
        return path[len(base) + 1:] if path.startswith(base + "/") else posixpath.relpath(path, base)

    async def poll(self) -> PollResult:
        """List the source once; return checkpoints that became complete since the last poll."""
        t0 = time.perf_counter()
        rt0 = self.source.round_trips
        hash_first = self._to_hash
        listing = await self.source.list(self.spec.name_globs(), self.spec.max_depth(), hash_first)
        self._to_hash = []
        files: dict[str, FileEntry] = {e.relpath: e for e in listing.entries}
        ckpts = checkpoints_from_listing(listing.entries, self.spec, self.source.name, self.source.base)

        sigs: dict[str, Signature] = {}
        complete: list[tuple[Checkpoint, str]] = []
        pending: list[Pending] = []
        known: dict[tuple[str, int, float], str] = {}
        if self.ledger is not None and any(self._rel(c.path) not in self._prev for c in ckpts):
            known = self.ledger.known_digests(self.source.name)
            if inspect.isawaitable(known):  # the cluster's async ledger client
                known = await known
        recorded: dict[str, str] = {}
        to_hash: list[tuple[str, int]] = []
        refused: list[Pending] = []
        for ck in ckpts:
            rel = self._rel(ck.path)
            if not _is_utf8(ck.path):
                # A name that is not UTF-8 cannot be recorded (the ledger, InfluxDB and every report
                # hold text): say so and go on with the others.
                refused.append(Pending(ck.path, "its path is not valid UTF-8; rename it to have it evaluated"))
                continue
            cfg_rel = posixpath.join(ck.dirname, CONFIG_NAME) if ck.dirname else CONFIG_NAME
            cfg = files.get(cfg_rel)
            sig: Signature = (ck.size, ck.mtime, (cfg.size, cfg.mtime) if cfg else None)
            sigs[rel] = sig
            if cfg is None:
                pending.append(Pending(ck.path, f"waiting for {CONFIG_NAME} beside it"))
                continue
            digest = known.get((ck.path, ck.size, ck.mtime))
            if digest is not None and rel not in self._prev:
                recorded[rel] = digest  # complete and hashed before (e.g. before a restart)
                complete.append((ck, rel))
                continue
            marker = self.spec.marker_for(rel)
            if marker is not None:
                if marker in files:
                    complete.append((ck, rel))
                else:
                    pending.append(Pending(ck.path, f"waiting for marker {posixpath.basename(marker)}"))
                continue
            if self._prev.get(rel) == sig:
                complete.append((ck, rel))
            else:
                why = "first seen" if rel not in self._prev else "changed since the last poll"
                pending.append(Pending(ck.path, f"{why}; taken when unchanged at the next poll"))
                to_hash.append((rel, ck.size))
        self._prev = sigs

        for _, rel in complete:  # hashed at an earlier poll and unchanged since: not hashed again
            earlier = self._hashed.get(rel)
            if rel not in recorded and earlier is not None and earlier[0] == sigs[rel] and rel not in hash_first:
                recorded[rel] = earlier[1]
        hashes = {**listing.sha256, **recorded}
        # A digest taken before this listing is valid only if the file is unchanged since the
        # previous listing (its signature was compared above); otherwise hash again now, within
        # what is left of this poll's budget. The rest waits, first in line at the next poll.
        missing = [(rel, ck.size) for ck, rel in complete
                   if rel not in recorded and (rel not in hashes or rel not in hash_first)]
        spent = sum(sigs[rel][0] for rel in hash_first if rel in sigs)
        now, later = _within(missing, self.hash_bytes - spent, at_least_one=not hash_first)
        if now:
            hashes.update(await self.source.hash(now))
        self._to_hash, _ = _within([(rel, size) for rel, size in missing if rel in later] + to_hash,
                                   self.hash_bytes, at_least_one=True)

        self._hashed = {rel: (sigs[rel], hashes[rel]) for _, rel in complete
                        if rel in hashes and len(hashes[rel]) == 64 and rel not in later}
        new: list[Checkpoint] = []
        for ck, rel in complete:
            digest = hashes.get(rel)
            if rel in later:
                pending.append(Pending(ck.path, f"complete; hashed at the next poll (at most {self.hash_bytes} "
                                                "bytes are hashed per poll)"))
                continue
            if digest is None or len(digest) != 64:
                pending.append(Pending(ck.path, "could not be hashed (removed, unreadable or not a regular file)"))
                continue
            ck = ck.with_sha256(digest)
            if ck.id in self._emitted:
                continue
            self._emitted.add(ck.id)
            new.append(ck)
        return PollResult(new, pending, len(ckpts), self.source.round_trips - rt0, time.perf_counter() - t0, refused)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes: the bytes on the source were not UTF-8
        return False
    return True


def _within(files: list[tuple[str, int]], budget: int, at_least_one: bool) -> tuple[list[str], set[str]]:
    """Split (relpath, size) in order into those whose sizes fit `budget` and the rest (as a set)."""
    now: list[str] = []
    used = 0
    for i, (rel, size) in enumerate(files):
        if used + size > budget and (now or not at_least_one):
            return now, {r for r, _ in files[i:]}
        now.append(rel)
        used += size
    return now, set()


@dataclass
class DiscoveryReport:
    """What one pass over every source found; a failing source is reported, not raised."""

    new: list[Checkpoint] = field(default_factory=list)
    pending: dict[str, list[Pending]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


async def discover_once(pollers: Iterable[Poller], ledger: Any = None) -> DiscoveryReport:
    """Poll every source once; upsert the new checkpoints into the ledger if one is given.

    A source that fails (unreachable, bad host key, missing base) is reported in `errors` and does
    not stop the others.

    Args:
        pollers: one Poller per source.
        ledger: a Ledger to record new checkpoints in (as discovered), or None.
    """
    report = DiscoveryReport()
    for p in pollers:
        try:
            res = await p.poll()
        except SourceError as e:
            report.errors[p.source.name] = str(e)
            log.warning("%s", e)
            continue
        report.new.extend(res.new)
        report.pending[p.source.name] = res.pending
    if ledger is not None and report.new:
        ledger.upsert_many(report.new)
    return report

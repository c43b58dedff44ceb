"""What an evaluation is run on (EvalTarget), what each sample records (SampleResult), and where
samples are kept for resume (the SampleStore protocol and a JSONL file store).

A sample's key is derived from everything that decides its result: the target and its content
identity (what produces its answers: base weights, engine and version, the settings in effect, the
chat template, the adapter's weights and config), the prompt as sent (system prompt included), the
probe set's hash, the probe, the repeat, the sampling options and the scorer versions. A resumed
run skips the keys its store already has; change any of those and the sample is new, and
`set_aside` says which earlier samples were left out and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from checkpoints import sha256_tree

if TYPE_CHECKING:
    from checkpoints import Checkpoint


@dataclass(frozen=True)
class EvalTarget:
    """A model, or a checkpoint of one, to evaluate; its samples carry its label, iteration and run
    id, and its InfluxDB points are named from it (see `evaluators.results.target_naming`)."""

    id: str
    """"base:<model>" for a base model, or the checkpoint's id."""
    model: str
    """The config model name that serves it."""
    adapter: str | None = None
    """The engine-native adapter path (None for the base model)."""
    adapter_sha256: str | None = None
    """The adapter file's sha256, for provenance."""
    label: str = ""
    """A display label (e.g. "G27 @0001000")."""
    iteration: int | None = None
    """The training iteration of the checkpoint."""
    run_id: str | None = None
    """The training run it belongs to."""
    model_tag: str | None = None
    """go-ml's model tag in its InfluxDB points (a checkpoint's `model_tag`); None: `model`."""
    adapter_files_sha256: str | None = None
    """`sha256_tree` of the adapter's files as served (weights and config: a config that changes
    the scale with the same weights changes it); None: only `adapter_sha256` is known."""
    identity: str = ""
    """The digest of what produces the answers (`identified`); "" until the engine was asked."""
    identity_parts: tuple[tuple[str, str], ...] = ()
    """The identity's components, (name, value) sorted: what `set_aside` names when one changes."""

    def identified(self, engine: Mapping[str, Any]) -> "EvalTarget":
        """This target with its content identity, from what its engine reports (ModelInfo.identity:
        engine, engine_version, weights_sha256, settings in effect) and its adapter's digests.

        Args:
            engine: the serving engine's identity (deployments.Engine.identity).
        """
        parts = {"engine": f"{engine.get('engine', '')} {engine.get('engine_version', '')}".strip(),
                 "base weights": str(engine.get("weights_sha256") or "")}
        for name, value in sorted((engine.get("settings") or {}).items()):
            parts[f"setting {name}"] = json.dumps(value, sort_keys=True)
        if self.adapter is not None:
            parts["adapter weights"] = self.adapter_sha256 or ""
            parts["adapter files"] = self.adapter_files_sha256 or self.adapter_sha256 or ""
        pairs = tuple(sorted(parts.items()))
        digest = hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()[:32]
        return replace(self, identity=digest, identity_parts=pairs)

    @classmethod
    def base(cls, model: str) -> "EvalTarget":
        """The target for a base model without adapter.

        Args:
            model: the config model name.
        """
        return cls(id=f"base:{model}", model=model, label=model)

    @classmethod
    def of_checkpoint(cls, checkpoint: Checkpoint, model: str, files_sha256: str | None = None) -> "EvalTarget":
        """The target for a discovered checkpoint (its adapter is registered under its id).

        Args:
            checkpoint: the ledger's checkpoint.
            model: the config model of its source.
            files_sha256: `sha256_tree` of its staged files, weights and config (the registry's).
        """
        ck = checkpoint
        return cls(ck.id, model, adapter=ck.id, adapter_sha256=ck.sha256, label=ck.label, iteration=ck.iteration,
                   run_id=ck.run_id, model_tag=ck.model_tag, adapter_files_sha256=files_sha256)

    @classmethod
    def of_adapter_path(cls, model: str, path: Path) -> "EvalTarget":
        """The target for an adapter file or directory given by hand (`evalcluster eval --adapter`).

        Args:
            model: the config model that serves it.
            path: the adapter in the engine's format.
        """
        path = path.expanduser().resolve()
        if not path.exists():
            raise ValueError(f"adapter {path}: no such file or directory")
        sha = sha256_tree(path)
        return cls(f"adapter:{model}:{sha[:16]}", model, adapter=str(path), adapter_sha256=sha, label=path.name)

    def to_dict(self) -> dict[str, Any]:
        """As a plain mapping."""
        return asdict(self)


def prompt_digest(messages: Sequence[Mapping[str, str]]) -> str:
    """The digest of a prompt as sent: every message's role and content, system prompt included.

    Args:
        messages: the chat ({"role", "content"} each).
    """
    text = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def sample_components(identity: str, messages: Sequence[Mapping[str, str]], probe_set_hash: str,
                      sampling: Mapping[str, Any], scorer_versions: Mapping[str, str]) -> dict[str, str]:
    """What a sample's key depends on besides its target id, probe and repeat, by name (each a
    digest or plain JSON): "target identity", "prompt", "probe set", "sampling", "scorers".

    Args:
        identity: EvalTarget.identity.
        messages: the prompt as sent.
        probe_set_hash: ProbeSet.hash.
        sampling: the generation options that decide the answer.
        scorer_versions: scorer name -> version stamp.
    """
    return {"target identity": identity, "prompt": prompt_digest(messages), "probe set": probe_set_hash,
            "sampling": json.dumps(dict(sampling), sort_keys=True), "scorers": json.dumps(dict(scorer_versions),
                                                                                         sort_keys=True)}


def sample_key(target_id: str, probe_id: str, repeat: int, components: Mapping[str, str]) -> str:
    """The stable key of one sample: "<probe id>#<repeat>@<digest>".

    Args:
        target_id: EvalTarget.id.
        probe_id: the probe.
        repeat: 0-based repeat index.
        components: `sample_components` of the sample.
    """
    ident = {"target": target_id, "probe": probe_id, "repeat": repeat, **components}
    text = json.dumps(ident, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return f"{probe_id}#{repeat}@{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def plan_signature(record: Mapping[str, Any]) -> str:
    """What a recorded sample was asked under, apart from who answered: the prompt, probe set,
    sampling and scorers (a record older than content identity: its probe set hash and sampling).
    Two targets' samples are comparable only with equal signatures.

    Args:
        record: a sample record.
    """
    prov = record.get("provenance") or {}
    comps = prov.get("components")
    if comps:
        data: Any = {k: v for k, v in comps.items() if k != "target identity"}
    else:
        data = {"probe set": record.get("probe_set_hash") or prov.get("probe_set_hash"),
                "sampling": prov.get("sampling")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


def engine_signature(record: Mapping[str, Any]) -> str:
    """What stood behind a recorded sample apart from its adapter: its target identity's parts
    without the adapter's (base weights, engine and version, settings in effect). A checkpoint is
    compared only with base samples made on the same engine ("" for a record older than identity).

    Args:
        record: a sample record.
    """
    parts = [list(p) for p in (record.get("provenance") or {}).get("identity_parts") or ()
             if not str(p[0]).startswith("adapter ")]
    if not parts:
        return ""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:24]


def set_aside(records: Iterable[Mapping[str, Any]], planned: Mapping[tuple[str, str, int], Mapping[str, str]],
              keys: set[str], parts: Sequence[tuple[str, str]] = ()) -> dict[str, int]:
    """Earlier samples of a target that a run does not reuse, counted by why: which component of
    their key changed ("target identity (base weights, setting n_ctx)", "prompt", "sampling", ...).

    Args:
        records: the target's recorded samples.
        planned: (probe set name, probe id, repeat) -> the planned sample's `sample_components`.
        keys: the planned samples' keys (a record with one of them is reused, not set aside).
        parts: the target's current `identity_parts` (to name what in its identity changed).
    """
    out: dict[str, int] = {}
    now = dict(parts)
    for rec in records:
        if rec.get("key") in keys or not rec.get("complete", True):
            continue
        prov = rec.get("provenance") or {}
        old = prov.get("components")
        comp = planned.get((str(rec.get("probe_set")), str(rec.get("probe_id")), int(rec.get("repeat") or 0)))
        if comp is None:
            why = ["probe not in this plan"]
        elif not old:
            why = ["recorded before content identity"]
        else:
            why = [name for name, value in comp.items() if old.get(name) != value]
            if "target identity" in why:
                was = dict(tuple(p) for p in prov.get("identity_parts") or ())
                changed = sorted(n for n in set(was) | set(now) if was.get(n) != now.get(n))
                if changed:
                    why[why.index("target identity")] = f"target identity ({', '.join(changed)})"
            why = why or ["key scheme"]
        reason = ", ".join(why)
        out[reason] = out.get(reason, 0) + 1
    return out


def current_samples(records: Sequence[dict[str, Any]], identity: str | None = None
                    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """A target's samples as it is now, and the earlier ones set aside, counted by why.

    Current: the newest sample of each (probe set, probe, repeat) made with one identity (the
    target's newest, or the one given), so a target evaluated again after a change is summarised,
    charted and rebuilt as it is now, never mixed with what it was. The rest are set aside, named by
    the component that changed (`set_aside`).

    Args:
        records: the target's sample records.
        identity: the identity to keep (None: the newest record's).
    """
    if not records:
        return [], {}
    ordered = sorted(records, key=lambda r: r.get("created_at") or 0.0)
    if identity is None:
        identity = (ordered[-1].get("provenance") or {}).get("identity")
    latest: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in ordered:
        if (r.get("provenance") or {}).get("identity") == identity:
            latest[(str(r.get("probe_set")), str(r.get("probe_id")), int(r.get("repeat") or 0))] = r
    keep = {id(r) for r in latest.values()}
    current = [r for r in records if id(r) in keep]  # in the given order: sums come out the same everywhere
    planned = {k: (r.get("provenance") or {}).get("components") or {} for k, r in latest.items()}
    newest = next((r for r in reversed(ordered) if (r.get("provenance") or {}).get("identity") == identity), None)
    parts = tuple(tuple(p) for p in ((newest or {}).get("provenance") or {}).get("identity_parts") or ())
    return current, set_aside(records, planned, {r["key"] for r in current}, parts)


@dataclass
class SampleResult:
    """One answered (or failed) probe and its scores, with full provenance."""

    key: str
    """The sample's stable key (`sample_key`): what a resumed run skips."""
    target: str
    """EvalTarget.id."""
    probe_set: str
    """The probe set's name."""
    probe_set_hash: str
    """The probe set's content hash (ProbeSet.hash)."""
    probe_id: str
    """The probe."""
    domain: str
    """The probe's domain."""
    category: str
    """The probe's category."""
    repeat: int
    """0-based repeat index."""
    prompt: str
    """The probe's prompt."""
    messages: list[dict[str, str]]
    """The chat sent to the model ({"role", "content"} each)."""
    answer: str | None
    """The model's answer (None: it could not be generated)."""
    finish_reason: str | None
    """Why the engine ended the answer ("stop", "length", ...)."""
    usage: dict[str, int]
    """Token counts ({"prompt_tokens", "completion_tokens"}; empty without an answer)."""
    latency_s: float
    """Wall time of the generation that gave the answer."""
    scores: dict[str, dict[str, Any]]
    """Scorer name -> its fields."""
    failures: dict[str, dict[str, Any]]
    """Scorer name (or "generate") -> {"error", "raw", ...}."""
    provenance: dict[str, Any]
    """Target, model, engine, adapter sha256, probe-set hash, sampling, scorer versions, judge."""
    judge_attempts: dict[str, int] = field(default_factory=dict)
    """Judge scorer -> how many calls its verdict took."""
    judge_latency_s: float = 0.0
    """Wall time of judging this answer (0.0: not judged)."""
    complete: bool = True
    """False when no answer could be generated (a resumed run tries such samples again)."""
    label: str = ""
    """EvalTarget.label."""
    iteration: int | None = None
    """EvalTarget.iteration."""
    run_id: str | None = None
    """EvalTarget.run_id."""
    created_at: float = field(default_factory=time.time)
    """When the sample was made (Unix seconds); wallclock point timestamps derive from it."""

    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict (what the ledger stores verbatim)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "SampleResult":
        """Rebuild a SampleResult from `to_record()` output.

        Args:
            record: the dict.
        """
        names = set(cls.__dataclass_fields__)
        missing = [k for k in ("key", "target", "probe_id") if not record.get(k)]
        if missing:
            raise ValueError(f"sample record lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in record.items() if k in names})


@runtime_checkable
class SampleStore(Protocol):
    """Where a run records samples and looks up what is already done (the checkpoints Ledger fits).

    The runner calls a synchronous `record_samples` from a worker thread (one call at a time per
    sample), so it must be thread-safe; an `async def record_samples` is awaited instead.
    """

    def sample_keys(self, target: str) -> set[str]:
        """Keys of the complete samples recorded for a target."""
        ...

    def record_samples(self, records: list[dict[str, Any]]) -> Any:
        """Store sample records (dicts from SampleResult.to_record())."""
        ...


class JsonlSampleStore:
    """A SampleStore in one JSONL file: one record per line, the last record of a key wins.

    Each record is written with a single write of a whole line and fsync'd, so a crash leaves at
    most an unterminated last line: loading counts it in `torn_lines` and ignores it, and the
    next write cuts it off (its sample was never recorded, so a resumed run redoes it).

    Args:
        path: the file (created with its directory on first write).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}
        self.torn_lines = 0
        self._valid_size = 0
        self._load()

    def __repr__(self) -> str:
        return f"JsonlSampleStore({str(self.path)!r}, {len(self._records)} samples)"

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # after the last newline: b"" unless the last write was torn
        self._valid_size = len(data) - len(tail)
        if tail:
            self.torn_lines += 1
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{self.path}:{n}: not a JSON sample record: {e}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
                raise ValueError(f"{self.path}:{n}: a sample record needs a string 'key'")
            self._records[rec["key"]] = rec

    def sample_keys(self, target: str) -> set[str]:
        """Keys of the complete samples recorded for a target.

        Args:
            target: EvalTarget.id.
        """
        with self._lock:
            return {k for k, r in self._records.items() if r.get("target") == target and r.get("complete", True)}

    def record_samples(self, records: list[dict[str, Any]]) -> int:
        """Append records; returns how many were written.

        Args:
            records: dicts with at least "key", "target" and "probe_id".
        """
        if not records:
            return 0
        lines = []
        for i, rec in enumerate(records):
            for f in ("key", "target", "probe_id"):
                if not isinstance(rec.get(f), str) or not rec.get(f):
                    raise ValueError(f"sample record {i}: field {f!r} must be a non-empty string")
            lines.append(json.dumps(rec, ensure_ascii=False, sort_keys=True))
        blob = ("\n".join(lines) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                if self.torn_lines and os.fstat(fd).st_size > self._valid_size:
                    os.ftruncate(fd, self._valid_size)  # drop the torn line
                os.write(fd, blob)
                # On the descriptor written through: checkpoints.fsync_file reopens by path, which
                # costs ~25 µs more per sample (measured) on the runner's resume record.
                os.fsync(fd)
            finally:
                os.close(fd)
            self.torn_lines = 0
            self._valid_size += len(blob)
            for rec in records:
                self._records[rec["key"]] = json.loads(json.dumps(rec))
        return len(records)

    def samples(self, target: str | None = None) -> list[dict[str, Any]]:
        """The stored records (of one target, or all), in insertion order.

        Args:
            target: EvalTarget.id, or None for every target.
        """
        with self._lock:
            return [r for r in self._records.values() if target is None or r.get("target") == target]


"""From sample records and their aggregates to InfluxDB points (the schema is evaluators.sinks).

Every point is derived from what the ledger recorded, so deriving it again gives the same point
(measurement, tags, timestamp): in iteration mode the timestamps come from the iteration, in
wallclock mode from the sample's recorded `created_at` (and a summary's from the target's last
sample), never from the time of the call.

A target's points are tagged with go-ml's naming (model tag, run id, label, iteration), derived
from its EvalTarget by `target_naming`; the ledger notes that naming once per target so owed
points and `evalcluster influx rebuild` name them the same way later.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Union

from evaluators._probes import ProbeSet
from evaluators._records import EvalTarget
from evaluators._stats import aggregate
from evaluators.sinks import (
    Point,
    PointContext,
    capability_judge,
    capability_scores,
    choice_score,
    content_scores,
    eval_progress,
    exact_match,
    heuristic_score,
    judge_scores,
    probe_score,
    score_summary,
    text_score,
    writable_tag,
)

if TYPE_CHECKING:
    from checkpoints import Checkpoint

_NOT_JUDGE = {"heuristic", "exact", "capability", "choice", "bpb"}
_NAMING_KEYS = ("target", "model", "run_id", "label", "iteration")

# A sample record as the ledger stores it (SampleResult.to_record()): JSON values.
Record = Mapping[str, Any]
# A target's InfluxDB naming as the ledger notes it: {"target", "model", "run_id", "label", "iteration"}.
Naming = dict[str, Union[str, int]]


def target_naming(target: EvalTarget) -> Naming:
    """How a target's points are tagged (go-ml's naming), as the ledger notes it.

    - model: the target's `model_tag` (a checkpoint's go-ml model tag), else its config model;
    - run_id: its run id; a base model is go-ml's run "<model>-base", a target without a run
      (an `evalcluster eval --adapter`) the run "<model>-eval";
    - label: its label ("base" for a base model; the id when it has none);
    - iteration: its training iteration (0 when it has none).

    Args:
        target: the target.
    """
    base = target.id.startswith("base:")
    return {
        "target": target.id,
        "model": target.model_tag or target.model,
        "run_id": target.run_id or f"{target.model}-{'base' if base else 'eval'}",
        "label": "base" if base else (target.label or target.id),
        "iteration": int(target.iteration or 0),
    }


def target_from_naming(naming: Mapping[str, Any]) -> EvalTarget:
    """The target whose `target_naming` is `naming` (what the ledger noted, read back).

    Args:
        naming: a `target_naming` mapping.

    Raises:
        ValueError: a key is missing.
    """
    missing = [k for k in _NAMING_KEYS if k not in naming]
    if missing:
        raise ValueError(f"target naming {dict(naming)!r} lacks {', '.join(missing)}")
    model = str(naming["model"])
    return EvalTarget(str(naming["target"]), model, label=str(naming["label"]), run_id=str(naming["run_id"]),
                      iteration=int(naming["iteration"]), model_tag=model)


def target_from_ledger(target: str, records: list[Record], checkpoint: "Checkpoint | None" = None,
                       source_model: str | None = None) -> EvalTarget:
    """A target re-derived from the ledger, for targets recorded before their naming was noted.

    Args:
        target: the target id.
        records: its sample records.
        checkpoint: its ledger Checkpoint, if it is one.
        source_model: the config model of the checkpoint's source (used when it has no model tag).
    """
    if checkpoint is not None:
        return EvalTarget.of_checkpoint(checkpoint, source_model or "")
    first = records[0] if records else {}
    model = (first.get("provenance") or {}).get("model") or target.split(":")[1 if ":" in target else 0]
    if target.startswith("base:"):
        return EvalTarget(target, model, label=model)  # named as EvalTarget.base names it
    return EvalTarget(target, model, label=first.get("label") or "", run_id=first.get("run_id") or None,
                      iteration=int(first.get("iteration") or 0))


def _context(target: EvalTarget, timestamps: str, wall_ns: int | None) -> PointContext:
    n = target_naming(target)
    # The names come from run directories on the sources: any name must make writable points.
    tags = (writable_tag(str(n["model"])), writable_tag(str(n["run_id"])), writable_tag(str(n["label"])),
            int(n["iteration"]))
    if wall_ns is None:
        return PointContext(*tags, timestamps=timestamps)  # type: ignore[arg-type]
    return PointContext(*tags, timestamps=timestamps, wall_ns=wall_ns)  # type: ignore[arg-type]


def record_wall_ns(record: Record) -> int:
    """The wall-clock time a sample was made, in ns (to the microsecond, so it is exact across JSON).

    Args:
        record: a SampleResult record.
    """
    t = record.get("created_at")
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise ValueError(f"sample {record.get('key')!r} has no created_at time ({t!r}); "
                         "wallclock timestamps are derived from it")
    return int(round(float(t) * 1_000_000)) * 1000


_KNOWN_SETS: dict[str, ProbeSet] = {}  # content hash -> a probe set this process evaluates with


def register_probe_sets(sets: Iterable[ProbeSet]) -> None:
    """Tell point derivation the probe sets in use. A sample names its set by the set's own name
    and content hash; only a built-in set can be found again by name, a user's file by its hash.

    Args:
        sets: the plan's probe sets.
    """
    for ps in sets:
        _KNOWN_SETS[ps.hash] = ps


@lru_cache(maxsize=64)
def _probe_set_ids(probe_set: str, probe_set_hash: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """The probe ids of a set in file order (go-ml's per-probe timestamp offsets depend on them),
    and the ids that have a capability pass rule."""
    from evaluators._probes import BUILTIN_SETS, load_probe_set

    ps = _KNOWN_SETS.get(probe_set_hash)
    if ps is None:
        if probe_set not in BUILTIN_SETS:
            raise ValueError(f"probe set {probe_set!r} (hash {probe_set_hash[:12]}) is not one this evaluation "
                             "plan loads: its points need the set's probe order (is the probe file in the config "
                             "the one the samples were taken with?)")
        ps = load_probe_set(probe_set)
        if ps.hash != probe_set_hash:
            raise ValueError(f"probe set {probe_set!r} changed since the sample was taken "
                             f"(hash {ps.hash[:12]} now, {probe_set_hash[:12]} in the sample)")
    return tuple(p.id for p in ps.probes), frozenset(p.id for p in ps.probes if p.pass_rule is not None)


def _probe_ids(probe_set: str, probe_set_hash: str) -> tuple[str, ...]:
    return _probe_set_ids(probe_set, probe_set_hash)[0]


def sample_points(record: Record, target: EvalTarget, timestamps: str = "iteration") -> list[Point]:
    """The points of one sample: heuristic, exact, capability pass, multiple-choice and bits per
    byte, judge verdicts.

    Args:
        record: a SampleResult record.
        target: its target (named by `target_naming`).
        timestamps: "iteration" (go-ml's deterministic timestamps) or "wallclock" (the sample's
            recorded `created_at`).
    """
    ctx = _context(target, timestamps, record_wall_ns(record) if timestamps == "wallclock" else None)
    scores: Mapping[str, Mapping[str, Any]] = record.get("scores") or {}
    ps, probe, repeat = record["probe_set"], record["probe_id"], int(record.get("repeat", 0))
    points: list[Point] = []
    if "heuristic" in scores:
        h = dict(scores["heuristic"])
        lek = h.pop("lek_score")
        points.append(heuristic_score(ctx, ps, probe, h, lek, repeat))
    if "exact" in scores:
        e = scores["exact"]
        points.append(exact_match(ctx, ps, probe, bool(e.get("correct")), bool(e.get("extracted")), repeat))
    if "capability" in scores and repeat == 0:
        ids = _probe_ids(ps, record["probe_set_hash"])
        points.append(probe_score(ctx, probe, bool(scores["capability"]["passed"]), list(ids)))
    if "choice" in scores:
        c = scores["choice"]
        points.append(choice_score(ctx, ps, probe, bool(c.get("acc")), bool(c.get("acc_norm")), repeat))
    if "bpb" in scores:
        points.append(text_score(ctx, ps, probe, float(scores["bpb"]["bits_per_byte"]), repeat))
    for scorer, dims in scores.items():
        if scorer in _NOT_JUDGE:
            continue
        numeric = {k: float(v) for k, v in dims.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scorer == "capability_judge" and repeat == 0:
            ids = _probe_ids(ps, record["probe_set_hash"])
            points.append(capability_judge(ctx, probe, record.get("category") or "", numeric.get("reasoning", 0.0),
                                           numeric.get("correctness", 0.0), numeric.get("clarity", 0.0), list(ids)))
        elif scorer == "content" and repeat == 0:
            ids = _probe_ids(ps, record["probe_set_hash"])
            points.extend(content_scores(ctx, probe, numeric, list(ids)))
        points.extend(judge_scores(ctx, ps, probe, scorer, numeric, repeat=repeat))
    return points


def _capability_outcome(r: Record) -> bool | None:
    """Passed, failed, or not a capability sample. A generation that failed for good counts as a
    failed probe on a probe with a pass rule, as go-ml counted it."""
    if int(r.get("repeat", 0)) != 0:
        return None
    scores = r.get("scores") or {}
    if "capability" in scores:
        return bool(scores["capability"]["passed"])
    if r.get("complete", True) or "capability" not in ((r.get("provenance") or {}).get("scorer_versions") or {}):
        return None
    return False if r["probe_id"] in _probe_set_ids(r["probe_set"], r["probe_set_hash"])[1] else None


def summary_points(records: Iterable[Record], target: EvalTarget, timestamps: str = "iteration") -> list[Point]:
    """Per-target summaries: go-ml's capability_score (overall and per category), a score_summary
    per field (mean, n, failures), and the final progress point. No records, no points.

    Capability totals count every capability probe, passed or not, including one whose answer
    could not be generated (go-ml counted a generation error as a failed probe).

    Args:
        records: every sample record of the target.
        target: the target (named by `target_naming`).
        timestamps: as for `sample_points`; in wallclock mode the time is the target's last
            recorded sample.
    """
    records = list(records)
    if not records:
        return []
    wall = max(record_wall_ns(r) for r in records) if timestamps == "wallclock" else None
    ctx = _context(target, timestamps, wall)
    points: list[Point] = []
    by_set: dict[str, list[Record]] = {}
    for r in records:
        by_set.setdefault(r["probe_set"], []).append(r)
    failed = sum(1 for r in records if not r.get("complete", True))
    for ps, rs in sorted(by_set.items()):
        cats: dict[str, tuple[int, int]] = {}
        for r in rs:
            passed = _capability_outcome(r)
            if passed is None:
                continue
            cat = r.get("category") or "uncategorised"
            c, t = cats.get(cat, (0, 0))
            cats[cat] = (c + passed, t + 1)
        if cats:
            points.extend(capability_scores(ctx, cats))
        for group in aggregate(rs, by=("probe_set",)):
            for name, fs in group.fields.items():
                if fs.mean is None or "." not in name:
                    continue
                scorer, metric = name.split(".", 1)
                points.append(score_summary(ctx, ps, scorer, metric, fs.mean, fs.n, fs.failures))
    points.append(eval_progress(ctx, done=len(records), total=len(records), failed=failed))
    return points

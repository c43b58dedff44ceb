"""The InfluxDB schema: go-ml's four measurements, unchanged for its dashboards, plus new ones.

Builders take plain values (no dependency on the scorers' classes) and return `Point`s.

Timestamps. In `iteration` mode (the default, go-ml's) a point's time is
`EPOCH_BASE + iteration * 1000 + offset` seconds, so a checkpoint's points sort by iteration and
a point written twice (a replay, a re-score) is the same point. The offsets are go-ml's:
overall capability 0, categories 1.. (sorted), probe_score 100 + the probe's index among the
sorted probe ids, capability_judge the probe's index in probe-set order, content_score
probe index x 10 + dimension index. go-ml's streaming path used 100 + a running count for
probe_score while its batch path used the sorted index, so one probe got two timestamps (two
points); here there is one rule, computed from the probe id and the probe set, whatever the
write path. In `wallclock` mode the time is the context's wall clock (taken when the
`PointContext` is made, i.e. once per checkpoint evaluation) plus the offset in milliseconds,
so replays stay idempotent there too. `iteration` is always a field. Model answers are never
written to InfluxDB: no builder takes one (they live in the ledger).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

from evaluators.sinks._lineprotocol import Point

EPOCH_BASE = 1739577600  # go-ml's EpochBase: 2025-02-15T00:00:00Z

CAPABILITY_SCORE = "capability_score"
PROBE_SCORE = "probe_score"
CAPABILITY_JUDGE = "capability_judge"
CONTENT_SCORE = "content_score"
HEURISTIC_SCORE = "heuristic_score"
EXACT_MATCH = "exact_match"
JUDGE_SCORE = "judge_score"
SCORE_SUMMARY = "score_summary"
CHOICE_SCORE = "choice_score"
TEXT_SCORE = "text_score"
EVAL_PROGRESS = "eval_progress"

# go-ml's content rubric, in its order (the order sets the timestamp offset).
CONTENT_DIMENSIONS = (
    "ccp_compliance", "truth_telling", "engagement", "axiom_integration", "sovereignty_reasoning", "emotional_register",
)
HEURISTIC_SUBSCORES = (
    "compliance_markers", "formulaic_preamble", "first_person", "creative_form",
    "engagement_depth", "emotional_register", "degeneration", "empty_broken",
)

_BASE_TAGS = ("model", "run_id", "label")

# measurement -> (tag keys, {field: type}); documents the schema and is checked by the tests.
SCHEMA: dict[str, tuple[tuple[str, ...], dict[str, type]]] = {
    CAPABILITY_SCORE: (_BASE_TAGS + ("category",), {"accuracy": float, "correct": int, "total": int, "iteration": int}),
    PROBE_SCORE: (_BASE_TAGS + ("probe_id",), {"passed": int, "iteration": int}),
    CAPABILITY_JUDGE: (
        _BASE_TAGS + ("probe_id", "category"),
        {"reasoning": float, "correctness": float, "clarity": float, "avg": float, "iteration": int},
    ),
    CONTENT_SCORE: (_BASE_TAGS + ("dimension", "has_kernel", "probe_id"), {"score": float, "iteration": int}),
    HEURISTIC_SCORE: (
        _BASE_TAGS + ("probe_set", "probe_id", "repeat"),
        {**{k: int for k in HEURISTIC_SUBSCORES}, "lek_score": float, "iteration": int},
    ),
    EXACT_MATCH: (_BASE_TAGS + ("probe_set", "probe_id", "repeat"), {"correct": int, "extracted": int, "iteration": int}),
    JUDGE_SCORE: (
        _BASE_TAGS + ("probe_set", "probe_id", "repeat", "rubric", "dimension", "judge"),
        {"score": float, "iteration": int},
    ),
    CHOICE_SCORE: (_BASE_TAGS + ("probe_set", "probe_id", "repeat"), {"acc": int, "acc_norm": int, "iteration": int}),
    TEXT_SCORE: (_BASE_TAGS + ("probe_set", "probe_id", "repeat"), {"bits_per_byte": float, "iteration": int}),
    SCORE_SUMMARY: (
        _BASE_TAGS + ("probe_set", "scorer", "metric"),
        {"mean": float, "n": int, "failed": int, "iteration": int},
    ),
    EVAL_PROGRESS: (_BASE_TAGS + ("probe_set",), {"done": int, "total": int, "failed": int, "iteration": int}),
}

# Offsets (seconds in iteration mode) of the new measurements; each has a per-item tag, so one
# offset per measurement keeps every point distinct.
_OFFSET_HEURISTIC = 200
_OFFSET_EXACT = 300
_OFFSET_JUDGE = 400
_OFFSET_SUMMARY = 500
_OFFSET_CHOICE = 600
_OFFSET_TEXT = 700
_OFFSET_PROGRESS = 900
_MAX_OFFSET = 999


@dataclass(frozen=True)
class PointContext:
    """Which checkpoint a point belongs to, and how its timestamps are made."""

    model: str
    """The model tag (go-ml's `model` tag)."""
    run_id: str
    """The training run id."""
    label: str
    """The checkpoint label, e.g. "G27 @0001000"."""
    iteration: int
    """The checkpoint's training iteration."""
    timestamps: Literal["iteration", "wallclock"] = "iteration"
    """"iteration" (go-ml's deterministic times, the default) or "wallclock"."""
    wall_ns: int = field(default_factory=time.time_ns)
    """The wall clock used in wallclock mode (default: now, when the context is made)."""

    def __post_init__(self) -> None:
        if isinstance(self.iteration, bool) or not isinstance(self.iteration, int) or self.iteration < 0:
            raise ValueError(f"PointContext.iteration must be an integer >= 0, got {self.iteration!r}")
        if self.timestamps not in ("iteration", "wallclock"):
            raise ValueError(f"PointContext.timestamps must be 'iteration' or 'wallclock', got {self.timestamps!r}")
        for name in _BASE_TAGS:
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"PointContext.{name} must be a string, got {getattr(self, name)!r}")

    def time_ns(self, offset: int) -> int:
        """The timestamp of a point at `offset` (0..999) within this checkpoint.

        Args:
            offset: go-ml's per-point offset (seconds in iteration mode, milliseconds in wallclock mode).
        """
        offset = min(int(offset), _MAX_OFFSET)  # stay inside this iteration's 1000 s
        if self.timestamps == "wallclock":
            return self.wall_ns + offset * 1_000_000
        return (EPOCH_BASE + self.iteration * 1000 + offset) * 1_000_000_000

    def tags(self, **extra: str) -> dict[str, str]:
        """The base tags (model, run_id, label) plus `extra`."""
        return {"model": self.model, "run_id": self.run_id, "label": self.label, **extra}


def _pct1(correct: int, total: int) -> float:
    # go-ml prints "%.1f" of correct/total*100 (0 when total is 0).
    return float(f"{(correct / total * 100) if total else 0.0:.1f}")


def _r2(x: float) -> float:
    return float(f"{float(x):.2f}")


def _index(probe_id: str, probe_ids: Sequence[str], what: str) -> int:
    try:
        return list(probe_ids).index(probe_id)
    except ValueError:
        raise ValueError(f"{what}: probe id {probe_id!r} is not in the probe set given ({len(probe_ids)} ids)") from None


# --------------------------------------------------------------------------- go-ml's measurements


def capability_scores(ctx: PointContext, by_category: Mapping[str, tuple[int, int]]) -> list[Point]:
    """`capability_score`: the overall accuracy (category "overall") and one point per category.

    Args:
        ctx: the checkpoint.
        by_category: category -> (correct, total). The overall point sums them.

    Returns:
        [overall, *categories sorted by name]; accuracy in percent, 1 decimal, as go-ml writes it.
    """
    correct = sum(c for c, _ in by_category.values())
    total = sum(t for _, t in by_category.values())
    pts = [_capability_point(ctx, "overall", correct, total, 0)]
    for i, cat in enumerate(sorted(by_category)):
        c, t = by_category[cat]
        pts.append(_capability_point(ctx, cat, c, t, i + 1))
    return pts


def _capability_point(ctx: PointContext, category: str, correct: int, total: int, offset: int) -> Point:
    if not 0 <= correct <= total:
        raise ValueError(f"capability_score {category!r}: need 0 <= correct <= total, got {correct}/{total}")
    return Point(
        CAPABILITY_SCORE,
        ctx.tags(category=category),
        {"accuracy": _pct1(correct, total), "correct": int(correct), "total": int(total), "iteration": ctx.iteration},
        ctx.time_ns(offset),
    )


def probe_score(ctx: PointContext, probe_id: str, passed: bool, probe_ids: Sequence[str]) -> Point:
    """`probe_score`: one capability probe passed (1) or not (0).

    Args:
        ctx: the checkpoint.
        probe_id: the probe.
        passed: whether its check passed.
        probe_ids: every probe id of the set (the offset is 100 + the index among them sorted), so
            the streaming and the batch write paths give the same timestamp.
    """
    offset = 100 + _index(probe_id, sorted(probe_ids), "probe_score")
    return Point(
        PROBE_SCORE, ctx.tags(probe_id=probe_id), {"passed": int(bool(passed)), "iteration": ctx.iteration}, ctx.time_ns(offset)
    )


def probe_scores(ctx: PointContext, passed: Mapping[str, bool]) -> list[Point]:
    """`probe_score` for every probe of a set at once (same points as `probe_score` one by one).

    Args:
        ctx: the checkpoint.
        passed: probe id -> passed.
    """
    ids = sorted(passed)
    return [probe_score(ctx, pid, passed[pid], ids) for pid in ids]


def capability_judge(
    ctx: PointContext,
    probe_id: str,
    category: str,
    reasoning: float,
    correctness: float,
    clarity: float,
    probe_ids: Sequence[str],
) -> Point:
    """`capability_judge`: the judge's three 0-10 scores for one probe, and their mean (`avg`).

    Args:
        ctx: the checkpoint.
        probe_id: the probe.
        category: the probe's category.
        reasoning: judge score.
        correctness: judge score.
        clarity: judge score.
        probe_ids: the probe set in its order (the offset is the probe's index, as in go-ml).
    """
    offset = _index(probe_id, probe_ids, "capability_judge")
    r, c, cl = float(reasoning), float(correctness), float(clarity)
    return Point(
        CAPABILITY_JUDGE,
        ctx.tags(probe_id=probe_id, category=category),
        {"reasoning": _r2(r), "correctness": _r2(c), "clarity": _r2(cl), "avg": _r2((r + c + cl) / 3.0),
         "iteration": ctx.iteration},
        ctx.time_ns(offset),
    )


def content_run_id(run_id: str) -> str:
    """go-ml's run id for content scores: "-capability-" replaced by "-content-".

    Args:
        run_id: the capability run id.
    """
    return run_id.replace("-capability-", "-content-")


def content_scores(
    ctx: PointContext,
    probe_id: str,
    scores: Mapping[str, float],
    probe_ids: Sequence[str],
    has_kernel: bool = True,
) -> list[Point]:
    """`content_score`: one point per content dimension of one content probe.

    go-ml wrote these without a probe tag (probes told apart only by timestamp); a `probe_id` tag
    is added here, which go-ml's dashboards ignore. The run id is go-ml's content run id.

    Args:
        ctx: the checkpoint.
        probe_id: the content probe.
        scores: dimension (one of CONTENT_DIMENSIONS) -> 1..5 judge score.
        probe_ids: the content probe set in its order (offset = index x 10 + dimension index).
        has_kernel: go-ml's `has_kernel` tag (its agent always wrote true).
    """
    i = _index(probe_id, probe_ids, "content_score")
    pts = []
    for dim, score in scores.items():
        if dim not in CONTENT_DIMENSIONS:
            raise ValueError(f"content_score: unknown dimension {dim!r} (known: {', '.join(CONTENT_DIMENSIONS)})")
        j = CONTENT_DIMENSIONS.index(dim)
        pts.append(Point(
            CONTENT_SCORE,
            {**ctx.tags(dimension=dim, has_kernel="true" if has_kernel else "false", probe_id=probe_id),
             "run_id": content_run_id(ctx.run_id)},
            {"score": float(score), "iteration": ctx.iteration},
            ctx.time_ns(i * 10 + j),
        ))
    return pts


# --------------------------------------------------------------------------- new measurements


def heuristic_score(
    ctx: PointContext,
    probe_set: str,
    probe_id: str,
    subscores: Mapping[str, int],
    lek_score: float,
    repeat: int = 0,
) -> Point:
    """`heuristic_score`: the heuristic sub-scores and the LEK score of one answer.

    Args:
        ctx: the checkpoint.
        probe_set: the probe set's name.
        probe_id: the probe.
        subscores: sub-score name (HEURISTIC_SUBSCORES) -> integer value.
        lek_score: the normalised LEK score, 0..1.
        repeat: which repeat of the probe (0 for the first).
    """
    unknown = set(subscores) - set(HEURISTIC_SUBSCORES)
    if unknown:
        raise ValueError(f"heuristic_score: unknown sub-scores {sorted(unknown)} (known: {', '.join(HEURISTIC_SUBSCORES)})")
    fields: dict[str, float | int] = {k: int(v) for k, v in subscores.items()}
    fields["lek_score"] = float(lek_score)
    fields["iteration"] = ctx.iteration
    return Point(
        HEURISTIC_SCORE, ctx.tags(probe_set=probe_set, probe_id=probe_id, repeat=str(int(repeat))), fields,
        ctx.time_ns(_OFFSET_HEURISTIC),
    )


def exact_match(
    ctx: PointContext, probe_set: str, probe_id: str, correct: bool, extracted: bool = True, repeat: int = 0
) -> Point:
    """`exact_match`: whether an exact-match item (e.g. GSM8K) was answered correctly.

    Args:
        ctx: the checkpoint.
        probe_set: the probe set's name.
        probe_id: the item.
        correct: the extracted answer matched the reference.
        extracted: an answer could be extracted at all.
        repeat: which repeat of the item.
    """
    return Point(
        EXACT_MATCH, ctx.tags(probe_set=probe_set, probe_id=probe_id, repeat=str(int(repeat))),
        {"correct": int(bool(correct)), "extracted": int(bool(extracted)), "iteration": ctx.iteration},
        ctx.time_ns(_OFFSET_EXACT),
    )


def choice_score(ctx: PointContext, probe_set: str, probe_id: str, acc: bool, acc_norm: bool, repeat: int = 0) -> Point:
    """`choice_score`: whether a multiple-choice item's answer had the highest loglikelihood
    (`acc`), and the highest per byte (`acc_norm`).

    Args:
        ctx: the checkpoint.
        probe_set: the probe set's name.
        probe_id: the item.
        acc: chosen by summed logprob.
        acc_norm: chosen by logprob per UTF-8 byte.
        repeat: which repeat of the item.
    """
    return Point(
        CHOICE_SCORE, ctx.tags(probe_set=probe_set, probe_id=probe_id, repeat=str(int(repeat))),
        {"acc": int(bool(acc)), "acc_norm": int(bool(acc_norm)), "iteration": ctx.iteration},
        ctx.time_ns(_OFFSET_CHOICE),
    )


def text_score(ctx: PointContext, probe_set: str, probe_id: str, bits_per_byte: float, repeat: int = 0) -> Point:
    """`text_score`: a text's bits per byte under the model (lower: the model predicts it better).

    Args:
        ctx: the checkpoint.
        probe_set: the probe set's name.
        probe_id: the text.
        bits_per_byte: -loglikelihood / ln 2 / UTF-8 bytes.
        repeat: which repeat of the text.
    """
    return Point(
        TEXT_SCORE, ctx.tags(probe_set=probe_set, probe_id=probe_id, repeat=str(int(repeat))),
        {"bits_per_byte": float(bits_per_byte), "iteration": ctx.iteration}, ctx.time_ns(_OFFSET_TEXT),
    )


def judge_scores(
    ctx: PointContext,
    probe_set: str,
    probe_id: str,
    rubric: str,
    scores: Mapping[str, float],
    judge: str = "",
    repeat: int = 0,
) -> list[Point]:
    """`judge_score`: one point per dimension of any judge rubric (semantic, truthfulqa, ...).

    Args:
        ctx: the checkpoint.
        probe_set: the probe set's name.
        probe_id: the item.
        rubric: the rubric's name, e.g. "semantic".
        scores: dimension -> score.
        judge: the judge model's name (tag; empty leaves it out).
        repeat: which repeat of the item.
    """
    return [
        Point(
            JUDGE_SCORE,
            ctx.tags(probe_set=probe_set, probe_id=probe_id, repeat=str(int(repeat)), rubric=rubric, dimension=dim,
                     judge=judge),
            {"score": float(v), "iteration": ctx.iteration},
            ctx.time_ns(_OFFSET_JUDGE),
        )
        for dim, v in scores.items()
    ]


def score_summary(
    ctx: PointContext, probe_set: str, scorer: str, metric: str, mean: float | None, n: int, failed: int = 0
) -> Point:
    """`score_summary`: one aggregate per checkpoint (e.g. mean LEK), with its count and failures.

    Args:
        ctx: the checkpoint.
        probe_set: the probe set's name.
        scorer: the scorer and version, e.g. "lek-1".
        metric: the metric, e.g. "lek_score" or a judge dimension.
        mean: the mean over the `n` scored items (None when n is 0: the field is left out).
        n: how many items were scored.
        failed: how many items could not be scored (reported beside the mean, never mixed in).
    """
    fields: dict[str, float | int] = {"n": int(n), "failed": int(failed), "iteration": ctx.iteration}
    if mean is not None:
        fields["mean"] = float(mean)
    return Point(
        SCORE_SUMMARY, ctx.tags(probe_set=probe_set, scorer=scorer, metric=metric), fields, ctx.time_ns(_OFFSET_SUMMARY)
    )


def eval_progress(ctx: PointContext, done: int, total: int, failed: int = 0, probe_set: str = "") -> Point:
    """`eval_progress`: how far the evaluation of a checkpoint is (the latest write wins).

    Args:
        ctx: the checkpoint.
        done: samples finished.
        total: samples planned.
        failed: samples that failed.
        probe_set: the probe set (empty: the whole checkpoint).
    """
    return Point(
        EVAL_PROGRESS, ctx.tags(probe_set=probe_set),
        {"done": int(done), "total": int(total), "failed": int(failed), "iteration": ctx.iteration},
        ctx.time_ns(_OFFSET_PROGRESS),
    )

"""The schema: go-ml's measurements point for point, deterministic timestamps, the new measurements.

go-ml's lines are rebuilt here from its format strings (inventory §6.2; agent_influx.go), then both
sides are parsed and compared as points.
"""

from __future__ import annotations

import pytest

from evaluators.sinks import (
    EPOCH_BASE,
    SCHEMA,
    Point,
    PointContext,
    capability_judge,
    capability_scores,
    content_run_id,
    content_scores,
    eval_progress,
    exact_match,
    heuristic_score,
    judge_scores,
    parse_line,
    probe_score,
    probe_scores,
    score_summary,
    to_line,
)

CTX = PointContext(model="gemma-3-1b", run_id="lek-capability-G27", label="G27 @0001000", iteration=1000)
S = 1_000_000_000


def _esc(v: str) -> str:  # go-ml's EscapeLp: commas, equals signs, spaces in tag values
    return v.replace(",", r"\,").replace("=", r"\=").replace(" ", r"\ ")


def _goml_base(ctx: PointContext) -> str:
    return f"model={_esc(ctx.model)},run_id={_esc(ctx.run_id)},label={_esc(ctx.label)}"


def _ts(iteration: int, offset: int) -> int:
    return (EPOCH_BASE + iteration * 1000 + offset) * S


def test_capability_score_matches_go_ml():
    cats = {"math": (3, 4), "logic": (1, 3), "code": (0, 0)}
    ours = capability_scores(CTX, cats)
    b = _goml_base(CTX)
    goml = [
        f"capability_score,{b},category=overall accuracy={4 / 7 * 100:.1f},correct=4i,total=7i,iteration=1000i {_ts(1000, 0)}",
        f"capability_score,{b},category=code accuracy={0.0:.1f},correct=0i,total=0i,iteration=1000i {_ts(1000, 1)}",
        f"capability_score,{b},category=logic accuracy={1 / 3 * 100:.1f},correct=1i,total=3i,iteration=1000i {_ts(1000, 2)}",
        f"capability_score,{b},category=math accuracy={3 / 4 * 100:.1f},correct=3i,total=4i,iteration=1000i {_ts(1000, 3)}",
    ]
    assert [parse_line(to_line(p)) for p in ours] == [parse_line(g) for g in goml]
    assert ours[0].fields["accuracy"] == 57.1 and isinstance(ours[0].fields["accuracy"], float)


def test_probe_score_one_timestamp_whatever_the_write_path():
    ids = ["p03", "p01", "p02"]
    batch = probe_scores(CTX, {"p01": True, "p02": False, "p03": True})
    streamed = [probe_score(CTX, pid, pid != "p02", ids) for pid in ids]  # set order, as a stream sees them
    assert {p.identity(): p for p in batch} == {p.identity(): p for p in streamed}
    # go-ml's batch path: offset 100 + index over sorted ids (its streaming path used 101.. instead).
    b = _goml_base(CTX)
    assert parse_line(to_line(batch[0])) == parse_line(
        f"probe_score,{b},probe_id=p01 passed=1i,iteration=1000i {_ts(1000, 100)}"
    )
    assert [p.time_ns for p in batch] == [_ts(1000, 100), _ts(1000, 101), _ts(1000, 102)]


def test_capability_judge_matches_go_ml():
    ids = ["q1", "q2"]
    p = capability_judge(CTX, "q2", "math", 7.126, 8, 6.5, ids)
    b = _goml_base(CTX)
    avg = (7.126 + 8 + 6.5) / 3
    goml = (f"capability_judge,{b},probe_id=q2,category=math reasoning={7.126:.2f},correctness={8.0:.2f},"
            f"clarity={6.5:.2f},avg={avg:.2f},iteration=1000i {_ts(1000, 1)}")
    assert parse_line(to_line(p)) == parse_line(goml)


def test_content_score_matches_go_ml_plus_a_probe_tag():
    ids = ["taiwan", "tiananmen"]
    scores = {"ccp_compliance": 4, "truth_telling": 5, "emotional_register": 2}
    pts = content_scores(CTX, "tiananmen", scores, ids)
    run = content_run_id(CTX.run_id)
    assert run == "lek-content-G27"
    b = f"model={_esc(CTX.model)},run_id={run},label={_esc(CTX.label)}"
    goml = {
        "ccp_compliance": f"content_score,{b},dimension=ccp_compliance,has_kernel=true score=4,iteration=1000i {_ts(1000, 10)}",
        "truth_telling": f"content_score,{b},dimension=truth_telling,has_kernel=true score=5,iteration=1000i {_ts(1000, 11)}",
        "emotional_register":
            f"content_score,{b},dimension=emotional_register,has_kernel=true score=2,iteration=1000i {_ts(1000, 15)}",
    }
    for p in pts:
        ours = parse_line(to_line(p))
        assert ours.tags.pop("probe_id") == "tiananmen"
        assert ours == parse_line(goml[p.tags["dimension"]])
    with pytest.raises(ValueError, match="unknown dimension 'vibes'"):
        content_scores(CTX, "taiwan", {"vibes": 3}, ids)


def test_every_builder_follows_SCHEMA_and_writes_no_text():
    ids = ["a", "b"]
    pts: list[Point] = [
        *capability_scores(CTX, {"x": (1, 2)}),
        probe_score(CTX, "a", True, ids),
        capability_judge(CTX, "a", "x", 1, 2, 3, ids),
        *content_scores(CTX, "a", {"engagement": 3}, ids),
        heuristic_score(CTX, "capability", "a", {"compliance_markers": 2, "degeneration": 0}, 0.42, repeat=1),
        exact_match(CTX, "gsm8k", "q7", True),
        *judge_scores(CTX, "truthfulqa", "q1", "truthfulqa", {"truthfulness": 4, "informativeness": 3}, judge="smol"),
        score_summary(CTX, "capability", "lek-1", "lek_score", 0.4, n=22, failed=1),
        eval_progress(CTX, done=10, total=23, failed=1, probe_set="capability"),
    ]
    for p in pts:
        tag_keys, field_types = SCHEMA[p.measurement]
        assert set(p.tags) <= set(tag_keys), p
        assert {"model", "run_id", "label"} <= set(p.tags)
        for k, v in p.fields.items():
            assert type(v) is field_types[k], (p.measurement, k, v)
            assert not isinstance(v, str)  # model answers live in the ledger, never in InfluxDB
        assert p.fields["iteration"] == 1000
        assert _ts(1000, 0) <= p.time_ns < _ts(1001, 0)  # inside its iteration's 1000 s
        to_line(p)
    # New per-item measurements: one point per (item, repeat, dimension) -> distinct identities.
    assert len({p.identity() for p in pts}) == len(pts)


def test_summary_without_items_has_no_mean():
    p = score_summary(CTX, "capability", "lek-1", "lek_score", None, n=0, failed=3)
    assert "mean" not in p.fields and p.fields["failed"] == 3


def test_wallclock_mode():
    ctx = PointContext("m", "r", "l", 5, timestamps="wallclock", wall_ns=1_800_000_000_000_000_000)
    pts = capability_scores(ctx, {"a": (1, 1)})
    assert [p.time_ns for p in pts] == [1_800_000_000_000_000_000, 1_800_000_000_001_000_000]
    assert pts[0].fields["iteration"] == 5
    # The clock is taken once per context: building the same points again gives the same points.
    assert capability_scores(ctx, {"a": (1, 1)}) == pts


def test_iteration_mode_is_deterministic_and_ordered_by_iteration():
    a = capability_scores(PointContext("m", "r", "l", 7), {"x": (1, 2)})
    b = capability_scores(PointContext("m", "r", "l", 7), {"x": (1, 2)})
    c = capability_scores(PointContext("m", "r", "l", 8), {"x": (1, 2)})
    assert a == b
    assert max(p.time_ns for p in a) < min(p.time_ns for p in c)


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_bad_context(bad):
    with pytest.raises(ValueError, match="iteration must be an integer >= 0"):
        PointContext("m", "r", "l", bad)


def test_probe_not_in_set_is_a_clear_error():
    with pytest.raises(ValueError, match="probe id 'zz' is not in the probe set"):
        probe_score(CTX, "zz", True, ["a", "b"])

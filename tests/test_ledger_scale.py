"""The ledger as runs grow: the queries `status`, `report` and a resumed run make go through
indexes (SQLite's own query plan says so), and the per-target score sums the ledger keeps equal
what evaluators computes from the samples, through inserts, replacements and deletions."""

from __future__ import annotations

import sqlite3

import pytest

from checkpoints import Checkpoint, Ledger
from evaluators import aggregate


def record(key: str, target: str, passed: bool | None, lek: float | None, complete: bool = True) -> dict:
    scores: dict = {}
    if passed is not None:
        scores["capability"] = {"passed": passed, "reason": "text, not a score"}
    if lek is not None:
        scores["heuristic"] = {"lek_score": lek, "tokens": 7}
    return {"key": key, "target": target, "probe_id": key.split("#")[0], "scores": scores, "complete": complete,
            "failures": {}}


def expected(records: list[dict]) -> dict[str, dict[str, tuple[float, int, bool]]]:
    out: dict = {}
    for g in aggregate(records, by=("target",)):
        out[g.group["target"]] = {f: (fs.mean, fs.n, fs.kind == "rate") for f, fs in g.fields.items() if fs.n}
    return out


def same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for t in want:
        assert got[t].keys() == want[t].keys(), t
        for f, (mean, n, rate) in want[t].items():
            assert got[t][f][1:] == (n, rate), (t, f)
            assert got[t][f][0] == pytest.approx(mean, abs=1e-12), (t, f)


def test_field_sums_follow_inserts_replacements_and_deletes(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        recs = {f"p{i}#0@a": record(f"p{i}#0@a", "ck-a", i % 3 == 0, i / 7) for i in range(20)}
        recs |= {f"p{i}#0@b": record(f"p{i}#0@b", "base:m", i % 2 == 0, None) for i in range(9)}
        ledger.record_samples(list(recs.values()))
        same(ledger.field_means(), expected(list(recs.values())))
        # Replaced samples (a resumed run records a key again): the old values leave the sums.
        for k in ("p3#0@a", "p4#0@a"):
            recs[k] = record(k, "ck-a", False, 0.25)
        recs["p5#0@a"] = record("p5#0@a", "ck-a", None, 2.0)  # a field it no longer has
        recs["p6#0@a"] = record("p6#0@a", "ck-b", True, 1.0)  # moved to another target
        ledger.record_samples([recs[k] for k in ("p3#0@a", "p4#0@a", "p5#0@a", "p6#0@a")])
        same(ledger.field_means(), expected(list(recs.values())))
        assert ledger.field_means(["ck-b"]).keys() == {"ck-b"}
        with ledger._lock:
            ledger._db.execute("DELETE FROM samples WHERE key = 'p7#0@a'")
        del recs["p7#0@a"]
        same(ledger.field_means(), expected(list(recs.values())))


def test_a_ledger_made_before_the_sums_gets_them_when_opened(tmp_path):
    path = tmp_path / "old.sqlite"
    recs = [record(f"p{i}#0@x", "ck-x", i % 2 == 1, float(i)) for i in range(10)]
    with Ledger(path) as ledger:
        ledger.record_samples(recs)
    db = sqlite3.connect(path)  # as an older version left it: no sums, no triggers
    for name in ("samples_fields_add", "samples_fields_drop", "samples_fields_replace"):
        db.execute(f"DROP TRIGGER {name}")
    db.execute("DROP TABLE target_fields")
    db.commit()
    db.close()
    with Ledger(path, readonly=True) as ro:
        assert ro.field_means() == {}  # read-only: nothing to read the sums from, and no error
    with Ledger(path) as ledger:
        same(ledger.field_means(), expected(recs))


def plan(ledger: Ledger, sql: str, args: tuple = ()) -> str:
    with ledger._lock:
        rows = ledger._db.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall()
    return " | ".join(r[3] for r in rows)


def test_the_queries_that_grow_with_a_run_use_indexes(tmp_path):
    """What status, report and resume ask: never a scan of the samples table. (Ledger methods are
    checked by the SQL they run; the plan is SQLite's own.)"""
    with Ledger(tmp_path / "l.sqlite") as ledger:
        ledger.upsert(Checkpoint(source="s", run="adapters-x", iteration=100, path="/b/adapters-x/0000100_adapters.safetensors",
                                 dirname="adapters-x", label="X @0000100", run_id="x", model_tag="m", layout="mlx",
                                 size=1, mtime=1.0, sha256="0" * 64, config_path=None))
        ledger.record_samples([record("p1#0@k", "ck", True, 0.5)])
        traced: list[str] = []
        with ledger._lock:
            ledger._db.set_trace_callback(traced.append)
        ledger.sample_keys("ck")
        ledger.samples("ck")
        ledger.field_means(["ck"])
        ledger.run_states()
        ledger.list(run="adapters-x")
        with ledger._lock:
            ledger._db.set_trace_callback(None)
        selects = [q for q in traced if q.lstrip().upper().startswith("SELECT")]
        assert len(selects) == 5, traced
        for q in selects:
            p = plan(ledger, q)
            assert "SCAN samples" not in p, (q, p)
            assert "SCAN target_fields" not in p, (q, p)
            assert "USING" in p, (q, p)  # an index (or the primary key) answers it
        assert "samples_target" in plan(ledger, selects[0])
        assert "checkpoints_run_state" in plan(ledger, selects[3])
        # The sample write: a primary-key upsert, and the sums' trigger a primary-key upsert too.
        assert "SCAN" not in plan(ledger, "SELECT n FROM target_fields WHERE target = ? AND field = ?", ("ck", "f"))


def test_a_targets_version_changes_with_every_write_to_its_samples(tmp_path):
    """What the report keeps is kept under these versions: any change to a target's samples must
    change its version, and no other target's."""
    path = tmp_path / "l.sqlite"
    with Ledger(path) as led:
        assert led.target_versions() == {}
        led.record_samples([record("p1#0@t1", "t1", True, 1.0), record("p1#0@t2", "t2", False, 2.0)])
        v1 = led.target_versions()
        assert set(v1) == {"t1", "t2"}
        led.record_samples([record("p1#0@t1", "t1", False, 1.0)])  # the same sample, answered again
        v2 = led.target_versions()
        assert v2["t1"] != v1["t1"] and v2["t2"] == v1["t2"]
        led._db.execute("DELETE FROM samples WHERE target = 't2'")
        v3 = led.target_versions()
        assert v3["t2"] != v2["t2"] and v3["t1"] == v2["t1"]
        assert led.target_versions(["t1"]) == {"t1": v3["t1"]}
    path.unlink()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"l.sqlite{suffix}").unlink(missing_ok=True)
    with Ledger(path) as led:  # a ledger made anew with the same samples: versions unlike the old ones
        led.record_samples([record("p1#0@t1", "t1", False, 1.0)])
        assert led.target_versions()["t1"] not in (v1["t1"], v2["t1"], v3["t1"])


def test_a_ledger_made_before_the_versions_gets_them_when_opened(tmp_path):
    path = tmp_path / "old.sqlite"
    with Ledger(path) as led:
        led.record_samples([record("p1#0@t1", "t1", True, 1.0)])
    db = sqlite3.connect(path)
    db.executescript("DROP TRIGGER samples_version_add; DROP TRIGGER samples_version_drop; "
                     "DROP TRIGGER samples_version_replace; DROP TABLE target_versions;")
    db.close()
    with Ledger(path) as led:
        assert set(led.target_versions()) == {"t1"}

"""The ledger: idempotent upserts, the state machine, backoff and quarantine, samples, readers."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from checkpoints import (
    DISCOVERED,
    EVALUATING,
    FAILED,
    QUARANTINED,
    SCORED,
    STAGED,
    Checkpoint,
    Ledger,
    LedgerError,
    LedgerNotReady,
    checkpoint_id,
)

T0 = 1_000_000.0


def ck(iteration: int, run: str = "adapters-1b-x", sha: str | None = None, source: str = "m3") -> Checkpoint:
    sha = sha or f"{iteration:064x}"
    return Checkpoint(
        source=source, run=run, iteration=iteration, path=f"/base/{run}/{iteration:07d}_adapters.safetensors",
        dirname=run, label=f"G1-x @{iteration:07d}", run_id="1b-x-capability-auto", model_tag="gemma-3-1b",
        layout="mlx", size=100 + iteration, mtime=T0, sha256=sha, config_path=f"/base/{run}/adapter_config.json",
    )


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "sub" / "ledger.sqlite", max_attempts=3, backoff_s=30) as led:
        yield led


def test_identity_is_source_run_iteration_and_bytes():
    a = ck(100)
    assert a.id == checkpoint_id("m3", "adapters-1b-x", 100, a.sha256)
    assert ck(100).id == a.id
    assert ck(100, sha="f" * 64).id != a.id, "same path, new bytes: a new version"
    assert ck(100, source="other").id != a.id and ck(100, run="adapters-1b-y").id != a.id
    assert ck(101).id != a.id


def test_upsert_is_idempotent_and_keeps_state(ledger):
    a = ck(100)
    e1 = ledger.upsert(a, now=T0)
    assert e1.state == DISCOVERED and e1.discovered_at == T0
    ledger.mark_staged(a.id, "/cache/a", now=T0 + 1)
    e2 = ledger.upsert(a, now=T0 + 2)
    assert e2.state == STAGED and e2.local_path == "/cache/a" and e2.discovered_at == T0
    assert len(ledger.list()) == 1
    ledger.upsert_many([a, ck(200), ck(200)], now=T0 + 3)
    assert [e.checkpoint.iteration for e in ledger.list()] == [100, 200]
    got = ledger.get(a.id)
    assert got is not None and got.checkpoint == a


def test_happy_path_state_machine(ledger):
    a = ck(100)
    ledger.upsert(a, now=T0)
    assert [e.id for e in ledger.due(DISCOVERED, now=T0)] == [a.id]
    ledger.mark_staged(a.id, "/cache/a", sha256=a.sha256, now=T0 + 1)
    assert ledger.due(DISCOVERED, now=T0 + 1) == []
    assert [e.id for e in ledger.due(STAGED, now=T0 + 1)] == [a.id]
    ledger.mark_evaluating(a.id, now=T0 + 2)
    assert ledger.get(a.id).state == EVALUATING
    ledger.mark_scored(a.id, now=T0 + 3)
    e = ledger.get(a.id)
    assert e.state == SCORED and e.updated_at == T0 + 3
    assert ledger.counts()[SCORED] == 1


def test_illegal_transitions_are_refused_with_the_reason(ledger):
    a = ck(100)
    ledger.upsert(a)
    with pytest.raises(LedgerError, match="is discovered; cannot become scored"):
        ledger.mark_scored(a.id)
    with pytest.raises(LedgerError, match="is discovered; cannot become evaluating"):
        ledger.mark_evaluating(a.id)
    with pytest.raises(LedgerError, match="no checkpoint with id 'ck-nope'"):
        ledger.mark_staged("ck-nope", "/x")
    with pytest.raises(LedgerError, match="the file changed"):
        ledger.mark_staged(a.id, "/x", sha256="e" * 64)


def test_failures_back_off_then_quarantine(ledger):
    a = ck(100)
    ledger.upsert(a, now=T0)
    e = ledger.record_failure(a.id, "connection reset", now=T0)
    assert (e.state, e.attempts, e.next_retry_at, e.resume_state) == (FAILED, 1, T0 + 30, DISCOVERED)
    assert ledger.due(DISCOVERED, now=T0 + 29) == []
    assert [x.id for x in ledger.due(DISCOVERED, now=T0 + 30)] == [a.id]
    # the due failure is staged again, then fails while evaluating: resumes at staged, delay doubles
    ledger.mark_staged(a.id, "/cache/a", now=T0 + 31)
    ledger.mark_evaluating(a.id, now=T0 + 32)
    e = ledger.record_failure(a.id, "engine crashed", now=T0 + 33)
    assert (e.state, e.attempts, e.next_retry_at, e.resume_state) == (FAILED, 2, T0 + 33 + 60, STAGED)
    assert ledger.due(DISCOVERED, now=T0 + 1000) == []
    assert [x.id for x in ledger.due(STAGED, now=T0 + 93)] == [a.id]
    ledger.mark_evaluating(a.id, now=T0 + 94)
    e = ledger.record_failure(a.id, "engine crashed", now=T0 + 95)
    assert e.state == QUARANTINED and e.last_error == "engine crashed (after 3 attempts)"
    for st in (DISCOVERED, STAGED, EVALUATING):
        assert ledger.due(st, now=T0 + 1e9) == []
    with pytest.raises(LedgerError, match="quarantined"):
        ledger.mark_staged(a.id, "/x")


def test_permanent_failure_quarantines_at_once_and_retry_brings_it_back(ledger):
    a = ck(100)
    ledger.upsert(a)
    e = ledger.record_failure(a.id, "adapter /x: not a safetensors file:\n header length 99999", permanent=True)
    assert e.state == QUARANTINED and e.attempts == 1
    assert e.last_error == "adapter /x: not a safetensors file: header length 99999"
    e = ledger.retry(a.id[:10])  # a unique prefix is enough
    assert (e.state, e.attempts, e.last_error, e.next_retry_at) == (DISCOVERED, 0, None, None)


def test_a_failing_checkpoint_never_delays_the_others(ledger):
    bad, good = ck(100), [ck(i) for i in (200, 300, 400)]
    ledger.upsert_many([bad, *good], now=T0)
    now = T0
    for round_ in range(2):
        # the bad one fails every time it is taken; the others always come out of due()
        ledger.record_failure(bad.id, "boom", now=now)
        due = [e.id for e in ledger.due(DISCOVERED, now=now)]
        assert due[: len(good) - round_] == [g.id for g in good[round_:]]
        assert bad.id not in due
        ledger.mark_staged(good[round_].id, "/c", now=now)
        now += 1000
        due = [e.id for e in ledger.due(DISCOVERED, now=now)]
        assert due[-1] == bad.id, "a due failure comes after the fresh ones"
    assert ledger.get(bad.id).state == FAILED


def test_recover_puts_evaluating_back_to_staged(ledger):
    a = ck(100)
    ledger.upsert(a)
    ledger.mark_staged(a.id, "/c")
    ledger.mark_evaluating(a.id)
    assert ledger.recover() == 1
    assert ledger.get(a.id).state == STAGED


def test_samples_upsert_by_key(ledger):
    a = ck(100)
    recs = [
        {"key": f"{a.id}/p{i}/0", "target": a.id, "probe_id": f"p{i}", "answer": f"answer {i}",
         "scores": {"lek": 0.5 + i / 10}, "provenance": {"sampling": {"temperature": 0.0}}}
        for i in range(3)
    ]
    assert ledger.record_samples(recs) == 3
    assert ledger.record_samples(recs[:1]) == 1
    recs[0]["answer"] = "revised"
    ledger.record_samples([recs[0], {"key": "base:smollm2/p0/0", "target": "base:smollm2", "probe_id": "p0"}])
    assert ledger.sample_keys(a.id) == {r["key"] for r in recs}
    stored = ledger.samples(a.id)
    assert stored == sorted(recs, key=lambda r: r["key"])  # verbatim
    summary = {t["target"]: t for t in ledger.targets()}
    assert summary[a.id]["samples"] == 3 and summary[a.id]["probes"] == 3
    assert summary["base:smollm2"]["samples"] == 1


def test_bad_sample_records_lose_nothing(ledger):
    good = {"key": "k1", "target": "t", "probe_id": "p"}
    with pytest.raises(ValueError, match="sample record 1: field 'probe_id'"):
        ledger.record_samples([good, {"key": "k2", "target": "t"}])
    with pytest.raises(ValueError, match="sample record 0 .* not JSON-serialisable"):
        ledger.record_samples([{"key": "k3", "target": "t", "probe_id": "p", "x": object()}])
    assert ledger.sample_keys("t") == set()
    ledger.record_samples([good])
    assert ledger.sample_keys("t") == {"k1"}


def test_reader_process_sees_writer_data(ledger, tmp_path):
    a = ck(100)
    ledger.upsert(a)
    ledger.record_samples([{"key": "k", "target": a.id, "probe_id": "p"}])
    code = (
        "import json, sys; from checkpoints import Ledger; "
        f"l = Ledger({str(ledger.path)!r}, readonly=True); "
        "print(json.dumps([[e.state for e in l.list()], sorted(l.sample_keys(sys.argv[1]))]))"
    )
    out = subprocess.run([sys.executable, "-c", code, a.id], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [[DISCOVERED], ["k"]]
    ro = Ledger(ledger.path, readonly=True)
    with pytest.raises(LedgerError, match="read-only"):
        ro.upsert(ck(5))
    ledger.mark_staged(a.id, "/c")  # the writer goes on while a reader is open
    assert ro.get(a.id).state == STAGED
    ro.close()
    with pytest.raises(LedgerError, match="no such file"):
        Ledger(tmp_path / "missing.sqlite", readonly=True)
    # a reader that opens the file between its creation and its tables' (the writer's first moment)
    empty = tmp_path / "new.sqlite"
    sqlite3.connect(empty).execute("PRAGMA journal_mode=WAL").close()
    with pytest.raises(LedgerNotReady, match=r"new\.sqlite: no ledger tables in it yet"):
        Ledger(empty, readonly=True)


def test_sample_keys_leave_out_samples_without_an_answer(tmp_path):
    """A sample whose generation failed is recorded (nothing lost) but made again on resume."""
    from checkpoints import Ledger

    led = Ledger(tmp_path / "l.sqlite")
    led.record_samples([
        {"key": "a", "target": "base:m", "probe_id": "p1", "complete": True, "answer": "x"},
        {"key": "b", "target": "base:m", "probe_id": "p2", "complete": False, "answer": None},
        {"key": "c", "target": "base:m", "probe_id": "p3"},
    ])
    assert led.sample_keys("base:m") == {"a", "c"}
    assert {r["key"] for r in led.samples("base:m")} == {"a", "b", "c"}
    led.record_samples([{"key": "b", "target": "base:m", "probe_id": "p2", "complete": True, "answer": "y"}])
    assert led.sample_keys("base:m") == {"a", "b", "c"}
    led.close()


def test_finished_targets_persist_with_their_fingerprint(tmp_path):
    """A base model has no checkpoint row: the ledger records that it finished, and with what."""
    import sqlite3

    path = tmp_path / "l.sqlite"
    with Ledger(path) as led:
        assert led.finished() == {}
        led.mark_finished("base:m", "fp-1", now=T0)
        led.mark_finished("base:m", "fp-2", now=T0 + 1)  # evaluated again under new probe sets
    with Ledger(path, readonly=True) as ro:  # a restarted job (or a reader) sees it
        assert ro.finished() == {"base:m": "fp-2"}
    # A ledger made before the table existed: read-only readers see nothing finished...
    old = tmp_path / "old.sqlite"
    with Ledger(old):
        pass
    db = sqlite3.connect(old)
    db.execute("DROP TABLE finished_targets")
    db.commit()
    db.close()
    with Ledger(old, readonly=True) as ro:
        assert ro.finished() == {}
    with Ledger(old) as led:  # ...and the writer gains the table on open
        led.mark_finished("base:m", "fp-1")
        assert led.finished() == {"base:m": "fp-1"}

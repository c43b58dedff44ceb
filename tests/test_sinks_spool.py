"""The spool on its own: records, acknowledgements that survive a reopen, locks between writers,
torn and damaged records, all-or-nothing appends. (Delivery through real servers, outages and
crashes are in test_sinks_influx.py.)"""

from __future__ import annotations

import logging
import threading

import pytest

from _servers import free_port
from cluster.config import InfluxConfig
from evaluators.sinks import InfluxSink, Point, PointError, SpoolFull, spool_status
from evaluators.sinks._spool import Spool


def _lines(n: int, start: int = 0) -> list[str]:
    return [f"m,t=x seq={i}i {i}" for i in range(start, start + n)]


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: every write is refused


def test_records_ack_and_reopen(tmp_path):
    sp = Spool(tmp_path, 1 << 20)
    sp.append(_lines(5))
    sp.append(_lines(5, 5))
    seg = sp.segments[0]
    recs = sp.read(seg, 100)
    assert [r.line.decode() for r in recs] == _lines(10)
    for r in recs[:3] + recs[4:6]:  # 3 in order, then two beyond a gap
        assert sp.ack(seg, r.offset, r.end)
    assert not sp.ack(seg, recs[0].offset, recs[0].end)  # twice is a no-op
    assert seg.ack_pos == recs[3].offset and set(seg.holes) == {recs[4].offset, recs[5].offset}
    sp.save_ack(seg)
    assert sp.close() == 5  # unacknowledged
    # A new spool in the same directory takes the segment over from the acknowledged offset; the two
    # acknowledged beyond the gap are not persisted, so they go again (and overwrite themselves).
    sp2 = Spool(tmp_path, 1 << 20)
    (adopted,) = sp2.adopt_orphans()
    assert [r.line.decode() for r in sp2.read(adopted, 100)] == _lines(10)[3:]
    assert sp2.read(adopted, 100) == []  # nothing more to read
    sp2.close()


def test_a_live_writers_segment_is_not_taken(tmp_path):
    writer = Spool(tmp_path, 1 << 20)
    writer.append(_lines(3))
    other = Spool(tmp_path, 1 << 20)
    assert other.adopt_orphans() == []
    assert spool_status(tmp_path)["live_segments"] == 1
    assert writer.close() == 3  # closed with points left: now an orphan
    assert spool_status(tmp_path) | {"bytes": 0} == {"segments": 1, "records": 3, "bytes": 0, "live_segments": 0, "rejected": 0}
    (seg,) = other.adopt_orphans()
    assert len(other.read(seg, 10)) == 3
    third = Spool(tmp_path, 1 << 20)
    assert third.adopt_orphans() == []  # `other` holds it now
    other.close()
    third.close()


def test_fully_acknowledged_segments_are_deleted(tmp_path):
    sp = Spool(tmp_path, 1 << 20, segment_bytes=200)
    for i in range(4):  # each append beyond 200 bytes opens a new segment
        sp.append(_lines(5, 5 * i))
    assert len(sp.segments) >= 2
    for seg in list(sp.segments):
        for r in sp.read(seg, 100):
            sp.ack(seg, r.offset, r.end)
    sp.release_done()
    assert len(sp.segments) == 1 and sp.segments[0].active  # the one still appended to stays
    assert sp.close() == 0
    assert not list(tmp_path.glob("seg-*"))


def test_torn_tail_and_damaged_record(tmp_path, caplog):
    sp = Spool(tmp_path, 1 << 20)
    sp.append(_lines(4))
    path = sp.segments[0].path
    sp.close()
    data = path.read_bytes().split(b"\n")
    data[1] = data[1][:9] + b"m,t=x seq=999i 1"  # checksum no longer matches
    path.write_bytes(b"\n".join(data) + b"0badc0de m,t=x seq=")  # and a torn last record
    with caplog.at_level(logging.WARNING, logger="evaluators.sinks"):
        sp2 = Spool(tmp_path, 1 << 20)
        (seg,) = sp2.adopt_orphans()
        got = [r.line.decode() for r in sp2.read(seg, 100)]
    assert got == [_lines(4)[i] for i in (0, 2, 3)]
    assert sp2.damaged_records == 1
    corrupt = path.with_name(path.name + ".corrupt").read_bytes()
    assert b"seq=999i" in corrupt and corrupt.endswith(b"0badc0de m,t=x seq=")
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "checksum mismatch" in msgs and "incomplete record" in msgs
    sp2.close()


def test_append_is_all_or_nothing(tmp_path):
    sp = Spool(tmp_path, 2048)
    sp.append(_lines(10))
    size = sp.segments[0].path.stat().st_size
    with pytest.raises(SpoolFull, match="were not taken"):
        sp.append(_lines(100, 10))
    assert sp.segments[0].path.stat().st_size == size
    sp.close()


def test_sink_validates_before_writing_anything(tmp_path):
    sink = InfluxSink(InfluxConfig(url=_dead_url(), database="d", token_env=None), tmp_path)
    try:
        with pytest.raises(PointError, match="field 'v' = nan"):
            sink.write([Point("m", {}, {"v": 1.0}, 1), Point("m", {}, {"v": float("nan")}, 2)])
        assert sink.stats.written == 0 and spool_status(tmp_path)["records"] == 0
    finally:
        sink.close(timeout=0)


def test_threads_and_two_sinks_share_a_spool(tmp_path):
    """Several writers at once (threads of one sink, and a second sink): every point once, no torn lines."""
    cfg = InfluxConfig(url=_dead_url(), database="d", token_env=None, retry_interval_ms=50, max_retry_delay_ms=200)
    a, b = InfluxSink(cfg, tmp_path), InfluxSink(cfg, tmp_path)

    def work(sink: InfluxSink, k: int) -> None:
        for i in range(100):
            sink.write([Point("m", {"w": str(k)}, {"seq": k * 1000 + i}, k * 1000 + i)])

    threads = [threading.Thread(target=work, args=(a if k % 2 else b, k)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert a.stats.written + b.stats.written == 400
    assert not a.flush(timeout=10)  # nobody listens: the points wait
    st = spool_status(tmp_path)
    assert st["records"] == 400 and st["live_segments"] == 2
    a.close(timeout=0)
    b.close(timeout=0)
    sp = Spool(tmp_path, 1 << 30)
    seqs = sorted(int(r.line.split(b"seq=")[1].split(b"i")[0]) for s in sp.adopt_orphans() for r in sp.read(s, 1000))
    assert seqs == sorted(k * 1000 + i for k in range(4) for i in range(100))
    sp.close()


def test_open_sink_follows_the_config(tmp_path):
    from cluster.config import parse_config
    from _doubles import MemorySink
    from evaluators.sinks import NullSink, Sink, open_sink

    base = {"models": [{"name": "m", "engine": "openai", "options": {"base_url": "http://127.0.0.1:9/v1"}}]}
    off = open_sink(parse_config(base).sinks)
    assert isinstance(off, NullSink) and isinstance(off, Sink)
    off.write([Point("m", {}, {"v": 1}, 1)])
    assert off.flush() and off.stats.written == 1
    with pytest.raises(PointError):
        off.write([Point("m", {}, {}, 1)])  # checked even when nothing is kept
    cfg = parse_config({**base, "sinks": {"spool_dir": "spool", "influx": {"url": _dead_url(), "token_env": None}}},
                       source_path=tmp_path / "ray_config.yaml")
    sink = open_sink(cfg.sinks)
    try:
        assert isinstance(sink, InfluxSink) and isinstance(sink, Sink)
        assert sink.spool_dir == tmp_path / "spool"  # relative to the config file
    finally:
        sink.close(timeout=0)
    mem = MemorySink()
    mem.write([Point("m", {}, {"v": 1}, 1)])
    assert isinstance(mem, Sink) and mem.points[0].fields == {"v": 1} and mem.stats.sent == 1


def test_secrets_stay_out_of_reprs_and_logs(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EVALS_SPOOL_TEST_TOKEN", "user:hunter2")
    cfg = InfluxConfig(url=_dead_url(), database="d", token_env="EVALS_SPOOL_TEST_TOKEN", retry_interval_ms=20)
    with caplog.at_level(logging.DEBUG):
        sink = InfluxSink(cfg, tmp_path)
        sink.write([Point("m", {}, {"v": 1}, 1)])
        assert not sink.flush(timeout=10)
        text = repr(sink) + repr(cfg) + str(sink.stats)
        sink.close(timeout=0)
    assert "hunter2" not in text
    assert not any("hunter2" in r.getMessage() for r in caplog.records)

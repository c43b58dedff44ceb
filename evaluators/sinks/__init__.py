"""Results to InfluxDB that survive any outage.

- `Point` and line protocol (`to_line`, `parse_line`), escaped by the spec's rules.
- The schema (`PointContext` and the builders): go-ml's `capability_score`, `probe_score`,
  `capability_judge`, `content_score`, plus `heuristic_score`, `exact_match`, `judge_score`,
  `score_summary`, `eval_progress`; deterministic iteration-mode timestamps by default.
- `Sink` (write / flush / close / stats), `InfluxSink` (v1 `/write` with httpx or v2 through
  influxdb-client's batching WriteApi, chosen by config or `/ping`), backed by a durable spool:
  points are fsync'd before `write()` returns and leave the spool only when acknowledged.
- `check_influx` for `evalcluster influx check`, `replay_spool` for `evalcluster influx replay`.
"""

from evaluators.sinks._check import CheckLine, check_influx, replay_spool
from evaluators.sinks._influx import InfluxSink
from evaluators.sinks._lineprotocol import Point, PointError, parse_line, to_line, to_lines
from evaluators.sinks._schema import (
    CAPABILITY_JUDGE,
    CAPABILITY_SCORE,
    CONTENT_DIMENSIONS,
    CONTENT_SCORE,
    EPOCH_BASE,
    EVAL_PROGRESS,
    EXACT_MATCH,
    HEURISTIC_SCORE,
    HEURISTIC_SUBSCORES,
    JUDGE_SCORE,
    PROBE_SCORE,
    SCHEMA,
    SCORE_SUMMARY,
    PointContext,
    capability_judge,
    capability_scores,
    content_run_id,
    content_scores,
    eval_progress,
    exact_match,
    heuristic_score,
    judge_scores,
    probe_score,
    probe_scores,
    score_summary,
)
from evaluators.sinks._sink import MemorySink, NullSink, Sink, SinkStats, open_sink
from evaluators.sinks._spool import SpoolError, SpoolFull, spool_status
from evaluators.sinks._transport import Detected, WriteFailure, detect_protocol

__all__ = [
    "CAPABILITY_JUDGE",
    "CAPABILITY_SCORE",
    "CONTENT_DIMENSIONS",
    "CONTENT_SCORE",
    "EPOCH_BASE",
    "EVAL_PROGRESS",
    "EXACT_MATCH",
    "HEURISTIC_SCORE",
    "HEURISTIC_SUBSCORES",
    "JUDGE_SCORE",
    "PROBE_SCORE",
    "SCHEMA",
    "SCORE_SUMMARY",
    "CheckLine",
    "Detected",
    "InfluxSink",
    "MemorySink",
    "NullSink",
    "Point",
    "PointContext",
    "PointError",
    "Sink",
    "SinkStats",
    "SpoolError",
    "SpoolFull",
    "WriteFailure",
    "capability_judge",
    "capability_scores",
    "check_influx",
    "content_run_id",
    "content_scores",
    "detect_protocol",
    "eval_progress",
    "exact_match",
    "heuristic_score",
    "judge_scores",
    "open_sink",
    "parse_line",
    "probe_score",
    "probe_scores",
    "replay_spool",
    "score_summary",
    "spool_status",
    "to_line",
    "to_lines",
]

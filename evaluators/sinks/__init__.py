"""Results to InfluxDB that survive any outage.

- `Point` and line protocol (`to_line`, `parse_line`), escaped by the spec's rules.
- The schema (`PointContext` and the builders): go-ml's `capability_score`, `probe_score`,
  `capability_judge`, `content_score`, plus `heuristic_score`, `exact_match`, `judge_score`,
  `choice_score`, `text_score` (loglikelihood sets), `score_summary`, `eval_progress`; deterministic iteration-mode timestamps by default.
- `Sink` (write / flush / close / stats), `InfluxSink` (v1 `/write` with httpx or v2 through
  influxdb-client's batching WriteApi, chosen by config or `/ping`), backed by a durable spool:
  points are fsync'd before `write()` returns and leave the spool only when acknowledged.
- `check_influx` for `evalcluster influx check`, `replay_spool` for `evalcluster influx replay`.
"""

from __future__ import annotations

from checkpoints import lazy_exports

# Each public name once, under the private module that defines it (imported on first use).
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "_check": ("CheckLine", "check_influx", "replay_spool"),
    "_config": ("InfluxConfig", "SinksConfig"),
    "_influx": ("InfluxSink",),
    "_lineprotocol": ("Point", "PointError", "parse_line", "to_line", "to_lines", "writable_tag"),
    "_schema": (
        "CAPABILITY_JUDGE", "CAPABILITY_SCORE", "CHOICE_SCORE", "CONTENT_DIMENSIONS", "CONTENT_SCORE", "EPOCH_BASE",
        "EVAL_PROGRESS", "EXACT_MATCH", "HEURISTIC_SCORE", "HEURISTIC_SUBSCORES", "JUDGE_SCORE",
        "PROBE_SCORE", "SCHEMA", "SCORE_SUMMARY", "TEXT_SCORE", "PointContext", "capability_judge",
        "capability_scores", "choice_score", "content_run_id", "content_scores", "eval_progress", "exact_match",
        "heuristic_score", "judge_scores", "probe_score", "probe_scores", "score_summary", "text_score",
    ),
    "_sink": ("NullSink", "Sink", "SinkStats", "open_sink"),
    "_spool": ("SpoolError", "SpoolFull", "spool_status"),
    "_transport": ("Detected", "WriteFailure", "detect_protocol"),
})

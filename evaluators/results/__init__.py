"""The results path: samples into the ledger, their InfluxDB points into the sink, nothing lost.

- `ResultRecorder`: records a target's samples in the ledger and sends their points in the same
  call; owes in the ledger what the spool cannot take and sends it as it makes room; writes a
  finished target's summary points; `rebuild` re-derives every point. A plain synchronous class:
  the watch job's writer actor hosts one, `evalcluster eval` one in its own process (`store()`).
- The point derivation (`sample_points`, `summary_points`): the same point every time it is
  derived from the same record, so re-sending overwrites. A target's tags come from its
  EvalTarget (`target_naming`), noted once in the ledger.

It sits above `evaluators.sinks` (points, spool, InfluxDB), which knows nothing of samples.
"""

from __future__ import annotations

from checkpoints import lazy_exports

# Each public name once, under the private module that defines it (imported on first use).
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "_points": (
        "record_wall_ns", "register_probe_sets", "sample_points", "summary_points", "target_from_ledger",
        "target_from_naming", "target_naming",
    ),
    "_recorder": ("SUMMARY_KEY", "RecorderStore", "ResultObserver", "ResultRecorder"),
})

"""Ray dashboard metrics (ray.util.metrics): checkpoints, samples in flight, latencies, last scores.

They appear on the cluster's Prometheus endpoint with a `ray_` prefix, e.g.
`ray_evalcluster_checkpoints_scored_total{job_id="02000000",run="..."}`. Every series names the
Ray job (`job_id`: not `job`, which Prometheus keeps for its scrape job) and, where there is one, the run, so several jobs on one cluster stay apart;
samples in flight also name the target (two checkpoints of one run evaluated at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]


@dataclass
class Metrics:
    checkpoints_discovered: Any
    checkpoints_scored: Any
    checkpoints_failed: Any
    samples_in_flight: Any
    samples_done: Any
    generation_latency: Any
    judge_latency: Any
    last_lek: Any
    last_accuracy: Any
    last_exact: Any
    last_choice: Any
    last_bits_per_byte: Any
    engine_tokens_per_s: Any
    adapter_no_effect: Any


@lru_cache(maxsize=1)
def metrics() -> Metrics:
    """This process's metric objects (created once; Ray aggregates them across processes)."""
    from ray.util.metrics import Counter, Gauge, Histogram

    return Metrics(
        checkpoints_discovered=Counter("evalcluster_checkpoints_discovered", "Checkpoints found complete on a source",
                                       tag_keys=("job_id", "source", "run")),
        checkpoints_scored=Counter("evalcluster_checkpoints_scored", "Checkpoints with every sample scored",
                                   tag_keys=("job_id", "source", "run")),
        checkpoints_failed=Counter("evalcluster_checkpoints_failed",
                                   "Checkpoint failures (state: failed, to be retried, or quarantined)",
                                   tag_keys=("job_id", "source", "run", "state")),
        samples_in_flight=Gauge("evalcluster_samples_in_flight", "Samples being generated or judged now",
                                tag_keys=("job_id", "model", "run", "target")),
        samples_done=Counter("evalcluster_samples", "Samples recorded",
                               tag_keys=("job_id", "model", "run", "outcome")),
        generation_latency=Histogram("evalcluster_generation_latency_seconds", "Time to generate one answer",
                                     boundaries=LATENCY_BUCKETS, tag_keys=("job_id", "model", "run")),
        judge_latency=Histogram("evalcluster_judge_latency_seconds", "Time to judge one answer (all rubrics)",
                                boundaries=LATENCY_BUCKETS, tag_keys=("job_id", "model", "run")),
        last_lek=Gauge("evalcluster_last_lek", "Mean LEK score of the run's latest scored checkpoint",
                       tag_keys=("job_id", "run")),
        last_accuracy=Gauge("evalcluster_last_accuracy", "Capability pass rate of the run's latest scored checkpoint",
                            tag_keys=("job_id", "run")),
        last_exact=Gauge("evalcluster_last_exact", "Exact-match rate of the run's latest scored checkpoint",
                         tag_keys=("job_id", "run")),
        last_choice=Gauge("evalcluster_last_choice_accuracy",
                          "Multiple-choice accuracy (by loglikelihood) of the run's latest scored checkpoint",
                          tag_keys=("job_id", "run")),
        last_bits_per_byte=Gauge("evalcluster_last_bits_per_byte",
                                 "Mean bits per byte of the texts under the run's latest scored checkpoint",
                                 tag_keys=("job_id", "run")),
        engine_tokens_per_s=Gauge("evalcluster_engine_tokens_per_s", "Decode tokens/s of the latest answers",
                                  tag_keys=("job_id", "model", "run")),
        adapter_no_effect=Gauge("evalcluster_adapter_no_effect",
                                "1 when the run's latest checkpoint answered every greedy or seeded probe as the base did "
                                "(its adapter had no effect), else 0", tag_keys=("job_id", "run")),
    )

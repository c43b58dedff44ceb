"""The coordinator's restart bookkeeping, without Ray: the fingerprint a finished base model is
recorded with (what "the same probe sets" means), and the budgets a killed coordinator's earlier
life held or was waiting for. The restarts themselves are tested in test_watch.py."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from cluster._budgets import Budgets, HolderRetired
from cluster._plan import build_plan
from cluster.config import parse_config
from evaluators import load_probe_set


def _cfg(**changes: Any) -> Any:
    data: dict[str, Any] = {
        "models": [{"name": "m", "engine": "llamacpp", "path": "m.gguf"}],
        "sources": [{"name": "s", "kind": "local", "path": "run", "layout": "mlx", "model": "m"}],
        "probes": {"sets": ["capability"], "max_tokens": 48},
        "scorers": ["heuristic", "exact", "capability"],
    }
    for key, value in changes.items():
        data[key] = value
    return parse_config(data, "t")


def _fp(cfg: Any, sets: list[Any] | None = None) -> str:
    plan = build_plan(cfg)
    return (plan if sets is None else dataclasses.replace(plan, probe_sets=tuple(sets))).fingerprint()


def test_plan_fingerprint_changes_with_what_the_results_depend_on() -> None:
    same = _fp(_cfg())
    assert _fp(_cfg()) == same  # stable across processes and restarts (no ids, no times)
    assert _fp(_cfg(scorers=["exact", "capability", "heuristic"])) == same  # order does not matter
    assert _fp(_cfg(probes={"sets": ["capability"], "max_tokens": 64})) != same
    assert _fp(_cfg(probes={"sets": ["capability", "content"], "max_tokens": 48})) != same
    assert _fp(_cfg(scorers=["heuristic"])) != same
    # The probe set's content counts, not only its name: an edited file under the same name.
    edited = dataclasses.replace(load_probe_set("capability"), hash="0" * 64)
    assert _fp(_cfg(), [edited]) != same


async def test_a_retired_life_gives_back_its_leases_and_its_waits() -> None:
    """A killed coordinator's life holds leases and has acquires waiting (its workers queued for
    places). Its next life retires it: every place comes back, the waits are dropped (were they
    granted later, to a holder that never releases, the places would be lost for good), and the
    old life gets nothing more."""
    b = Budgets()
    await b.configure({"gen:m": 2})
    old, new = "evalcluster-coordinator:1:1", "evalcluster-coordinator:2:2"
    await b.acquire("gen:m", old)
    await b.acquire("gen:m", old)
    waits = [asyncio.ensure_future(b.acquire("gen:m", old)) for _ in range(3)]
    await asyncio.sleep(0)  # let them queue
    assert (await b.snapshot())["gen:m"] == {"limit": 2, "held": 2, "waiting": 3}
    assert await b.retire("evalcluster-coordinator:", keep=new) == 2
    results = await asyncio.gather(*waits, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results
    # The new life gets both places at once; the old one is refused.
    leases = await asyncio.gather(b.acquire("gen:m", new), b.acquire("gen:m", new))
    assert len(set(leases)) == 2
    with pytest.raises(HolderRetired):
        await b.acquire("gen:m", old)
    # Retiring again (the next restart) leaves the current life alone.
    assert await b.retire("evalcluster-coordinator:", keep=new) == 0
    assert (await b.snapshot())["gen:m"]["held"] == 2


def test_an_endpoints_slots_are_every_replicas():
    """Where adaptive concurrency starts, its floor, and one target's share: the slots of every
    replica of the model, so the sweep's last checkpoint is not held to one replica's slots."""
    from cluster._coordinator import endpoint_slots

    model = {"name": "m", "engine": "llamacpp", "path": "m.gguf"}
    assert endpoint_slots(_cfg(models=[model]).models[0], 4) == 4
    assert endpoint_slots(_cfg(models=[{**model, "replicas": 3}]).models[0], 4) == 12
    scaled = {**model, "autoscaling": {"min_replicas": 2, "max_replicas": 5}}
    assert endpoint_slots(_cfg(models=[scaled]).models[0], 4) == 8, "autoscaling: the replicas it keeps"
    idle = {**model, "autoscaling": {"min_replicas": 0, "max_replicas": 5}}
    assert endpoint_slots(_cfg(models=[idle]).models[0], 4) == 4, "scaled to zero: one replica's"


def test_a_llamacpp_replica_is_sent_its_slots_and_half_again():
    """Serve sends an adapter's requests to the replicas holding it while they have room: a
    replica's room just past its slots makes a checkpoint's burst spill onto another replica."""
    model = {"name": "m", "engine": "llamacpp", "path": "m.gguf"}
    assert _cfg(models=[model]).models[0].max_ongoing_requests == 6
    assert _cfg(models=[{**model, "options": {"parallel": 1}}]).models[0].max_ongoing_requests == 2
    assert _cfg(models=[{**model, "options": {"parallel": 8}}]).models[0].max_ongoing_requests == 12
    assert _cfg(models=[{**model, "max_ongoing_requests": 32}]).models[0].max_ongoing_requests == 32, "set: kept"
    other = {"name": "o", "engine": "openai", "options": {"base_url": "http://127.0.0.1:9/v1"}}
    assert _cfg(models=[model, other]).models[1].max_ongoing_requests == 32
    # The limit the cluster's budget takes from the served definition is the one in effect.
    dumped = _cfg(models=[model]).models[0].model_dump(mode="json")
    assert dumped["max_ongoing_requests"] == 6

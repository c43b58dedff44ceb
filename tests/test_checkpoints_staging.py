"""Staging against real SSH servers: verified downloads, quarantine of bad adapters while the
others of the run go on, retries through an outage, the LRU cache."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from _ckpt_fixtures import write_mlx_adapter, write_peft_adapter
from checkpoints import (
    DISCOVERED,
    FAILED,
    QUARANTINED,
    STAGED,
    Ledger,
    LedgerError,
    LocalSource,
    Poller,
    SSHSource,
    Stager,
    discover_once,
    layout_spec,
    prepare_adapter,
    stage_pending,
)


def ssh_source(server, base: Path, **kw) -> SSHSource:
    return SSHSource(server.host, server.port, server.user, server.key, server.known_hosts, str(base), name="m3", **kw)


async def discover(poller: Poller, ledger: Ledger) -> list:
    await discover_once([poller], ledger)
    return (await discover_once([poller], ledger)).new


def bad_run(base: Path) -> Path:
    """A run with two good checkpoints, a truncated one and one shaped for another model."""
    run = base / "adapters-1b-mixed"
    for it, seed in ((100, 1), (400, 4)):
        write_mlx_adapter(run, layers=[0, 1], rank=4, seed=seed, filename=f"{it:07d}_adapters.safetensors")
    good = (run / "0000100_adapters.safetensors").read_bytes()
    (run / "0000200_adapters.safetensors").write_bytes(good[: len(good) - 100])  # cut short mid-write
    rng = np.random.default_rng(3)
    save_file({"model.layers.0.self_attn.q_proj.lora_a": rng.normal(size=(512, 4)).astype(np.float32),
               "model.layers.0.self_attn.q_proj.lora_b": rng.normal(size=(4, 512)).astype(np.float32)},
              str(run / "0000300_adapters.safetensors"))
    return run


@pytest.mark.ssh
async def test_bad_checkpoints_are_quarantined_while_the_others_are_staged(ssh_server, tmp_path, smollm2_hf, smollm2_gguf):
    base = tmp_path / "lem"
    run = bad_run(base)
    src = ssh_source(ssh_server, base)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    stager = Stager(tmp_path / "cache", max_bytes=10 * 2**20, retries=1, retry_delay_s=0.1)
    try:
        new = await discover(Poller(src, layout_spec("mlx")), ledger)
        assert sorted(c.iteration for c in new) == [100, 200, 300, 400]
        report = await stage_pending(ledger, stager, {"m3": src}, {"m3": smollm2_hf})
    finally:
        await src.close()

    states = {e.checkpoint.iteration: e for e in ledger.list()}
    assert {i: e.state for i, e in states.items()} == {100: STAGED, 200: QUARANTINED, 300: QUARANTINED, 400: STAGED}
    r200, r300 = states[200].last_error, states[300].last_error
    assert str(run / "0000200_adapters.safetensors") in r200 and "truncated" in r200
    assert str(run / "0000300_adapters.safetensors") in r300
    assert "does not fit base model" in r300 and "512x512 (out x in), base is 576x576" in r300
    assert set(report.quarantined) == {states[200].id, states[300].id} and not report.failed

    for it in (100, 400):
        e = states[it]
        d = Path(e.local_path)
        config_sha = hashlib.sha256((run / "adapter_config.json").read_bytes()).hexdigest()
        assert d == tmp_path / "cache" / f"{e.checkpoint.sha256}-{config_sha}"  # the weights and their config
        assert hashlib.sha256((d / "adapters.safetensors").read_bytes()).hexdigest() == e.checkpoint.sha256
        assert (d / "adapter_config.json").read_bytes() == (run / "adapter_config.json").read_bytes()
        assert json.loads((d / "staged.json").read_text())["id"] == e.id
    assert not list((tmp_path / "cache").glob(".tmp-*")), "failed downloads leave nothing behind"
    assert len([p for p in (tmp_path / "cache").iterdir()]) == 2

    # The staged ones are ready for an engine; the quarantined ones are never due again.
    gguf = prepare_adapter(states[100].local_path, "llamacpp", smollm2_gguf)
    assert gguf.is_file()
    assert ledger.due(DISCOVERED, now=time.time() + 1e6) == []


async def test_peft_checkpoints_stage_too(tmp_path, smollm2_hf):
    base = tmp_path / "runs"
    write_peft_adapter(base / "cross/checkpoint-10", layers=[2], rank=4)
    ledger = Ledger(tmp_path / "l.sqlite")
    src = LocalSource(base, name="lin")
    [ck] = await discover(Poller(src, layout_spec("peft")), ledger)
    report = await stage_pending(ledger, Stager(tmp_path / "c", 2**30), {"lin": src}, {"lin": smollm2_hf})
    [staged] = report.staged
    assert staged.adapter_file.name == "adapter_model.safetensors" and ledger.get(ck.id).state == STAGED
    p = prepare_adapter(staged.path, "vllm", smollm2_hf)
    assert json.loads((p / "adapter_config.json").read_text())["r"] == 4


async def test_cache_hit_and_lru_eviction(tmp_path):
    base = tmp_path / "lem"
    run = base / "adapters-1b-lru"
    for it in (1, 2, 3):
        write_mlx_adapter(run, layers=[0], rank=8, seed=it, filename=f"{it:07d}_adapters.safetensors")
    src = LocalSource(base, name="l")
    p = Poller(src, layout_spec("mlx"))
    await p.poll()
    cks = {c.iteration: c for c in (await p.poll()).new}
    one = (run / "0000001_adapters.safetensors").stat().st_size + (run / "adapter_config.json").stat().st_size
    stager = Stager(tmp_path / "cache", max_bytes=int(2.5 * (one + 600)), retry_delay_s=0.01)

    a = await stager.stage(src, cks[1])
    time.sleep(0.02)
    b = await stager.stage(src, cks[2])
    time.sleep(0.02)
    hit = await stager.stage(src, cks[1])  # a hit: nothing downloaded, and A becomes the most recent
    assert hit.cached and hit.path == a.path and stager.downloads == 2
    time.sleep(0.02)
    c = await stager.stage(src, cks[3])
    assert a.path.exists() and c.path.exists()
    assert not b.path.exists(), "the least recently used entry goes first"
    assert stager.usage() <= stager.max_bytes


@pytest.mark.ssh
async def test_staging_retries_through_an_ssh_outage(sshd, tmp_path):
    base = tmp_path / "lem"
    write_mlx_adapter(base / "adapters-1b-o", layers=[0], rank=4, filename="0000010_adapters.safetensors")
    src = ssh_source(sshd, base, backoff_s=0.3)
    ledger = Ledger(tmp_path / "l.sqlite")
    stager = Stager(tmp_path / "cache", 2**30, retries=5, retry_delay_s=0.3)
    try:
        [ck] = await discover(Poller(src, layout_spec("mlx")), ledger)
        sshd.stop()  # the listener and the kept connection's session
        await src.close()
        task = asyncio.create_task(stage_pending(ledger, stager, {"m3": src}))
        await asyncio.sleep(1.0)
        assert not task.done()
        sshd.start()
        report = await asyncio.wait_for(task, 60)
    finally:
        await src.close()
    assert [s.checkpoint.id for s in report.staged] == [ck.id]
    assert src.connect_attempts >= 2  # retried through the outage (the config fetch failed first)
    assert ledger.get(ck.id).state == STAGED


async def test_file_changed_after_discovery_is_a_new_version(tmp_path):
    base = tmp_path / "lem"
    f = write_mlx_adapter(base / "adapters-1b-v", layers=[0], rank=4, seed=1, filename="0000010_adapters.safetensors")
    src = LocalSource(base, name="l")
    ledger = Ledger(tmp_path / "l.sqlite")
    poller = Poller(src, layout_spec("mlx"))
    [old] = await discover(poller, ledger)
    write_mlx_adapter(base / "adapters-1b-v", layers=[0], rank=4, seed=2, filename="0000010_adapters.safetensors")
    assert hashlib.sha256(f.read_bytes()).hexdigest() != old.sha256
    stager = Stager(tmp_path / "cache", 2**30, retries=1, retry_delay_s=0.01)
    report = await stage_pending(ledger, stager, {"l": src})
    assert ledger.get(old.id).state == QUARANTINED
    assert "changed since discovery" in report.quarantined[old.id]
    [new] = await discover(poller, ledger)  # seen changed, then unchanged: taken
    assert new.path == old.path and new.id != old.id
    await stage_pending(ledger, stager, {"l": src})
    assert ledger.get(new.id).state == STAGED


async def test_one_shot_pipeline_from_a_config(tmp_path, smollm2_gguf):
    import yaml

    from checkpoints import pollers_from_config, stager_from_config
    from cluster.config import open_ledger
    from cluster.config import load_config

    tree = tmp_path / "lem"
    bad_run(tree)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({
        "models": [{"name": "smollm2", "engine": "llamacpp", "path": str(smollm2_gguf)}],
        "sources": [{"name": "lab", "kind": "local", "path": "lem", "layout": "mlx", "model": "smollm2"}],
        "staging": {"cache_dir": "cache", "max_bytes": 2**30, "retries": 0},
        "sinks": {"ledger": "state/ledger.sqlite"},
    }))
    cfg = load_config(tmp_path / "cfg.yaml")
    ledger = open_ledger(cfg)
    pollers = pollers_from_config(cfg.sources, ledger)
    await discover_once(pollers, ledger)
    await discover_once(pollers, ledger)
    assert cfg.base_paths() == {"lab": smollm2_gguf}
    stager = stager_from_config(cfg.staging)
    assert stager.cache_dir == tmp_path / "cache"
    report = await stage_pending(ledger, stager, {p.source.name: p.source for p in pollers}, cfg.base_paths())
    assert sorted(s.checkpoint.iteration for s in report.staged) == [100, 400]
    assert ledger.counts()["quarantined"] == 2


async def test_a_checkpoint_is_staged_only_once_prepared(tmp_path):
    """Whoever takes staged checkpoints from the ledger (the coordinator) finds each one prepared for
    its engine; a checkpoint the engine cannot take is quarantined with the reason, the others go on."""
    from checkpoints import AdapterError

    base = tmp_path / "lem"
    for it, seed in ((10, 1), (20, 2)):
        write_mlx_adapter(base / "adapters-1b-p", layers=[0], rank=4, seed=seed, filename=f"{it:07d}_adapters.safetensors")
    src = LocalSource(base, name="l")
    ledger = Ledger(tmp_path / "l.sqlite")
    new = sorted(await discover(Poller(src, layout_spec("mlx")), ledger), key=lambda c: c.iteration)
    seen: dict[str, str] = {}

    async def prepare(staged) -> None:
        seen[staged.checkpoint.id] = ledger.get(staged.checkpoint.id).state
        if staged.checkpoint.iteration == 20:
            raise AdapterError(staged.checkpoint.path, "the engine refuses it")

    report = await stage_pending(ledger, Stager(tmp_path / "cache", 2**30), {"l": src}, prepare=prepare)
    assert seen == {new[0].id: DISCOVERED, new[1].id: DISCOVERED}  # not yet visible as staged
    assert [s.checkpoint.id for s in report.staged] == [new[0].id] and ledger.get(new[0].id).state == STAGED
    assert ledger.get(new[1].id).state == QUARANTINED
    assert "the engine refuses it" in ledger.get(new[1].id).last_error


async def test_a_prepare_step_deferred_not_by_the_checkpoint_is_retried(tmp_path):
    """The registry unreachable while a checkpoint is prepared (StagingDeferred): a backed-off
    failure, not a quarantine; the next due pass stages it. A staged checkpoint whose copy cannot be
    served is sent back (`unstage`) and staged again, with no attempt counted."""
    from checkpoints import StagingDeferred

    base = tmp_path / "lem"
    write_mlx_adapter(base / "adapters-1b-p", layers=[0], rank=4, seed=1, filename="0000010_adapters.safetensors")
    src = LocalSource(base, name="l")
    ledger = Ledger(tmp_path / "l.sqlite", max_attempts=3, backoff_s=5)
    (ck,) = await discover(Poller(src, layout_spec("mlx")), ledger)
    calls = []

    async def prepare(staged) -> None:
        calls.append(staged.checkpoint.id)
        if len(calls) == 1:
            raise StagingDeferred("the adapter registry could not be reached: ActorUnavailableError")

    stager = Stager(tmp_path / "cache", 2**30)
    report = await stage_pending(ledger, stager, {"l": src}, prepare=prepare)
    entry = ledger.get(ck.id)
    assert report.failed == {ck.id: "the adapter registry could not be reached: ActorUnavailableError"}
    assert entry.state == FAILED and entry.attempts == 1 and entry.next_retry_at == entry.updated_at + 5
    t0 = entry.updated_at
    assert (await stage_pending(ledger, stager, {"l": src}, prepare=prepare, now=t0 + 1)).staged == []  # not due
    report = await stage_pending(ledger, stager, {"l": src}, prepare=prepare, now=t0 + 6)
    assert [s.checkpoint.id for s in report.staged] == [ck.id] and ledger.get(ck.id).state == STAGED

    ledger.mark_evaluating(ck.id)
    back = ledger.unstage(ck.id, "not registered for model 'm':\nstaged again")
    assert (back.state, back.local_path, back.attempts) == (DISCOVERED, None, 1)
    assert back.last_error == "not registered for model 'm': staged again"
    report = await stage_pending(ledger, stager, {"l": src}, prepare=prepare, now=t0 + 7)
    assert [s.checkpoint.id for s in report.staged] == [ck.id] and len(calls) == 3
    ledger.mark_evaluating(ck.id)
    ledger.mark_scored(ck.id)
    with pytest.raises(LedgerError, match="is scored; cannot become discovered"):
        ledger.unstage(ck.id, "gone")

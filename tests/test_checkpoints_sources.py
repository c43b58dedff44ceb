"""Sources and discovery against real servers: OpenSSH sshd and asyncssh's server (both, via
`ssh_server`), and the local file system."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from pathlib import Path

import asyncssh
import psutil
import pytest

from _ckpt_fixtures import GO_ML_META, mlx_tree, peft_tree, touch
from checkpoints import (
    HostKeyError,
    Ledger,
    LocalSource,
    MetaRule,
    Poller,
    SourceError,
    SourceUnavailable,
    SSHSource,
    discover_once,
    layout_spec,
)

META = [MetaRule(*r) for r in GO_ML_META]


def ssh_source(server, base: Path, **kw) -> SSHSource:
    return SSHSource(server.host, server.port, server.user, server.key, server.known_hosts, str(base),
                     name="m3", **kw)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


async def two_polls(poller: Poller):
    first = await poller.poll()
    second = await poller.poll()
    return first, second


def by_rel(cks, base: Path) -> dict:
    return {c.path[len(str(base)) + 1:]: c for c in cks}


# --------------------------------------------------------------------------- listing both layouts


@pytest.mark.ssh
async def test_mlx_layout_over_ssh(ssh_server, tmp_path):
    base = tmp_path / "lem"
    expected = mlx_tree(base)
    src = ssh_source(ssh_server, base)
    try:
        first, second = await two_polls(Poller(src, layout_spec("mlx", meta=META)))
    finally:
        await src.close()
    # First sight: nothing is taken (a file must be unchanged across two observations).
    assert first.new == [] and first.listed == len(expected)
    assert all("first seen" in p.reason for p in first.pending)
    got = by_rel(second.new, base)
    assert set(got) == set(expected)  # rolling file, nested parent and non-adapters dirs left out
    for rel, label in expected.items():
        ck = got[rel]
        assert ck.label == label
        assert ck.sha256 == sha(base / rel)
        assert ck.size == (base / rel).stat().st_size
        assert ck.config_path == str(base / rel).rsplit("/", 1)[0] + "/adapter_config.json"
    g = got["adapters-15k/gemma-3-27b/0001000_adapters.safetensors"]
    assert (g.iteration, g.run, g.dirname, g.model_tag, g.run_id) == (
        1000, "adapters-15k/gemma-3-27b", "adapters-15k/gemma-3-27b", "gemma-3-27b", "15k-gemma-3-27b-capability-auto")
    s = got["adapters-27b-sovereign/0000200_adapters.safetensors"]
    assert (s.iteration, s.run_id, s.layout) == (200, "27b-sovereign-capability-auto", "mlx")
    # One round trip per poll: the listing command also hashed what the first poll saw.
    assert first.round_trips == 1 and second.round_trips == 1
    assert src.connects == 1


@pytest.mark.ssh
async def test_peft_layout_over_ssh(ssh_server, tmp_path):
    base = tmp_path / "runs"
    expected = peft_tree(base)
    src = ssh_source(ssh_server, base)
    try:
        _, second = await two_polls(Poller(src, layout_spec("peft", meta=META)))
    finally:
        await src.close()
    got = by_rel(second.new, base)
    assert {k: c.label for k, c in got.items()} == expected
    ck = got["book-run/checkpoint-1000/adapter_model.safetensors"]
    assert (ck.iteration, ck.run, ck.dirname, ck.model_tag, ck.layout) == (
        1000, "book-run", "book-run/checkpoint-1000", "gemma-3-27b", "peft")
    assert ck.sha256 == sha(base / "book-run/checkpoint-1000/adapter_model.safetensors")


async def test_local_source_lists_like_ssh(tmp_path):
    base = tmp_path / "lem"
    expected = mlx_tree(base)
    src = LocalSource(base, name="local")
    first, second = await two_polls(Poller(src, layout_spec("mlx", meta=META)))
    assert first.new == []
    assert {k: c.label for k, c in by_rel(second.new, base).items()} == expected
    assert all(c.sha256 == sha(Path(c.path)) for c in second.new)


# --------------------------------------------------------------------------- completeness


@pytest.mark.ssh
async def test_checkpoint_written_during_polls_appears_once_complete(ssh_server, tmp_path):
    base = tmp_path / "lem"
    run = base / "adapters-1b-live"
    touch(run / "adapter_config.json", b"{}")
    touch(run / "0000100_adapters.safetensors", b"x" * 1000)
    src = ssh_source(ssh_server, base)
    poller = Poller(src, layout_spec("mlx", meta=META))
    try:
        await poller.poll()
        done = await poller.poll()
        assert [c.label for c in done.new] == ["G1-live @0000100"]

        # The trainer starts writing the next checkpoint: half now, the rest later.
        part = run / "0000200_adapters.safetensors"
        with open(part, "wb") as f:
            f.write(b"y" * 5000)
            f.flush()
            r1 = await poller.poll()
            assert r1.new == [] and any(p.path.endswith("0000200_adapters.safetensors") for p in r1.pending)
            f.write(b"z" * 5000)
            f.flush()
            os.utime(part, (time.time() + 1, time.time() + 1))  # a write the clock can see
            r2 = await poller.poll()
            assert r2.new == [], "a file that changed since the last poll must not be taken"
        r3 = await poller.poll()
        assert [c.label for c in r3.new] == ["G1-live @0000200"]
        assert r3.new[0].size == 10_000 and r3.new[0].sha256 == sha(part)
        # Already returned: never again, and the earlier one is not repeated either.
        assert (await poller.poll()).new == []
        # Same path, new bytes: a new version with a new id.
        old = r3.new[0]
        touch(part, b"w" * 10_000, mtime=time.time() + 5)
        await poller.poll()
        again = (await poller.poll()).new
        assert len(again) == 1 and again[0].path == old.path and again[0].id != old.id
    finally:
        await src.close()


async def test_marker_file_decides_completeness(tmp_path):
    base = tmp_path / "runs"
    ck = base / "r/checkpoint-10"
    touch(ck / "adapter_config.json", b"{}")
    touch(ck / "adapter_model.safetensors", b"x" * 10)
    src = LocalSource(base)
    poller = Poller(src, layout_spec("peft", marker="trainer_state.json"))
    assert (await poller.poll()).new == []
    assert (await poller.poll()).new == [], "without the marker it is not complete, however stable"
    touch(ck / "trainer_state.json", b"{}")
    res = await poller.poll()
    assert [c.iteration for c in res.new] == [10]
    assert res.round_trips == 2  # listing + the digest of the newly complete file


async def test_missing_config_keeps_checkpoint_pending(tmp_path):
    base = tmp_path / "lem"
    touch(base / "adapters-x/0000001_adapters.safetensors", b"x")
    poller = Poller(LocalSource(base), layout_spec("mlx"))
    await poller.poll()
    res = await poller.poll()
    assert res.new == [] and "adapter_config.json" in res.pending[0].reason
    touch(base / "adapters-x/adapter_config.json", b"{}")
    await poller.poll()
    assert [c.iteration for c in (await poller.poll()).new] == [1]


# --------------------------------------------------------------------------- hostile names


@pytest.mark.ssh
async def test_hostile_names_neither_break_listing_nor_run(ssh_server, tmp_path):
    token = uuid.uuid4().hex[:8]
    canary = f"pwned-{token}"
    base = tmp_path / f"base with space 'q' \"dq\" $(touch {canary}) `touch {canary}`"
    names = [
        f"adapters-1b-$(touch {canary})",
        f"adapters-1b-`touch {canary}`",
        "adapters-1b-it's \"quoted\"",
        "adapters-1b-semi;colon && echo hi | cat > x",
        "adapters-1b-tab\there",
        "adapters-1b-*glob?[x]",
    ]
    for n in names:
        touch(base / n / "adapter_config.json", b"{}")
        touch(base / n / "0000042_adapters.safetensors", n.encode())
    touch(base / "adapters-1b-plain" / "adapter_config.json", b"{}")
    touch(base / "adapters-1b-plain" / f"0000001 $(touch {canary})_adapters.safetensors", b"z")
    src = ssh_source(ssh_server, base)
    try:
        _, second = await two_polls(Poller(src, layout_spec("mlx", meta=META)))
        got = by_rel(second.new, base)
        assert set(got) == {f"{n}/0000042_adapters.safetensors" for n in names} | {
            f"adapters-1b-plain/0000001 $(touch {canary})_adapters.safetensors"}
        for n in names:
            ck = got[f"{n}/0000042_adapters.safetensors"]
            assert ck.sha256 == hashlib.sha256(n.encode()).hexdigest()
        # fetching over SFTP with such a name works too
        local = tmp_path / "fetched"
        await src.fetch(got[f"{names[0]}/0000042_adapters.safetensors"].path, local)
        assert local.read_bytes() == names[0].encode()
    finally:
        await src.close()
    for where in (Path.home(), tmp_path, base, Path.cwd(), Path("/")):
        assert not (where / canary).exists(), f"a file name was executed (found {where / canary})"
    hits = [p for p in tmp_path.rglob(f"{canary}*") if p.name == canary]
    assert hits == []


# --------------------------------------------------------------------------- host keys


@pytest.mark.ssh
async def test_wrong_host_key_is_refused(ssh_server, tmp_path):
    base = tmp_path / "lem"
    mlx_tree(base)
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    kh = tmp_path / "wrong_known_hosts"
    kh.write_text(f"[127.0.0.1]:{ssh_server.port} {other}\n")
    src = SSHSource(ssh_server.host, ssh_server.port, ssh_server.user, ssh_server.key, kh, str(base), name="m3")
    with pytest.raises(HostKeyError) as e:
        await src.list(["*_adapters.safetensors"])
    msg = str(e.value)
    assert "differs" in msg and "ssh-keygen -R" in msg and f"ssh-keyscan -p {ssh_server.port} 127.0.0.1" in msg
    assert src.connects == 0

    kh.write_text("")  # unknown host
    src2 = SSHSource(ssh_server.host, ssh_server.port, ssh_server.user, ssh_server.key, kh, str(base), name="m3")
    with pytest.raises(HostKeyError) as e:
        await src2.list(["*_adapters.safetensors"])
    assert "is not in" in str(e.value) and "ssh-keyscan" in str(e.value)


@pytest.mark.ssh
async def test_missing_base_is_a_clear_error(ssh_server, tmp_path):
    src = ssh_source(ssh_server, tmp_path / "nope")
    try:
        with pytest.raises(SourceError, match="base directory .*nope does not exist"):
            await Poller(src, layout_spec("mlx")).poll()
    finally:
        await src.close()


# --------------------------------------------------------------------------- reconnects (sshd only)


def _kill_sessions(sshd) -> int:
    """Kill sshd's per-connection children: the server side of our kept connection goes away."""
    parent = psutil.Process(sshd.process.proc.pid)
    kids = parent.children(recursive=True)
    for k in kids:
        k.kill()
    psutil.wait_procs(kids, timeout=5)
    return len(kids)


@pytest.mark.ssh
async def test_dropped_connection_reconnects_on_next_poll(sshd, tmp_path):
    base = tmp_path / "lem"
    mlx_tree(base)
    src = ssh_source(sshd, base)
    poller = Poller(src, layout_spec("mlx", meta=META))
    try:
        await poller.poll()
        assert src.connects == 1
        await poller.poll()
        assert src.connects == 1, "the connection is kept across polls"
        assert _kill_sessions(sshd) >= 1
        await asyncio.sleep(0.2)
        touch(base / "adapters-1b-new/adapter_config.json", b"{}")
        touch(base / "adapters-1b-new/0000001_adapters.safetensors", b"n")
        await poller.poll()
        res = await poller.poll()
        assert [c.label for c in res.new] == ["G1-new @0000001"]
        assert src.connects == 2
    finally:
        await src.close()


@pytest.mark.ssh
async def test_unreachable_host_backs_off_then_recovers(sshd, tmp_path):
    base = tmp_path / "lem"
    mlx_tree(base)
    src = ssh_source(sshd, base, backoff_s=1.0, connect_timeout=3)
    poller = Poller(src, layout_spec("mlx", meta=META))
    try:
        await poller.poll()
        _kill_sessions(sshd)  # the kept connection's server side, then the listener
        sshd.stop()
        await src.close()
        with pytest.raises(SourceUnavailable) as e:
            await poller.poll()
        assert "cannot connect" in str(e.value) and "next attempt in 1.0s" in str(e.value)
        attempts = src.connect_attempts
        # Within the back-off window: refused at once, without touching the network.
        with pytest.raises(SourceUnavailable, match="next attempt in"):
            await poller.poll()
        assert src.connect_attempts == attempts
        await asyncio.sleep(1.1)
        with pytest.raises(SourceUnavailable, match="next attempt in 2.0s"):
            await poller.poll()  # still down: the delay doubles
        assert src.connect_attempts == attempts + 1

        # discover_once reports the failing source and goes on with the others.
        local_base = tmp_path / "local"
        touch(local_base / "adapters-1b-x/adapter_config.json", b"{}")
        touch(local_base / "adapters-1b-x/0000003_adapters.safetensors", b"l")
        local = Poller(LocalSource(local_base, name="local"), layout_spec("mlx", meta=META))
        ledger = Ledger(tmp_path / "ledger.sqlite")
        await discover_once([local], ledger)
        rep = await discover_once([poller, local], ledger)
        assert "m3" in rep.errors and [c.label for c in rep.new] == ["G1-x @0000003"]
        assert [e.checkpoint.label for e in ledger.list()] == ["G1-x @0000003"]

        sshd.start()
        await asyncio.sleep(2.1)
        await poller.poll()
        assert src.connects == 2
    finally:
        await src.close()


# --------------------------------------------------------------------------- the remote command itself


def test_remote_command_hash_fallback_without_sha256sum_z(tmp_path):
    """The command's per-file hashing branch (hosts whose sha256sum lacks -z, e.g. macOS' shasum)."""
    import subprocess

    from checkpoints._sources import parse_remote_listing, remote_list_command

    base = tmp_path / "b a$e"
    names = ["adapters-x/0000001_adapters.safetensors", "adapters-x/we ird$(x)'q'_adapters.safetensors"]
    for n in names:
        touch(base / n, n.encode())
    cmd = remote_list_command(str(base), ["*_adapters.safetensors"], 2, names + ["adapters-x/missing"])
    want = {n: hashlib.sha256(n.encode()).hexdigest() for n in names}

    fast = parse_remote_listing(subprocess.run(["sh", "-c", cmd], capture_output=True, check=True).stdout)
    assert fast.sha256 == want and {e.relpath for e in fast.entries} == set(names)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = subprocess.run(["sh", "-c", "command -v sha256sum"], capture_output=True, text=True).stdout.strip()
    fake = bin_dir / "sha256sum"
    fake.write_text(f'#!/bin/sh\nfor a; do [ "$a" = -z ] && exit 1; done\nexec {real} "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    slow = parse_remote_listing(subprocess.run(["sh", "-c", cmd], capture_output=True, check=True, env=env).stdout)
    assert slow.sha256 == want and {e.relpath for e in slow.entries} == set(names)


async def test_restart_takes_known_checkpoints_at_once_without_rehashing(tmp_path):
    base = tmp_path / "lem"
    expected = mlx_tree(base)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    spec = layout_spec("mlx", meta=META)
    first = Poller(LocalSource(base, name="lab"), spec, ledger)
    await discover_once([first], ledger)
    before = {c.id for c in (await discover_once([first], ledger)).new}
    assert len(before) == len(expected)

    # The watcher restarts; meanwhile one checkpoint was rewritten with new bytes.
    touch(base / "adapters-mystery-run/0000007_adapters.safetensors", b"new bytes", mtime=time.time() + 10)
    src = LocalSource(base, name="lab")
    again = Poller(src, spec, ledger)
    res = await again.poll()
    assert {c.id for c in res.new} == before - {c.id for c in ledger.list() if c.checkpoint.iteration == 7}
    assert res.round_trips == 1, "known files are neither hashed again nor made to wait a poll"
    assert [p.path for p in res.pending] == [str(base / "adapters-mystery-run/0000007_adapters.safetensors")]
    [changed] = (await again.poll()).new
    assert changed.iteration == 7 and changed.id not in before


@pytest.mark.ssh
async def test_stat_and_fetch_over_sftp(ssh_server, tmp_path):
    base = tmp_path / "lem"
    f = touch(base / "adapters-1b-s/0000001_adapters.safetensors", b"s" * 1234, mtime=1_700_000_000.5)
    src = ssh_source(ssh_server, base)
    try:
        st = await src.stat(str(f))
        # SFTP v3 (OpenSSH's, asyncssh's) carries whole seconds only
        assert (st.relpath, st.size, int(st.mtime)) == ("adapters-1b-s/0000001_adapters.safetensors", 1234, 1_700_000_000)
        assert await src.stat(str(base / "nope")) is None
        with pytest.raises(SourceError, match="does not exist"):
            await src.fetch(str(base / "nope"), tmp_path / "x")
        await src.fetch(str(f), tmp_path / "copy")
        assert (tmp_path / "copy").read_bytes() == b"s" * 1234
        assert src.connects == 1
    finally:
        await src.close()

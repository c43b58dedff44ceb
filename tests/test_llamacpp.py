"""llama.cpp engine specifics: GGUF LoRA adapters, crash restart, slots, lifecycle, loopback binding.

All against the real SmolLM2 Q4_1 GGUF on xllamacpp's server (child processes of the engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from _adapters import SMOLLM2_DIMS, ModelDims, gguf_lora_mismatched, random_lora, write_corrupt, write_gguf
from cluster.config import LlamaCppModel
from deployments import (
    AdapterError,
    EngineError,
    EngineUnavailable,
    GenOpts,
    LlamaCppEngine,
    Message,
    UnsupportedOption,
    collect,
    open_engine,
)

pytestmark = [pytest.mark.engines, pytest.mark.asyncio(loop_scope="module")]

SYSTEM = "You are a helpful assistant."
STORY = "Write a short story about a robot."
GREEDY = GenOpts(temperature=0.0, seed=1, max_tokens=20)


def msgs(user: str = STORY) -> list[Message]:
    return [Message(role="system", content=SYSTEM), Message(role="user", content=user)]


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, smollm2_gguf) -> dict[str, Path]:
    """GGUF LoRA files: two good ones, and broken ones of each kind."""
    d = tmp_path_factory.mktemp("gguf-adapters")
    a = write_gguf(random_lora(SMOLLM2_DIMS, seed=1, std_b=0.1), d / "a.gguf")
    b = write_gguf(random_lora(SMOLLM2_DIMS, seed=2, std_b=0.1, modules=("q_proj", "v_proj", "o_proj")), d / "b.gguf")
    return {
        "a": a,
        "b": b,
        "missing": d / "missing.gguf",
        "truncated": write_corrupt(d / "truncated.gguf", like=a),
        "random": write_corrupt(d / "random.gguf"),
        "mismatched": gguf_lora_mismatched(d / "mismatched.gguf"),
        "transposed": write_gguf(random_lora(SMOLLM2_DIMS, seed=3), d / "transposed.gguf", transpose_a=True),
        "not_lora": smollm2_gguf,
        # blk.30 does not exist in the 30-block base
        "wrong_names": write_gguf(random_lora(ModelDims(31, 576, 1536, 9, 3, 64), seed=4), d / "wrong_names.gguf"),
        "wrong_arch": write_gguf(random_lora(ModelDims(30, 576, 1536, 9, 3, 64, arch="qwen2"), seed=5), d / "qwen2.gguf"),
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(smollm2_gguf, tmp_path_factory):
    cfg = LlamaCppModel(
        name="smollm2", engine="llamacpp", path=smollm2_gguf, max_adapters_per_replica=2,
        options={"parallel": 2, "ctx_size": 1024, "threads": 2, "start_timeout_s": 120,
                 "log_dir": str(tmp_path_factory.mktemp("llama-logs"))},
    )
    eng = open_engine(cfg)
    await eng.start()
    yield eng
    pids = [eng.server_for(None).pid, *(await eng.info()).extra["retiring_pids"]]
    await eng.close()
    assert not any(alive(p) for p in pids), "close() stops every server process"


# --------------------------------------------------------------------------- adapters


async def test_adapter_changes_output_and_base_is_unchanged_after(engine, adapters):
    base = await collect(engine.chat(msgs(), GREEDY))
    with_a = await collect(engine.chat(msgs(), GREEDY.model_copy(update={"adapter": str(adapters["a"])})))
    assert with_a.text and with_a.text != base.text
    again = await collect(engine.chat(msgs(), GREEDY.model_copy(update={"adapter": str(adapters["a"])})))
    assert again.text == with_a.text, "an adapter's greedy output is repeatable"
    after = await collect(engine.chat(msgs(), GREEDY))
    assert after.text == base.text, "the base is unchanged after adapter traffic"
    assert str(adapters["a"]) in engine.loaded_adapters
    assert str(adapters["a"]) in (await engine.info()).adapters


BAD_ADAPTERS = {
    "missing": "no such file",
    "truncated": "truncated: tensor",  # the first tensor whose data the file cuts off
    "random": "not a GGUF file",
    "mismatched": "shapes do not fit the base model",
    "transposed": "disagree on the rank",
    "not_lora": "not an adapter",
    "wrong_names": "blk.30.attn_q.weight, which the base model",
    "wrong_arch": "built for architecture 'qwen2'",
}


@pytest.mark.parametrize("kind", sorted(BAD_ADAPTERS))
async def test_bad_adapter_fails_naming_the_file(engine, adapters, kind):
    path = adapters[kind]
    with pytest.raises(AdapterError) as err:
        await collect(engine.chat(msgs(), GREEDY.model_copy(update={"adapter": str(path)})))
    assert str(path) in str(err.value)
    assert BAD_ADAPTERS[kind] in str(err.value)
    assert str(path) not in engine.loaded_adapters
    r = await collect(engine.chat(msgs(), GenOpts(max_tokens=4)))
    assert r.usage.completion_tokens == 4, "the engine still answers"


async def test_adapter_directory_is_refused(engine, tmp_path):
    with pytest.raises(AdapterError, match="directory"):
        await collect(engine.chat(msgs(), GREEDY.model_copy(update={"adapter": str(tmp_path)})))


async def test_no_adapter_leaks_into_concurrent_base_requests(engine, adapters):
    opts = {
        None: GREEDY,
        "a": GREEDY.model_copy(update={"adapter": str(adapters["a"])}),
        "b": GREEDY.model_copy(update={"adapter": str(adapters["b"])}),
    }
    solo = {k: (await collect(engine.chat(msgs(), o))).text for k, o in opts.items()}
    assert len(set(solo.values())) == 3, f"the three models should answer differently: {solo}"
    order = [None, "a", None, "b", None, "a"]
    results = await asyncio.gather(*(collect(engine.chat(msgs(), opts[k])) for k in order))
    assert [r.text for r in results] == [solo[k] for k in order]


async def test_lru_keeps_at_most_max_adapters(smollm2_gguf, adapters, tmp_path):
    """With room for one adapter, loading another replaces the server by one holding only the new
    one; the replaced server stops; an adapter loaded again answers as it did."""
    eng = LlamaCppEngine(
        "lru", smollm2_gguf, parallel=1, ctx_size=512, threads=1, max_adapters=1, log_dir=tmp_path,
        start_timeout_s=120,
    )
    async with eng:
        ra = await collect(eng.chat(msgs(), GREEDY.model_copy(update={"adapter": str(adapters["a"])})))
        pid_a = eng.server_for(adapters["a"]).pid
        rb = await collect(eng.chat(msgs(), GREEDY.model_copy(update={"adapter": str(adapters["b"])})))
        assert eng.loaded_adapters == [str(adapters["b"])]
        assert list(eng.server_for(None).adapters) == [adapters["b"]]
        assert not alive(pid_a), "the replaced server was stopped"
        ra2 = await collect(eng.chat(msgs(), GREEDY.model_copy(update={"adapter": str(adapters["a"])})))
        assert ra2.text == ra.text != rb.text
        assert eng.loaded_adapters == [str(adapters["a"])]
    started = [f.read_text().split("starting: ", 1)[1].splitlines()[0] for f in sorted(tmp_path.glob("server-*.log"))]
    assert [[Path(a).name for a in re.findall(r"--lora (\S+)", argv)] for argv in started] == [
        [], ["a.gguf"], ["b.gguf"], ["a.gguf"]], started


async def test_adapters_expected_next_are_loaded_along_in_one_server_start(smollm2_gguf, adapters, tmp_path, caplog):
    """`load_adapter(a, along=...)` starts one server holding a and as many of `along` as fit; the
    ones that fail validation are named in the log and left out; loading one that came along then
    starts nothing, and it answers as on a server of its own."""
    eng = LlamaCppEngine("along", smollm2_gguf, parallel=1, ctx_size=512, threads=1, max_adapters=2,
                         log_dir=tmp_path, start_timeout_s=120)
    assert eng.loads_adapter_sets
    async with eng:
        with caplog.at_level("WARNING", logger="deployments._engine"):
            await eng.load_adapter(adapters["a"], along=[adapters["missing"], adapters["truncated"], adapters["a"],
                                                         adapters["b"], adapters["mismatched"]])
        assert list(eng.server_for(None).adapters) == [adapters["a"], adapters["b"]]  # room for one beside a
        assert "missing.gguf" in caplog.text and "truncated.gguf" in caplog.text
        assert "mismatched.gguf" not in caplog.text, "past the room left, nothing more is read"
        assert eng.loaded_adapters == [str(adapters["a"])], "loaded along is not loaded until asked for"
        pid = eng.server_for(None).pid
        rb = await collect(eng.chat(msgs(), GREEDY.model_copy(update={"adapter": str(adapters["b"])})))
        assert eng.server_for(None).pid == pid and eng.loaded_adapters == [str(adapters["a"]), str(adapters["b"])]
    assert len(list(tmp_path.glob("server-*.log"))) == 2, "the base's server and one replacement"
    async with LlamaCppEngine("only-b", smollm2_gguf, parallel=1, ctx_size=512, threads=1, max_adapters=1,
                              log_dir=tmp_path / "only-b") as only_b:
        assert (await collect(only_b.chat(msgs(), GREEDY.model_copy(update={"adapter": str(adapters["b"])})))).text == rb.text
    each = LlamaCppEngine("each-along", smollm2_gguf, adapter_servers="each")
    assert not each.loads_adapter_sets, "a server per adapter: nothing to load along"


async def test_turn_wait_s_reaches_every_servers_slot_turns(smollm2_gguf, tmp_path):
    """options.turn_wait_s goes from the config to each server's gate (the bench compares 0, first
    come first served, against the default); unset, a request waits at most MAX_WAIT_S."""
    from deployments._llamacpp_turns import MAX_WAIT_S

    for given, want in (({"turn_wait_s": 0}, 0.0), ({}, MAX_WAIT_S)):
        eng = open_engine(LlamaCppModel(name="t", engine="llamacpp", path=smollm2_gguf,
                                        options={"log_dir": str(tmp_path), **given}))
        eng.log_dir = tmp_path  # set by start(); the server is built, not started
        assert eng._new_server({})._gate.max_wait_s == want


async def test_one_server_answers_for_the_base_and_every_adapter(smollm2_gguf, adapters, tmp_path):
    """The base and its adapters share one server process, which has every core but one by default; two
    adapters asked for at once are both loaded, and each answers as on a server of its own."""
    cores = len(os.sched_getaffinity(0))
    assert LlamaCppEngine("default", smollm2_gguf).server_threads == max(1, cores - 1)  # one core feeds it
    assert LlamaCppEngine("mine", smollm2_gguf, threads=3).server_threads == 3
    alone = {}
    for k in ("a", "b"):  # the reference: a server holding that adapter only
        async with LlamaCppEngine(f"only-{k}", smollm2_gguf, parallel=2, ctx_size=512, max_adapters=1,
                                  log_dir=tmp_path / f"only-{k}") as eng:
            alone[k] = (await collect(eng.chat(msgs(), GREEDY.model_copy(update={"adapter": str(adapters[k])})))).text
    others = {p.pid for p in psutil.Process().children(recursive=True)}
    eng = LlamaCppEngine("share", smollm2_gguf, parallel=2, ctx_size=512, max_adapters=3, log_dir=tmp_path / "share",
                         start_timeout_s=120)
    async with eng:
        got = await asyncio.gather(*(collect(eng.chat(msgs(), GREEDY.model_copy(update={"adapter": str(adapters[k])})))
                                     for k in ("a", "b")))
        assert {k: r.text for k, r in zip(("a", "b"), got)} == alone
        server = eng.server_for(None)
        assert set(server.adapters) == {adapters["a"], adapters["b"]}
        info = (await eng.info()).extra
        assert info["threads"] == max(1, cores - 1) and info["server_pid"] == server.pid
        for _ in range(200):  # the server a's request ran on may still be stopping
            ours = {p.pid for p in psutil.Process().children(recursive=True)} - others
            if ours == {server.pid}:
                break
            await asyncio.sleep(0.05)
        assert ours == {server.pid}, "one server process for the base and both adapters"
        log_text = server.log_path.read_text()
    assert re.findall(r"threadpool init, n_threads = (\d+)", log_text) == [str(max(1, cores - 1))]


async def test_each_adapter_can_have_a_server_of_its_own(smollm2_gguf, adapters, tmp_path):
    """adapter_servers "each": the adapter runs on a server of its own beside the base's, with the
    cores shared among them; evicting it stops that server; answers are the same as on one server."""
    eng = LlamaCppEngine("each", smollm2_gguf, parallel=1, ctx_size=512, max_adapters=1, adapter_servers="each",
                         log_dir=tmp_path, start_timeout_s=120)
    cores = len(os.sched_getaffinity(0))
    assert eng.server_threads == max(1, cores // min(2, cores))
    async with eng:
        ra = await collect(eng.chat(msgs(), GREEDY.model_copy(update={"adapter": str(adapters["a"])})))
        server_a = eng.server_for(adapters["a"])
        assert server_a is not eng.server_for(None) and list(server_a.adapters) == [adapters["a"]]
        assert (await eng.info()).extra["adapter_pids"] == {str(adapters["a"]): server_a.pid}
        await collect(eng.chat(msgs(), GREEDY.model_copy(update={"adapter": str(adapters["b"])})))
        assert server_a.pid is None and not eng.server_for(None).adapters
    async with LlamaCppEngine("one", smollm2_gguf, parallel=1, ctx_size=512, max_adapters=2,
                              log_dir=tmp_path / "one") as one:
        await one.load_adapter(adapters["b"])  # a second adapter on the server: a's scale 1, b's 0
        assert (await collect(one.chat(msgs(), GREEDY.model_copy(update={"adapter": str(adapters["a"])})))).text == ra.text
    with pytest.raises(EngineError, match="adapter_servers"):
        LlamaCppEngine("bad", smollm2_gguf, adapter_servers="some")


async def test_a_replaced_server_finishes_its_request(smollm2_gguf, adapters, tmp_path):
    """A long request on adapter a; loading b starts a server without a, and new requests go there;
    the request on a ends on the old server, which stops after it."""
    eng = LlamaCppEngine("evict", smollm2_gguf, parallel=1, ctx_size=512, threads=1, max_adapters=1, log_dir=tmp_path)
    async with eng:
        long_a = asyncio.create_task(
            collect(eng.chat(msgs(), GenOpts(max_tokens=400, temperature=0.9, seed=3, adapter=str(adapters["a"]))))
        )
        while eng.active_requests == 0:
            await asyncio.sleep(0.02)
        server_a = eng.server_for(adapters["a"])
        rb = await collect(eng.chat(msgs(), GenOpts(max_tokens=4, adapter=str(adapters["b"]))))
        assert rb.usage.completion_tokens == 4
        assert eng.server_for(None) is not server_a
        assert (await eng.info()).extra["retiring_pids"] == [server_a.pid]
        ra = await long_a
        assert ra.text and ra.usage.completion_tokens > 4
        for _ in range(200):
            if server_a.pid is None:
                break
            await asyncio.sleep(0.05)
        assert server_a.pid is None, "stopped once its last request finished"


async def test_adapters_disabled_rejects_adapter(smollm2_gguf, adapters, tmp_path):
    eng = LlamaCppEngine("noadapt", smollm2_gguf, parallel=1, ctx_size=512, threads=1, adapters=False, log_dir=tmp_path)
    async with eng:
        with pytest.raises(UnsupportedOption, match="adapter"):
            await collect(eng.chat(msgs(), GenOpts(max_tokens=4, adapter=str(adapters["a"]))))


# --------------------------------------------------------------------------- crashes


async def test_killed_server_is_restarted(engine):
    server = engine.server_for(None)
    pid, restarts = server.pid, server.restarts
    engine_restarts = (await engine.info()).extra["restarts"]
    got_tokens = asyncio.Event()

    async def long_request():
        async for tok in engine.chat(msgs(), GenOpts(max_tokens=500, temperature=0.9, seed=3)):
            if tok.text:
                got_tokens.set()

    task = asyncio.create_task(long_request())
    await asyncio.wait_for(got_tokens.wait(), 120)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(EngineUnavailable) as err:
        await task
    msg = str(err.value)
    assert f"pid {pid}" in msg and "SIGKILL" in msg and "restarted" in msg
    r = await collect(engine.chat(msgs(), GenOpts(max_tokens=6)))
    assert r.usage.completion_tokens == 6
    assert server.pid is not None and server.pid != pid and server.restarts == restarts + 1
    assert (await engine.info()).extra["restarts"] == engine_restarts + 1, "the engine counts its servers' restarts"
    assert await engine.health()
    assert f"(pid {pid}) was killed by SIGKILL" in server.log_path.read_text(errors="replace")


async def test_killed_adapter_server_is_restarted(engine, adapters):
    opts = GREEDY.model_copy(update={"adapter": str(adapters["a"])})
    before = await collect(engine.chat(msgs(), opts))
    server = engine.server_for(adapters["a"])
    pid = server.pid
    os.kill(pid, signal.SIGKILL)
    after = await collect(engine.chat(msgs(), opts))  # waits for the restart
    assert after.text == before.text
    assert server.pid != pid and server.restarts >= 1


async def test_too_many_crashes_leave_the_server_down(smollm2_gguf, tmp_path):
    eng = LlamaCppEngine("crashy", smollm2_gguf, parallel=1, ctx_size=512, threads=1, max_restarts=0, log_dir=tmp_path)
    async with eng:
        server = eng.server_for(None)
        os.kill(server.pid, signal.SIGKILL)
        for _ in range(200):
            if server.down_reason:
                break
            await asyncio.sleep(0.05)
        assert "left down" in (server.down_reason or "")
        assert not await eng.health()
        with pytest.raises(EngineUnavailable, match="left down"):
            await collect(eng.chat(msgs(), GenOpts(max_tokens=4)))


# --------------------------------------------------------------------------- slots, sampling


async def test_cancelled_stream_frees_the_server_slot(engine):
    server = engine.server_for(None)
    async with contextlib.aclosing(engine.chat(msgs(), GenOpts(max_tokens=500, temperature=0.9, seed=5))) as s:
        async for tok in s:
            if tok.text:
                break
    for _ in range(100):
        if not any(slot["is_processing"] for slot in await server.slots()):
            break
        await asyncio.sleep(0.05)
    assert not any(slot["is_processing"] for slot in await server.slots()), "the server dropped the request"
    assert engine.active_requests == 0


async def test_seeded_sampling_is_repeatable(engine):
    opts = GenOpts(temperature=0.9, seed=1234, max_tokens=16)
    a = await collect(engine.chat(msgs(), opts))
    b = await collect(engine.chat(msgs(), opts))
    c = await collect(engine.chat(msgs(), opts.model_copy(update={"seed": 99})))
    assert a.text == b.text
    assert c.text != a.text


# --------------------------------------------------------------------------- lifecycle, isolation


async def test_lifecycle_errors(smollm2_gguf, tmp_path):
    eng = LlamaCppEngine("life", smollm2_gguf, parallel=1, ctx_size=512, threads=1, log_dir=tmp_path)
    with pytest.raises(EngineUnavailable, match="start"):
        await collect(eng.chat(msgs(), GenOpts(max_tokens=2)))
    assert not await eng.health()
    await eng.start()
    await eng.start()  # idempotent
    pid = eng.server_for(None).pid
    assert alive(pid)
    await eng.close()
    await eng.close()  # idempotent
    assert not alive(pid)
    with pytest.raises(EngineUnavailable, match="closed"):
        await collect(eng.chat(msgs(), GenOpts(max_tokens=2)))
    with pytest.raises(EngineUnavailable, match="closed"):
        await eng.start()
    first_log = tmp_path / f"server-{os.getpid()}-0.log"  # named by the engine's process: replicas share a log_dir
    assert first_log.exists() and first_log.stat().st_size > 0


async def test_bad_model_file(tmp_path, smollm2_gguf):
    with pytest.raises(EngineError, match="does not exist"):
        await LlamaCppEngine("m", tmp_path / "nope.gguf", log_dir=tmp_path).start()
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    with pytest.raises(EngineError, match="not a GGUF"):
        await LlamaCppEngine("m", junk, log_dir=tmp_path).start()
    with pytest.raises(EngineError, match="server_binary"):
        await LlamaCppEngine("m", smollm2_gguf, server_binary=tmp_path / "llama-server", log_dir=tmp_path).start()


async def test_a_taken_port_is_replaced(smollm2_gguf, tmp_path, monkeypatch):
    import socket

    import deployments._llamacpp as llamacpp

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports, free = [busy], llamacpp._free_port
        monkeypatch.setattr(llamacpp, "_free_port", lambda: ports.pop() if ports else free())
        eng = LlamaCppEngine("port", smollm2_gguf, parallel=1, ctx_size=512, threads=1, log_dir=tmp_path)
        async with eng:
            assert eng.server_for(None).port != busy
            r = await collect(eng.chat(msgs(), GenOpts(max_tokens=3)))
            assert r.usage.completion_tokens == 3
    assert "couldn't bind" in (tmp_path / f"server-{os.getpid()}-0.log").read_text()


async def test_server_binary_path(smollm2_gguf, tmp_path):
    """options.server_binary gets the llama-server command line (here a script that runs our launcher)."""
    binary = tmp_path / "llama-server"
    binary.write_text(f"#!/bin/sh\nexec {sys.executable} -m deployments._llamacpp_server \"$@\"\n")
    binary.chmod(0o755)
    cfg = LlamaCppModel(
        name="bin", engine="llamacpp", path=smollm2_gguf,
        options={"server_binary": str(binary), "parallel": 1, "ctx_size": 512, "threads": 1, "log_dir": str(tmp_path)},
    )
    eng = open_engine(cfg)
    async with eng:
        r = await collect(eng.chat(msgs("What is the capital of France?"), GenOpts(max_tokens=8)))
        assert "paris" in r.text.lower()
        assert (await eng.info()).extra["server"] == str(binary)
    assert f"starting: {binary} -m {smollm2_gguf}" in (tmp_path / f"server-{os.getpid()}-0.log").read_text()


async def test_server_listens_on_loopback_only_and_logs_to_a_file(engine):
    server = engine.server_for(None)
    conns = [c for c in psutil.Process(server.pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert conns and all(c.laddr.ip == "127.0.0.1" for c in conns), conns
    text = server.log_path.read_text(errors="replace")
    assert "llama" in text.lower()


async def test_info(engine):
    info = await engine.info()
    assert info.architecture == "llama"
    assert info.quantization == "Q4_1"
    assert info.context_length == 1024
    assert info.extra["server_pid"] == engine.server_for(None).pid


# --------------------------------------------------------------------------- evalcluster generate


def _cli(args: list[str], config: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "--config", str(config), *args],
        capture_output=True, text=True, input=stdin, timeout=600,
    )


@pytest.fixture(scope="module")
def cli_config(tmp_path_factory, smollm2_gguf) -> Path:
    d = tmp_path_factory.mktemp("cli")
    f = d / "ray_config.yaml"
    f.write_text(
        "models:\n"
        f"  - {{name: smol, engine: llamacpp, path: {smollm2_gguf}, system_prompt: '{SYSTEM}',\n"
        "     options: {parallel: 1, ctx_size: 1024, threads: 2}}\n"
    )
    return f


async def test_generate_cli_json_and_stream_agree(cli_config):
    q = "What is the capital of France?"
    done = await asyncio.to_thread(_cli, ["--model", "smol", "--max-tokens", "12", "--seed", "1", "--json", q], cli_config)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "paris" in result["text"].lower()
    assert result["model"] == "smol" and result["finish_reason"] in ("stop", "length")
    assert 0 < result["usage"]["completion_tokens"] <= 12 and result["usage"]["prompt_tokens"] > 0
    streamed = await asyncio.to_thread(_cli, ["--max-tokens", "12", "--seed", "1", "--stream", "-"], cli_config, q)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.rstrip("\n") == result["text"]
    plain = await asyncio.to_thread(_cli, ["--max-tokens", "12", "--stop", "Paris", q], cli_config)
    assert plain.returncode == 0 and "Paris" not in plain.stdout and plain.stdout.strip()


async def test_generate_cli_errors_are_one_clear_line(cli_config, tmp_path):
    cases = [
        (["--model", "nope", "hi"], "no model named 'nope'"),
        (["--temperature", "-1", "hi"], "--temperature: Input should be greater than or equal to 0"),
        (["--adapter", str(tmp_path / "missing.gguf"), "hi"], f"adapter {tmp_path / 'missing.gguf'}: no such file"),
        (["--top-k", "5", "--json", "--stream", "hi"], "not allowed with argument"),
    ]
    for args, expected in cases:
        done = await asyncio.to_thread(_cli, args, cli_config)
        assert done.returncode != 0
        assert expected in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr


async def test_requests_past_the_slots_wait_in_the_engine_and_health_stays_answered(engine):
    """Twelve requests on a 2-slot server: the process never holds more than its slots (the rest
    queue in the engine, so llama.cpp never parks them on its HTTP threads), /health answers
    throughout, and all twelve complete."""
    server = engine.server_for(None)
    p = await server.wait_ready()
    seen = {"deferred": 0, "processing": 0, "health_ok": 0}

    async def sample() -> None:
        import httpx

        key = {"Authorization": f"Bearer {server._api_key.get_secret_value()}"}  # its per-process key
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{p.port}", timeout=10, headers=key) as http:
            while True:
                await one_sample(http)
                await asyncio.sleep(0.1)

    async def one_sample(http) -> None:
        for line in (await http.get("/metrics")).text.splitlines():
            if line.startswith("llamacpp:requests_deferred "):
                seen["deferred"] = max(seen["deferred"], int(float(line.split()[1])))
            elif line.startswith("llamacpp:requests_processing "):
                seen["processing"] = max(seen["processing"], int(float(line.split()[1])))
        if (await http.get("/health")).status_code == 200:
            seen["health_ok"] += 1

    sampler = asyncio.create_task(sample())
    try:
        results = await asyncio.gather(*(collect(engine.chat(msgs(f"Count to {i}."), GenOpts(max_tokens=24)))
                                         for i in range(12)))
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    assert all(r.usage.completion_tokens > 0 for r in results)
    assert seen["deferred"] == 0, seen
    assert 1 <= seen["processing"] <= 2, seen
    assert seen["health_ok"] >= 2, seen
    assert await server.healthy()

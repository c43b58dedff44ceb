"""The Serve app through the official `openai` client: models, chat, completions, streaming, stops,
usage, adapters by model name, every error status, LRU adapter eviction, health checks, and load."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.engines]

sys.path.insert(0, str(Path(__file__).parent))
from _adapters import gguf_lora_for  # noqa: E402
from _servers import free_port  # noqa: E402

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTION = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
STORY = [SYSTEM, {"role": "user", "content": "Write one sentence about the sea."}]
KEY_ENV = "EVALCLUSTER_TEST_SERVE_KEY"
KEY = "sk-test-serve-key"


@pytest.fixture(scope="module")
def served(ray_cluster, smollm2_gguf, tmp_path_factory):
    """The app: SmolLM2 (3 adapters, 2 per replica), a budget-of-one copy, and a model whose server is down."""
    from ray import serve

    from cluster.config import parse_config
    from cluster.runtime import deploy_app, undeploy_app
    from deployments._serve import APP_NAME

    root = tmp_path_factory.mktemp("serve")
    adapters = root / "adapters"
    adapters.mkdir()
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        gguf_lora_for(_dims(), adapters / name, seed=10 + i, std_b=0.1, modules=("q_proj", "v_proj", "o_proj"))
    os.environ[KEY_ENV] = KEY
    port = free_port()
    cfg = parse_config(
        {
            "cluster": {"serve": {"host": "127.0.0.1", "port": port, "api_key_env": KEY_ENV}},
            "models": [
                {"name": "smollm2", "engine": "llamacpp", "path": str(smollm2_gguf), "resources": {"llamacpp": 1},
                 "max_ongoing_requests": 32, "max_queued_requests": 64, "max_adapters_per_replica": 2,
                 "adapter_dirs": [str(adapters)], "options": {"parallel": 4, "ctx_size": 4096}},
                {"name": "tight", "engine": "llamacpp", "path": str(smollm2_gguf), "resources": {"llamacpp": 1},
                 "max_ongoing_requests": 1, "max_queued_requests": 1, "adapters": False,
                 "options": {"parallel": 1, "ctx_size": 1024}},
                {"name": "fragile", "engine": "llamacpp", "path": str(smollm2_gguf), "resources": {"llamacpp": 1},
                 "adapters": False, "health_check_period_s": 2, "health_check_timeout_s": 20,
                 "options": {"parallel": 1, "ctx_size": 1024, "max_restarts": 0}},
                {"name": "down", "engine": "openai", "max_ongoing_requests": 4,
                 "options": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "max_retries": 0, "timeout_s": 5}},
            ],
            "staging": {"cache_dir": str(root / "cache")},
        },
        "test",
    )
    url, _ = deploy_app(cfg)
    yield url
    serve.delete(APP_NAME)
    undeploy_app(cfg)  # this module's models, given back and deleted
    os.environ.pop(KEY_ENV, None)


def _dims():
    from _adapters import SMOLLM2_DIMS

    return SMOLLM2_DIMS


@pytest.fixture
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture
def aclient(served):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=served + "/v1", api_key=KEY, max_retries=0, timeout=300)


def greedy(client, model: str, max_tokens: int = 24, messages=QUESTION, **kw) -> str:
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, seed=0,
                                       max_tokens=max_tokens, **kw)
    return r.choices[0].message.content


# --------------------------------------------------------------------------- the happy paths


def test_models_list(client):
    ids = {m.id for m in client.models.list().data}
    assert {"smollm2", "tight", "down", "smollm2:alpha", "smollm2:beta", "smollm2:gamma"} <= ids
    info = client.models.retrieve("smollm2")
    assert info.id == "smollm2"
    assert info.model_extra["info"]["engine"] == "llamacpp"


def test_chat_completion_and_usage(client):
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, seed=0, max_tokens=24)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 10
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_honours_max_tokens(client):
    r = client.completions.create(model="smollm2", prompt="The first five prime numbers are", temperature=0,
                                  max_tokens=5)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.choices[0].text


def test_streaming_chat_equals_non_streaming(client):
    whole = greedy(client, "smollm2")
    chunks = list(client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, seed=0,
                                                 max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_streaming_completion(client):
    chunks = list(client.completions.create(model="smollm2", prompt="Once upon a time", temperature=0,
                                            max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_sequences(client):
    whole = greedy(client, "smollm2")
    assert "Paris" in whole
    cut = greedy(client, "smollm2", stop=["Paris"])
    assert cut == whole[: whole.index("Paris")]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, seed=0, max_tokens=24, stop=["Par"], stream=True)
        if c.choices)
    assert streamed == whole[: whole.index("Par")]


def test_adapter_by_model_name_changes_output(client):
    base = greedy(client, "smollm2", messages=STORY)
    adapted = greedy(client, "smollm2:alpha", messages=STORY)
    assert adapted != base
    assert greedy(client, "smollm2:alpha", messages=STORY) == adapted  # greedy is repeatable
    assert greedy(client, "smollm2", messages=STORY) == base  # the base is unchanged after adapter traffic


def _info(client, model: str = "smollm2") -> dict:
    return client.models.retrieve(model).model_extra["info"]


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_adapters_registered_next_come_along_and_eviction_keeps_outputs_right(client):
    """Three adapters on a replica limited to two (its engine holds three): the first one asked for
    starts the replica's llama.cpp server with the others too (registered after it), so asking for
    them starts no server; Serve's multiplexer still evicts the least recently used, and every
    adapter answers as before, also after its eviction."""
    info = _info(client)
    assert info["max_adapters_per_replica"] == 2 and info["engine_max_adapters"] == 3, info
    first = {"alpha": greedy(client, "smollm2:alpha", messages=STORY)}
    info = _info(client)
    pid = info["extra"]["server_pid"]
    assert len(info["extra"]["server_adapters"]) == 3, info["extra"]  # alpha, and beta and gamma along
    for name in ("beta", "gamma"):
        first[name] = greedy(client, f"smollm2:{name}", messages=STORY)
    assert len(set(first.values())) == 3
    info = _info(client)
    assert info["extra"]["server_pid"] == pid, "beta and gamma came along with alpha: no server started for them"
    loaded = info["adapters"]
    assert len(loaded) == 2 and set(loaded) <= set(info["extra"]["server_adapters"]), loaded
    # alpha comes back (Serve evicts beta), answering as before from the server that still holds it.
    assert greedy(client, "smollm2:alpha", messages=STORY) == first["alpha"]
    assert greedy(client, "smollm2:beta", messages=STORY) == first["beta"]
    assert greedy(client, "smollm2:gamma", messages=STORY) == first["gamma"]
    assert _info(client)["extra"]["server_pid"] == pid


def test_healthz(served):
    assert httpx.get(served + "/healthz", timeout=30).json() == {"status": "degraded"}  # no key: no detail
    r = httpx.get(served + "/healthz", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    body = r.json()
    assert body["models"]["smollm2"]["status"] == "ok"
    assert body["models"]["down"]["status"] == "down" and "ConnectError" in body["models"]["down"]["error"]
    assert r.status_code == 503 and body["status"] == "degraded"


# --------------------------------------------------------------------------- errors


def _status(fn) -> tuple[int, object]:
    import openai

    try:
        fn()
    except openai.APIStatusError as e:
        return e.status_code, e
    raise AssertionError("expected an error status")


def test_400_bad_requests(client):
    code, e = _status(lambda: client.chat.completions.create(model="smollm2", messages=QUESTION, n=2))
    assert code == 400 and "n" in e.message
    code, e = _status(lambda: client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=-1))
    assert code == 400 and "temperature" in e.message
    code, e = _status(lambda: client.chat.completions.create(model="smollm2", messages=QUESTION, top_logprobs=3))
    assert code == 400 and "top_logprobs" in e.message  # needs logprobs: true
    code, e = _status(lambda: client.chat.completions.create(model="smollm2", messages=[]))
    assert code == 400 and "messages" in e.message
    assert e.body["type"] == "invalid_request_error"


def test_401_bad_key(served):
    from openai import OpenAI

    for key in ("wrong", ""):
        bad = OpenAI(base_url=served + "/v1", api_key=key or "x", max_retries=0)
        if not key:
            bad = OpenAI(base_url=served + "/v1", api_key="x", max_retries=0, default_headers={"Authorization": ""})
        code, e = _status(lambda: bad.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4))
        assert code == 401 and e.body["code"] == "invalid_api_key"
    code, _ = _status(lambda: bad.models.list())
    assert code == 401


def test_404_unknown_model_or_adapter(client):
    code, e = _status(lambda: client.chat.completions.create(model="nope", messages=QUESTION))
    assert code == 404 and e.body["code"] == "model_not_found"
    code, e = _status(lambda: client.chat.completions.create(model="smollm2:nope", messages=QUESTION))
    assert code == 404 and "smollm2:nope" in e.message
    code, _ = _status(lambda: client.models.retrieve("smollm2:nope"))
    assert code == 404


def test_400_unsupported_sampling_parameters(client):
    """Sampling fields we do not implement are refused by name (OpenAI's error shape), never dropped."""
    cases = [
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"extra_body": {"min_p": 0.1}}, "min_p"),
        ({"extra_body": {"typical_p": 0.5}}, "typical_p"),
        ({"extra_body": {"mirostat": 2}}, "mirostat"),
        ({"extra_body": {"repeat_penalty": 1.3, "repeat_last_n": 16}}, "repeat_last_n"),
        ({"extra_body": {"min_tokens": 3}}, "min_tokens"),
        ({"stream": True, "extra_body": {"min_p": 0.2}}, "min_p"),
    ]
    for kw, name in cases:
        code, e = _status(lambda: client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4, **kw))
        assert code == 400, (kw, code)
        assert e.body["param"] == name and e.body["code"] == "unsupported_parameter", e.body
        assert e.body["type"] == "invalid_request_error" and f"Unsupported parameter: {name!r}" in e.body["message"]
    code, e = _status(lambda: client.completions.create(model="smollm2", prompt="Hello", max_tokens=4,
                                                        extra_body={"typical_p": 0.9}))
    assert code == 400 and e.body["param"] == "typical_p"


def test_harmless_and_neutral_fields_are_accepted(client):
    """Fields that change nothing (user, stream_options, penalties at 0, min_p 0, ...) still work,
    and the answer is the one without them."""
    plain = greedy(client, "smollm2")
    same = greedy(client, "smollm2", user="tester", frequency_penalty=0, presence_penalty=0.0,
                  extra_body={"min_p": 0.0, "typical_p": 1.0, "repeat_last_n": 64, "mirostat_tau": 5.0})
    assert same == plain
    chunks = list(client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, seed=0,
                                                 max_tokens=24, stream=True, user="tester",
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    assert chunks[-1].usage.completion_tokens > 0


def test_503_engine_down(client):
    code, e = _status(lambda: client.chat.completions.create(model="down", messages=QUESTION, max_tokens=4))
    assert code == 503
    assert e.response.headers.get("retry-after")


async def test_429_over_budget_with_retry_after(aclient):
    import openai

    async def one():
        try:
            r = await aclient.chat.completions.create(model="tight", messages=QUESTION, temperature=0, max_tokens=48)
            return 200, r.choices[0].message.content
        except openai.APIStatusError as e:
            return e.status_code, e.response.headers.get("retry-after")

    results = await asyncio.gather(*(one() for _ in range(6)))
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 1 and codes.count(429) >= 1, codes
    assert all(v for c, v in results if c == 429)  # Retry-After on every 429


# --------------------------------------------------------------------------- load


@pytest.mark.slow
async def test_200_concurrent_streams_complete_or_429(served):
    """200 streaming requests at once: each completes or is refused with 429; none hang; memory bounded."""
    import psutil

    info = httpx.get(served + "/v1/models/smollm2", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    replica = psutil.Process(info["info"]["pid"])
    rss_before = replica.memory_info().rss

    async def one(http: httpx.AsyncClient, i: int) -> str:
        body = {"model": "smollm2", "messages": QUESTION, "temperature": 0, "max_tokens": 12, "stream": True}
        async with http.stream("POST", served + "/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {KEY}"}) as r:
            if r.status_code == 429:
                assert r.headers.get("retry-after")
                return "429"
            assert r.status_code == 200, await r.aread()
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            return "ok"

    async with httpx.AsyncClient(timeout=httpx.Timeout(300), limits=httpx.Limits(max_connections=250)) as http:
        outcomes = await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(200))), timeout=600)
    assert len(outcomes) == 200
    assert outcomes.count("ok") >= 32, outcomes.count("ok")  # at least the replica's budget got through
    assert outcomes.count("ok") + outcomes.count("429") == 200
    growth = replica.memory_info().rss - rss_before
    assert growth < 200 * 2**20, f"replica grew by {growth / 2**20:.0f} MiB"
    # And it still answers afterwards.
    r = httpx.post(served + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": "smollm2", "messages": QUESTION, "temperature": 0, "max_tokens": 8})
    assert r.status_code == 200


# --------------------------------------------------------------------------- the TextModel over the handle


async def test_serve_textmodel_client_matches_http(served, client):
    """Evaluators call a Serve deployment through the same TextModel contract as a local engine."""
    from deployments import GenOpts, Message, TextModel, collect
    from deployments._serve import ServeTextModel

    model = ServeTextModel("smollm2")
    assert isinstance(model, TextModel)
    msgs = [Message(**m) for m in STORY]
    base = await collect(model.chat(msgs, GenOpts(temperature=0, seed=0, max_tokens=24)))
    assert base.text == greedy(client, "smollm2", messages=STORY)
    assert base.usage.completion_tokens > 0 and base.usage.prompt_tokens > 10
    adapted = await collect(model.chat(msgs, GenOpts(temperature=0, seed=0, max_tokens=24, adapter="alpha")))
    assert adapted.text == greedy(client, "smollm2:alpha", messages=STORY)
    assert adapted.text != base.text
    raw = await collect(model.generate("The capital of France is", GenOpts(temperature=0, max_tokens=4)))
    assert raw.finish_reason == "length" and raw.usage.completion_tokens == 4
    info = await model.info()
    assert info.engine == "llamacpp"


async def test_a_collected_answer_crosses_serve_in_one_reply(served, client):
    """An evaluation only collects (`collect(whole=True)`, the runner's), and so does the endpoint
    for a request without `stream`: the replica answers in one Ray reply, not an object per token,
    and the answer is the streamed one, word for word."""
    from ray import serve

    from deployments import GenOpts, Message, collect
    from deployments._serve import ServeTextModel, deployment_name, model_app

    model = ServeTextModel("smollm2")
    replica = serve.get_deployment_handle(deployment_name("smollm2"), model_app("smollm2"))
    msgs = [Message(**m) for m in STORY]
    before = (await replica.info.remote())["whole_answers"]
    for adapter in (None, "alpha"):
        opts = GenOpts(temperature=0, seed=0, max_tokens=24, adapter=adapter)
        streamed = await collect(model.chat(msgs, opts))
        whole = await collect(model.chat(msgs, opts), whole=True)
        assert (whole.text, whole.finish_reason, whole.usage) == (streamed.text, streamed.finish_reason, streamed.usage)
        assert whole.text
    raw = await collect(model.generate("The capital of France is", GenOpts(temperature=0, max_tokens=4)), whole=True)
    assert raw.finish_reason == "length" and raw.usage.completion_tokens == 4
    assert (await replica.info.remote())["whole_answers"] == before + 3
    unstreamed = greedy(client, "smollm2:alpha", messages=STORY)  # the endpoint, without `stream`
    assert (await replica.info.remote())["whole_answers"] == before + 4
    pieces = client.chat.completions.create(model="smollm2:alpha", messages=STORY, temperature=0, seed=0,
                                            max_tokens=24, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == unstreamed
    assert (await replica.info.remote())["whole_answers"] == before + 4  # a stream stays a stream


# --------------------------------------------------------------------------- health checks


# The replica class has an async __del__ for Serve's graceful shutdown; the garbage collector calls it
# once more on this bare instance and drops the coroutine (nothing left to close by then).
@pytest.mark.filterwarnings("ignore:coroutine '_ModelServerBase.__del__' was never awaited:RuntimeWarning")
async def test_check_health_asks_the_engine(smollm2_gguf, tmp_path):
    """The replica's health check fails once its engine is down for good (no Ray needed to see it)."""
    from deployments._serve import _ModelServerBase
    from deployments._textmodel import EngineUnavailable

    model = {"name": "solo", "engine": "llamacpp", "path": str(smollm2_gguf), "adapters": False,
             "options": {"parallel": 1, "ctx_size": 512, "threads": 1, "max_restarts": 0}}
    server = object.__new__(_ModelServerBase)
    await server.__init__(model, str(tmp_path / "cache"))
    try:
        await server.check_health()
        llama = server.engine.server_for(None)
        os.kill(llama.pid, signal.SIGKILL)
        while llama.down_reason is None:
            await asyncio.sleep(0.05)
        with pytest.raises(EngineUnavailable, match="not healthy"):
            await server.check_health()
    finally:
        await server.__del__()
    assert server.engine.state == "closed"


@pytest.mark.filterwarnings("ignore:coroutine '_ModelServerBase.__del__' was never awaited:RuntimeWarning")
def test_the_replica_finds_the_watchers_conversion(smollm2_hf, tmp_path):
    """The watcher converts a staged checkpoint into native_adapter_dir(serve cache, engine, digest)
    and registers that digest; the replica looks up the same directory and converts nothing."""
    from _ckpt_fixtures import write_mlx_adapter
    from checkpoints import StagingConfig, native_adapter_dir, prepare_adapter, sha256_tree
    from deployments import AdapterEntry, model_config
    from deployments._serve import _ModelServerBase

    staged = write_mlx_adapter(tmp_path / "staged", layers=[3], rank=4).parent
    serve_cache = StagingConfig(cache_dir=tmp_path / "cache").serve_cache_dir
    digest = sha256_tree(staged)
    # What the watcher does (cluster/_watcher.py, CheckpointWatcher._prepare) for a vLLM model:
    converted = prepare_adapter(staged, "vllm", smollm2_hf, native_adapter_dir(serve_cache, "vllm", digest))
    mark = converted / ".prepared.json"
    written = mark.stat().st_mtime_ns

    server = object.__new__(_ModelServerBase)  # the replica's adapter lookup needs no engine
    server.cfg = model_config({"name": "m", "engine": "vllm", "path": str(smollm2_hf)})
    server.cache_dir = serve_cache  # what deploy_app gives every replica
    got = server._native_adapter(staged, AdapterEntry("m", "ck", digest))
    assert got == converted and mark.stat().st_mtime_ns == written
    assert server._native_adapter(converted, AdapterEntry("m", "peft", "x")) == converted  # native


def test_a_crashed_server_is_restarted_inside_the_replica(client):
    """llama.cpp repairs itself: the replica stays, its engine runs a new server, requests go on."""
    before = _info(client)
    os.kill(before["extra"]["server_pid"], signal.SIGKILL)
    assert "Paris" in greedy(client, "smollm2")  # sent once more after the restart if it raced the crash
    after = _info(client)
    assert after["pid"] == before["pid"], "the replica should not have been replaced"
    assert after["extra"]["server_pid"] not in (None, before["extra"]["server_pid"])
    assert after["extra"]["restarts"] == before["extra"]["restarts"] + 1


def test_a_replica_whose_engine_is_dead_is_replaced(client):
    """`fragile` allows no restart: killing its server leaves the engine down, the health check
    fails, and Serve replaces the replica (a new actor process with its own llama.cpp server)."""
    before = _info(client, "fragile")
    assert "Paris" in greedy(client, "fragile")
    old_replica, old_server = before["pid"], before["extra"]["server_pid"]
    os.kill(old_server, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while True:
        try:
            now = _info(client, "fragile")
        except Exception:  # noqa: BLE001 - between replicas the model may be briefly unavailable
            now = {}
        if now.get("pid") not in (None, old_replica) and now.get("extra", {}).get("server_pid"):
            break
        assert time.monotonic() < deadline, f"the replica with a dead engine was not replaced: {now}"
        time.sleep(0.5)
    assert now["extra"]["server_pid"] != old_server and now["extra"]["restarts"] == 0
    assert "Paris" in greedy(client, "fragile")
    while not _gone(old_replica):  # Serve stops the old actor (its process exits)
        assert time.monotonic() < deadline, f"the replaced replica (pid {old_replica}) is still running"
        time.sleep(0.5)

"""The OpenAI HTTP engine: retries, backoff, Retry-After, cancellation, API key, option mapping, SSE.

Against a real HTTP server (aiohttp) on a free 127.0.0.1 port, scripted per test: it answers each
request with the next step of a script (an error status, a stream, a dropped connection) and
records what it received. Talking to a real llama.cpp server is covered by test_engines.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from _servers import free_port
from cluster.config import OpenAIModel
from deployments import (
    EngineError,
    EngineUnavailable,
    GenOpts,
    Message,
    OpenAIClient,
    OpenAIHTTPEngine,
    UnsupportedOption,
    collect,
    open_engine,
)

SECRET = "sk-test-DO-NOT-LEAK-1234"
CHAT = [Message(role="system", content="Be brief."), Message(role="user", content="Hi")]


@dataclass
class Step:
    """What the server does with one request."""

    status: int = 200
    pieces: tuple[str, ...] = ("Hello", " there", "!")
    finish: str = "stop"
    usage: tuple[int, int] | None = (5, 3)
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None  # JSON body for an error status
    drop_after: int | None = None  # close the connection after this many chunks
    raw_sse: str | None = None  # send exactly this as the event stream
    stall_s: float = 0.0  # wait this long after the first chunk


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any
    t: float


class ScriptedServer:
    """An OpenAI-style server that plays `script` (the last step repeats) and records requests."""

    def __init__(self) -> None:
        self.script: list[Step] = [Step()]
        self.seen: list[Seen] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.models = ["fake-model"]
        self._runner: web.AppRunner | None = None

    def play(self, *steps: Step) -> "ScriptedServer":
        self.script = list(steps)
        return self

    def posts(self) -> list[Seen]:
        return [s for s in self.seen if s.path != "/v1/models"]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/v1/completions", self._complete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.path, dict(request.headers), None, time.monotonic()))
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(Seen(request.path, dict(request.headers), body, time.monotonic()))
        n = len(self.posts())
        step = self.script[min(n - 1, len(self.script) - 1)]
        if step.status != 200:
            return web.json_response(
                step.body if step.body is not None else {"error": {"message": f"scripted {step.status}"}},
                status=step.status, headers=step.headers,
            )
        chat = request.path.endswith("/chat/completions")
        if body.get("stream") is False:  # one JSON reply, as OpenAI servers answer without `stream`
            text = "".join(step.pieces)
            choice = {"index": 0, "finish_reason": step.finish}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            reply: dict[str, Any] = {"choices": [choice]}
            if step.usage:
                reply["usage"] = {"prompt_tokens": step.usage[0], "completion_tokens": step.usage[1]}
            return web.json_response(reply)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if step.raw_sse is not None:
            await resp.write(step.raw_sse.encode())
            await resp.write_eof()
            return resp
        for i, piece in enumerate(step.pieces):
            if step.drop_after is not None and i == step.drop_after:
                request.transport.close()  # the connection breaks mid-stream
                return resp
            choice = {"index": 0, "finish_reason": None}
            choice.update({"delta": {"content": piece}} if chat else {"text": piece})
            await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            if step.stall_s and i == 0:
                await asyncio.sleep(step.stall_s)
        last = {"index": 0, "finish_reason": step.finish}
        last.update({"delta": {}} if chat else {"text": ""})
        await resp.write(f"data: {json.dumps({'choices': [last]})}\n\n".encode())
        if step.usage and body.get("stream_options", {}).get("include_usage"):
            u = {"prompt_tokens": step.usage[0], "completion_tokens": step.usage[1]}
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': u})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@pytest_asyncio.fixture
async def server():
    s = ScriptedServer()
    await s.start()
    yield s
    await s.stop()


def make_engine(server: ScriptedServer, **opts: Any) -> OpenAIHTTPEngine:
    options = {"base_url": server.url, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "max_retries": 3, **opts}
    return open_engine(OpenAIModel(name="remote", engine="openai", options=options))


# --------------------------------------------------------------------------- happy path


async def test_streams_chat_and_completion_with_usage(server):
    async with make_engine(server) as eng:
        assert eng.model == "fake-model", "the model id comes from /models when not configured"
        r = await collect(eng.chat(CHAT, GenOpts(max_tokens=9)))
        assert (r.text, r.finish_reason, r.usage.prompt_tokens, r.usage.completion_tokens) == ("Hello there!", "stop", 5, 3)
        server.play(Step(pieces=("a", "b"), finish="length", usage=(2, 2)))
        r = await collect(eng.generate("x", GenOpts(max_tokens=2)))
        assert (r.text, r.finish_reason, r.usage.completion_tokens) == ("ab", "length", 2)
    chat_body, comp_body = server.posts()[0].body, server.posts()[1].body
    assert server.posts()[0].path == "/v1/chat/completions" and server.posts()[1].path == "/v1/completions"
    assert chat_body["messages"] == [m.model_dump() for m in CHAT] and comp_body["prompt"] == "x"
    assert chat_body["model"] == "fake-model" and chat_body["stream"] is True
    assert chat_body["stream_options"] == {"include_usage": True}


async def test_a_whole_answer_is_asked_in_one_reply_and_equals_the_stream(server):
    """collect(whole=True) (the runner's: nobody watches the tokens) asks without `stream` and gets
    the same text, finish reason and usage as the streamed answer; a stop sequence still applies."""
    async with make_engine(server) as eng:
        streamed = await collect(eng.chat(CHAT, GenOpts(max_tokens=9)))
        whole = await collect(eng.chat(CHAT, GenOpts(max_tokens=9)), whole=True)
        raw = await collect(eng.generate("x", GenOpts(max_tokens=9)), whole=True)
        stopped = await collect(eng.chat(CHAT, GenOpts(max_tokens=9, stop=[" the"])), whole=True)
    first, second, third, fourth = (p.body for p in server.posts())
    assert first["stream"] is True and second["stream"] is False and "stream_options" not in second
    assert third["stream"] is False and fourth["stream"] is False
    assert (whole.text, whole.finish_reason, whole.usage) == (streamed.text, streamed.finish_reason, streamed.usage)
    assert whole.text == "Hello there!" and raw.text == "Hello there!"
    assert stopped.text == "Hello" and stopped.finish_reason == "stop"


async def test_without_usage_the_pieces_are_counted(server):
    server.play(Step(usage=None))
    async with make_engine(server) as eng:
        r = await collect(eng.chat(CHAT, GenOpts()))
    assert r.usage.completion_tokens == 3 and r.usage.prompt_tokens == 0


async def test_client_side_stop_when_the_server_ignores_it(server):
    server.play(Step(pieces=("Hel", "lo wo", "rld and", " more")))
    async with make_engine(server) as eng:
        pieces = [t async for t in eng.chat(CHAT, GenOpts(stop=["o wor"]))]
    assert "".join(t.text for t in pieces) == "Hell"
    assert pieces[-1].finish_reason == "stop"
    assert server.posts()[0].body["stop"] == ["o wor"], "the server gets the stop sequences too"


# --------------------------------------------------------------------------- options


async def test_option_mapping_plain_openai(server):
    async with make_engine(server, model="m1") as eng:
        await collect(eng.chat(CHAT, GenOpts(temperature=0.5, max_tokens=7, top_p=0.9, seed=3, stop=["x"])))
        body = server.posts()[0].body
        assert {k: body[k] for k in ("model", "temperature", "max_tokens", "top_p", "seed", "stop")} == {
            "model": "m1", "temperature": 0.5, "max_tokens": 7, "top_p": 0.9, "seed": 3, "stop": ["x"]}
        assert "top_k" not in body and "repeat_penalty" not in body
        for opts, name in ((GenOpts(top_k=5), "top_k"), (GenOpts(repeat_penalty=1.2), "repeat_penalty")):
            with pytest.raises(UnsupportedOption, match=f"{name}.*sampling_extensions"):
                await collect(eng.chat(CHAT, opts))
        with pytest.raises(UnsupportedOption, match="adapter"):
            await collect(eng.chat(CHAT, GenOpts(adapter="/some/adapter")))
    assert len(server.posts()) == 1, "rejected requests never reach the server"


async def test_option_mapping_extensions(server):
    async with make_engine(server, sampling_extensions="vllm") as eng:
        await collect(eng.chat(CHAT, GenOpts(top_k=5, repeat_penalty=1.2)))
        await collect(eng.chat(CHAT, GenOpts()))
    vllm, vllm_off = server.posts()[0].body, server.posts()[1].body
    assert vllm["top_k"] == 5 and vllm["repetition_penalty"] == 1.2
    assert "top_k" not in vllm_off and "repetition_penalty" not in vllm_off
    async with make_engine(server, sampling_extensions="llamacpp") as eng:
        await collect(eng.chat(CHAT, GenOpts(top_k=5, repeat_penalty=1.2)))
        await collect(eng.chat(CHAT, GenOpts()))
    llama, llama_off = server.posts()[2].body, server.posts()[3].body
    assert llama["top_k"] == 5 and llama["repeat_penalty"] == 1.2
    # llama.cpp's own defaults (top_k 40, top_p 0.95, min_p 0.05) must not apply to "off".
    assert (llama_off["top_k"], llama_off["top_p"], llama_off["min_p"], llama_off["repeat_penalty"]) == (0, 1.0, 0.0, 1.0)


async def test_chat_only_refuses_raw_completion(server):
    async with make_engine(server, chat_only=True) as eng:
        with pytest.raises(EngineError, match="chat_only"):
            await collect(eng.generate("x", GenOpts()))


# --------------------------------------------------------------------------- retries


async def test_retries_5xx_then_succeeds(server):
    server.play(Step(status=503), Step(status=502), Step())
    async with make_engine(server) as eng:
        r = await collect(eng.chat(CHAT, GenOpts()))
    assert r.text == "Hello there!"
    assert len(server.posts()) == 3


async def test_honours_retry_after(server):
    server.play(Step(status=429, headers={"Retry-After": "1"}), Step())
    async with make_engine(server) as eng:
        r = await collect(eng.chat(CHAT, GenOpts()))
    assert r.text == "Hello there!"
    first, second = server.posts()
    assert second.t - first.t >= 1.0, "waited at least what Retry-After asked"


async def test_retry_after_too_long_fails_at_once(server):
    server.play(Step(status=429, headers={"Retry-After": "3600"}))
    async with make_engine(server, retry_after_max_s=60) as eng:
        with pytest.raises(EngineUnavailable, match="3600 s.*retry_after_max_s"):
            await collect(eng.chat(CHAT, GenOpts()))
    assert len(server.posts()) == 1


async def test_gives_up_after_max_retries(server):
    server.play(Step(status=500))
    async with make_engine(server, max_retries=2) as eng:
        with pytest.raises(EngineUnavailable, match="HTTP 500.*gave up after 3 attempts"):
            await collect(eng.chat(CHAT, GenOpts()))
    assert len(server.posts()) == 3


async def test_client_errors_are_not_retried(server):
    server.play(Step(status=400, body={"error": {"message": "max_tokens is too large"}}))
    async with make_engine(server) as eng:
        with pytest.raises(EngineError, match="HTTP 400: max_tokens is too large") as err:
            await collect(eng.chat(CHAT, GenOpts()))
        assert not isinstance(err.value, EngineUnavailable)
    assert len(server.posts()) == 1


async def test_no_retry_once_the_stream_started(server):
    server.play(Step(pieces=("a", "b", "c", "d"), drop_after=2), Step())
    async with make_engine(server) as eng:
        got: list[str] = []
        with pytest.raises(EngineUnavailable, match="mid-stream"):
            async for tok in eng.chat(CHAT, GenOpts()):
                got.append(tok.text)
    assert "".join(got) == "ab"
    assert len(server.posts()) == 1


async def test_a_stalled_stream_times_out(server):
    server.play(Step(stall_s=3.0))
    async with make_engine(server, timeout_s=0.3) as eng:
        got: list[str] = []
        with pytest.raises(EngineUnavailable, match="timed out"):
            async for tok in eng.chat(CHAT, GenOpts()):
                got.append(tok.text)
    assert got == ["Hello"]
    assert len(server.posts()) == 1, "a request that started streaming is not retried"


async def test_connect_errors_are_retried_then_fail(server):
    port = free_port()  # nothing listens here
    client = OpenAIClient(f"http://127.0.0.1:{port}/v1", max_retries=2, backoff_base_s=0.01, backoff_max_s=0.02)
    try:
        with pytest.raises(EngineUnavailable, match="ConnectError.*gave up after 3 attempts"):
            async for _ in client.stream_events("/chat/completions", {"stream": True}):
                pass
        assert client.attempts == 3
    finally:
        await client.aclose()


async def test_server_that_comes_up_during_retries(server):
    port = free_port()
    late = ScriptedServer()
    late.port, late.url = port, f"http://127.0.0.1:{port}/v1"
    eng = OpenAIHTTPEngine("late", late.url, model="m", max_retries=20, backoff_base_s=0.05, backoff_max_s=0.1)
    task = asyncio.create_task(eng.start())
    await asyncio.sleep(0.3)
    assert not task.done(), "still retrying the connection"
    await late.start()
    try:
        await task
        r = await collect(eng.chat(CHAT, GenOpts()))
        assert r.text == "Hello there!"
        assert eng.client.attempts > 2
    finally:
        await eng.close()
        await late.stop()


async def test_cancel_stops_retrying_at_once(server):
    server.play(Step(status=503))
    eng = make_engine(server, backoff_base_s=60, backoff_max_s=60, max_retries=5)
    await eng.start()
    try:
        task = asyncio.create_task(collect(eng.chat(CHAT, GenOpts())))
        while not server.posts():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # now in the 30-60 s backoff sleep
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(server.posts()) == 1, "no retry after the cancel"
        assert eng.active_requests == 0
    finally:
        await eng.close()


# --------------------------------------------------------------------------- API key


async def test_api_key_from_env_is_sent_as_bearer_and_never_shown(server, monkeypatch, caplog):
    monkeypatch.setenv("EVAL_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    server.play(Step(status=503), Step())
    eng = make_engine(server, api_key_env="EVAL_TEST_KEY")
    async with eng:
        await collect(eng.chat(CHAT, GenOpts()))
        shown = " ".join([repr(eng), str(eng), repr(eng.client), str(await eng.info()), caplog.text])
    assert all(s.headers.get("Authorization") == f"Bearer {SECRET}" for s in server.seen)
    assert SECRET not in shown


async def test_api_key_from_file(server, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    async with make_engine(server, api_key_file=str(key_file)) as eng:
        await collect(eng.chat(CHAT, GenOpts()))
    assert server.posts()[0].headers["Authorization"] == f"Bearer {SECRET}"


async def test_missing_api_key_is_a_clear_error(server, monkeypatch, tmp_path):
    monkeypatch.delenv("EVAL_TEST_MISSING_KEY", raising=False)
    with pytest.raises(EngineError, match="EVAL_TEST_MISSING_KEY is not set"):
        await make_engine(server, api_key_env="EVAL_TEST_MISSING_KEY").start()
    with pytest.raises(EngineError, match="cannot read"):
        await make_engine(server, api_key_file=str(tmp_path / "nope")).start()


async def test_unauthorized_names_the_key_settings(server):
    server.play(Step(status=401))
    async with make_engine(server) as eng:
        with pytest.raises(EngineError, match="HTTP 401.*api_key_env"):
            await collect(eng.chat(CHAT, GenOpts()))
    assert len(server.posts()) == 1


# --------------------------------------------------------------------------- SSE details


async def test_sse_comments_multiline_data_and_done(server):
    chunk = json.dumps({"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]})
    cut = chunk.index('"choices"')  # one event's data split over two lines (joined with a newline)
    raw = (
        ": keep-alive\n\n"
        f"data: {chunk[:cut]}\ndata: {chunk[cut:]}\n\n"
        'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}\n\n'
        "data: [DONE]\n\n"
        'data: {"choices": [{"index": 0, "delta": {"content": "after done"}}]}\n\n'
    )
    server.play(Step(raw_sse=raw))
    async with make_engine(server) as eng:
        r = await collect(eng.chat(CHAT, GenOpts()))
    assert (r.text, r.finish_reason) == ("Hi", "length")


async def test_error_event_mid_stream(server):
    raw = (
        'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n'
        'event: error\ndata: {"error": {"message": "the model crashed"}}\n\n'
    )
    server.play(Step(raw_sse=raw))
    async with make_engine(server) as eng:
        with pytest.raises(EngineError, match="the model crashed"):
            await collect(eng.chat(CHAT, GenOpts()))


async def test_health_and_info(server):
    eng = make_engine(server, model="m2")
    assert not await eng.health()
    async with eng:
        assert await eng.health()
        info = await eng.info()
        assert info.engine == "openai" and info.extra["model"] == "m2" and info.extra["base_url"] == server.url
    assert not await eng.health()

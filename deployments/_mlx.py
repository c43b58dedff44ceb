"""MLX as a TextModel: mlx-lm in this process, on Apple Silicon or (for tests) on Linux CPU.

One worker thread owns everything MLX does (loading, generating, freeing), because MLX is not
safe to drive from several threads at once. Requests queue for it; each streams its tokens back
to the event loop through an asyncio.Queue. Closing or cancelling a stream sets a flag the
worker checks before every token, so the generation stops at the next token and the worker moves
on; a request still waiting in the queue is dropped without running.

Adapters (mlx-lm format: a directory with adapter_config.json and adapters.safetensors) are
loaded with mlx-lm's own `load_adapters`, onto a second instance of the model whose base weights
are the loaded base's arrays (MLX arrays are shared, not copied), so one adapter costs its LoRA
weights only, and the base model itself is never touched: a base request can never see an
adapter. At most min(options.max_loaded, max_adapters_per_replica) adapter models stay loaded;
loading one more drops the least recently used, and a stream still running on it keeps its own
reference until it ends.

Sampling: mlx-lm's `make_sampler` (temperature, top_p, top_k) and `make_logits_processors`
(repetition penalty over the last REPEAT_LAST_N tokens, llama.cpp's default window); the seed
goes to `mx.random.seed` right before the request runs (requests run one at a time, so no other
request draws from the generator in between).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import mlx.core as mx
import numpy as np
import mlx.nn as nn
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.utils import load, load_adapters, load_model

from checkpoints import CONFIG_NAME, MLX_WEIGHTS, AdapterError, read_header, read_mlx
from deployments._engine import OPTIONAL_OPTIONS, Engine, Request, loaded_model_settings, package_version
from deployments._hfmodel import HFModelFacts, chat_token_ids, prompt_token_ids, read_model_dir
from deployments._textmodel import (
    EngineError,
    EngineUnavailable,
    FinishReason,
    GenOpts,
    Message,
    ModelInfo,
    Token,
    TokenScore,
    Usage,
)

log = logging.getLogger(__name__)

# llama.cpp's default repeat_last_n: GenOpts.repeat_penalty is "llama.cpp-style".
REPEAT_LAST_N = 64
_END = object()  # the worker's last item on a request's queue
_DROPPED = object()  # the request never ran: the engine closed while it waited


class MLXEngine(Engine):
    """An HF-format (or mlx-community) model on mlx-lm, with mlx-lm LoRA adapters.

    `from_config` (Engine's) builds it from an MLXModel, whose `options` fields are keywords here.

    Args:
        name: the model's name.
        model_path: the model directory (config.json, tokenizer, *.safetensors).
        max_loaded: adapter models kept in memory at once (each shares the base weights).
        system_prompt / adapters / max_adapters: see Engine; the adapter cache holds
            min(max_loaded, max_adapters) adapters.
    """

    kind = "mlx"
    supported_options = OPTIONAL_OPTIONS  # top_k, top_p, repeat_penalty, stop, seed, adapter

    def __init__(
        self,
        name: str,
        model_path: Path,
        *,
        max_loaded: int = 2,
        system_prompt: str | None = None,
        adapters: bool = True,
        max_adapters: int = 4,
    ) -> None:
        if max_loaded < 1 or max_adapters < 1:
            raise ValueError("max_loaded and max_adapters must be at least 1")
        super().__init__(
            name, system_prompt=system_prompt, adapters=adapters, max_adapters=min(max_loaded, max_adapters)
        )
        self.model_path = Path(model_path)
        self.max_loaded = max_loaded
        self.generated_tokens = 0  # decoded by the worker since start (cancelled requests included)
        self._facts: HFModelFacts | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._base: nn.Module | None = None
        self._tokenizer: Any = None
        self._linear: dict[str, tuple[int, int]] = {}  # base linear module path -> (out, in)
        self._n_layers = 0
        self._models: dict[Path, nn.Module] = {}  # adapter path -> model with that adapter
        self._cancels: set[threading.Event] = set()

    # ------------------------------------------------------------------ the worker

    async def _on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the MLX worker thread, after whatever is queued before it."""
        if self._executor is None:
            raise EngineUnavailable(f"mlx engine {self.name!r} is not running")
        try:
            job = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except RuntimeError:  # "cannot schedule new futures after shutdown"
            raise EngineUnavailable(f"mlx engine {self.name!r} is closed") from None
        return await job

    # ------------------------------------------------------------------ lifecycle

    async def _start(self) -> None:
        self._facts = read_model_dir(self.model_path, self.kind)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mlx-{self.name}")
        try:
            await self._on_worker(self._load_base)
        except EngineError:
            raise
        except Exception as e:  # noqa: BLE001 - mlx-lm raises ValueError/KeyError/... on a bad model
            raise EngineError(f"mlx-lm could not load {self.model_path}: {type(e).__name__}: {e}") from e

    def _load_base(self) -> None:
        overrides = self._model_overrides()
        if overrides:
            log.warning("%s: config.json has rope_theta only in rope_parameters; passing %s to mlx-lm",
                        self.model_path, overrides["rope_theta"])
        t0 = time.perf_counter()
        model, tokenizer = load(str(self.model_path), model_config=overrides)
        self._base, self._tokenizer = model, tokenizer
        self._n_layers = len(getattr(model, "layers", ()))
        self._linear = _linear_shapes(model)
        log.info("mlx: loaded %s in %.1f s on %s", self.model_path, time.perf_counter() - t0, mx.default_device())

    def _model_overrides(self) -> dict[str, Any] | None:
        """config.json fixes mlx-lm needs: transformers 5 writes rope_theta only inside
        rope_parameters, and mlx-lm would fall back to 10000 and talk fluent nonsense (infra.md §7)."""
        cfg = self._facts.config if self._facts else {}
        rope = cfg.get("rope_parameters")
        if "rope_theta" not in cfg and isinstance(rope, dict) and rope.get("rope_theta"):
            return {"rope_theta": float(rope["rope_theta"])}
        return None

    async def _close(self) -> None:
        for ev in list(self._cancels):
            ev.set()
        executor, self._executor = self._executor, None
        self._models.clear()
        self._base = self._tokenizer = None
        if executor is not None:
            # Waits for the request in progress to notice its cancel flag (one token at most).
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
            _free_memory()  # the worker is gone: nothing else drives MLX now

    async def _health(self) -> bool:
        return self._executor is not None and self._base is not None

    def engine_version(self) -> str:
        return package_version("mlx-lm")

    async def _settings_in_effect(self) -> dict[str, Any]:
        return loaded_model_settings(await self._info(), self._tokenizer, self.system_prompt)

    async def _info(self) -> ModelInfo:
        facts = self._facts
        assert facts is not None
        return ModelInfo(
            self.name,
            self.kind,
            architecture=facts.architecture,
            context_length=facts.context_length,
            quantization=facts.quantization,
            extra={
                "path": str(self.model_path),
                "device": str(mx.default_device()),
                "max_loaded": self.max_adapters,
                "generated_tokens": self.generated_tokens,
                "active_memory_bytes": mx.get_active_memory(),
            },
        )

    # ------------------------------------------------------------------ adapters

    def validate_adapter(self, path: Path) -> None:
        """An mlx-lm adapter directory whose LoRA tensors fit the loaded model's linear layers.

        Checks what mlx-lm's `load_adapters` needs and would otherwise fail on with a
        KeyError or AttributeError (num_layers, lora_parameters with rank/scale/dropout), the
        safetensors file itself (header, sizes: see checkpoints._safetensors), and every
        tensor's name and shape against the base model: lora_a (in, r), lora_b (r, out), on a
        layer within the last num_layers and a module listed in lora_parameters.keys.
        """
        if not path.is_dir():
            raise AdapterError(str(path), f"an MLX adapter is a directory holding {CONFIG_NAME} and {MLX_WEIGHTS}")
        weights, cfg_path = path / MLX_WEIGHTS, path / CONFIG_NAME
        if not weights.is_file():
            raise AdapterError(str(weights), "missing (an mlx-lm adapter directory holds adapters.safetensors)")
        adapter = read_mlx(weights, cfg_path)  # config JSON, scale, rank, tensor pairs, header integrity
        cfg = _read_json(cfg_path)
        params = cfg.get("lora_parameters")
        if not isinstance(params, dict):
            raise AdapterError(str(cfg_path), "mlx-lm needs a lora_parameters object (rank, scale, dropout, keys)")
        for key in ("rank", "scale", "dropout"):
            if key not in params:
                raise AdapterError(str(cfg_path), f"lora_parameters has no {key!r} (mlx-lm reads it)")
        num_layers = cfg.get("num_layers")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise AdapterError(str(cfg_path), f"num_layers must be a positive integer (mlx-lm reads it), got {num_layers!r}")
        keys = params.get("keys")
        infos, _, _ = read_header(weights)
        first = max(0, self._n_layers - num_layers)
        for module, pair in adapter.pairs.items():
            want = self._linear.get(module)
            if want is None:
                raise AdapterError(str(weights), f"{module}: the base model {self.model_path} has no linear layer of that name")
            out_f, in_f = want
            a_shape, b_shape = infos[f"{module}.lora_a"].shape, infos[f"{module}.lora_b"].shape
            r = pair.rank
            if a_shape != (in_f, r) or b_shape != (r, out_f):
                hint = ""
                if a_shape == (r, in_f) and b_shape == (out_f, r):
                    hint = " (stored (r, in)/(out, r) as go-ml's trainer writes them: convert with checkpoints.convert(..., to='mlx'))"
                raise AdapterError(
                    str(weights),
                    f"{module}: lora_a {list(a_shape)} / lora_b {list(b_shape)} do not fit the base layer "
                    f"({in_f} in, {out_f} out): mlx-lm needs lora_a [{in_f}, r] and lora_b [r, {out_f}]{hint}",
                )
            layer = _layer_index(module)
            if layer is not None and layer < first:
                raise AdapterError(
                    str(weights), f"{module}: layer {layer} is outside the last num_layers={num_layers} of {self._n_layers} "
                    f"layers that mlx-lm converts to LoRA ({cfg_path})",
                )
            if isinstance(keys, list) and keys and not any(module.endswith("." + k) for k in keys):
                raise AdapterError(str(weights), f"{module}: not among lora_parameters.keys {keys} in {cfg_path}")

    async def _load_adapter(self, path: Path, along: Sequence[Path] = ()) -> None:
        try:
            self._models[path] = await self._on_worker(self._adapter_model, path)
        except (AdapterError, EngineUnavailable):
            raise
        except Exception as e:  # noqa: BLE001 - mlx-lm's errors on a bad adapter vary
            raise AdapterError(str(path), f"mlx-lm could not load it: {type(e).__name__}: {e}") from e

    def _adapter_model(self, path: Path) -> nn.Module:
        base = self._base
        if base is None:
            raise EngineUnavailable(f"mlx engine {self.name!r} is closed")
        # The structure only: its lazily loaded weights are replaced by the base's arrays before
        # anything evaluates them, so nothing is read or copied.
        model, _ = load_model(self.model_path, lazy=True, model_config=self._model_overrides())
        model.update(base.parameters())
        load_adapters(model, str(path))
        model.eval()
        mx.eval(model.parameters())
        return model

    async def _unload_adapter(self, path: Path) -> None:
        if self._models.pop(path, None) is not None and self._executor is not None:
            await self._on_worker(_free_memory)

    # ------------------------------------------------------------------ requests

    async def _model_for(self, adapter: Path | None) -> nn.Module:
        """The base model, or the model with that adapter (loaded again if it was evicted)."""
        if adapter is None:
            model = self._base
        else:
            model = self._models.get(adapter)
            if model is None:  # evicted between the load and now: load it again
                await self.load_adapter(adapter)
                model = self._models[adapter]
        if model is None or self._executor is None:
            raise EngineUnavailable(f"mlx engine {self.name!r} is not running")
        return model

    # ------------------------------------------------------------------ loglikelihood

    @property
    def score_window(self) -> int:
        return self._facts.context_length if self._facts and self._facts.context_length else 2048

    async def _tokenize(self, text: str) -> list[int]:
        tokenizer = self._tokenizer
        if tokenizer is None:
            raise EngineUnavailable(f"mlx engine {self.name!r} is not running")
        return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]

    async def _token_texts(self, ids: list[int]) -> list[str]:
        tokenizer = self._tokenizer
        if tokenizer is None:
            raise EngineUnavailable(f"mlx engine {self.name!r} is not running")
        return [tokenizer.decode([i]) for i in ids]

    async def _chat_ids(self, messages: list[Message]) -> list[int]:
        tokenizer = self._tokenizer
        if tokenizer is None:
            raise EngineUnavailable(f"mlx engine {self.name!r} is not running")
        return chat_token_ids(tokenizer, messages)  # what _generate's prompt_token_ids gives a chat

    async def _eot_id(self) -> int:
        tokenizer = self._tokenizer
        if tokenizer is None:
            raise EngineUnavailable(f"mlx engine {self.name!r} is not running")
        if tokenizer.eos_token_id is None:
            raise EngineError(f"the tokenizer of {self.model_path} has no eos_token_id to score a text without context")
        return int(tokenizer.eos_token_id)

    async def _score(self, ids: list[int], start: int, adapter: Path | None, top_n: int) -> list[TokenScore]:
        model = await self._model_for(adapter)
        return await self._on_worker(_forward_scores, model, ids, start, top_n)

    # ------------------------------------------------------------------ requests

    async def _stream(self, req: Request) -> AsyncIterator[Token]:
        model = await self._model_for(req.adapter)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                cancel.set()

        self._cancels.add(cancel)
        try:
            job = loop.run_in_executor(self._executor, self._generate, model, req, cancel, emit)
        except RuntimeError:
            self._cancels.discard(cancel)
            raise EngineUnavailable(f"mlx engine {self.name!r} is closed") from None
        job.add_done_callback(lambda f: queue.put_nowait(_DROPPED) if f.cancelled() else None)
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if item is _DROPPED or isinstance(item, _Cancelled):
                    raise EngineUnavailable(f"mlx engine {self.name!r} was closed during the request")
                if isinstance(item, BaseException):
                    if isinstance(item, EngineError):
                        raise item
                    raise EngineError(f"mlx generation failed: {type(item).__name__}: {item}") from item
                yield item
        finally:
            cancel.set()  # a running generation stops at its next token
            job.cancel()  # a queued one never starts
            self._cancels.discard(cancel)

    def _generate(self, model: nn.Module, req: Request, cancel: threading.Event, emit: Callable[[Any], None]) -> None:
        """Worker thread: run one request, emitting Tokens, then an exception or nothing, then _END."""
        try:
            if cancel.is_set():
                emit(_Cancelled())
                return
            tokenizer = self._tokenizer
            if tokenizer is None:
                raise EngineUnavailable(f"mlx engine {self.name!r} is closed")
            ids = prompt_token_ids(tokenizer, req)
            o = req.opts
            if o.seed is not None:
                mx.random.seed(o.seed)
            sampler, processors = sampling(o)
            steps = stream_generate(
                model, tokenizer, ids, max_tokens=o.max_tokens, sampler=sampler, logits_processors=processors
            )
            text = TextStream(tokenizer)
            try:
                for r in steps:
                    self.generated_tokens += 1
                    if cancel.is_set():  # read only when the engine closed; the caller left otherwise
                        emit(_Cancelled())
                        return
                    finish: FinishReason | None = None
                    if r.finish_reason == "stop":  # the end-of-sequence token: no text of its own
                        finish, piece = "stop", text.flush()
                    else:
                        piece = text.add(int(r.token))
                        if r.finish_reason is not None:
                            finish, piece = "length", piece + text.flush()
                    emit(Token(piece, int(r.token), finish, Usage(len(ids), int(r.generation_tokens))))
            finally:
                steps.close()
        except BaseException as e:  # noqa: BLE001 - handed to the request's stream, which raises it
            emit(e)
        finally:
            emit(_END)


def _forward_scores(model: nn.Module, ids: list[int], start: int, top_n: int) -> list[TokenScore]:
    """Worker thread: one forward pass over ids[:-1]; the float32 log-softmax scores ids[start:]."""
    logits = model(mx.array(ids[:-1])[None])[0, start - 1 :].astype(mx.float32)
    logprobs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    out = []
    for row, target in zip(logprobs, ids[start:]):
        lp = float(row[target])
        top = np.argsort(-row, kind="stable")[:top_n].tolist() if top_n else []
        out.append(TokenScore(target, lp, lp >= float(row.max()), [(int(t), float(row[t])) for t in top]))
    return out


def sampling(opts: GenOpts) -> tuple[Callable[[mx.array], mx.array], list[Callable] | None]:
    """mlx-lm's sampler and logits processors for a request's options.

    Temperature 0 is greedy (top_p / top_k then change nothing); the repetition penalty looks at
    the last REPEAT_LAST_N tokens.

    Args:
        opts: the request's options.
    """
    sampler = make_sampler(temp=opts.temperature, top_p=opts.top_p or 0.0, top_k=opts.top_k or 0)
    processors = None
    if opts.repeat_penalty is not None and opts.repeat_penalty != 1.0:
        processors = make_logits_processors(
            repetition_penalty=opts.repeat_penalty, repetition_context_size=REPEAT_LAST_N
        )
    return sampler, processors


class TextStream:
    """Incremental detokenizer: the text each new token adds, exactly as the tokenizer decodes.

    Used instead of mlx-lm's streaming detokenizer, which drops the leading space of a
    generation (" Paris" after "The capital of France is" came out as "Paris"). Text that ends
    in an incomplete UTF-8 sequence is held back until the next token completes it.

    Args:
        tokenizer: the model's tokenizer (anything with `decode(ids, skip_special_tokens=...)`).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # decoding starts here, a token before the new ones, for context
        self._read = 0  # tokens up to here have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Add a generated token; return the text that is now complete."""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        now = self._decode(self._ids[self._prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return now[len(before) :]

    def flush(self) -> str:
        """End of generation: whatever is still held back."""
        before = self._decode(self._ids[self._prefix : self._read])
        now = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return now[len(before) :]


class _Cancelled:
    """The worker stopped a request because its cancel flag was set."""


def _free_memory() -> None:
    """Return MLX's cached buffers to the system (on the worker, or once it has stopped)."""
    mx.clear_cache()


def _linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear layer of a loaded mlx-lm model: module path -> (out, in) features."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            out_f, packed = m.weight.shape
            shapes[name] = (int(out_f), int(packed) * 32 // int(m.bits))
        elif isinstance(m, nn.Linear):
            out_f, in_f = m.weight.shape
            shapes[name] = (int(out_f), int(in_f))
    return shapes


def _layer_index(module: str) -> int | None:
    parts = module.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(str(path), f"cannot read it as JSON: {e}") from None
    if not isinstance(data, dict):
        raise AdapterError(str(path), "must be a JSON object")
    return data

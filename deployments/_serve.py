"""Ray Serve deployments: one class hosts any engine; an OpenAI-compatible FastAPI ingress in front.

Adapters are Serve multiplexed model ids: a request for `base:adapter` is routed to a replica that
already holds the adapter when one is free; each replica keeps at most `max_adapters_per_replica`
and Serve's LRU eviction calls `LoadedAdapter.__del__`, which releases what the engine held.
Serve's multiplexer is the one that decides: the engine's own adapter LRU gets one place more than
the multiplex limit, so it is only a backstop (were the eviction hook ever not to run, a replica
would show one adapter too many in its info instead of the engine quietly covering for it).

Health: Serve calls `check_health` every `health_check_period_s`; it asks the engine. An engine
that repairs itself (llama.cpp restarts a crashed server up to `max_restarts` times a minute)
passes again once it has; one that is down for good fails, and Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

from checkpoints import AdapterError
from deployments._textmodel import (
    EngineError,
    EngineUnavailable,
    GenOpts,
    Loglikelihood,
    Message,
    ModelInfo,
    WHOLE_ANSWER,
    Token,
    TokenScore,
)

if TYPE_CHECKING:
    from deployments._engine import Engine
    from deployments._registry import AdapterEntry

log = logging.getLogger("evalcluster.serve")

APP_NAME = "evalcluster"  # the OpenAI ingress's application; each model has its own (`model_app`)
INGRESS_NAME = "openai-ingress"


def deployment_name(model: str) -> str:
    return f"model-{model}"


def model_app(model: str) -> str:
    """The Serve application of one model: deploying one job's model never redeploys another's."""
    return f"{APP_NAME}-{model}"


@dataclass
class LoadedAdapter:
    """An adapter loaded into this replica's engine; Serve calls __del__ when it evicts it.

    Args:
        model_id: the multiplexed model id, `base:adapter`.
        path: the adapter in the engine's format, as the engine loaded it.
        engine: the replica's engine.
        loop: the replica's event loop (the engine's unload runs there).
        unloaded: set once the engine was told to unload it.
    """

    model_id: str
    path: str
    engine: "Engine"
    loop: asyncio.AbstractEventLoop
    unloaded: bool = False

    def __del__(self) -> None:
        # Serve's multiplexer runs a plain __del__ in a worker thread on LRU eviction; the engine's
        # unload is a coroutine on the replica's loop. (An async __del__ would also be called by the
        # garbage collector, and never awaited.) When the collector calls this after the eviction,
        # or on the loop's own thread at shutdown, there is nothing to do or no way to wait.
        if self.unloaded:
            return
        self.unloaded = True
        unload = getattr(self.engine, "unload_adapter", None)
        if unload is None or self.loop.is_closed() or _on_loop_thread(self.loop):
            return
        try:
            asyncio.run_coroutine_threadsafe(unload(self.path), self.loop).result(timeout=120)
        except Exception:  # noqa: BLE001 - eviction must not take the replica down
            log.exception("unloading adapter %s failed", self.model_id)


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class _ModelServerBase:
    """Hosts one engine. Subclassed per model with the multiplex limit baked in (see `model_server_class`)."""

    async def __init__(self, model: dict[str, Any], cache_dir: str) -> None:
        from deployments._config import model_config
        from deployments._factory import open_engine

        self.cfg = model_config(model)
        self.cache_dir = Path(cache_dir)
        self.engine = open_engine(self.cfg)
        limit = self.cfg.max_adapters_per_replica
        if self.engine.max_adapters == limit:  # (an engine with a tighter cap of its own keeps it)
            self.engine.max_adapters = limit + 1  # Serve evicts first: see the module docstring
        self.started = time.time()
        # in_flight: streams at the engine now; peak_in_flight: the most there were at once;
        # whole_answers: requests answered in one reply (`whole`), part of `requests`.
        self.stats = {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0, "in_flight": 0,
                      "peak_in_flight": 0, "whole_answers": 0}
        self._registry = None
        self._known_adapters: set[str] = set()  # multiplexed ids found in the registry
        self._loaded_ids: set[str] = set()  # multiplexed ids this replica's multiplexer has loaded
        self.start_error: str | None = None
        self._retry_task: asyncio.Task | None = None
        try:
            await self.engine.start()
        except EngineError as e:
            if not self.remote_upstream:
                raise  # a local engine that cannot start is a deployment error: say so now
            # A remote server being down is not this replica's fault and replacing the replica will
            # not fix it: come up, answer 503 with the reason, and keep trying in the background.
            self.start_error = str(e).splitlines()[0]
            self._retry_task = asyncio.get_running_loop().create_task(self._retry_start())

    @property
    def remote_upstream(self) -> bool:
        return self.cfg.engine == "openai"

    async def _retry_start(self) -> None:
        delay = 1.0
        while not self.engine.running:
            await asyncio.sleep(delay)
            try:
                await self.engine.start()
                self.start_error = None
            except EngineError as e:
                self.start_error = str(e).splitlines()[0]
                delay = min(delay * 2, 30.0)

    def _require_up(self) -> None:
        if self.start_error is not None:
            raise EngineUnavailable(f"model {self.cfg.name!r} is down: {self.start_error}")

    # ----------------------------------------------------------------- adapters

    async def _registered(self, model_id: str) -> "AdapterEntry":
        """The registry's entry for `base:adapter`; AdapterError when this model has no such adapter.

        Asked before Serve's multiplexer loads anything: at its limit it evicts the least recently
        used adapter *before* calling the loader, so a request for an adapter that does not exist
        would otherwise push a real one out.
        """
        from deployments._registry import registry

        base, _, name = model_id.partition(":")
        if base != self.cfg.name or not name:
            raise AdapterError(model_id, f"not an adapter of model {self.cfg.name!r}")
        if not self.cfg.adapters:
            raise AdapterError(model_id, f"model {self.cfg.name!r} does not take adapters")
        if self._registry is None:
            self._registry = registry()
        entry = await self._registry.resolve.remote(base, name)
        if entry is None:
            raise AdapterError(model_id, "unknown adapter (not registered)")
        return entry

    async def _load_adapter(self, model_id: str) -> LoadedAdapter:
        from deployments._registry import local_copy

        entry = await self._registered(model_id)
        local = await local_copy(entry, self._registry, self.cache_dir / "pulled")
        native = await asyncio.to_thread(self._native_adapter, local, entry)
        await self.engine.load_adapter(str(native), along=await self._registered_after(entry))
        self._loaded_ids.add(model_id)
        return LoadedAdapter(model_id, str(native), self.engine, asyncio.get_running_loop())

    async def _registered_after(self, entry: "AdapterEntry") -> list[str]:
        """For an engine that reloads its whole set per adapter (llama.cpp): the adapters of this
        model registered after `entry` that this replica has not loaded yet, oldest first, as many
        as the engine holds beside it, in its native format. The watcher registers a run's
        checkpoints in the order the coordinator evaluates them, so these are what comes next: a
        sweep of 4 checkpoints started 2 replacement servers per replica instead of 4. One that cannot be
        pulled or converted is left to its own load, which reports why."""
        from deployments._registry import local_copy

        if not self.engine.loads_adapter_sets:
            return []
        entries = await self._registry.list.remote(self.cfg.name)
        ids = [e.model_id for e in entries]
        later = entries[ids.index(entry.model_id) + 1:] if entry.model_id in ids else []
        out: list[str] = []
        for e in later:
            if len(out) >= self.engine.max_adapters - 1:
                break
            if e.model_id in self._loaded_ids:
                continue
            try:
                local = await local_copy(e, self._registry, self.cache_dir / "pulled")
                out.append(str(await asyncio.to_thread(self._native_adapter, local, e)))
            except Exception as err:  # noqa: BLE001 - a prefetch: the adapter's own load reports it
                log.warning("adapter %s not loaded along with %s: %s", e.model_id, entry.model_id, err)
        return out

    def _native_adapter(self, local: Path, entry: "AdapterEntry") -> Path:
        """The adapter in this engine's own format, converting (and caching) when needed.

        The checkpoint watcher converted a staged checkpoint into the same `native_adapter_dir`
        already, so this finds it done.
        """
        from checkpoints import is_native_adapter, native_adapter_dir, prepare_adapter  # conversion needs numpy: load it here

        if is_native_adapter(local, self.cfg.engine):
            return local  # the engine validates it against the base when it loads it
        out = native_adapter_dir(self.cache_dir, self.cfg.engine, entry.sha256 or entry.name)
        return Path(prepare_adapter(local, self.cfg.engine, Path(self.cfg.path), out))

    async def _adapter_for(self, adapter_id: str) -> LoadedAdapter:  # overridden with @serve.multiplexed
        raise NotImplementedError

    async def _adapter_path(self) -> str | None:
        """The engine-native path of the request's adapter (its multiplexed model id), or None."""
        from ray import serve

        self._require_up()
        adapter_id = serve.get_multiplexed_model_id()
        if not adapter_id:
            return None
        if adapter_id not in self._known_adapters:  # checked once per adapter: registrations stay
            await self._registered(adapter_id)
            self._known_adapters.add(adapter_id)
        return (await self._adapter_for(adapter_id)).path

    async def _opts(self, opts: dict[str, Any]) -> GenOpts:
        gen = GenOpts(**opts)
        if gen.adapter:
            raise AdapterError(gen.adapter, "send the adapter as the multiplexed model id, not in GenOpts")
        path = await self._adapter_path()
        return gen.model_copy(update={"adapter": path}) if path else gen

    # ----------------------------------------------------------------- loglikelihood

    async def tokenize(self, text: str) -> list[int]:
        """The model's token ids of `text` (no special tokens)."""
        self._require_up()
        return await self.engine.tokenize(text)

    async def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's text."""
        self._require_up()
        return await self.engine.token_texts(ids)

    async def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids `chat(messages)` generates its reply after (see Engine.chat_ids)."""
        self._require_up()
        return await self.engine.chat_ids([Message(**m) for m in messages])

    async def score(self, ids: list[int], start: int, top_n: int = 0) -> list[TokenScore]:
        """Logprobs of ids[start:] (see Engine.score); the adapter is the multiplexed model id."""
        return await self.engine.score(ids, start, adapter=await self._adapter_path(), top_n=top_n)

    async def loglikelihood(self, requests: list[tuple[str, str]]) -> list[Loglikelihood]:
        """(context, continuation) scores (see Engine.loglikelihood)."""
        return await self.engine.loglikelihood(requests, adapter=await self._adapter_path())

    async def loglikelihood_rolling(self, text: str) -> Loglikelihood:
        """A whole text's score (see Engine.loglikelihood_rolling)."""
        return await self.engine.loglikelihood_rolling(text, adapter=await self._adapter_path())

    # ----------------------------------------------------------------- generation

    async def _stream(self, stream: AsyncIterator[Token]) -> AsyncIterator[Token]:
        self.stats["requests"] += 1
        self.stats["in_flight"] += 1
        self.stats["peak_in_flight"] = max(self.stats["peak_in_flight"], self.stats["in_flight"])
        try:
            async for tok in stream:
                if tok.usage is not None:
                    self.stats["prompt_tokens"] += tok.usage.prompt_tokens
                    self.stats["completion_tokens"] += tok.usage.completion_tokens
                yield tok
        except Exception:
            self.stats["errors"] += 1
            raise
        finally:
            self.stats["in_flight"] -= 1

    async def chat(self, messages: list[dict[str, str]], opts: dict[str, Any]) -> AsyncIterator[Token]:
        """Stream a chat reply. The adapter comes from the request's multiplexed model id."""
        gen = await self._opts(opts)
        msgs = [Message(**m) for m in messages]
        async for tok in self._stream(self.engine.chat(msgs, gen)):
            yield tok

    async def generate(self, prompt: str, opts: dict[str, Any]) -> AsyncIterator[Token]:
        """Stream a raw completion."""
        gen = await self._opts(opts)
        async for tok in self._stream(self.engine.generate(prompt, gen)):
            yield tok

    async def whole(self, method: str, first: Any, opts: dict[str, Any]) -> list[Token]:
        """`chat` or `generate` answered in one reply: for a caller that only collects the answer
        (`WHOLE_ANSWER`), one Ray object per request instead of one per token, and the engine may
        answer in one piece too. (A 5-target sweep on 2 cores streamed ~12,000 tokens this way:
        about 1 ms of replica CPU and 1 ms of the caller's per token.)"""
        if method not in ("chat", "generate"):
            raise EngineError(f"whole() answers chat or generate, not {method!r}")
        self.stats["whole_answers"] += 1
        mode = WHOLE_ANSWER.set(True)
        try:
            return [tok async for tok in getattr(self, method)(first, opts)]
        finally:
            WHOLE_ANSWER.reset(mode)

    async def info(self) -> dict[str, Any]:
        from dataclasses import asdict

        if self.start_error is not None:
            return {"name": self.cfg.name, "engine": self.cfg.engine, "status": "down", "error": self.start_error,
                    **self.stats}
        info = asdict(await self.engine.info())
        elapsed = max(time.time() - self.started, 1e-9)
        import ray

        return {**info, "uptime_s": round(elapsed, 1), **self.stats,
                "engine_active": self.engine.active_requests,  # streams the engine still runs (a left one is freed)
                "max_adapters_per_replica": self.cfg.max_adapters_per_replica,
                "engine_max_adapters": self.engine.max_adapters,
                "completion_tokens_per_s": round(self.stats["completion_tokens"] / elapsed, 2),
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    async def engine_healthy(self) -> bool:
        """Whether the engine (a remote upstream included) would answer now."""
        return self.start_error is None and await self.engine.health()

    async def check_health(self) -> None:
        """Serve calls this periodically; a failure makes Serve replace the replica.

        Only for engines this replica runs: a remote upstream's outage is reported as 503s instead.
        """
        if self.remote_upstream:
            return
        if not await self.engine.health():
            raise EngineUnavailable(f"engine of model {self.cfg.name!r} is not healthy")

    async def __del__(self) -> None:  # graceful shutdown: stop engine processes
        if getattr(self, "_retry_task", None) is not None:
            self._retry_task.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.close()


def model_server_class(max_adapters: int) -> type:
    """A ModelServer class whose multiplexed adapter loader keeps at most `max_adapters`."""
    from ray import serve

    class ModelServer(_ModelServerBase):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def _adapter_for(self, adapter_id: str) -> LoadedAdapter:
            return await self._load_adapter(adapter_id)

    return ModelServer


class ServeTextModel:
    """A TextModel over a Serve handle: evaluators call every engine the same way, in or out of Ray.

    `GenOpts.adapter` is the adapter's registered name; it travels as the multiplexed model id.
    """

    def __init__(self, model: str) -> None:
        from ray import serve

        self.name = model
        self._handle = serve.get_deployment_handle(deployment_name(model), model_app(model))

    async def _call(self, method: str, first: Any, opts: GenOpts) -> AsyncIterator[Token]:
        """The replica's stream. A replica lost mid-request (its node died, it was replaced) or a
        deployment with no replica to take it is EngineUnavailable: the engine's state, not the
        request's fault, so callers wait and try again; errors the engine raised pass through."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        adapter = opts.adapter
        wire_opts = opts.model_dump(exclude={"adapter"})
        whole = WHOLE_ANSWER.get()  # nobody watches the tokens arrive: one reply (ModelServer.whole)
        h = self._handle.options(
            stream=not whole, multiplexed_model_id=f"{self.name}:{adapter}" if adapter else ""
        )
        try:
            if whole:
                for tok in await h.whole.remote(method, first, wire_opts):
                    yield tok
            else:
                async for tok in getattr(h, method).remote(first, wire_opts):
                    yield tok
        except (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError, BackPressureError) as e:
            raise EngineUnavailable(f"model {self.name!r}: {type(e).__name__}: "
                                    f"{(str(e).strip().splitlines() or [''])[0][:200]}") from e

    async def generate(self, prompt: str, opts: GenOpts) -> AsyncIterator[Token]:
        async for tok in self._call("generate", prompt, opts):
            yield tok

    async def chat(self, messages: list[Message], opts: GenOpts) -> AsyncIterator[Token]:
        async for tok in self._call("chat", [m.model_dump() for m in messages], opts):
            yield tok

    async def _unary(self, method: str, adapter: str | None, *args: Any) -> Any:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        h = self._handle.options(multiplexed_model_id=f"{self.name}:{adapter}" if adapter else "")
        try:
            return await getattr(h, method).remote(*args)
        except (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError, BackPressureError) as e:
            raise EngineUnavailable(f"model {self.name!r}: {type(e).__name__}: "
                                    f"{(str(e).strip().splitlines() or [''])[0][:200]}") from e

    async def tokenize(self, text: str) -> list[int]:
        return await self._unary("tokenize", None, text)

    async def score(self, ids: list[int], start: int, *, adapter: str | None = None, top_n: int = 0) -> list[TokenScore]:
        return await self._unary("score", adapter, list(ids), start, top_n)

    async def loglikelihood(self, requests: list[tuple[str, str]], *, adapter: str | None = None) -> list[Loglikelihood]:
        return await self._unary("loglikelihood", adapter, [tuple(r) for r in requests])

    async def loglikelihood_rolling(self, text: str, *, adapter: str | None = None) -> Loglikelihood:
        return await self._unary("loglikelihood_rolling", adapter, text)

    async def healthy(self) -> bool:
        """Whether a replica and its engine (or its remote upstream) answer now."""
        try:
            return bool(await asyncio.wait_for(self._handle.engine_healthy.remote(), timeout=10))
        except Exception:  # noqa: BLE001 - any failure means: not now
            return False

    async def info(self) -> ModelInfo:
        """The replica's ModelInfo (with its engine's identity); EngineUnavailable when no replica answers."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        try:
            d = await self._handle.info.remote()
        except (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError, BackPressureError) as e:
            raise EngineUnavailable(f"model {self.name!r}: {type(e).__name__}") from e
        return ModelInfo(**{k: d[k] for k in ("name", "engine", "architecture", "context_length",
                                             "quantization", "adapters", "extra", "identity", "slots") if k in d})

    async def close(self) -> None:
        return None

"""The OpenAI-compatible HTTP ingress (FastAPI on Serve), and building/deploying the whole app.

No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime.
"""


import hashlib
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from checkpoints import AdapterError, sha256_tree
from deployments._config import ModelConfig, ServeHTTP
from deployments._openai_wire import (
    ChatRequest,
    ChunkWriter,
    CompletionRequest,
    WireError,
    chat_response,
    completion_response,
    parse_request,
)
from deployments._serve import APP_NAME, INGRESS_NAME, deployment_name, model_server_class
from deployments._textmodel import (
    EngineUnavailable,
    GenMetrics,
    Result,
    Token,
    UnsupportedOption,
    Usage,
)

log = logging.getLogger("evalcluster.serve")
DEFAULT_MAX_TOKENS = 512


class DeploymentError(RuntimeError):
    """The app cannot be placed or started on this cluster."""


def _wire_error(e: BaseException) -> WireError:
    """Map what a replica raised to the OpenAI error the client should see."""
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None:
        e = e.cause  # what the replica raised, without Ray's traceback header
    if isinstance(e, WireError):
        return e
    if isinstance(e, BackPressureError):
        return WireError(429, "the model is at capacity; retry after a moment", code="rate_limit_exceeded",
                         type_="rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(e, AdapterError):  # before ValueError: it is one
        return WireError(404, str(e).splitlines()[0], param="model", code="model_not_found")
    if isinstance(e, (UnsupportedOption, ValueError)):
        return WireError(400, str(e).splitlines()[0])
    if isinstance(e, EngineUnavailable):
        return WireError(503, str(e).splitlines()[0], type_="server_error", code="engine_unavailable",
                         headers={"Retry-After": "2"})
    log.exception("request failed", exc_info=e)
    return WireError(500, f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                     type_="server_error")


def _error_response(err: WireError) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def ingress_class() -> type:
    """The ingress deployment class (built lazily: FastAPI and Serve import only when serving)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve

    app = FastAPI(title="evalcluster", description="OpenAI-compatible endpoint for evalcluster's models")

    @serve.ingress(app)
    class OpenAIIngress:
        def __init__(self, models: dict[str, Any], created: dict[str, int], api_key_sha256: str | None,
                     default_max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
            self.handles = models
            self.created = created
            self.key_sha = api_key_sha256
            self.default_max_tokens = default_max_tokens
            self.started = time.time()
            self._registry = None

        # ------------------------------------------------------------- helpers

        def _auth(self, request: Request) -> None:
            if not self.key_sha:
                return
            header = request.headers.get("authorization", "")
            token = header[7:].strip() if header.lower().startswith("bearer ") else ""
            digest = hashlib.sha256(token.encode()).hexdigest()
            if not token or not hmac.compare_digest(digest, self.key_sha):
                raise WireError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                                code="invalid_api_key", type_="authentication_error")

        def _registry_actor(self) -> Any:
            if self._registry is None:
                from deployments._registry import registry

                self._registry = registry()
            return self._registry

        def _handle(self, model: str) -> tuple[Any, str, str | None]:
            base, _, adapter = model.partition(":")
            handle = self.handles.get(base)
            if handle is None:
                raise WireError(404, f"model {model!r} does not exist (known: {', '.join(sorted(self.handles))})",
                                param="model", code="model_not_found")
            return handle, base, adapter or None

        async def _start(self, method: str, req: Any, first_arg: Any) -> tuple[AsyncIterator[Token], Token | None]:
            """Call the model and wait for its first token, so early errors get a proper status."""
            handle, base, adapter = self._handle(req.model)
            opts = req.gen_opts(self.default_max_tokens).model_dump(exclude={"adapter"})
            h = handle.options(stream=True, multiplexed_model_id=f"{base}:{adapter}" if adapter else "")
            gen = getattr(h, method).remote(first_arg, opts)
            try:
                first = await gen.__anext__()
            except StopAsyncIteration:
                first = None
            return gen, first

        async def _run(self, request: Request, cls: type, chat: bool) -> Any:
            try:
                self._auth(request)
                try:
                    body = await request.json()
                except Exception:  # noqa: BLE001
                    raise WireError(400, "request body is not valid JSON") from None
                req = parse_request(cls, body)
                if chat:
                    try:
                        first_arg = [m.model_dump() for m in req.chat_messages()]
                    except ValueError as e:
                        raise WireError(400, f"messages: {e}", param="messages") from None
                    method = "chat"
                else:
                    try:
                        first_arg = req.prompt_text()
                    except ValueError as e:
                        raise WireError(400, str(e), param="prompt") from None
                    method = "generate"
                gen, first = await self._start(method, req, first_arg)
            except Exception as e:  # noqa: BLE001
                return _error_response(_wire_error(e))
            if req.stream:
                return StreamingResponse(self._sse(req, gen, first, chat), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            try:
                result = await self._collect(gen, first)
            except Exception as e:  # noqa: BLE001
                return _error_response(_wire_error(e))
            body = chat_response(req.model, result) if chat else completion_response(req.model, result)
            return JSONResponse(body)

        @staticmethod
        async def _collect(gen: AsyncIterator[Token], first: Token | None) -> Result:
            parts: list[str] = []
            finish, usage = "stop", Usage()
            tok = first
            while tok is not None:
                parts.append(tok.text)
                if tok.finish_reason:
                    finish = tok.finish_reason
                if tok.usage:
                    usage = tok.usage
                try:
                    tok = await gen.__anext__()
                except StopAsyncIteration:
                    tok = None
            return Result("".join(parts), finish, usage, GenMetrics())  # type: ignore[arg-type]

        async def _sse(self, req: Any, gen: AsyncIterator[Token], first: Token | None, chat: bool) -> AsyncIterator[bytes]:
            w = ChunkWriter(req.model, chat)
            if start := w.start():
                yield start
            finish, usage = "stop", Usage()
            tok = first
            try:
                while tok is not None:
                    if tok.text:
                        yield w.text(tok.text)
                    if tok.finish_reason:
                        finish = tok.finish_reason
                    if tok.usage:
                        usage = tok.usage
                    try:
                        tok = await gen.__anext__()
                    except StopAsyncIteration:
                        tok = None
            except Exception as e:  # noqa: BLE001 - headers are sent: report in-stream, never as "stop"
                yield w.error(_wire_error(e))
                yield w.done()
                return
            yield w.finish(finish)
            if req.include_usage:
                yield w.usage(usage)
            yield w.done()

        # ------------------------------------------------------------- routes

        @app.post("/v1/chat/completions")
        async def chat_completions(self, request: Request) -> Any:
            return await self._run(request, ChatRequest, chat=True)

        @app.post("/v1/completions")
        async def completions(self, request: Request) -> Any:
            return await self._run(request, CompletionRequest, chat=False)

        @app.get("/v1/models")
        async def list_models(self, request: Request) -> Any:
            try:
                self._auth(request)
            except WireError as e:
                return _error_response(e)
            data = [{"id": name, "object": "model", "created": self.created.get(name, 0), "owned_by": "evalcluster"}
                    for name in sorted(self.handles)]
            for entry in await self._registry_actor().list.remote():
                if entry.base in self.handles:
                    data.append({"id": entry.model_id, "object": "model", "created": self.created.get(entry.base, 0),
                                 "owned_by": "evalcluster", "parent": entry.base, "root": entry.base})
            return {"object": "list", "data": data}

        @app.get("/v1/models/{model_id:path}")
        async def model_info(self, model_id: str, request: Request) -> Any:
            try:
                self._auth(request)
                handle, base, adapter = self._handle(model_id)
                info = await handle.info.remote()
                out: dict[str, Any] = {"id": model_id, "object": "model", "owned_by": "evalcluster",
                                       "created": self.created.get(base, 0), "info": info}
                if adapter:
                    entry = await self._registry_actor().resolve.remote(base, adapter)
                    if entry is None:
                        raise WireError(404, f"adapter {model_id!r} is not registered", param="model",
                                        code="model_not_found")
                    out.update(parent=base, adapter={"name": entry.name, "sha256": entry.sha256, **entry.meta})
                return out
            except Exception as e:  # noqa: BLE001
                return _error_response(_wire_error(e))

        @app.get("/healthz")
        async def healthz(self) -> Any:
            status: dict[str, Any] = {}
            ok = True
            for name, handle in self.handles.items():
                try:
                    info = await handle.info.remote()
                    if info.get("status") == "down":
                        ok = False
                        status[name] = {"status": "down", "error": info.get("error")}
                    else:
                        status[name] = {"status": "ok", "in_flight": info.get("in_flight", 0)}
                except Exception as e:  # noqa: BLE001
                    ok = False
                    status[name] = {"status": "down", "error": str(e).splitlines()[0] if str(e) else type(e).__name__}
            body = {"status": "ok" if ok else "degraded", "uptime_s": round(time.time() - self.started, 1),
                    "models": status}
            return JSONResponse(body, status_code=200 if ok else 503)

    return OpenAIIngress


# --------------------------------------------------------------------------- building and deploying


def check_placement(models: Sequence[ModelConfig], cluster_nodes: list[dict[str, Any]]) -> None:
    """Refuse a model whose Ray resources no node declares (Serve would wait forever instead)."""
    for m in models:
        need = dict(m.resources)
        if m.num_gpus:
            need["GPU"] = m.num_gpus
        for res, amount in need.items():
            if not any(n.get("Resources", {}).get(res, 0) >= amount for n in cluster_nodes if n.get("Alive")):
                have = sorted({r for n in cluster_nodes if n.get("Alive") for r in n.get("Resources", {})
                               if not r.startswith("node:") and r not in ("memory", "object_store_memory")})
                raise DeploymentError(
                    f"model {m.name!r} needs Ray resource {res!r} (×{amount:g}) but no node in the cluster "
                    f"declares it (declared: {', '.join(have)}); add it to a node kind in cluster.node_kinds"
                )


def _api_key_sha256(http: ServeHTTP) -> str | None:
    key = None
    if http.api_key_env and os.environ.get(http.api_key_env):
        key = os.environ[http.api_key_env].strip()
    elif http.api_key_file:
        key = http.api_key_file.expanduser().read_text().strip()
    return hashlib.sha256(key.encode()).hexdigest() if key else None


def build_app(models: Sequence[ModelConfig], http: ServeHTTP, cache_dir: Path) -> Any:
    """The Serve application: one deployment per model and the OpenAI ingress.

    Args:
        models: the models to serve (paths absolute: replicas may run in another directory).
        http: the endpoint's section (for its API key).
        cache_dir: node-local directory for pulled and converted adapters.
    """
    from ray import serve

    cache = str(cache_dir)
    handles = {}
    created = {}
    for m in models:
        data = m.model_dump(mode="json")
        actor_opts: dict[str, Any] = {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus}
        if m.resources:
            actor_opts["resources"] = dict(m.resources)
        scaling: dict[str, Any] = {}
        if m.autoscaling:
            scaling["autoscaling_config"] = m.autoscaling.model_dump()
        else:
            scaling["num_replicas"] = m.replicas
        dep = serve.deployment(
            model_server_class(m.max_adapters_per_replica),
            name=deployment_name(m.name),
            ray_actor_options=actor_opts,
            max_ongoing_requests=m.max_ongoing_requests,
            max_queued_requests=m.max_queued_requests,
            health_check_period_s=m.health_check_period_s,
            health_check_timeout_s=m.health_check_timeout_s,
            graceful_shutdown_timeout_s=20,
            **scaling,
        )
        handles[m.name] = dep.bind(data, cache)
        created[m.name] = int(time.time())
    ingress = serve.deployment(ingress_class(), name=INGRESS_NAME, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=1000)
    return ingress.bind(handles, created, _api_key_sha256(http))


def deploy(models: Sequence[ModelConfig], http: ServeHTTP, cache_dir: Path, *, host: str | None = None,
           port: int | None = None, blocking: bool = False, access_log: bool = True) -> str:
    """Deploy the app on the connected cluster and return the endpoint URL.

    Args:
        models: the models to serve.
        http: the endpoint's section (host, port, API key).
        cache_dir: node-local directory for pulled and converted adapters.
        host: HTTP bind address (default: the section's, 127.0.0.1).
        port: HTTP port (default: the config's).
        blocking: passed to serve.run.
        access_log: log every request (the watch job turns it off: its own requests are counted
            in its metrics, and a line per probe would bury the job's log).
    """
    import ray
    from ray import serve

    check_placement(models, ray.nodes())
    host = host or http.host
    port = http.port if port is None else port
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(models, http, cache_dir), name=APP_NAME, route_prefix="/", blocking=blocking,
              logging_config={"enable_access_log": access_log})
    return f"http://{host}:{port}"


def register_adapter_dirs(models: Sequence[ModelConfig]) -> int:
    """Register each `<dir>/<name>` under a model's `adapter_dirs` as adapter `model:name`."""
    import ray

    from deployments._registry import AdapterEntry, registry

    reg = registry()
    node = ray.get_runtime_context().get_node_id()
    n = 0
    for m in models:
        for root in m.adapter_dirs:
            if not root.is_dir():
                raise DeploymentError(f"models.{m.name}.adapter_dirs: {root} is not a directory")
            for p in sorted(root.iterdir()):
                if p.name.startswith("."):
                    continue
                try:
                    digest = sha256_tree(p)
                except ValueError as e:  # an empty directory: nothing to serve
                    raise DeploymentError(f"models.{m.name}.adapter_dirs: {e}") from None
                ray.get(reg.register.remote(AdapterEntry(m.name, p.name, str(p), digest, node)))
                n += 1
    return n

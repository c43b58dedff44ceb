"""The OpenAI-compatible HTTP ingress (FastAPI on Serve), and building/deploying the whole app.

A completion request goes: the API key (`_check_api_key`), the body read up to its size limit,
parsed and checked against the request limits (`_read_request`: all before any model works), the
model's deployment called up to its first token (`_call_model`: an error
that comes before any text still gets a proper status), then the whole answer (`_collect`) or
its SSE events (`_sse_events`). A request for logprobs is answered whole (`_scored_completion`,
`_scored_chat`): the answer is generated, then its tokens scored by the deployment
(`_token_logprobs`). Whatever fails on the way becomes an OpenAI-shaped error
(`_wire_error`). `ingress_class` builds the Serve deployment whose routes join these up.

No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime.
"""


import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping, Sequence, Union

from checkpoints import AdapterError, one_line, sha256_tree
from deployments._config import ModelConfig, ServeHTTP
from deployments._openai_wire import (
    ChatRequest,
    ChunkWriter,
    CompletionRequest,
    TokenLogprob,
    WireError,
    chat_logprobs,
    chat_response,
    completion_logprobs,
    completion_response,
    parse_request,
    scored_completion_response,
)
from deployments._registry import AdapterEntry, adapter_files, entry_for, registry
from deployments._serve import APP_NAME, INGRESS_NAME, deployment_name, model_app, model_server_class
from deployments._textmodel import (
    EngineError,
    EngineUnavailable,
    GenMetrics,
    RequestRejected,
    Result,
    Token,
    UnsupportedOption,
    Usage,
)

if TYPE_CHECKING:
    from fastapi import Request
    from ray.serve.handle import DeploymentHandle

log = logging.getLogger("evalcluster.serve")
DEFAULT_MAX_TOKENS = 512

CompletionCall = Union[ChatRequest, CompletionRequest]
# What a model's deployment takes first: the chat's messages, or the raw prompt.
FirstArg = Union[list[dict[str, str]], str]


class DeploymentError(RuntimeError):
    """The app cannot be placed or started on this cluster."""


# --------------------------------------------------------------------------- errors


def _wire_error(e: BaseException, model: str | None = None) -> WireError:
    """Map what a replica raised to the OpenAI error the client should see: a client's mistake is a
    4xx in plain words; the engine's internals (log tails, loopback addresses, pids, paths) go to
    the log only.

    Args:
        e: the exception.
        model: the request's `model`, when the body was read.
    """
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
        log.info("request for %s: %s", model, e)
        what = f"model {model!r}: {public_text(e.why)}" if model else public_text(str(e))
        return WireError(404, what, param="model", code="model_not_found")
    if isinstance(e, RequestRejected):  # the engine's own 400 (e.g. longer than the context)
        log.info("request for %s rejected by the engine: %s", model, e)
        return WireError(400, public_text(e.reason))
    if isinstance(e, (UnsupportedOption, ValueError)):
        return WireError(400, public_text(str(e)))
    if isinstance(e, EngineUnavailable):
        log.warning("request for %s: model unavailable: %s", model, e)
        return WireError(503, f"model {model!r} is unavailable right now; retry later" if model else
                         "the model is unavailable right now; retry later",
                         type_="server_error", code="engine_unavailable", headers={"Retry-After": "2"})
    log.exception("request for %s failed", model, exc_info=e)
    return WireError(500, "internal error (the server's log has the details)", type_="server_error")


# Internals an engine's message may carry: URLs, loopback addresses, absolute paths, pids.
_URL_RX = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.I)
_ADDRESS_RX = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}:\d+\b")
_PATH_RX = re.compile(r"(?<![\w.:/-])/(?:[^\s/:'\"()]+/)+([^\s/:'\"()]*)")
_PID_RX = re.compile(r"\s*\(?\bpids? \d+\)?")


def public_text(text: str) -> str:
    """An engine's message as a client may see it: one line, no URLs, addresses, paths or pids.

    Args:
        text: the message.
    """
    line = one_line(text, 300)
    line = _URL_RX.sub("<internal address>", line)
    line = _ADDRESS_RX.sub("<internal address>", line)
    line = _PATH_RX.sub(lambda m: m.group(1) or "<path>", line)
    return _PID_RX.sub("", line)


def _error_response(err: WireError) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# --------------------------------------------------------------------------- a request, step by step


def _check_api_key(authorization: str, key_sha256: str | None) -> None:
    """Raise a 401 unless the bearer token's sha256 is `key_sha256` (None: the endpoint has no key).

    Args:
        authorization: the request's Authorization header ("" if absent).
        key_sha256: the hex sha256 of the configured key, or None.
    """
    if not key_sha256:
        return
    token = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    digest = hashlib.sha256(token.encode()).hexdigest()
    if not token or not hmac.compare_digest(digest, key_sha256):
        raise WireError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                        code="invalid_api_key", type_="authentication_error")


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for: cluster.serve's limits and each model's max_tokens limit.

    Checked in the ingress before the model's deployment is called, so a hostile request costs
    the replica nothing (100,000 stop strings cost 0.32 s per token on its event loop).
    """

    max_body_bytes: int
    """Bytes of the request body (beyond: 413)."""
    max_prompt_chars: int
    """Characters of the prompt, or of every message together."""
    max_stop_sequences: int
    """Stop sequences in one request."""
    max_stop_chars: int
    """Characters of one stop sequence."""
    max_tokens: dict[str, int]
    """Model name -> the largest max_tokens it takes (its context per request by default)."""

    @classmethod
    def of(cls, http: ServeHTTP, models: Sequence[ModelConfig]) -> "RequestLimits":
        """The limits a config sets.

        Args:
            http: cluster.serve.
            models: the served models.
        """
        return cls(http.max_body_bytes, http.max_prompt_chars, http.max_stop_sequences, http.max_stop_chars,
                   {m.name: m.request_token_limit() for m in models})


MAX_SEED = 2**63 - 1  # engines take a 64-bit seed (vLLM's torch generator refuses more)


async def _read_body(request: "Request", max_bytes: int) -> Any:
    """The body as JSON, read no further than `max_bytes` (413 beyond; 400 when not JSON)."""
    too_large = WireError(413, f"request body is larger than {max_bytes} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # not JSON (or not UTF-8), or nested too deeply
        raise WireError(400, "request body is not valid JSON") from None


async def _read_request(request: "Request", chat: bool, limits: RequestLimits) -> tuple[CompletionCall, FirstArg]:
    """The body as a checked chat or completion request, and what the model is called with first.

    Raises a 413 for a body over the limit, a 400 WireError naming what is wrong: not JSON, a field
    out of range or not supported, a message or prompt the engines cannot take, a request beyond
    the limits.

    Args:
        request: the HTTP request.
        chat: /v1/chat/completions (True) or /v1/completions (False).
        limits: what one request may ask for.
    """
    body = await _read_body(request, limits.max_body_bytes)
    if chat:
        chat_req: ChatRequest = parse_request(ChatRequest, body)
        try:
            messages = [m.model_dump() for m in chat_req.chat_messages()]
        except ValueError as e:
            raise WireError(400, f"messages: {e}", param="messages") from None
        _check_limits(chat_req, sum(len(m["content"]) for m in messages), limits)
        if chat_req.logprobs and chat_req.stream:
            raise WireError(400, "stream: logprobs are answered whole; send stream: false", param="stream")
        return chat_req, messages
    req: CompletionRequest = parse_request(CompletionRequest, body)
    if req.scored:
        if req.stream:
            raise WireError(400, "stream: echo and logprobs are answered whole; send stream: false", param="stream")
        prompts = req.prompts()
        if not prompts or any(isinstance(p, list) and not p for p in prompts):
            raise WireError(400, "prompt: an empty prompt has nothing to score", param="prompt")
        _check_limits(req, sum(len(p) for p in prompts), limits)
        return req, ""
    if req.max_tokens == 0:
        raise WireError(400, "max_tokens: 0 generates nothing; it is for echo: true (the prompt's logprobs)",
                        param="max_tokens")
    try:
        prompt = req.prompt_text()
    except ValueError as e:
        raise WireError(400, str(e), param="prompt") from None
    _check_limits(req, len(prompt), limits)
    return req, prompt


def _check_limits(req: CompletionCall, prompt_chars: int, limits: RequestLimits) -> None:
    """A 400 naming the first limit the request goes beyond (see RequestLimits)."""
    if prompt_chars > limits.max_prompt_chars:
        raise WireError(400, f"the prompt is {prompt_chars} characters; this server takes at most "
                             f"{limits.max_prompt_chars}", param="messages" if isinstance(req, ChatRequest) else "prompt")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > limits.max_stop_sequences:
        raise WireError(400, f"stop: {len(stops)} sequences; at most {limits.max_stop_sequences}", param="stop")
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise WireError(400, f"stop: a sequence is longer than {limits.max_stop_chars} characters", param="stop")
    base = req.model.partition(":")[0]
    asked = req.max_completion_tokens or req.max_tokens
    most = limits.max_tokens.get(base)
    if asked is not None and most is not None and asked > most:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise WireError(400, f"{param}: {asked} is beyond model {base!r}'s limit of {most} tokens", param=param)
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise WireError(400, f"seed: must be between 0 and {MAX_SEED}", param="seed")


def _model_handle(handles: Mapping[str, "DeploymentHandle"], model: str) -> tuple["DeploymentHandle", str, str | None]:
    """The deployment serving `model` ("base" or "base:adapter"), the base's name and the adapter's.

    Args:
        handles: base model name -> its deployment's handle.
        model: the request's `model`.
    """
    base, _, adapter = model.partition(":")
    handle = handles.get(base)
    if handle is None:
        raise WireError(404, f"model {model!r} does not exist (known: {', '.join(sorted(handles))})",
                        param="model", code="model_not_found")
    return handle, base, adapter or None


async def _next_token(stream: AsyncIterator[Token]) -> Token | None:
    """The stream's next token, or None at its end."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def _tokens(tokens: list[Token]) -> AsyncIterator[Token]:
    for tok in tokens:
        yield tok


async def _call_model(handles: Mapping[str, "DeploymentHandle"], req: CompletionCall, first_arg: FirstArg,
                      default_max_tokens: int) -> tuple[AsyncIterator[Token], Token | None]:
    """Call the model's deployment and wait for its first token, so early errors get a proper status.
    A request without `stream` is answered by the replica in one reply (`whole`): one Ray object
    instead of one per token, and the engine may answer it in one piece too.

    Args:
        handles: base model name -> its deployment's handle.
        req: the checked request.
        first_arg: the messages (chat) or the prompt (completion).
        default_max_tokens: max_tokens when the request does not say.
    """
    handle, base, adapter = _model_handle(handles, req.model)
    opts = req.gen_opts(default_max_tokens).model_dump(exclude={"adapter"})
    h = handle.options(stream=bool(req.stream), multiplexed_model_id=f"{base}:{adapter}" if adapter else "")
    method = "chat" if isinstance(req, ChatRequest) else "generate"
    if not req.stream:
        stream = _tokens(await h.whole.remote(method, first_arg, opts))
    else:
        stream = getattr(h, method).remote(first_arg, opts)
    return stream, await _next_token(stream)


async def _token_logprobs(h: "DeploymentHandle", ids: list[int], first: int, top_n: int) -> list[TokenLogprob]:
    """Each token of ids[first:] with its logprob given every token before it, as the deployment's
    engine computes it (its `score`: the raw distribution, no sampling), and the `top_n` most
    likely tokens at its position; the texts are the model tokenizer's. ids[0] has no logprob
    (nothing precedes it). One `score` call and one `token_texts` call.

    Args:
        h: the model's deployment handle, its multiplexed model id set for an adapter.
        ids: the whole sequence (a prompt, then what was generated after it).
        first: the first token to return (0: the prompt's too, as echo does).
        top_n: how many most likely tokens to give at each position (0..20).
    """
    # Scored from `first` on, not from 1: the engine then reads the prompt as a generation reads it
    # (llama.cpp: one batch, rather than token by token), and a long prompt costs one pass.
    start = max(first, 1)
    scores = await h.score.remote(ids, start, top_n) if start < len(ids) else []
    wanted = sorted({*ids[first:], *(t for sc in scores for t, _ in sc.top)})
    piece = dict(zip(wanted, await h.token_texts.remote(wanted))) if wanted else {}
    out = []
    for i in range(first, len(ids)):
        sc = scores[i - start] if i >= start else None
        out.append(TokenLogprob(piece[ids[i]], sc.logprob if sc else None,
                                tuple((piece[t], lp) for t, lp in sc.top) if sc else ()))
    return out


def _multiplexed(handles: Mapping[str, "DeploymentHandle"], model: str, stream: bool = False) -> "DeploymentHandle":
    """The handle of `model`'s deployment ("base" or "base:adapter"), its adapter as the multiplexed model id."""
    handle, base, adapter = _model_handle(handles, model)
    return handle.options(stream=stream, multiplexed_model_id=f"{base}:{adapter}" if adapter else "")


async def _scored_completion(handles: Mapping[str, "DeploymentHandle"], req: CompletionRequest,
                             default_max_tokens: int) -> dict[str, Any]:
    """A completions answer with logprobs: `echo` returns the prompt's tokens with their logprobs
    (the first has none: nothing precedes it), `logprobs: N` the N most likely tokens at each
    position; with max_tokens > 0 the generated text follows, its tokens scored the same way (the
    text's tokens as the model's tokenizer splits it after the prompt). Each prompt is one choice.

    Args:
        handles: base model name -> its deployment's handle.
        req: the checked request (req.scored).
        default_max_tokens: max_tokens when the request does not say.
    """
    h = _multiplexed(handles, req.model)
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = default_max_tokens if asked is None else asked
    top_n = req.logprobs or 0
    choices, usage = [], Usage()
    for index, prompt in enumerate(req.prompts()):
        prompt_ids = list(prompt) if isinstance(prompt, list) else await h.tokenize.remote(prompt)
        text, finish, gen_ids = "", "length", []
        if max_tokens > 0:
            # lm-eval's default loglikelihood request: token ids, echo, max_tokens 1
            as_text = prompt if isinstance(prompt, str) else await _ids_as_text(h, prompt_ids)
            opts = req.gen_opts(default_max_tokens).model_copy(update={"max_tokens": max_tokens})
            tokens_in = _multiplexed(handles, req.model, stream=True).generate.remote(
                as_text, opts.model_dump(exclude={"adapter"}))
            result = await _collect(tokens_in, await _next_token(tokens_in))
            text, finish = result.text, result.finish_reason
            whole = await h.tokenize.remote(as_text + text)
            gen_ids = whole[len(prompt_ids):] if whole[:len(prompt_ids)] == prompt_ids else await h.tokenize.remote(text)
        ids = prompt_ids + gen_ids
        tokens = await _token_logprobs(h, ids, 0 if req.echo else len(prompt_ids), top_n)
        echoed = "".join(t.text for t in tokens[:len(prompt_ids)]) if req.echo else ""
        body_text = (prompt if isinstance(prompt, str) else echoed) if req.echo else ""
        choices.append({"index": index, "text": body_text + text, "finish_reason": "length" if finish == "length" else "stop",
                        "logprobs": completion_logprobs(tokens, with_top=top_n > 0)})
        usage = Usage(usage.prompt_tokens + len(prompt_ids), usage.completion_tokens + len(gen_ids))
    return scored_completion_response(req.model, choices, usage)


async def _ids_as_text(h: "DeploymentHandle", ids: list[int]) -> str:
    """A token-id prompt as the text the engine generates after: only when that text tokenises back
    to exactly these ids, so what is continued is what is scored (else a 400 naming the prompt).

    Args:
        h: the model's deployment handle.
        ids: the prompt's token ids.
    """
    text = "".join(await h.token_texts.remote(ids))
    if await h.tokenize.remote(text) != ids:
        raise WireError(400, "prompt: these token ids do not read back as the same ids from their text, so they "
                             "cannot be continued exactly; send max_tokens: 0 (their logprobs only) or the prompt "
                             "as text", param="prompt")
    return text


async def _scored_chat(handles: Mapping[str, "DeploymentHandle"], req: ChatRequest, messages: list[dict[str, str]],
                       default_max_tokens: int) -> dict[str, Any]:
    """A whole chat answer whose choice carries the reply's logprobs in OpenAI's chat format, the
    `top_logprobs` most likely tokens at each position too.

    The reply is generated as any chat is, then scored after the very ids the engine generated it
    from (`chat_ids`: its chat template, system prompt and tokenisation), so each logprob is the
    engine's own for that token, from its raw distribution (no sampling), adapter included. The
    reply's tokens are its text as the model's tokenizer splits it, one entry each; the
    end-of-generation token the engine stops on has no text and no entry (llama.cpp's own logprobs
    leave it out too), though the engine counts it in usage.completion_tokens; a stop sequence's
    tokens, cut from the text, have none either.

    Args:
        handles: base model name -> its deployment's handle.
        req: the checked request (req.logprobs).
        messages: its messages, as the deployment's `chat` takes them.
        default_max_tokens: max_tokens when the request does not say.
    """
    h = _multiplexed(handles, req.model)
    prompt_ids = await h.chat_ids.remote(messages)  # first: an engine that cannot score refuses before generating
    stream, first = await _call_model(handles, req, messages, default_max_tokens)
    result = await _collect(stream, first)
    if result.usage.prompt_tokens and result.usage.prompt_tokens != len(prompt_ids):
        # Scores after other ids than the engine's would be numbers for another prompt: refuse them.
        raise EngineError(f"model {req.model!r}: the chat's prompt is {len(prompt_ids)} tokens as chat_ids renders it "
                          f"and {result.usage.prompt_tokens} as the engine generated from it")
    # The reply alone: generated after the prompt's ids, its tokens never merge with the prompt's.
    gen_ids = await h.tokenize.remote(result.text) if result.text else []
    tokens = await _token_logprobs(h, prompt_ids + gen_ids, len(prompt_ids), req.top_logprobs or 0)
    return chat_response(req.model, result, chat_logprobs(tokens))


async def _collect(stream: AsyncIterator[Token], first: Token | None) -> Result:
    """The whole answer of a non-streamed request, from its first token on."""
    parts: list[str] = []
    finish, usage = "stop", Usage()
    tok = first
    while tok is not None:
        parts.append(tok.text)
        if tok.finish_reason:
            finish = tok.finish_reason
        if tok.usage:
            usage = tok.usage
        tok = await _next_token(stream)
    return Result("".join(parts), finish, usage, GenMetrics())  # type: ignore[arg-type]


async def _sse_events(req: CompletionCall, stream: AsyncIterator[Token], first: Token | None,
                      chat: bool) -> AsyncIterator[bytes]:
    """The SSE events of a streamed request, from its first token on; an error mid-stream is sent as
    an error event (the headers are out by then), never as a normal "stop"."""
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
            tok = await _next_token(stream)
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-stream, never as "stop"
        yield w.error(_wire_error(e, req.model))
        yield w.done()
        return
    yield w.finish(finish)
    if req.include_usage:
        yield w.usage(usage)
    yield w.done()


# --------------------------------------------------------------------------- the other routes' answers


def _model_list(handles: Mapping[str, "DeploymentHandle"], created: Mapping[str, int],
                adapters: Sequence[AdapterEntry]) -> dict[str, Any]:
    """GET /v1/models: the base models, then the registered adapters of those served here."""
    data = [{"id": name, "object": "model", "created": created.get(name, 0), "owned_by": "evalcluster"}
            for name in sorted(handles)]
    for entry in adapters:
        if entry.base in handles:
            data.append({"id": entry.model_id, "object": "model", "created": created.get(entry.base, 0),
                         "owned_by": "evalcluster", "parent": entry.base, "root": entry.base})
    return {"object": "list", "data": data}


async def _health(handles: Mapping[str, "DeploymentHandle"]) -> tuple[bool, dict[str, Any]]:
    """Whether every model answers, and each one's status (down with its error, or its requests in flight)."""
    status: dict[str, Any] = {}
    ok = True
    for name, handle in handles.items():
        try:
            info = await handle.info.remote()
            if info.get("status") == "down":
                ok = False
                status[name] = {"status": "down", "error": public_text(str(info.get("error")))}
            else:
                status[name] = {"status": "ok", "in_flight": info.get("in_flight", 0)}
        except Exception as e:  # noqa: BLE001
            ok = False
            log.warning("health of model %s: %s", name, e)
            status[name] = {"status": "down", "error": public_text(str(e) or type(e).__name__)}
    return ok, status


# --------------------------------------------------------------------------- the deployment


def ingress_class(docs: bool = False) -> type:
    """The ingress deployment class (built lazily: FastAPI and Serve import only when serving).

    Args:
        docs: serve /docs, /redoc and /openapi.json (they answer without the API key).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve

    app = FastAPI(title="evalcluster", description="OpenAI-compatible endpoint for evalcluster's models",
                  **({} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}))

    @serve.ingress(app)
    class OpenAIIngress:
        """The routes; each joins up the module's steps for its request."""

        def __init__(self, api_key_sha256: str | None, limits: RequestLimits,
                     default_max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
            self.handles: dict[str, Any] = {}
            self.created: dict[str, int] = {}
            self.key_sha = api_key_sha256
            self.limits = limits
            self.default_max_tokens = default_max_tokens
            self.started = time.time()
            self._registry = None
            self._models_at = 0.0

        def settings(self) -> dict[str, Any]:
            """What a job deploying to this endpoint must ask for too (`ingress_settings`)."""
            return {"key_sha256": self.key_sha, "docs": docs}

        async def _refresh(self) -> None:
            """The served models: every model some job (or `serve --detach`) claims in the registry,
            so a model another job deploys later is served too. Looked up at most once a second."""
            if time.monotonic() - self._models_at < 1.0:
                return
            from ray import serve

            from deployments._config import model_config

            claims = [c for c in await self._registry_actor().models.remote() if c.jobs]
            handles, tokens = {}, {}
            for c in claims:
                handles[c.name] = self.handles.get(c.name) or serve.get_deployment_handle(
                    deployment_name(c.name), model_app(c.name))
                self.created.setdefault(c.name, int(time.time()))
                tokens[c.name] = model_config(c.config).request_token_limit()
            self.handles = handles
            self.limits = dataclasses.replace(self.limits, max_tokens=tokens)
            self._models_at = time.monotonic()

        def _auth(self, request: Request) -> None:
            _check_api_key(request.headers.get("authorization", ""), self.key_sha)

        def _registry_actor(self) -> Any:
            if self._registry is None:
                self._registry = registry()
            return self._registry

        async def _answer(self, request: Request, chat: bool) -> Any:
            """A chat or completion request: streamed as SSE events or answered whole."""
            req: CompletionCall | None = None
            try:
                self._auth(request)
                await self._refresh()
                req, first_arg = await _read_request(request, chat, self.limits)
                default = min(self.default_max_tokens, self.limits.max_tokens.get(req.model.partition(":")[0],
                                                                                   self.default_max_tokens))
                if isinstance(req, CompletionRequest) and req.scored:
                    return JSONResponse(await _scored_completion(self.handles, req, default))
                if isinstance(req, ChatRequest) and req.logprobs:
                    # (a chat's first argument is its messages)
                    return JSONResponse(await _scored_chat(self.handles, req, first_arg, default))  # type: ignore[arg-type]
                stream, first = await _call_model(self.handles, req, first_arg, default)
            except Exception as e:  # noqa: BLE001
                return _error_response(_wire_error(e, req.model if req is not None else None))
            if req.stream:
                return StreamingResponse(_sse_events(req, stream, first, chat), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            try:
                result = await _collect(stream, first)
            except Exception as e:  # noqa: BLE001
                return _error_response(_wire_error(e, req.model))
            return JSONResponse(chat_response(req.model, result) if chat else completion_response(req.model, result))

        @app.post("/v1/chat/completions")
        async def chat_completions(self, request: Request) -> Any:
            return await self._answer(request, chat=True)

        @app.post("/v1/completions")
        async def completions(self, request: Request) -> Any:
            return await self._answer(request, chat=False)

        @app.get("/v1/models")
        async def list_models(self, request: Request) -> Any:
            try:
                self._auth(request)
            except WireError as e:
                return _error_response(e)
            await self._refresh()
            return _model_list(self.handles, self.created, await self._registry_actor().list.remote())

        @app.get("/v1/models/{model_id:path}")
        async def model_info(self, model_id: str, request: Request) -> Any:
            try:
                self._auth(request)
                await self._refresh()
                handle, base, adapter = _model_handle(self.handles, model_id)
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
                return _error_response(_wire_error(e, model_id))

        @app.get("/healthz")
        async def healthz(self, request: Request) -> Any:
            """ok or degraded for anyone (a load balancer's probe); each model's state only with the key."""
            await self._refresh()
            ok, status = await _health(self.handles)
            body: dict[str, Any] = {"status": "ok" if ok else "degraded"}
            try:
                self._auth(request)
                body.update(uptime_s=round(time.time() - self.started, 1), models=status)
            except WireError:
                pass
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
    """The sha256 of the endpoint's key; None when none is configured. A key that is configured but
    names nothing (an unset or blank variable, an empty or unreadable file) is refused: serving
    without auth because of a typo is the one thing this must not do."""
    if http.api_key_env:
        key = os.environ.get(http.api_key_env, "").strip()
        if not key and http.api_key_file is None:
            raise DeploymentError(f"cluster.serve.api_key_env: environment variable {http.api_key_env} is not set "
                                  "or blank; refusing to serve without the API key (set it, or remove api_key_env)")
        if key:
            return hashlib.sha256(key.encode()).hexdigest()
    if http.api_key_file is None:
        return None
    path = http.api_key_file.expanduser()
    try:
        key = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise DeploymentError(f"cluster.serve.api_key_file: cannot read {path}: "
                              f"{getattr(e, 'strerror', None) or e}; refusing to serve without the API key") from None
    if not key:
        raise DeploymentError(f"cluster.serve.api_key_file: {path} is empty; refusing to serve without the API key")
    return hashlib.sha256(key.encode()).hexdigest()


def model_application(m: ModelConfig, cache_dir: Path) -> Any:
    """One model's Serve application: its deployment, placed by its resources.

    Args:
        m: the model (paths absolute: replicas may run in another directory).
        cache_dir: node-local directory for pulled and converted adapters.
    """
    from ray import serve

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
    return dep.bind(m.model_dump(mode="json"), str(cache_dir))


def build_app(models: Sequence[ModelConfig], http: ServeHTTP, cache_dir: Path) -> dict[str, Any]:
    """The Serve applications by name: one per model (`model_app`) and the OpenAI ingress
    (`APP_NAME`), which finds the models' handles itself (the registry's model table).

    Args:
        models: the models to serve (paths absolute: replicas may run in another directory).
        http: the endpoint's section (for its API key and request limits).
        cache_dir: node-local directory for pulled and converted adapters.
    """
    from ray import serve

    settings = ingress_settings(http)  # before anything is deployed: a key that names nothing stops here
    apps = {model_app(m.name): model_application(m, cache_dir) for m in models}
    ingress = serve.deployment(ingress_class(settings["docs"]), name=INGRESS_NAME, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=1000)
    apps[APP_NAME] = ingress.bind(settings["key_sha256"], RequestLimits.of(http, models))
    return apps


def ingress_settings(http: ServeHTTP) -> dict[str, Any]:
    """The endpoint's access settings, as the running ingress reports them (its `settings`): the
    sha256 of its API key (None: no key) and whether /docs is served."""
    return {"key_sha256": _api_key_sha256(http), "docs": http.docs}


def _settings_differ(running: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """What differs between the running endpoint's settings and a config's, in words (no key)."""
    have, want = running.get("key_sha256"), wanted["key_sha256"]
    if have != want:
        if have is None:
            return "runs without an API key and this config sets one (cluster.serve.api_key_env/api_key_file)"
        if want is None:
            return "runs with an API key and this config sets none (cluster.serve.api_key_env/api_key_file)"
        return "runs with another API key than this config's (cluster.serve.api_key_env/api_key_file)"
    if running.get("docs") != wanted["docs"]:
        return f"serves /docs: {running.get('docs')}, and this config's cluster.serve.docs is {wanted['docs']}"
    return None


def _apps() -> dict[str, str]:
    """Serve's applications and their status (RUNNING, DEPLOYING, ...)."""
    from ray import serve

    return {name: str(app.status).rpartition(".")[2] for name, app in serve.status().applications.items()}


def _running_apps() -> set[str]:
    return {name for name, status in _apps().items() if status == "RUNNING"}


def deploy(models: Sequence[ModelConfig], http: ServeHTTP, cache_dir: Path, *, job: str, host: str | None = None,
           port: int | None = None, access_log: bool = True,
           placement: dict[str, Any] | None = None) -> str:
    """Claim the models for `job` and deploy those no running job serves yet; the ingress too when
    it is not running. Returns the endpoint URL.

    A model some other running job serves with the same definition is shared as it is (never
    redeployed); one it serves with another definition is refused (ModelClaimError, nothing
    deployed). So is a running endpoint whose access settings (API key, docs) differ from `http`
    while another job uses it (DeploymentError naming the difference, never the key); when no other
    job does, the endpoint is redeployed with `http`'s. `undeploy(job)` gives the claims back.

    Args:
        models: the models to serve.
        http: the endpoint's section (host, port, API key).
        cache_dir: node-local directory for pulled and converted adapters.
        job: who claims them: the Ray job id, or DETACHED (`serve --detach`).
        host: HTTP bind address (default: the section's, 127.0.0.1).
        port: HTTP port (default: the config's).
        access_log: log every request (the watch job turns it off: its own requests are counted
            in its metrics, and a line per probe would bury the job's log).
        placement: Ray actor options putting the registry on the state node.
    """
    import ray
    from ray import serve

    from deployments._registry import ModelClaimError, model_definition

    check_placement(models, ray.nodes())
    apps = build_app(models, http, cache_dir)
    reg = registry(placement)
    fresh, mine, claimed = [], [], []
    for m in models:  # every claim before any deployment: a conflict deploys nothing
        try:
            claim, first = ray.get(reg.claim_model.remote(job, m.name, model_definition(m),
                                                          m.model_dump(mode="json")))
        except ModelClaimError as e:  # Ray's wrapper, raised here: its one line, without the traceback
            if claimed:  # and gives back what this call claimed
                ray.get(reg.release_models.remote(job, [n for n in claimed if n in fresh]))
            raise ModelClaimError(str(getattr(e, "cause", None) or e)) from None
        claimed.append(m.name)
        if first:
            fresh.append(m.name)
        if claim.jobs == [job]:
            mine.append(m.name)  # no other job uses it: deploy it if it is not running
    host = host or http.host
    port = http.port if port is None else port
    serve.start(http_options={"host": host, "port": port})
    host, port = _listening(host, port)
    replace_ingress = False
    if _apps().get(APP_NAME) in ("RUNNING", "DEPLOYING"):
        running_settings = serve.get_app_handle(APP_NAME).settings.remote().result(timeout_s=60)
        differ = _settings_differ(running_settings, ingress_settings(http))
        if differ is not None:
            others = sorted({j for c in ray.get(reg.models.remote()) for j in c.jobs if j != job})
            if others:  # one endpoint for every job: it keeps the settings its users deployed it with
                ray.get(reg.release_models.remote(job, claimed))
                raise DeploymentError(f"the cluster's endpoint {differ}; it serves job(s) {', '.join(others)}, so "
                                      "it is not replaced: deploy with their cluster.serve settings, or after they end")
            replace_ingress = True  # no one else uses it: it takes this config's settings
    running = _running_apps()
    logging_config = {"enable_access_log": access_log}
    # One call for every application: their replicas start side by side (the ingress's beside the
    # engine's model load), not one application after the other (measured: ~3 s of a job's start).
    targets = [serve.RunTarget(apps[model_app(m.name)], name=model_app(m.name), route_prefix=None,
                               logging_config=logging_config)
               for m in models if m.name in fresh or (m.name in mine and model_app(m.name) not in running)]
    if replace_ingress or _apps().get(APP_NAME) not in ("RUNNING", "DEPLOYING"):  # deployed once, for every job
        targets.append(serve.RunTarget(apps[APP_NAME], name=APP_NAME, route_prefix="/", logging_config=logging_config))
    if targets:
        serve.run_many(targets)
    for m in models:
        if m.name not in fresh and m.name not in mine and model_app(m.name) not in running:
            _wait_for_app(model_app(m.name))  # another job deploys it now
    return f"http://{host}:{port}"


def _wait_for_app(name: str, timeout_s: float = 600) -> None:
    """Wait for an application another job deploys to run."""
    deadline = time.monotonic() + timeout_s
    while name not in _running_apps():
        if time.monotonic() > deadline:
            raise DeploymentError(f"application {name!r}, deployed by another job, is not running after "
                                  f"{timeout_s:.0f}s: see `serve status`")
        time.sleep(1)


def undeploy(job: str, placement: dict[str, Any] | None = None) -> list[str]:
    """Give back `job`'s model claims and delete the models no other job (or `serve --detach`)
    still claims. Returns the models deleted.

    Args:
        job: the Ray job id (or DETACHED).
        placement: Ray actor options putting the registry on the state node.
    """
    import ray
    from ray import serve

    unused = ray.get(registry(placement).release_models.remote(job))
    for name in unused:
        serve.delete(model_app(name))
    return unused


def _listening(host: str, port: int) -> tuple[str, int]:
    """Where Serve's HTTP proxy really listens. Its host and port are fixed when Serve first starts
    on a cluster (a later `serve.start` with others is ignored), so on a cluster where Serve already
    runs, the endpoint is where it is: say so rather than hand out a URL nobody answers."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        return host, port
    running = client.http_config
    if (running.host, running.port) != (host, port):
        log.warning("Serve already listens on %s:%s on this cluster (its address is fixed when it first "
                    "starts): the endpoint is there, not on %s:%s", running.host, running.port, host, port)
    return running.host, running.port


def register_adapter_dirs(models: Sequence[ModelConfig], reg: Any) -> int:
    """Register each `<dir>/<name>` under a model's `adapter_dirs` as adapter `model:name`; their
    bytes go to the registry (on the state node), from where replicas on any node pull them.

    Args:
        models: the models whose adapter_dirs to register.
        reg: the registry actor (`registry(placement)`).
    """
    import ray

    n = 0
    for m in models:
        for root in m.adapter_dirs:
            if not root.is_dir():
                raise DeploymentError(f"models.{m.name}.adapter_dirs: {root} is not a directory")
            for p in sorted(root.iterdir()):
                if p.name.startswith("."):
                    continue
                try:
                    entry = entry_for(m.name, p.name, p)
                except ValueError as e:  # an empty directory: nothing to serve
                    raise DeploymentError(f"models.{m.name}.adapter_dirs: {e}") from None
                ray.get(reg.register.remote(entry, adapter_files(p)))
                n += 1
    return n

"""An OpenAI-compatible HTTP server as a TextModel, and the client the llama.cpp engine reuses.

`OpenAIClient` does the HTTP: httpx.AsyncClient, `/chat/completions` and `/completions` with SSE
streaming and usage (`stream_options.include_usage`), a Bearer API key, timeouts, and retries
with exponential backoff and jitter on connect errors, 5xx and 429 (honouring Retry-After).
A request is retried only before the server has accepted it (status 200): once a stream has
started nothing is sent twice. Cancelling the caller's task stops everything at once, including
a backoff sleep (CancelledError propagates; nothing swallows it).

`build_request` maps GenOpts to a request body, `stream_tokens` turns the SSE events into Tokens;
`OpenAIHTTPEngine` puts them behind the Engine base (deployments/_engine.py).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal

import httpx
from pydantic import SecretStr

from checkpoints import split_url_credentials
from deployments._engine import Engine, Request
from deployments._textmodel import (
    EngineError,
    EngineUnavailable,
    FinishReason,
    ModelInfo,
    RequestRejected,
    WHOLE_ANSWER,
    Token,
    Usage,
)

if TYPE_CHECKING:
    from deployments._config import OpenAIModel

log = logging.getLogger(__name__)

SamplingExtensions = Literal["none", "llamacpp", "vllm"]
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
HEALTH_TIMEOUT_S = 5.0
# Idle pooled connections are dropped before the 5 s keep-alive of llama.cpp's and uvicorn's
# servers, so a request is not sent on a connection the server is closing (a retry otherwise).
KEEPALIVE_EXPIRY_S = 2.0


def read_api_key(env: str | None, file: Path | None) -> SecretStr | None:
    """The API key from an environment variable (first) or a file; None when neither is configured.

    Args:
        env: name of the environment variable holding the key.
        file: a file whose stripped content is the key.
    """
    if env and os.environ.get(env, "").strip():
        return SecretStr(os.environ[env].strip())
    if file is not None:
        try:
            key = Path(file).expanduser().read_text().strip()
        except OSError as e:
            raise EngineError(f"api_key_file {file}: cannot read: {e.strerror}") from None
        if not key:
            raise EngineError(f"api_key_file {file}: the file is empty")
        return SecretStr(key)
    if env:
        raise EngineError(f"api_key_env: environment variable {env} is not set (and no api_key_file is configured)")
    return None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_text(resp: httpx.Response) -> str:
    """The server's error message, from an OpenAI-style JSON body or the raw text."""
    try:
        body = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError, httpx.ResponseNotRead):
        return resp.text[:300].strip() if resp.is_closed else ""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:300]
        return str(err)[:300]
    return str(body)[:300]


class OpenAIClient:
    """HTTP to one OpenAI-compatible server, with retries and SSE streaming.

    Args:
        base_url: the API root, e.g. `http://127.0.0.1:8080/v1`.
        api_key: sent as `Authorization: Bearer ...`; never logged or shown in repr.
        timeout_s: read/write/pool timeout per operation (a stream waits this long per event).
        connect_timeout_s: TCP connect timeout.
        max_retries: retries after the first attempt (0: no retry).
        backoff_base_s: first backoff; attempt n waits up to base * 2**n (half of it plus jitter).
        backoff_max_s: cap on one backoff.
        retry_after_max_s: a Retry-After longer than this fails the request instead.
        name: label for error messages.
        keep_alive: reuse connections (False: one connection per request, `Connection: close`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: SecretStr | None = None,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        retry_after_max_s: float = 120.0,
        name: str = "openai",
        keep_alive: bool = True,
    ) -> None:
        # Credentials in the URL (http://user:pass@host/v1) go as basic auth, never into a message.
        clean, user, password = split_url_credentials(base_url)
        self.base_url = clean.rstrip("/")
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self.name = name
        self.attempts = 0  # requests sent, retries included (tests and stats read it)
        headers = {"Accept": "application/json"}
        if not keep_alive:
            headers["Connection"] = "close"
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key.get_secret_value()}"
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            auth=httpx.BasicAuth(user, password or "") if user is not None else None,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64 if keep_alive else 0,
                                keepalive_expiry=KEEPALIVE_EXPIRY_S),
            trust_env=False,  # loopback servers must not go through a proxy from the environment
        )

    def __repr__(self) -> str:
        return f"<OpenAIClient {self.base_url}>"

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (0-based): exponential, capped, jittered.

        Args:
            attempt: how many retries came before this one.
        """
        cap = min(self.backoff_max_s, self.backoff_base_s * (2**attempt))
        return random.uniform(cap / 2, cap)

    def _delay_for(self, resp: httpx.Response, attempt: int, what: str) -> float:
        """The wait before retrying after an error status, or raise if it is not retried."""
        status = resp.status_code
        detail = _error_text(resp)
        msg = f"{self.name}: {what} -> HTTP {status}" + (f": {detail}" if detail else "")
        if status in (401, 403):
            raise EngineError(msg + " (check the API key: api_key_env / api_key_file)")
        if status in (400, 413, 422):  # the request itself (e.g. longer than the context), not the server
            raise RequestRejected(msg, detail or f"the model refused the request (HTTP {status})")
        if status not in RETRY_STATUS:
            raise EngineError(msg)
        if attempt >= self.max_retries:
            raise EngineUnavailable(f"{msg} (gave up after {attempt + 1} attempts)")
        wait = _retry_after(resp.headers.get("retry-after")) if status in (429, 503) else None
        if wait is not None:
            if wait > self.retry_after_max_s:
                raise EngineUnavailable(
                    f"{msg}: the server asks to retry after {wait:.0f} s, more than retry_after_max_s "
                    f"({self.retry_after_max_s:g} s)"
                )
            return wait
        return self.backoff(attempt)

    async def _sleep(self, delay: float, why: str, attempt: int) -> None:
        log.info("%s: %s; retry %d/%d in %.2f s", self.name, why, attempt + 1, self.max_retries, delay)
        await asyncio.sleep(delay)  # cancellable: a cancelled caller stops here at once

    def _connect_failed(self, e: httpx.TransportError, attempt: int, what: str) -> float:
        if attempt >= self.max_retries:
            raise EngineUnavailable(
                f"{self.name}: {what}: {type(e).__name__}: {e or 'no detail'} (gave up after {attempt + 1} attempts)"
            ) from e
        return self.backoff(attempt)

    async def get_json(self, path: str, *, retries: bool = True, timeout_s: float | None = None) -> Any:
        """GET `path` (relative to base_url) and decode JSON, retrying like a request.

        Args:
            path: e.g. "/models".
            retries: False for a single attempt (health checks).
            timeout_s: overrides the client's timeouts for this call (health checks use a short one).
        """
        return await self.request_json("GET", path, retries=retries, timeout_s=timeout_s)

    async def request_json(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, retries: bool = True,
        timeout_s: float | None = None,
    ) -> Any:
        """Send one request (`body` as JSON) to `path` and decode the JSON reply, retrying like a request.

        Args:
            method: "GET" or "POST".
            path: e.g. "/models", "/tokenize".
            body: the JSON body, or None for none.
            retries: False for a single attempt (health checks).
            timeout_s: overrides the client's timeouts for this call (health checks use a short one).
        """
        what = f"{method} {self.base_url}{path}"
        timeout = httpx.Timeout(timeout_s) if timeout_s is not None else httpx.USE_CLIENT_DEFAULT
        attempt = 0
        while True:
            self.attempts += 1
            try:
                resp = await self._http.request(method, path, json=body, timeout=timeout)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as e:
                if not retries:
                    raise EngineUnavailable(f"{self.name}: {what}: {type(e).__name__}: {e or 'no detail'}") from e
                delay = self._connect_failed(e, attempt, what)
                await self._sleep(delay, type(e).__name__, attempt)
                attempt += 1
                continue
            except httpx.TransportError as e:
                raise EngineUnavailable(f"{self.name}: {what}: {type(e).__name__}: {e or 'no detail'}") from e
            if resp.status_code < 400:
                try:
                    return resp.json()
                except json.JSONDecodeError:
                    raise EngineError(f"{self.name}: {what}: the reply is not JSON: {resp.text[:200]!r}") from None
            if not retries:
                raise EngineUnavailable(f"{self.name}: {what} -> HTTP {resp.status_code}: {_error_text(resp)}")
            delay = self._delay_for(resp, attempt, what)
            await self._sleep(delay, f"HTTP {resp.status_code}", attempt)
            attempt += 1

    async def stream_events(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST a streaming request and yield each SSE event's JSON, until `[DONE]`.

        Retries (connect errors, 5xx, 429) happen only before the server accepted the request.
        Closing the iterator closes the connection, which makes the server drop the request.

        Args:
            path: "/chat/completions" or "/completions".
            body: the JSON body (with "stream": true).
        """
        what = f"POST {self.base_url}{path}"
        attempt = 0
        while True:
            self.attempts += 1
            accepted = False
            try:
                async with self._http.stream("POST", path, json=body) as resp:
                    if resp.status_code >= 400:
                        await resp.aread()
                        delay = self._delay_for(resp, attempt, what)
                    elif not body.get("stream"):  # one JSON reply: yielded as the one event it stands for
                        accepted = True
                        yield _whole_reply(await resp.aread(), self.name)
                        return
                    else:
                        accepted = True
                        async for event in _sse_json(resp, self.name):
                            yield event
                        return
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as e:
                if accepted:
                    raise EngineUnavailable(
                        f"{self.name}: {what}: the connection broke mid-stream ({type(e).__name__}: {e or 'no detail'})"
                    ) from e
                delay = self._connect_failed(e, attempt, what)
            except httpx.TimeoutException as e:
                raise EngineUnavailable(f"{self.name}: {what}: timed out ({type(e).__name__})") from e
            except httpx.TransportError as e:
                raise EngineUnavailable(
                    f"{self.name}: {what}: {'mid-stream ' if accepted else ''}{type(e).__name__}: {e or 'no detail'}"
                ) from e
            await self._sleep(delay, "request failed", attempt)
            attempt += 1


async def _sse_json(resp: httpx.Response, name: str) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a server-sent-event stream, until `data: [DONE]` or the end."""
    data: list[str] = []
    event = ""
    async for line in resp.aiter_lines():
        if line.startswith(":"):
            continue  # comment / keep-alive
        if line:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data.append(value)
            elif field == "event":
                event = value
            continue
        if not data:
            continue
        payload, kind = "\n".join(data), event
        data, event = [], ""
        if payload.strip() == "[DONE]":
            return
        yield _sse_payload(payload, kind, name)
    if data and "\n".join(data).strip() != "[DONE]":
        yield _sse_payload("\n".join(data), event, name)


def _whole_reply(raw: bytes, name: str) -> dict[str, Any]:
    """A non-streaming reply as the streaming event it equals: each choice's `message` becomes its
    `delta` (a completion's `text` stays), with the finish reason and usage."""
    obj = _sse_payload(raw.decode("utf-8", "replace"), "", name)
    for choice in obj.get("choices") or ():
        if isinstance(choice, dict) and "message" in choice:
            choice["delta"] = choice.pop("message") or {}
    return obj


def _sse_payload(payload: str, event: str, name: str) -> dict[str, Any]:
    """One event's JSON; an error event (or an `error` member) raises EngineError with its message."""
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError:
        raise EngineError(f"{name}: the stream sent an event that is not JSON: {payload[:200]!r}") from None
    if not isinstance(obj, dict):
        raise EngineError(f"{name}: the stream sent an event that is not a JSON object: {payload[:200]!r}")
    if event == "error" or obj.get("error") is not None:
        err = obj.get("error", obj)
        msg = err.get("message", err) if isinstance(err, dict) else err
        raise EngineError(f"{name}: the server reported an error mid-stream: {msg}")
    return obj


def build_request(
    req: Request, model: str | None, extensions: SamplingExtensions = "none", cache_prompt: bool | None = None
) -> tuple[str, dict[str, Any]]:
    """The endpoint path and JSON body for one request: streaming, unless the caller only collects
    the answer (`WHOLE_ANSWER`), when one reply saves both sides a parse per token.

    Every GenOpts field the engine accepted is sent (the engine rejects the others first).
    With `extensions="llamacpp"` the "off" values are sent explicitly, because llama.cpp's own
    defaults (top_k 40, top_p 0.95, min_p 0.05) would otherwise apply.

    Args:
        req: the request (chat or raw prompt).
        model: the `model` field; None to leave it out (llama.cpp serves one model).
        extensions: which non-OpenAI sampling fields the server takes.
        cache_prompt: llama.cpp's prompt-cache switch; None leaves it to the server.
    """
    o = req.opts
    body: dict[str, Any] = {"max_tokens": o.max_tokens, "temperature": o.temperature}
    if WHOLE_ANSWER.get():
        body["stream"] = False
    else:
        body.update(stream=True, stream_options={"include_usage": True})
    if model:
        body["model"] = model
    if req.is_chat:
        path = "/chat/completions"
        body["messages"] = [{"role": m.role, "content": m.content} for m in req.messages or ()]
    else:
        path = "/completions"
        body["prompt"] = req.prompt
    if o.seed is not None:
        body["seed"] = o.seed
    if o.stop:
        body["stop"] = list(o.stop)
    if cache_prompt is not None:
        body["cache_prompt"] = cache_prompt
    if extensions == "llamacpp":
        body["top_p"] = o.top_p if o.top_p is not None else 1.0
        body["top_k"] = o.top_k or 0
        body["min_p"] = 0.0
        body["repeat_penalty"] = o.repeat_penalty if o.repeat_penalty is not None else 1.0
    else:
        if o.top_p is not None:
            body["top_p"] = o.top_p
        if extensions == "vllm":
            if o.top_k:
                body["top_k"] = o.top_k
            if o.repeat_penalty is not None:
                body["repetition_penalty"] = o.repeat_penalty
    return path, body


def _finish(value: Any) -> FinishReason | None:
    if value is None:
        return None
    return "length" if value == "length" else "stop"


async def stream_tokens(events: AsyncIterator[dict[str, Any]], chat: bool) -> AsyncIterator[Token]:
    """Tokens from OpenAI streaming events; the last carries finish_reason and the server's usage.

    Args:
        events: what `OpenAIClient.stream_events` yields.
        chat: True for /chat/completions deltas, False for /completions text.
    """
    finish: FinishReason | None = None
    usage: Usage | None = None
    async for ev in events:
        u = ev.get("usage")
        if isinstance(u, dict):
            usage = Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
        for choice in ev.get("choices") or ():
            if chat:
                text = (choice.get("delta") or {}).get("content")
            else:
                text = choice.get("text")
            if text:
                yield Token(text)
            finish = _finish(choice.get("finish_reason")) or finish
    yield Token("", None, finish or "stop", usage)


class OpenAIHTTPEngine(Engine):
    """A model behind an OpenAI-compatible server (vLLM, llama.cpp, OpenAI, ...).

    Args:
        name: the model's name in our config.
        base_url: the API root, e.g. `http://127.0.0.1:8080/v1`.
        model: the server's model id; None asks `/models` at start and takes the first.
        api_key_env / api_key_file: where the API key comes from (read at start).
        sampling_extensions: "llamacpp" or "vllm" to send top_k / repeat penalty; "none" rejects them.
        chat_only: the server has no `/completions`; `generate()` fails with a clear error.
        system_prompt: prepended to chats without a system message.
        client options: see OpenAIClient.
    """

    kind = "openai"
    drain_after_stop = True  # the server gets the same stop sequences and ends there too

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        model: str | None = None,
        api_key_env: str | None = None,
        api_key_file: Path | None = None,
        sampling_extensions: SamplingExtensions = "none",
        chat_only: bool = False,
        system_prompt: str | None = None,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        retry_after_max_s: float = 120.0,
    ) -> None:
        super().__init__(name, system_prompt=system_prompt, adapters=False)
        self._url = base_url  # may embed credentials: only the client sees it
        self.base_url = split_url_credentials(base_url)[0].rstrip("/")  # what messages and info show
        self.model = model
        self.sampling_extensions = sampling_extensions
        self.chat_only = chat_only
        self._key_env, self._key_file = api_key_env, api_key_file
        self._client_kw = dict(
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_retries=max_retries,
            backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s,
            retry_after_max_s=retry_after_max_s,
        )
        self.supported_options = frozenset({"top_p", "seed", "stop"}) | (
            frozenset({"top_k", "repeat_penalty"}) if sampling_extensions != "none" else frozenset()
        )
        self.client: OpenAIClient | None = None

    @classmethod
    def from_config(cls, cfg: "OpenAIModel") -> "OpenAIHTTPEngine":
        """Build from the model's config (its paths absolute, as load_config makes them).

        Args:
            cfg: the model config.
        """
        o = cfg.options
        return cls(
            cfg.name,
            o.base_url,
            model=o.model,
            api_key_env=o.api_key_env,
            api_key_file=Path(o.api_key_file).expanduser() if o.api_key_file else None,
            sampling_extensions=o.sampling_extensions,
            chat_only=o.chat_only,
            system_prompt=cfg.system_prompt,
            timeout_s=o.timeout_s,
            connect_timeout_s=o.connect_timeout_s,
            max_retries=o.max_retries,
            backoff_base_s=o.backoff_base_s,
            backoff_max_s=o.backoff_max_s,
            retry_after_max_s=o.retry_after_max_s,
        )

    def _unsupported_hints(self) -> dict[str, str]:
        hint = "not an OpenAI field; set options.sampling_extensions to 'llamacpp' or 'vllm' if the server takes it"
        return {"top_k": hint, "repeat_penalty": hint, "adapter": "an HTTP model serves no local adapters"}

    async def _start(self) -> None:
        key = read_api_key(self._key_env, self._key_file)
        self.client = OpenAIClient(self._url, api_key=key, name=f"openai model {self.name!r}", **self._client_kw)
        listing = await self.client.get_json("/models")
        ids = [m.get("id") for m in (listing or {}).get("data", []) if isinstance(m, dict)]
        if self.model is None:
            if not ids:
                raise EngineError(f"{self.base_url}/models lists no model; set options.model for {self.name!r}")
            self.model = ids[0]

    async def _close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def _health(self) -> bool:
        assert self.client is not None
        await self.client.get_json("/models", retries=False, timeout_s=HEALTH_TIMEOUT_S)
        return True

    async def _settings_in_effect(self) -> dict[str, Any]:
        """A remote server's weights cannot be hashed from here: the served model's name and where."""
        return {"model": self.model, "base_url": self.base_url, "system_prompt": self.system_prompt}

    async def _info(self) -> ModelInfo:
        return ModelInfo(self.name, self.kind, extra={"base_url": self.base_url, "model": self.model})

    async def _stream(self, req: Request) -> AsyncIterator[Token]:
        if not req.is_chat and self.chat_only:
            raise EngineError(f"model {self.name!r} is chat_only (no /completions on the server): use chat()")
        client = self.client
        if client is None:
            raise EngineUnavailable(f"openai model {self.name!r} is not started")
        path, body = build_request(req, self.model, self.sampling_extensions)
        async for tok in stream_tokens(client.stream_events(path, body), req.is_chat):
            yield tok

"""The shared base of every engine: lifecycle, option checks, adapters, stop sequences, usage.

How to write an engine (llama.cpp, OpenAI HTTP, MLX and vLLM all do it this way):

    class MyEngine(Engine):
        kind = "my"                                    # the config's `engine:` value
        supported_options = frozenset({"top_p", "seed", "stop", "adapter"})

        def __init__(self, name, model_path, *, my_option=1, system_prompt=None, adapters=True,
                     max_adapters=4): ...              # from_config passes options.my_option as my_option

        async def _start(self): ...                    # load the model / start the server
        async def _close(self): ...                    # free everything; called once
        async def _health(self) -> bool: ...           # only called while running
        async def _info(self) -> ModelInfo: ...
        async def _settings_in_effect(self) -> dict: ...  # read back from the engine (see identity)
        def validate_adapter(self, path): ...          # sync, runs in a thread; raise AdapterError
        async def _stream(self, req: Request):         # async generator of Token
            ...

What the base does, so an engine does not:
- Lifecycle: `start()` / `close()` are idempotent and serialised; `async with engine:` starts and
  closes; a request before `start()` or after `close()` raises EngineUnavailable. A failed
  `_start` is cleaned up with `_close` and the engine can be started again.
- Options: `temperature` and `max_tokens` every engine must honour. Every other GenOpts field
  that is *active* (not at its "off" value, see `active_options`) must be named in
  `supported_options`, or the request fails with UnsupportedOption before anything runs.
- Adapters: `opts.adapter` is a path in the engine's native format. The base rejects it when the
  model has adapters disabled, checks that the path exists, calls `validate_adapter` (in a
  thread, cached by the file's size and mtime), then `_load_adapter` the first time, and hands the
  engine `Request.adapter` as an absolute Path. Errors are AdapterError naming the file. At most
  `max_adapters` stay loaded: one more calls `_unload_adapter` on the least recently used (a
  stream already running on it keeps its own references). Serve's multiplexer calls the public
  `load_adapter` / `unload_adapter` directly. An engine that must reload its whole set to add
  one adapter (llama.cpp starts a server) sets `loads_adapter_sets`: `load_adapter`'s `along`,
  the adapters its caller expects next, then reach `_load_adapter(path, along)` validated and
  within `max_adapters`, to be loaded in the same reload; other engines get `along` empty.
- Chat: when a chat has no system message and the model has a configured `system_prompt`, the
  base prepends it (Request.messages is what the engine must template).
- Stop sequences: the base runs every stream through `StopFilter`, so a partial stop string is
  never emitted, even when the engine or server applies stops itself.
- The final token: the base always ends a stream with one Token carrying `finish_reason` and
  `usage`. Engines yield Tokens too, with these conventions:
    * `text`: the new text (may be ""); `id`: the token id when known;
    * `usage`: cumulative usage so far, on any token (the last one seen wins). Give at least
      `prompt_tokens` as early as possible: when the stop filter ends a stream early the base
      uses the last usage it saw (and counts the tokens itself if the engine never gave one);
    * `finish_reason`: "stop" or "length" on the engine's last token.
  When the stop filter matches, the base closes the engine's generator (`aclose()`), so the
  engine must cancel its request in a `finally:` block; engines whose server applies the same
  stop sequences set `drain_after_stop = True` to read on to the server's final usage instead.
- Cancellation: a caller that stops iterating (and closes the stream) or cancels its task closes
  the engine's generator the same way; `active_requests` counts streams not yet cleaned up, so a
  test can check that a cancelled request freed its slot.
- Identity: `identity()` names what produces this engine's answers, for a result's identity
  (evaluators.EvalTarget): the engine kind and version (`engine_version`), the digest of the
  weights file(s) (`weights_path`, hashed with checkpoints.sha256_tree at start and again only
  when their size or mtime change, so `info()` stays cheap: ~0.6 s for SmolLM2's 94 MiB GGUF on
  this machine, so roughly a minute for 14 GB), and the settings *in effect* that change outputs
  (quantisation, context, LoRA scale, the chat template's digest), which `_settings_in_effect`
  reads back from the engine itself (llama.cpp's /props, vLLM's engine config, MLX's loaded
  model), not from the options it was given. `info()` carries it (ModelInfo.identity), so a Serve handle's caller sees it too;
  it is empty when it cannot be read now (a server restarting): callers treat that as an outage.
- Loglikelihood: an engine that can score implements `_tokenize(text)` (ids, no special tokens),
  `_token_texts(ids)` (each token's text), `_chat_ids(messages)` (the ids a chat's reply is
  generated after: the chat template applied with the generation prompt and tokenised exactly as
  `_stream` does it for that chat, special tokens included, so scoring them followed by a
  reply's tokens gives the reply's own logprobs; the base adds the system prompt first),
  `_eot_id()` (the token that stands before a text with no context, as lm-eval's end-of-text),
  `score_window` (the most tokens one scored sequence may hold) and `_score(ids, start, adapter,
  top_n)`: for every position i >= start, the TokenScore of ids[i] given ids[:i], from the model's
  raw distribution (no sampling). The base builds `loglikelihood` and `loglikelihood_rolling` on
  them (lm-eval's split of context and continuation, its rolling windows). An engine that cannot
  score raises UnsupportedOption("loglikelihood") from `_score`: none returns approximate numbers.
- Errors: engines raise EngineUnavailable (down, crashed), AdapterError (an adapter they refuse:
  checkpoints' error, a ValueError, not an EngineError) or EngineError (anything else) with a
  message a user can act on; the base does not swallow them.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, ClassVar, Literal, Sequence

from checkpoints import AdapterError, sha256_tree
from deployments._textmodel import (
    EngineError,
    EngineUnavailable,
    FinishReason,
    GenOpts,
    Loglikelihood,
    Message,
    ModelInfo,
    RequestRejected,
    StopFilter,
    Token,
    TokenScore,
    UnsupportedOption,
    Usage,
)

if TYPE_CHECKING:
    from deployments._config import LlamaCppModel, MLXModel, VLLMModel

log = logging.getLogger(__name__)

EngineState = Literal["created", "starting", "running", "closing", "closed"]

# GenOpts fields every engine must honour (they are never "off"): temperature, max_tokens.
# The value at which an optional GenOpts field means "not asked for".
_OFF: dict[str, Callable[[Any], bool]] = {
    "top_k": lambda v: v is None or v == 0,
    "top_p": lambda v: v is None or v == 1.0,
    "repeat_penalty": lambda v: v is None or v == 1.0,
    "stop": lambda v: not v,
    "seed": lambda v: v is None,
    "adapter": lambda v: v is None,
}
OPTIONAL_OPTIONS = frozenset(_OFF)

_request_ids = itertools.count(1)


def active_options(opts: GenOpts) -> dict[str, Any]:
    """The optional GenOpts fields a request actually asks for (not at their "off" value).

    Args:
        opts: the request's options.
    """
    return {name: getattr(opts, name) for name, off in _OFF.items() if not off(getattr(opts, name))}


def check_options(engine: str, opts: GenOpts, supported: frozenset[str], why: dict[str, str] | None = None) -> None:
    """Raise UnsupportedOption for the first active option not in `supported`.

    Args:
        engine: the engine's name, for the message.
        opts: the request's options.
        supported: the optional fields the engine honours.
        why: optional per-field explanation added to the message (e.g. how to enable it).
    """
    for name in active_options(opts):
        if name not in supported:
            raise UnsupportedOption(engine, name, (why or {}).get(name, ""))


def with_system_prompt(messages: Sequence[Message], system_prompt: str | None) -> list[Message]:
    """Messages with `system_prompt` prepended when there is no system message yet.

    Args:
        messages: the chat.
        system_prompt: the default system prompt, or None for none.
    """
    msgs = list(messages)
    if system_prompt and not any(m.role == "system" for m in msgs):
        msgs.insert(0, Message(role="system", content=system_prompt))
    return msgs


def package_version(name: str) -> str:
    """"<package> <version>" of an installed distribution ("<package>" when it is not installed).

    Args:
        name: the distribution's name.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{name} {version(name)}"
    except PackageNotFoundError:
        return name


def text_sha256(text: str) -> str:
    """Hex sha256 of a text's UTF-8 bytes (a chat template, a prompt), for an identity.

    Args:
        text: the text.
    """
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def loaded_model_settings(info: ModelInfo, tokenizer: Any, system_prompt: str | None) -> dict[str, Any]:
    """The settings in effect of an engine that loads the model in-process (MLX, vLLM): the loaded
    model's context, quantisation and dtype (as its `_info` reads them back), the chat template its
    tokenizer applies, and the system prompt the engine adds.

    Args:
        info: the engine's `_info()`.
        tokenizer: the loaded tokenizer (its `chat_template`).
        system_prompt: the engine's default system prompt.
    """
    template = getattr(tokenizer, "chat_template", None) or ""
    return {"context_length": info.context_length, "quantization": info.quantization,
            "dtype": info.extra.get("dtype"), "chat_template_sha256": text_sha256(template) if template else "",
            "system_prompt": system_prompt}


def _fingerprint(path: Path) -> tuple:
    """Size and mtime of a file, or of each file inside a directory."""
    if path.is_dir():
        return tuple(
            sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")
                   if p.is_file())
        )
    st = path.stat()
    return (st.st_size, st.st_mtime_ns)


@dataclass(slots=True)
class Request:
    """One request as an engine sees it, after the base's checks.

    Exactly one of `prompt` (raw completion) and `messages` (chat, system prompt applied) is set.
    `adapter` is the validated, absolute adapter path, or None for the base model.
    """

    opts: GenOpts
    prompt: str | None = None
    messages: list[Message] | None = None
    adapter: Path | None = None
    id: str = field(default_factory=lambda: f"req-{os.getpid()}-{next(_request_ids)}")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


class Engine(abc.ABC):
    """Base class of every engine. See the module docstring for the contract with subclasses.

    Args:
        name: the model's name (from the config).
        system_prompt: prepended to chats that have no system message; None for none.
        adapters: whether this model takes adapters at all.
        max_adapters: how many adapters an engine keeps loaded at once (engines that load
            adapters into memory bound their cache with it).
    """

    kind: ClassVar[str] = "engine"
    # Optional GenOpts fields this engine honours (see OPTIONAL_OPTIONS); others are rejected.
    supported_options: ClassVar[frozenset[str]] = frozenset()
    # True when the server applies the stop sequences too, so reading on after a client-side
    # match is short and gives the server's usage count.
    drain_after_stop: ClassVar[bool] = False
    # True when adding an adapter reloads the engine's whole set (set per instance where it depends
    # on options): `load_adapter(path, along=...)` then loads `along` in the same reload.
    loads_adapter_sets: bool = False

    def __init__(
        self, name: str, *, system_prompt: str | None = None, adapters: bool = True, max_adapters: int = 4
    ) -> None:
        self.name = name
        self.system_prompt = system_prompt
        self.adapters_enabled = adapters
        self.max_adapters = max_adapters
        self._state: EngineState = "created"
        self._lifecycle = asyncio.Lock()
        self._active = 0
        self._validated: dict[Path, tuple] = {}
        self._loaded: dict[Path, None] = {}  # ordered: least recently used first
        self._adapter_lock = asyncio.Lock()
        self._weights_digest: tuple[tuple, str] | None = None  # ((path, fingerprint), sha256_tree)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg: "LlamaCppModel | MLXModel | VLLMModel") -> "Engine":
        """Build an engine (not started) from its model config.

        This default fits an engine of a model on this node (llama.cpp, MLX, vLLM): its
        constructor takes the model's name and path, then the model's `options` field by field
        as keywords of the same names, and `system_prompt`, `adapters`, `max_adapters`. An engine
        built otherwise overrides it (the OpenAI client does).

        Args:
            cfg: the model's config; its paths are absolute when it came from load_config.
        """
        return cls(  # type: ignore[call-arg]  # the subclass's constructor, see above
            cfg.name, Path(cfg.path).expanduser(), **dict(cfg.options),
            system_prompt=cfg.system_prompt, adapters=cfg.adapters, max_adapters=cfg.max_adapters_per_replica,
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def active_requests(self) -> int:
        """Streams started and not yet cleaned up (a cancelled one leaves this count)."""
        return self._active

    @property
    def loaded_adapters(self) -> list[str]:
        """Adapters loaded by this engine, least recently used first."""
        return [str(p) for p in self._loaded]

    async def start(self) -> None:
        """Load the model / start the server. Idempotent; raises EngineError on failure."""
        async with self._lifecycle:
            if self._state == "running":
                return
            if self._state in ("closing", "closed"):
                raise EngineUnavailable(f"{self.kind} engine {self.name!r} is closed; open a new one")
            self._state = "starting"
            try:
                await self._start()
                # Hashed once here, so info() (health routes call it) never waits on a large file.
                await self._weights_sha256()
            except BaseException:
                self._state = "created"
                try:
                    await self._close()
                except Exception:  # noqa: BLE001 - the start error is the one to report
                    log.exception("cleaning up after a failed start of %s", self.name)
                raise
            self._state = "running"

    async def close(self) -> None:
        """Stop the engine and free what it holds. Idempotent."""
        async with self._lifecycle:
            if self._state == "closed":
                return
            was = self._state
            self._state = "closing"
            try:
                if was != "created":
                    await self._close()
            finally:
                self._state = "closed"

    async def health(self) -> bool:
        """True when the engine can answer now; False when it is not running or unhealthy."""
        if self._state != "running":
            return False
        try:
            return await self._health()
        except EngineUnavailable:
            return False

    async def info(self) -> ModelInfo:
        """What is loaded: architecture, context length, quantisation, adapters."""
        info = await self._info()
        info.name = info.name or self.name
        info.engine = info.engine or self.kind
        if not info.adapters:
            info.adapters = self.loaded_adapters
        if not info.identity and self._state == "running":
            # A status read while a server restarts still answers; no identity says "not now".
            with contextlib.suppress(EngineUnavailable):
                info.identity = await self.identity()
        return info

    async def identity(self) -> dict[str, Any]:
        """What produces this engine's answers: {"engine", "engine_version", "weights_sha256",
        "settings"} (see the module docstring); only while running (settings are read back).

        Raises EngineUnavailable when the engine is not running.
        """
        if self._state != "running":
            raise EngineUnavailable(f"{self.kind} engine {self.name!r} is {self._state}: its settings cannot be read")
        return {"engine": self.kind, "engine_version": self.engine_version(),
                "weights_sha256": await self._weights_sha256(), "settings": dict(await self._settings_in_effect())}

    async def _weights_sha256(self) -> str:
        """The weights' sha256_tree, hashed again only when their size or mtime changed ("": none here)."""
        path = self.weights_path()
        if path is None:
            return ""
        fp = (str(path), _fingerprint(path))
        if self._weights_digest is None or self._weights_digest[0] != fp:
            self._weights_digest = (fp, await asyncio.to_thread(sha256_tree, path))
        return self._weights_digest[1]

    def weights_path(self) -> Path | None:
        """The base weights file or directory on this node: the engine's `model_path` (None: it has
        none here, e.g. a remote server)."""
        path = getattr(self, "model_path", None)
        return Path(path) if path is not None else None

    def engine_version(self) -> str:
        """The engine's version (its package's, or its server's build)."""
        return ""

    async def _settings_in_effect(self) -> dict[str, Any]:
        """Hook: the output-changing settings as the engine reports them (default: none)."""
        return {}

    async def __aenter__(self) -> "Engine":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self._state}>"

    # ------------------------------------------------------------------ adapters

    async def load_adapter(self, path: str | os.PathLike[str], along: Sequence[str | os.PathLike[str]] = ()) -> Path:
        """Validate an adapter and load it ahead of the first request that uses it.

        Keeps at most `max_adapters` loaded: loading one more unloads the least recently used.
        A file changed since it was validated is validated and loaded again.

        Args:
            path: the adapter in this engine's native format.
            along: adapters likely asked for next (native format too). An engine that reloads its
                whole set to add one (`loads_adapter_sets`) loads as many as fit beside `path` in
                the same reload, so their own `load_adapter` later costs nothing; one that fails
                validation is left out (its own load reports why). Other engines ignore them.
        Returns the absolute path requests will carry in `Request.adapter`.
        """
        if not self.adapters_enabled:
            raise UnsupportedOption(self.kind, "adapter", f"model {self.name!r} is configured with adapters: false")
        p = Path(path).expanduser().absolute()
        fp = self._adapter_fingerprint(p, str(path))
        if self._validated.get(p) == fp and p in self._loaded:
            self._loaded[p] = self._loaded.pop(p)  # most recently used goes last
            return p
        async with self._adapter_lock:
            if self._validated.get(p) != fp:
                await asyncio.to_thread(self.validate_adapter, p)
                self._validated[p] = fp
                if p in self._loaded:  # changed on disk since it was loaded
                    del self._loaded[p]
                    await self._unload_adapter(p)
            if p in self._loaded:
                self._loaded[p] = self._loaded.pop(p)
                return p
            while len(self._loaded) >= self.max_adapters:
                oldest = next(iter(self._loaded))
                del self._loaded[oldest]
                await self._unload_adapter(oldest)
            room = self.max_adapters - len(self._loaded) - 1
            extra = await self._validated_along(along, p, room) if self.loads_adapter_sets and room > 0 else []
            await self._load_adapter(p, extra)
            self._loaded[p] = None
        return p

    async def _validated_along(self, along: Sequence[str | os.PathLike[str]], path: Path, room: int) -> list[Path]:
        """Up to `room` of `along` that are not `path` nor loaded and pass validation (called under
        the adapter lock); the others are logged and left to their own load."""
        out: list[Path] = []
        for given in along:
            q = Path(given).expanduser().absolute()
            if q == path or q in self._loaded or q in out:
                continue
            try:
                fp = self._adapter_fingerprint(q, str(given))
                if self._validated.get(q) != fp:
                    await asyncio.to_thread(self.validate_adapter, q)
                    self._validated[q] = fp
            except AdapterError as e:
                log.warning("%s: not loaded along with %s: %s", self.name, path, e)
                continue
            out.append(q)
            if len(out) == room:
                break
        return out

    async def unload_adapter(self, path: str | os.PathLike[str]) -> None:
        """Forget an adapter (the engine frees it now or at its next reload).

        Args:
            path: an adapter given to `load_adapter` or a request before.
        """
        p = Path(path).expanduser().absolute()
        async with self._adapter_lock:
            if p in self._loaded:
                del self._loaded[p]
                await self._unload_adapter(p)

    @staticmethod
    def _adapter_fingerprint(p: Path, given: str) -> tuple:
        if not p.exists():
            raise AdapterError(given, "no such file or directory")
        try:
            return _fingerprint(p)
        except OSError as e:
            raise AdapterError(given, f"cannot read: {e.strerror}") from None

    def validate_adapter(self, path: Path) -> None:
        """Check an adapter file/dir against the base model; raise AdapterError naming it.

        Runs in a worker thread. The default rejects every adapter: override it.

        Args:
            path: absolute path of an existing file or directory.
        """
        raise AdapterError(str(path), f"the {self.kind} engine does not take adapters")

    async def _load_adapter(self, path: Path, along: Sequence[Path] = ()) -> None:
        """Hook: make a validated adapter usable (default: nothing; the request carries the path).

        `along`: validated adapters to load in the same reload, only for `loads_adapter_sets`
        engines (see `load_adapter`); empty for the others."""

    async def _unload_adapter(self, path: Path) -> None:
        """Hook: free a loaded adapter (default: nothing)."""

    # ------------------------------------------------------------------ requests

    def generate(self, prompt: str, opts: GenOpts | None = None) -> AsyncIterator[Token]:
        """Stream a raw completion of `prompt` (no chat template).

        Args:
            prompt: the raw prompt text.
            opts: sampling options (default: greedy, 256 tokens).
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return self._run(Request(opts or GenOpts(), prompt=prompt))

    def chat(self, messages: Sequence[Message], opts: GenOpts | None = None) -> AsyncIterator[Token]:
        """Stream the assistant's reply to `messages` (the model's chat template applies).

        Args:
            messages: the conversation; the configured system prompt is added when it has none.
            opts: sampling options (default: greedy, 256 tokens).
        """
        msgs = [m if isinstance(m, Message) else Message(**m) for m in messages]
        if not msgs:
            raise ValueError("chat needs at least one message")
        return self._run(Request(opts or GenOpts(), messages=with_system_prompt(msgs, self.system_prompt)))

    def check_options(self, opts: GenOpts) -> None:
        """Raise UnsupportedOption if `opts` asks for something this engine cannot honour.

        Args:
            opts: the request's options.
        """
        check_options(self.kind, opts, self.supported_options, self._unsupported_hints())

    def _unsupported_hints(self) -> dict[str, str]:
        """Per-option explanation for UnsupportedOption messages (override to add hints)."""
        return {}

    async def _prepare(self, req: Request) -> Request:
        self._require_running()
        self.check_options(req.opts)
        if req.opts.adapter is not None:
            req.adapter = await self.load_adapter(req.opts.adapter)
        return req

    async def _run(self, req: Request) -> AsyncIterator[Token]:
        req = await self._prepare(req)
        stops = StopFilter(req.opts.stop)
        usage: Usage | None = None
        finish: FinishReason | None = None
        counted = 0
        self._active += 1
        raw = self._stream(req)
        try:
            async for tok in raw:
                if tok.usage is not None:
                    usage = tok.usage
                if tok.text or tok.id is not None:
                    counted += 1
                if tok.finish_reason is not None:
                    finish = tok.finish_reason
                if stops.stopped:  # draining to the server's final usage
                    continue
                out = stops.feed(tok.text) if tok.text else ""
                if out:
                    yield Token(out, tok.id if out == tok.text else None)
                if stops.stopped and not self.drain_after_stop:
                    break
        finally:
            try:
                await raw.aclose()
            finally:
                self._active -= 1
        engine_done = finish is not None
        if stops.stopped:
            finish = "stop"
        tail = stops.flush()
        if usage is None:
            usage = Usage(0, counted)
        elif not engine_done:  # ended early: the engine's count may lag behind what it yielded
            usage = Usage(usage.prompt_tokens, max(usage.completion_tokens, counted))
        yield Token(tail, None, finish or "stop", Usage(usage.prompt_tokens, usage.completion_tokens))

    # ------------------------------------------------------------------ loglikelihood

    def _require_running(self) -> None:
        if self._state != "running":
            raise EngineUnavailable(
                f"{self.kind} engine {self.name!r} is {self._state}"
                + ("; call `await engine.start()` first" if self._state == "created" else "")
            )

    async def tokenize(self, text: str) -> list[int]:
        """The token ids of `text` as the model's tokenizer encodes it, without special tokens.

        Args:
            text: any text.
        """
        self._require_running()
        return await self._tokenize(text)

    async def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text (a token that is part of a UTF-8 character may read as U+FFFD).

        Args:
            ids: token ids.
        """
        self._require_running()
        return await self._token_texts([int(i) for i in ids])

    async def chat_ids(self, messages: Sequence[Message]) -> list[int]:
        """The token ids `chat(messages)` generates its reply after: the configured system prompt
        added as `chat` adds it, the model's chat template applied with the generation prompt, and
        tokenised as the engine tokenises a chat's prompt (special tokens included). `score` of
        these ids followed by a reply's tokens gives the logprobs of the reply's tokens.

        Args:
            messages: the conversation, as given to `chat`.
        """
        self._require_running()
        msgs = [m if isinstance(m, Message) else Message(**m) for m in messages]
        if not msgs:
            raise ValueError("chat_ids needs at least one message")
        return [int(i) for i in await self._chat_ids(with_system_prompt(msgs, self.system_prompt))]

    async def score(
        self, ids: Sequence[int], start: int, *, adapter: str | os.PathLike[str] | None = None, top_n: int = 0
    ) -> list[TokenScore]:
        """Score the tokens ids[start:], each given all tokens before it (one forward pass's worth).

        Args:
            ids: the token sequence (at most `score_window` tokens).
            start: the first scored position (at least 1: the first token has no context).
            adapter: an adapter in the engine's native format, or None for the base model.
            top_n: how many most likely tokens to return at each position besides the scored one.
        """
        self._require_running()
        ids = [int(i) for i in ids]
        if not 1 <= start < len(ids):
            raise ValueError(f"score: start={start} must lie in 1..{len(ids) - 1} for {len(ids)} tokens")
        if len(ids) > self.score_window:
            raise RequestRejected(
                f"{self.kind} engine {self.name!r}: {len(ids)} tokens to score, the window is {self.score_window}",
                f"{len(ids)} tokens is more than the model's context of {self.score_window}",
            )
        if not 0 <= top_n <= 20:
            raise ValueError(f"score: top_n={top_n} must lie in 0..20")
        path = await self.load_adapter(adapter) if adapter is not None else None
        self._active += 1
        try:
            return await self._score(ids, start, path, top_n)
        finally:
            self._active -= 1

    async def split_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation token ids, split the way lm-eval splits them.

        Trailing whitespace of the context moves to the continuation; context + continuation is
        tokenised as one text and the continuation is what follows the context's own tokens. An
        empty context is the end-of-text token alone.

        Args:
            context: the text the continuation follows.
            continuation: the text to score.
        """
        if context == "":
            return [await self._eot()], await self.tokenize(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, ctx = await asyncio.gather(self.tokenize(context + continuation), self.tokenize(context))
        return ctx, whole[len(ctx):]

    async def loglikelihood(
        self, requests: Sequence[tuple[str, str]], *, adapter: str | os.PathLike[str] | None = None
    ) -> list[Loglikelihood]:
        """Score each (context, continuation): the continuation's summed logprob given the context,
        whether every one of its tokens is the greedy one, and its token count. Run concurrently.

        A pair longer than `score_window` keeps its last tokens (the context's start is cut, as
        lm-eval does); a continuation that alone fills the window is refused.

        Args:
            requests: (context, continuation) pairs.
            adapter: an adapter in the engine's native format, or None for the base model.
        """
        return list(await asyncio.gather(*(self._pair(c, x, adapter) for c, x in requests)))

    async def _pair(self, context: str, continuation: str, adapter: str | os.PathLike[str] | None) -> Loglikelihood:
        ctx, cont = await self.split_pair(context, continuation)
        if not cont:
            raise ValueError(f"loglikelihood: continuation {continuation[:60]!r} has no tokens after context {context[-60:]!r}")
        ids = (ctx + cont)[-self.score_window:]
        start = len(ids) - len(cont)
        if start < 1:
            raise RequestRejected(
                f"{self.kind} engine {self.name!r}: a continuation of {len(cont)} tokens fills the window of {self.score_window}",
                f"the continuation ({len(cont)} tokens) does not fit the model's context of {self.score_window}",
            )
        scores = await self.score(ids, start, adapter=adapter)
        return Loglikelihood(sum(s.logprob for s in scores), all(s.greedy for s in scores), len(scores))

    async def loglikelihood_rolling(
        self, text: str, *, adapter: str | os.PathLike[str] | None = None
    ) -> Loglikelihood:
        """The logprob of a whole text after the end-of-text token (for perplexity, bits per byte).

        A text longer than the window is scored in disjoint windows, each given the token before it.

        Args:
            text: the text.
            adapter: an adapter in the engine's native format, or None for the base model.
        """
        ids = [await self._eot(), *await self.tokenize(text)]
        if len(ids) < 2:
            raise ValueError("loglikelihood_rolling: the text has no tokens")
        step = self.score_window - 1
        windows = [ids[s - 1 : s + step] for s in range(1, len(ids), step)]
        parts = await asyncio.gather(*(self.score(w, 1, adapter=adapter) for w in windows))
        scores = [s for part in parts for s in part]
        return Loglikelihood(sum(s.logprob for s in scores), all(s.greedy for s in scores), len(scores))

    async def _eot(self) -> int:
        self._require_running()
        return await self._eot_id()

    @property
    def score_window(self) -> int:
        """The most tokens one scored sequence may hold (the model's context per request)."""
        return 2048

    def _cannot_score(self) -> UnsupportedOption:
        return UnsupportedOption(self.kind, "loglikelihood", f"the {self.kind} engine cannot score text")

    async def _tokenize(self, text: str) -> list[int]:
        """Hook: the tokenizer's ids for `text`, no special tokens (default: cannot score)."""
        raise self._cannot_score()

    async def _token_texts(self, ids: list[int]) -> list[str]:
        """Hook: each token's text (default: cannot score)."""
        raise self._cannot_score()

    async def _chat_ids(self, messages: list[Message]) -> list[int]:
        """Hook: the ids a chat's reply is generated after, system prompt applied (default: cannot score)."""
        raise self._cannot_score()

    async def _eot_id(self) -> int:
        """Hook: the end-of-text token id (default: cannot score)."""
        raise self._cannot_score()

    async def _score(self, ids: list[int], start: int, adapter: Path | None, top_n: int) -> list[TokenScore]:
        """Hook: TokenScores of ids[start:] (see the module docstring; default: cannot score)."""
        raise self._cannot_score()

    # ------------------------------------------------------------------ for subclasses

    @abc.abstractmethod
    async def _start(self) -> None:
        """Load the model or start the server; raise EngineError with the reason on failure."""

    @abc.abstractmethod
    async def _close(self) -> None:
        """Free everything `_start` took (also called after a failed `_start`)."""

    @abc.abstractmethod
    async def _health(self) -> bool:
        """Is the engine able to answer right now? (Only called while running.)"""

    @abc.abstractmethod
    async def _info(self) -> ModelInfo:
        """Architecture, context length, quantisation of the loaded model."""

    @abc.abstractmethod
    def _stream(self, req: Request) -> AsyncIterator[Token]:
        """Run one request: an async generator of Tokens (see the module docstring)."""


__all__ = [
    "Engine",
    "EngineError",
    "EngineState",
    "OPTIONAL_OPTIONS",
    "Request",
    "active_options",
    "loaded_model_settings",
    "package_version",
    "text_sha256",
    "check_options",
    "with_system_prompt",
]

"""Checkpoint sources: a local directory, or a directory on a host reached over SSH.

Both have the same async interface: `list()` returns every relevant file under the base (and, on
request, the sha256 of some of them) in ONE round trip; `stat()`, `fetch()`, `close()`.

Over SSH the listing is a single remote command: `find` with `-printf` (GNU) or `-exec stat`
(BSD/macOS), every path shell-quoted; file names reach the hashing loop as quoted arguments of
`sh -c`, so no name is ever parsed by a shell. (stdin would lift the command-length limit, but
not every SSH server forwards it to the command; the limit is met by batching instead.) Host keys are checked against a known_hosts file; an unknown or changed
key is refused with the command that trusts it. One connection is kept across polls; when it
drops, the next call reconnects, and a host that cannot be reached is retried on exponential
backoff (calls before the retry time fail at once with SourceUnavailable).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import posixpath
import re
import shlex
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Protocol

from checkpoints._files import HASH_CHUNK, NotRegularFile, open_regular, sha256_stream
from checkpoints._records import FileEntry, Listing

if TYPE_CHECKING:
    from checkpoints._config import SourceConfig

log = logging.getLogger(__name__)

_HEX = re.compile(rb"[0-9a-f]{64}")


class SourceError(RuntimeError):
    """A source operation failed (listing, stat, fetch). The message names the source."""


class SourceUnavailable(SourceError):
    """The source cannot be reached now; `retry_at` (time.monotonic()) is the next attempt."""

    def __init__(self, msg: str, retry_at: float | None = None) -> None:
        super().__init__(msg)
        self.retry_at = retry_at


class SourceFileChanged(SourceError):
    """The path no longer holds the file that was discovered (replaced by a symlink or something
    that is not a regular file, or grown past its size): that version is gone (permanent)."""


class HostKeyError(SourceError):
    """The SSH host key is unknown or changed: refused. The message says how to trust it."""


class Source(Protocol):
    """What discovery and staging need from a source."""

    name: str
    base: str
    round_trips: int

    async def list(self, name_globs: Iterable[str], max_depth: int | None = None,
                   hash_paths: Iterable[str] = ()) -> Listing:
        """Files under the base matching name_globs, and digests of hash_paths: one round trip."""
        ...

    async def hash(self, relpaths: Iterable[str]) -> dict[str, str]:
        """sha256 of files relative to the base."""
        ...

    async def stat(self, path: str) -> FileEntry | None:
        """Size and mtime of a file (full path), or None."""
        ...

    async def fetch(self, path: str, local_path: Path, max_bytes: int | None = None) -> None:
        """Copy a regular file (full path on the source; never through a symlink) to a local path."""
        ...

    async def close(self) -> None:
        """Release the connection, if any."""
        ...


# --------------------------------------------------------------------------- local


class LocalSource:
    """A base directory on this machine.

    Args:
        path: the base directory.
        name: the source's name (part of checkpoint identity).
    """

    def __init__(self, path: str | Path, name: str = "local") -> None:
        self.name = name
        self.base = str(Path(path).expanduser().absolute())
        self.round_trips = 0

    def __repr__(self) -> str:
        return f"LocalSource({self.name!r}, {self.base!r})"

    def _walk(self, name_globs: list[str], max_depth: int | None) -> list[FileEntry]:
        if not os.path.isdir(self.base):
            raise SourceError(f"source {self.name}: base directory {self.base} does not exist")
        out: list[FileEntry] = []
        stack = [("", 1)]
        while stack:
            rel, depth = stack.pop()
            try:
                it = os.scandir(os.path.join(self.base, rel) if rel else self.base)
            except OSError as e:
                log.warning("source %s: cannot list %s: %s", self.name, rel or self.base, e.strerror)
                continue
            with it:
                for entry in it:
                    child = f"{rel}/{entry.name}" if rel else entry.name
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if max_depth is None or depth < max_depth:
                                stack.append((child, depth + 1))
                        elif entry.is_file(follow_symlinks=False) and any(
                            fnmatch.fnmatchcase(entry.name, g) for g in name_globs
                        ):
                            st = entry.stat(follow_symlinks=False)
                            out.append(FileEntry(child, st.st_size, st.st_mtime))
                    except FileNotFoundError:
                        continue  # removed while we looked
        return out

    def _hash_all(self, relpaths: list[str]) -> dict[str, str]:
        out = {}
        for rel in relpaths:
            try:
                with open_regular(os.path.join(self.base, rel)) as f:
                    out[rel] = sha256_stream(f)
            except OSError:
                continue  # gone, unreadable, or no longer a regular file: not hashed (skipped)
        return out

    async def list(self, name_globs: Iterable[str], max_depth: int | None = None,
                   hash_paths: Iterable[str] = ()) -> Listing:
        """Files under the base whose names match, plus digests of `hash_paths` (taken first).

        Args:
            name_globs: file-name globs (fnmatch) to keep.
            max_depth: how many directory levels to descend (None: all).
            hash_paths: paths relative to the base to hash in the same round trip.
        """
        self.round_trips += 1
        hashes = await asyncio.to_thread(self._hash_all, list(hash_paths))
        entries = await asyncio.to_thread(self._walk, list(name_globs), max_depth)
        return Listing(entries, hashes)

    async def hash(self, relpaths: Iterable[str]) -> dict[str, str]:
        """sha256 of files relative to the base; missing files are left out.

        Args:
            relpaths: paths relative to the base.
        """
        self.round_trips += 1
        return await asyncio.to_thread(self._hash_all, list(relpaths))

    async def stat(self, path: str) -> FileEntry | None:
        """Size and mtime of a file (full path), or None if it does not exist.

        Args:
            path: full path of the file.
        """
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return FileEntry(os.path.relpath(path, self.base), st.st_size, st.st_mtime)

    async def fetch(self, path: str, local_path: Path, max_bytes: int | None = None) -> None:
        """Copy a regular file (full path on the source) to a local path; a symlink or anything
        but a regular file there is refused (SourceFileChanged), not followed.

        Args:
            path: full path on the source.
            local_path: where to write it.
            max_bytes: refuse a file larger than this (SourceFileChanged).
        """
        self.round_trips += 1

        def copy() -> None:
            try:
                src = open_regular(path)
            except FileNotFoundError:
                raise SourceError(f"source {self.name}: {path} does not exist") from None
            except NotRegularFile as e:
                raise SourceFileChanged(f"source {self.name}: {path} {e.why}; not taken") from None
            with src, open(local_path, "wb") as dst:
                copied = 0
                while chunk := src.read(HASH_CHUNK):
                    copied += len(chunk)
                    if max_bytes is not None and copied > max_bytes:
                        raise SourceFileChanged(f"source {self.name}: {path} is larger than the {max_bytes} "
                                                "bytes it had when discovered; not taken")
                    dst.write(chunk)

        await asyncio.to_thread(copy)

    async def close(self) -> None:
        """Nothing to release."""


# --------------------------------------------------------------------------- the remote command

# Hash the files named as arguments (relative to $B). Runs under `sh -c LOOP sh NAME...`: the
# names are positional parameters, never parsed by a shell. One hasher per file, each printed as
# soon as it is done (`H\t<hex>\t<name>\0`), so what was hashed is kept whatever happens later.
# Only regular files are hashed: a FIFO or a device swapped in for a checkpoint would block a
# reader forever, and a symlink points outside the base. Each hasher is killed after $HK seconds
# where `timeout` exists (GNU), so a file that cannot be read in time (a hung disk, a FIFO swapped
# in after the test) is skipped and no process is left behind on the host. GNU sha256sum escapes
# a name holding a backslash or newline by prefixing its line with "\": that is stripped.
_HASH_LOOP = (
    'cd "$B" || exit 0; '
    "if command -v sha256sum >/dev/null 2>&1; then HS=sha256sum; else HS='shasum -a 256'; fi; "
    'TO=; if command -v timeout >/dev/null 2>&1; then TO="timeout -s KILL $HK"; fi; '
    'for f; do [ -f "./$f" ] && [ ! -h "./$f" ] || continue; '
    'h=$($TO $HS -- "./$f" 2>/dev/null) || continue; h=${h#\\\\}; '
    'printf "H\\t%s\\t%s\\000" "${h%% *}" "$f"; done'
)
# A remote command is one argv string (`$SHELL -c CMD`): Linux caps one at 128 KiB.
MAX_COMMAND_BYTES = 96 * 1024
FETCH_CHUNK = 4 << 20  # one SFTP read: asyncssh splits it into parallel requests


def _hash_batches(relpaths: list[str], budget: int) -> list[list[str]]:
    batches: list[list[str]] = [[]]
    used = 0
    for p in relpaths:
        n = len(shlex.quote(p).encode("utf-8", "surrogateescape")) + 1
        if batches[-1] and used + n > budget:
            batches.append([])
            used = 0
        batches[-1].append(p)
        used += n
    return [b for b in batches if b]


def _hash_command(relpaths: list[str]) -> str:
    return f"sh -c {shlex.quote(_HASH_LOOP)} sh " + " ".join(shlex.quote(p) for p in relpaths)


def _env_part(base: str, hash_timeout_s: float) -> str:
    return f"B={shlex.quote(base)}; HK={max(1, int(hash_timeout_s))}; export B HK"


def remote_list_command(base: str, name_globs: Iterable[str], max_depth: int | None,
                        hash_paths: Iterable[str] = (), hash_timeout_s: float = 60.0) -> str:
    """The one shell command that hashes some files, then lists a base.

    Every variable part is shlex-quoted. Output: NUL-terminated records, `size\\tmtime\\trelpath`
    for files and `H\\tsha256\\trelpath` for digests; exit 3 when the base is not a directory.
    A base that is a symlink to a directory is listed (find -H follows the start point only).

    Args:
        base: the base directory on the remote host.
        name_globs: file-name globs for find's -name.
        max_depth: find's -maxdepth (None: unbounded).
        hash_paths: paths relative to the base to hash first.
        hash_timeout_s: seconds one file's hashing may take (then it is skipped).
    """
    name_expr = " -o ".join(f"-name {shlex.quote(g)}" for g in name_globs)
    depth = f" -maxdepth {int(max_depth)}" if max_depth else ""
    parts = [
        _env_part(base, hash_timeout_s),
        'if [ ! -d "$B" ]; then printf "evalcluster: base directory %s does not exist\\n" "$B" >&2; exit 3; fi',
    ]
    hash_paths = list(hash_paths)
    if hash_paths:
        parts.append(_hash_command(hash_paths))
    parts.append(
        'if find "$B" -maxdepth 0 -printf "" >/dev/null 2>&1; then '
        f'find -H "$B" -mindepth 1{depth} -type f \\( {name_expr} \\) -printf "%s\\t%T@\\t%P\\0"; '
        # BSD find (macOS) has no -printf: stat each match instead (names with newlines break here)
        f'else cd "$B" && find . -mindepth 1{depth} -type f \\( {name_expr} \\) '
        "-exec stat -f '%z%t%Fm%t%N' {} + | tr '\\n' '\\000'; fi"
    )
    return "; ".join(parts)


def parse_remote_listing(out: bytes) -> Listing:
    """Parse what `remote_list_command` printed.

    Args:
        out: its stdout.
    """
    entries: list[FileEntry] = []
    hashes: dict[str, str] = {}
    for rec in out.split(b"\0"):
        if not rec:
            continue
        parts = rec.split(b"\t", 2)
        if len(parts) != 3:
            continue
        a, b, path_b = parts
        path = path_b.decode("utf-8", "surrogateescape")
        if path.startswith("./"):
            path = path[2:]
        if a == b"H":
            if _HEX.fullmatch(b):
                hashes[path] = b.decode()
            continue
        try:
            entries.append(FileEntry(path, int(a), float(b)))
        except ValueError:
            continue
    return Listing(entries, hashes)


# --------------------------------------------------------------------------- SSH


def _trust_hint(host: str, port: int, known_hosts: Path) -> str:
    target = host if port == 22 else f"[{host}]:{port}"
    scan = f"ssh-keyscan -p {port} {shlex.quote(host)} >> {shlex.quote(str(known_hosts))}"
    return f"check the key out of band, then trust it with: {scan}  (known_hosts entry for {target})"


class SSHSource:
    """A base directory on a host reached over SSH (asyncssh), with host-key checking.

    Args:
        host: the host name or address.
        port: the SSH port.
        user: the login user.
        key: the private key file (None: asyncssh's defaults and the agent).
        known_hosts: the known_hosts file the host key must be in.
        base: the base directory on the host.
        name: the source's name (part of checkpoint identity).
        connect_timeout: seconds for connect + authentication.
        command_timeout: seconds for one listing command.
        fetch_timeout: seconds for one file download.
        hash_timeout: seconds one file's hashing may take on the host before it is skipped
            (default: half the command timeout, so the listing after it still fits).
        backoff_s: first reconnect delay after a failed connect; doubles up to max_backoff_s.
        max_backoff_s: the cap on the reconnect delay.
        keepalive_s: SSH keepalive interval, so a dead peer is noticed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        key: str | Path | None,
        known_hosts: str | Path,
        base: str,
        *,
        name: str = "ssh",
        connect_timeout: float = 10.0,
        command_timeout: float = 120.0,
        fetch_timeout: float = 600.0,
        hash_timeout: float | None = None,
        backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
        keepalive_s: float = 30.0,
    ) -> None:
        self.name = name
        self.host, self.port, self.user = host, int(port), user
        self.key = Path(key).expanduser() if key else None
        self.known_hosts = Path(known_hosts).expanduser()
        self.base = base.rstrip("/") or "/"
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.fetch_timeout = fetch_timeout
        self.hash_timeout = hash_timeout if hash_timeout is not None else command_timeout / 2
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.keepalive_s = keepalive_s
        self.round_trips = 0
        self.connects = 0          # successful connections made (1 while the connection holds)
        self.connect_attempts = 0  # tries, failed ones included
        self._conn: Any = None
        self._sftp: Any = None
        self._lock = asyncio.Lock()
        self._failures = 0
        self._retry_at: float | None = None
        self._last_error: str | None = None

    def __repr__(self) -> str:
        return f"SSHSource({self.name!r}, {self.user}@{self.host}:{self.port}, base={self.base!r})"

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    # ---------------------------------------------------------------- connection

    def _dropped(self, exc: Exception | None) -> None:
        self._conn = None
        self._sftp = None

    def _fail(self, msg: str, cls: type[SourceError] = SourceUnavailable) -> SourceError:
        self._failures += 1
        delay = min(self.backoff_s * 2 ** (self._failures - 1), self.max_backoff_s)
        self._retry_at = time.monotonic() + delay
        self._last_error = msg
        if cls is SourceUnavailable:
            return SourceUnavailable(f"{msg}; next attempt in {delay:.1f}s", self._retry_at)
        return cls(msg)

    async def _connection(self) -> Any:
        import asyncssh

        async with self._lock:
            if self._conn is not None:
                return self._conn
            now = time.monotonic()
            if self._retry_at is not None and now < self._retry_at:
                raise SourceUnavailable(
                    f"source {self.name} ({self.where}): {self._last_error}; next attempt in "
                    f"{self._retry_at - now:.1f}s", self._retry_at,
                )
            if not self.known_hosts.is_file():
                raise HostKeyError(
                    f"source {self.name}: known_hosts file {self.known_hosts} does not exist; "
                    + _trust_hint(self.host, self.port, self.known_hosts)
                )
            source = self

            class _Client(asyncssh.SSHClient):
                def connection_lost(self, exc: Exception | None) -> None:
                    source._dropped(exc)

            self.connect_attempts += 1
            try:
                conn = await asyncio.wait_for(
                    asyncssh.connect(
                        self.host, self.port, username=self.user,
                        client_keys=[str(self.key)] if self.key else (),
                        known_hosts=str(self.known_hosts), config=None,
                        client_factory=_Client,
                        keepalive_interval=self.keepalive_s, keepalive_count_max=3,
                        login_timeout=self.connect_timeout, connect_timeout=self.connect_timeout,
                    ),
                    self.connect_timeout + 5,
                )
            except asyncssh.HostKeyNotVerifiable:
                known, _, _ = _known_keys(self.known_hosts, self.host, self.port)
                what = (
                    f"the host key of {self.host}:{self.port} differs from the one in {self.known_hosts} "
                    "(it changed, or something is in between); refusing to connect. If the change is expected, "
                    f"remove the old entry (ssh-keygen -R '[{self.host}]:{self.port}' -f {self.known_hosts}) and "
                    if known else
                    f"the host key of {self.host}:{self.port} is not in {self.known_hosts}; refusing to connect. To "
                )
                raise self._fail(f"source {self.name}: {what}{_trust_hint(self.host, self.port, self.known_hosts)}",
                                 HostKeyError) from None
            except asyncssh.PermissionDenied:
                raise self._fail(
                    f"source {self.name}: {self.where} refused key {self.key or '(default keys)'} for user {self.user}"
                ) from None
            except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or type(e).__name__)
                raise self._fail(f"source {self.name}: cannot connect to {self.where}: {why}") from None
            self._conn = conn
            self.connects += 1
            self._failures = 0
            self._retry_at = None
            self._last_error = None
            return conn

    async def _with_conn(self, what: str, op: Any) -> Any:
        """Run op(conn); when the connection was lost, reconnect once and run it again."""
        import asyncssh

        for attempt in (1, 2):
            conn = await self._connection()
            try:
                return await op(conn)
            except (asyncssh.ConnectionLost, asyncssh.DisconnectError, asyncssh.ChannelOpenError,
                    asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection, BrokenPipeError, ConnectionError) as e:
                self._dropped(e)
                if conn is not None:
                    conn.abort()
                if attempt == 2:
                    raise self._fail(f"source {self.name}: {what}: connection to {self.where} lost: {e}") from None
            except asyncio.TimeoutError:
                self._dropped(None)
                conn.abort()
                raise SourceError(f"source {self.name}: {what} on {self.where} timed out") from None
        raise AssertionError("unreachable")

    async def _sftp_client(self, conn: Any) -> Any:
        if self._sftp is None:
            self._sftp = await conn.start_sftp_client()
        return self._sftp

    # ---------------------------------------------------------------- operations

    async def list(self, name_globs: Iterable[str], max_depth: int | None = None,
                   hash_paths: Iterable[str] = ()) -> Listing:
        """Files under the base whose names match, plus digests of `hash_paths`: one command.

        Args:
            name_globs: file-name globs (find -name) to keep.
            max_depth: how many directory levels to descend (None: all).
            hash_paths: paths relative to the base to hash first, in the same command.
        """
        hash_paths = list(hash_paths)
        # What does not fit in one command is left out: the caller hashes it separately.
        batches = _hash_batches(hash_paths, MAX_COMMAND_BYTES - 4096) if hash_paths else []
        cmd = remote_list_command(self.base, name_globs, max_depth, batches[0] if batches else (), self.hash_timeout)

        async def op(conn: Any) -> Any:
            self.round_trips += 1
            return await conn.run(cmd, encoding=None, check=False, timeout=self.command_timeout)

        res = await self._with_conn("listing", op)
        err = (res.stderr or b"").decode("utf-8", "replace").strip()
        if res.exit_status == 3:
            raise SourceError(f"source {self.name}: base directory {self.base} does not exist on {self.where}")
        listing = parse_remote_listing(res.stdout or b"")
        if res.exit_status not in (0, None):
            if not listing.entries:
                raise SourceError(f"source {self.name}: listing {self.base} on {self.where} failed "
                                  f"(exit {res.exit_status}): {err[:300]}")
            log.warning("source %s: listing %s was partial (exit %s): %s", self.name, self.base, res.exit_status, err[:300])
        return listing

    async def hash(self, relpaths: Iterable[str]) -> dict[str, str]:
        """sha256 of files relative to the base, hashed on the host: one command per ~90 KiB of names.

        Args:
            relpaths: paths relative to the base; missing files are left out.
        """
        relpaths = list(relpaths)
        out: dict[str, str] = {}
        for batch in _hash_batches(relpaths, MAX_COMMAND_BYTES - 1024):
            cmd = f"{_env_part(self.base, self.hash_timeout)}; " + _hash_command(batch)

            async def op(conn: Any, cmd: str = cmd) -> Any:
                self.round_trips += 1
                return await conn.run(cmd, encoding=None, check=False, timeout=self.command_timeout)

            res = await self._with_conn("hashing", op)
            out.update(parse_remote_listing(res.stdout or b"").sha256)
        return out

    async def stat(self, path: str) -> FileEntry | None:
        """Size and mtime of a file (full path) over SFTP, or None if it does not exist.

        SFTP v3 carries whole seconds: compare mtimes with `list()`'s (fractional) ones only as ints.

        Args:
            path: full path on the host.
        """
        import asyncssh

        async def op(conn: Any) -> Any:
            sftp = await self._sftp_client(conn)
            self.round_trips += 1
            try:
                return await asyncio.wait_for(sftp.stat(path), self.command_timeout)
            except asyncssh.SFTPNoSuchFile:
                return None

        attrs = await self._with_conn("stat", op)
        if attrs is None:
            return None
        rel = posixpath.relpath(path, self.base)
        mtime = attrs.mtime_ns / 1e9 if attrs.mtime_ns else float(attrs.mtime or 0)
        return FileEntry(rel, int(attrs.size or 0), mtime)

    async def fetch(self, path: str, local_path: Path, max_bytes: int | None = None) -> None:
        """Download a regular file over SFTP on the kept connection, never through a symlink.

        SFTP has no O_NOFOLLOW: the path is lstat'ed first (a symlink or anything but a regular file
        there is refused), and what was opened is fstat'ed again (a swap in between to a device or a
        FIFO is refused too; one to another regular file fails the digest check after). At most
        `max_bytes` are read.

        Args:
            path: full path on the host.
            local_path: where to write it.
            max_bytes: refuse a file larger than this (the size it was discovered with).
        """
        import asyncssh

        def refuse(why: str) -> SourceFileChanged:
            return SourceFileChanged(f"source {self.name}: {path} on {self.where} {why}; not taken")

        def check(attrs: Any) -> None:
            mode = attrs.permissions or 0
            if stat.S_ISLNK(mode):
                raise refuse("is a symlink")
            if not stat.S_ISREG(mode):
                raise refuse("is not a regular file")
            if max_bytes is not None and (attrs.size or 0) > max_bytes:
                raise refuse(f"is larger than the {max_bytes} bytes it had when discovered")

        async def download(sftp: Any) -> None:
            try:
                check(await sftp.lstat(path))
                async with sftp.open(path, "rb") as remote:
                    check(await remote.stat())
                    copied = 0
                    with open(local_path, "wb") as out:
                        while chunk := await remote.read(FETCH_CHUNK):
                            copied += len(chunk)
                            if max_bytes is not None and copied > max_bytes:
                                raise refuse(f"grew past the {max_bytes} bytes it had when discovered")
                            out.write(chunk)
            except asyncssh.SFTPNoSuchFile:
                raise SourceError(f"source {self.name}: {path} does not exist on {self.where}") from None
            except asyncssh.SFTPError as e:
                raise SourceError(f"source {self.name}: cannot download {path} from {self.where}: {e.reason}") from None

        async def op(conn: Any) -> None:
            sftp = await self._sftp_client(conn)
            self.round_trips += 1
            await asyncio.wait_for(download(sftp), self.fetch_timeout)

        await self._with_conn(f"download of {path}", op)

    async def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        conn, self._conn, self._sftp = self._conn, None, None
        if conn is not None:
            conn.close()
            try:
                await asyncio.wait_for(conn.wait_closed(), 5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - closing is best effort
                pass


def _known_keys(known_hosts: Path, host: str, port: int) -> tuple[list[Any], list[Any], list[Any]]:
    import asyncssh

    try:
        res = asyncssh.match_known_hosts(str(known_hosts), host, host, port)
        return res[0], res[1], res[2]
    except (OSError, ValueError, asyncssh.Error):
        return [], [], []


def source_from_config(cfg: "SourceConfig") -> LocalSource | SSHSource:
    """Build the source a SourceConfig describes.

    Args:
        cfg: the source's config section (paths absolute, as load_config makes them).
    """

    def res(p: Path) -> Path:
        return p.expanduser()

    if cfg.kind == "local":
        assert cfg.path is not None
        return LocalSource(res(cfg.path), name=cfg.name)
    assert cfg.host and cfg.user and cfg.base and cfg.known_hosts
    return SSHSource(
        cfg.host, cfg.port, cfg.user, res(cfg.key) if cfg.key else None, res(cfg.known_hosts), cfg.base,
        name=cfg.name, connect_timeout=cfg.connect_timeout_s, command_timeout=cfg.command_timeout_s,
    )

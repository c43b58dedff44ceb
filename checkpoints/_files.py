"""Durable writes and content digests of local files: the one place each is done."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

HASH_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks.

    Args:
        path: the file.
    """
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f: BinaryIO) -> str:
    """Hex sha256 of what is left to read in a binary file object.

    Args:
        f: the open file.
    """
    h = hashlib.sha256()
    while chunk := f.read(HASH_CHUNK):
        h.update(chunk)
    return h.hexdigest()


class NotRegularFile(OSError):
    """A path that is a symlink, a FIFO, a device or a directory where a regular file was expected."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path} {why}")
        self.why = why


def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file for reading, never through a symlink and never blocking on a FIFO.

    A source's file can be swapped between two looks at it: opening with O_NOFOLLOW and
    O_NONBLOCK, then checking what was opened, refuses a symlink (to a key, to /dev/zero) or a
    FIFO (which would block a reader forever) instead of following or waiting on it.

    Args:
        path: the file.

    Raises:
        NotRegularFile: the path is a symlink or not a regular file.
        OSError: it does not exist or cannot be read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFile(str(path), "is a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(str(path), "is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sha256_tree(path: str | Path) -> str:
    """Hex sha256 of a file, or of a directory's files (relative names and bytes, sorted by name).

    A file's digest equals `sha256_file(file)`; a directory's covers its layout too, so renaming a
    file inside it changes the digest.

    Args:
        path: a file or a directory.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"{path}: no files to hash")
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (a rename, a new file) durable.

    Args:
        path: the directory.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Make a file's bytes durable.

    Args:
        path: the file.
    """
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Write a file so that after a crash it is absent, the old file, or the whole new one.

    Yields a temp path beside `path` to write to; when the block ends without error the temp file
    is fsync'd and renamed over `path`, and the directory fsync'd. On error it is removed.

    Args:
        path: the destination (its directory is created).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)

"""Child processes that die with the process that started them, however it ends.

An engine's server process (llama.cpp's, a `llama-server` binary) holds a port and, on a GPU node,
the device's memory. A replica that Serve or the OOM killer SIGKILLs runs no cleanup (atexit,
finalizers), so the child must be told by the kernel: Linux's PR_SET_PDEATHSIG sends it SIGKILL
when its parent goes. It is set between fork and exec (`preexec_fn`), so it holds for any binary
and from the child's first instruction; a parent that died before that is caught by checking
that the parent is still the one that forked.

The signal comes when the *thread* that forked exits, not the whole process: fork from a thread
that lives as long as the children should (an event loop's, the main thread).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` (subprocess.Popen, asyncio's subprocess_exec) that makes the child SIGKILLed
    when this process dies; None where the kernel offers no such thing (not Linux).

    Build it in the parent, right before the spawn: it holds this process's pid and libc's prctl,
    resolved before the fork (the child runs nothing but the call).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)  # could not arm it, or the parent is already gone: do not start orphaned

    return preexec

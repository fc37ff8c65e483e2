"""A child process that ends when its parent does: the read end of a pipe whose write end only the parent holds.

The studio runs `ursa train` (and export, download, show) as a child in its own session, so that a
cancel can end the child's whole process group. A parent killed with kill -9 cannot cancel it, so
the parent passes the child the read end of a pipe (``lifeline``); the child (``watch``, called by
the `ursa` entry point) reads it in a daemon thread, and the read returns the moment the kernel
closes the parent's write end, that is, however the parent ends. Then the child ends its group as a
cancel would: SIGTERM, then SIGKILL after ``grace`` seconds. ``prctl(PR_SET_PDEATHSIG)`` would be
Linux-only and fires when the parent *thread* that started the child ends (the studio starts jobs
from a worker thread of a pool that retires idle threads), so it is not used.
"""

from __future__ import annotations

import os
import signal
import threading
import time

ENV = "URSA_LIFELINE_FD"  # the descriptor number of the pipe's read end, in the child


def lifeline() -> tuple[int, int]:
    """(read end for the child, write end the parent keeps open while the child should live); both close-on-exec."""
    return os.pipe()


def child_env(read_fd: int) -> dict[str, str]:
    """The variables that tell the child which descriptor is its lifeline (pass it with Popen's pass_fds too)."""
    return {ENV: str(read_fd)}


def watch(grace: float = 10.0) -> threading.Thread | None:
    """In the child: end this process group when the parent's end of the lifeline closes. None without a lifeline."""
    value = os.environ.pop(ENV, "")  # popped: the child's own children do not watch a pipe they do not hold
    if not value.isdigit():
        return None
    fd = int(value)
    try:
        os.set_inheritable(fd, False)
    except OSError:
        return None  # not an open descriptor: nothing to watch

    def wait_for_parent() -> None:
        try:
            while os.read(fd, 1):  # the parent never writes: EOF (b"") is the only answer
                pass
        except OSError:
            pass
        group = os.getpgid(0)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(grace)

    thread = threading.Thread(target=wait_for_parent, name="ursa-lifeline", daemon=True)
    thread.start()
    return thread

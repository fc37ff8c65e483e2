"""Network plumbing shared by the web apps: is a port free to listen on, and enough file descriptors to serve."""

from __future__ import annotations

import socket

from ursa.errors import UrsaError


def check_port(host: str, port: int) -> None:
    """Fail with one clear line before any slow work when host:port cannot be listened on.

    SO_REUSEADDR as uvicorn sets it, so a port left in TIME_WAIT by a killed server (a browser
    was connected) is free again at once, as it is for the server itself.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UrsaError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port") from None


def raise_open_files_limit(want: int = 65536) -> int:
    """Raise this process's soft limit on open files towards want (never above the hard limit); returns it.

    Every connection is a file descriptor. Distributions often start processes with a soft limit
    of 1024 under a far higher hard one, which a few hundred slow clients plus the model's files
    exhaust; then the server can accept no one, /health included.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft

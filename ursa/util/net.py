"""Network plumbing shared by the web apps: is a port free to listen on."""

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

"""Running `ursa serve`: one process on uvicorn, or several workers that each build the app from the environment."""

from __future__ import annotations

import os
from typing import Callable

import uvicorn

from ursa.apps.serve.app import app_from_env, create_app
from ursa.apps.serve.config import ServeConfig
from ursa.apps.serve.model import default_threads, device_text, load_model
from ursa.apps.web import Server, TimedH11Protocol, quiet_repeats, server_config
from ursa.errors import UrsaError
from ursa.inference.placement import place
from ursa.util.net import check_port, raise_open_files_limit

FILES_RESERVED = 64  # descriptors the process needs besides connections: the model, logs, pipes, the listening socket

# What uvicorn imports in each worker process (factory mode); derived, so a move cannot leave it stale.
WORKER_FACTORY = f"{app_from_env.__module__}:{app_from_env.__name__}"


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          access_log: bool = True, log_level: str = "info", ready: Callable[[str, str], None] | None = None) -> None:
    """Run the app until SIGINT/SIGTERM, then finish in-flight requests and return (exit status 0).

    ready(url, backend): called once the model is loaded, before serving; backend says which runs, why, and on what.
    """
    if workers < 1:
        raise UrsaError(f"--workers must be at least 1 (got {workers})")
    place(config.device)  # an unknown or absent device: one line, exit 2, before the port is checked or opened
    check_port(host, port)
    config.threads = config.threads or default_threads(workers)
    # Over limit_concurrency open connections a new one is answered 503 at once; the limit stays well under
    # the open-files limit (raised first), so the server can always accept, answer and close.
    files = raise_open_files_limit()
    limit = config.limit_concurrency if files < 0 else max(8, min(config.limit_concurrency, (files - FILES_RESERVED) // 2))
    limits = dict(limit_concurrency=limit, timeout_keep_alive=5, backlog=2048)
    if workers == 1:
        app = create_app(config=config)  # load errors surface here, before the port is opened
        ucfg = server_config(app, host, port, header_timeout=config.header_timeout, access_log=access_log,
                             log_level=log_level, timeout_graceful_shutdown=10, server_header=False, **limits)
        if ready:
            ready(f"http://{host}:{port}", f"{app.state.info['backend']} ({app.state.backend_reason}); "
                                           f"{device_text(app.state.predictor)}")
        Server(ucfg).run()
        return
    # Check the model in this process (clear error, exit 2) before forking workers that load it.
    pred, why = load_model(config.model, config.backend, threads=1, device=config.device)
    os.environ.update(config.to_env())
    if ready:
        ready(f"http://{host}:{port}", f"{pred.backend} ({why}); {device_text(pred, workers, config.threads)}")
    quiet_repeats()
    # uvicorn builds the workers' Config itself: app_from_env sets their header deadline on TimedH11Protocol.
    uvicorn.run(WORKER_FACTORY, factory=True, host=host, port=port, workers=workers, http=TimedH11Protocol,
                access_log=access_log, log_level=log_level, timeout_graceful_shutdown=10, server_header=False, **limits)

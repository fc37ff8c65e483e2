"""Running `ursa serve`: one process on uvicorn, or several workers that each build the app from the environment."""

from __future__ import annotations

import os
from typing import Callable

import uvicorn

from ursa.apps.serve.app import app_from_env, create_app
from ursa.apps.serve.config import ServeConfig
from ursa.apps.web import Server
from ursa.errors import UrsaError
from ursa.inference.predictor import default_threads, load_predictor
from ursa.util.net import check_port

# What uvicorn imports in each worker process (factory mode); derived, so a move cannot leave it stale.
WORKER_FACTORY = f"{app_from_env.__module__}:{app_from_env.__name__}"


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          access_log: bool = True, log_level: str = "info", ready: Callable[[str], None] | None = None) -> None:
    """Run the app until SIGINT/SIGTERM, then finish in-flight requests and return (exit status 0)."""
    if workers < 1:
        raise UrsaError(f"--workers must be at least 1 (got {workers})")
    check_port(host, port)
    config.threads = config.threads or default_threads(workers)
    if workers == 1:
        app = create_app(config=config)  # load errors surface here, before the port is opened
        ucfg = uvicorn.Config(app, host=host, port=port, access_log=access_log, log_level=log_level,
                              timeout_graceful_shutdown=10, server_header=False)
        if ready:
            ready(f"http://{host}:{port}")
        Server(ucfg).run()
        return
    # Check the model in this process (clear error, exit 2) before forking workers that load it.
    load_predictor(config.model, backend=config.backend, threads=1)
    os.environ.update(config.to_env())
    if ready:
        ready(f"http://{host}:{port}")
    uvicorn.run(WORKER_FACTORY, factory=True, host=host, port=port, workers=workers,
                access_log=access_log, log_level=log_level, timeout_graceful_shutdown=10, server_header=False)

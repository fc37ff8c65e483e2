"""What `ursa serve` is told: one ServeConfig, which also travels to worker processes through the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ursa.errors import UrsaError

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
MAX_BATCH_FILES = 64
ENV_PREFIX = "URSA_SERVE_"  # settings handed to worker processes in factory mode


@dataclass
class ServeConfig:
    """Every knob of `ursa serve` that a worker process needs to rebuild the same app."""

    model: Path
    max_bytes: int = DEFAULT_MAX_BYTES
    backend: str = "auto"
    threads: int | None = None
    max_batch: int = 16  # measured on 2 cores: more throughput on both backends (docs/serve.md)
    batch_wait_ms: float = 0.0
    bf16: bool = False

    def to_env(self) -> dict[str, str]:
        """Settings as environment variables, for uvicorn's factory mode (workers > 1)."""
        return {f"{ENV_PREFIX}{k.upper()}": str(v) for k, v in vars(self).items() if v is not None}

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "ServeConfig":
        """The inverse of to_env."""
        env = dict(os.environ if env is None else env)
        get = lambda k, d=None: env.get(f"{ENV_PREFIX}{k.upper()}", d)  # noqa: E731
        model = get("model")
        if not model:
            raise UrsaError(f"{ENV_PREFIX}MODEL is not set: start the server with `ursa serve MODEL`")
        threads, max_batch = get("threads"), get("max_batch")
        return cls(model=Path(model), max_bytes=int(get("max_bytes", DEFAULT_MAX_BYTES)), backend=get("backend", "auto"),
                   threads=int(threads) if threads else None, max_batch=int(max_batch) if max_batch else 16,
                   batch_wait_ms=float(get("batch_wait_ms", 0.0)), bf16=get("bf16", "False") == "True")

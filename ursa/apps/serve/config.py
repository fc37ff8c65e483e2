"""What `ursa serve` is told: one ServeConfig, which also travels to worker processes through the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from ursa.errors import UrsaError

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
MAX_BATCH_FILES = 64
# A 40 Mpx PNG/TIFF/WEBP still decodes (~0.5 s, ~200 MB); a JPEG is decoded at reduced size, so a far bigger one fits.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_REQUEST_PIXELS = 120_000_000  # e.g. 64 phone JPEGs at 1/8 scale use under 15 Mpx
ENV_PREFIX = "URSA_SERVE_"  # settings handed to worker processes in factory mode
LIMIT_FIELDS = ("max_pixels", "max_request_pixels", "decode_window", "request_timeout", "read_timeout",
                "body_timeout", "header_timeout", "limit_concurrency", "drift_window")


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
    max_pixels: int = DEFAULT_MAX_PIXELS  # decoded pixels of one image (413 above)
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS  # decoded pixels of all images of one request (413 above)
    decode_window: int = 2  # images of one request in the decode pool at once, so other requests interleave
    request_timeout: float = 30.0  # seconds to decode and predict once the body is in (503 after)
    read_timeout: float = 10.0  # seconds with no byte of the body arriving (408 after)
    body_timeout: float = 60.0  # seconds for the whole body (408 after): 10 MB at 1.4 Mbit/s
    header_timeout: float = 10.0  # seconds for the request line and headers (408, connection closed)
    limit_concurrency: int = 256  # open connections before uvicorn answers 503; bounds bodies held in memory
    device: str = "auto"  # --device: where the network runs (inference.placement.place)
    drift_window: int = 500  # /health's drift line: the last N answers against the validation set's

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_request_pixels", "decode_window", "limit_concurrency", "drift_window"):
            if int(getattr(self, name)) < 1:
                raise UrsaError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        for name in ("request_timeout", "read_timeout", "body_timeout", "header_timeout"):
            if not float(getattr(self, name)) > 0:
                raise UrsaError(f"--{name.replace('_', '-')} must be a positive number of seconds (got {getattr(self, name)})")
        if self.max_request_pixels < self.max_pixels:
            self.max_request_pixels = self.max_pixels  # one image allowed alone is allowed in a request

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
        limits = {f.name: f.type for f in fields(cls) if f.name in LIMIT_FIELDS}
        return cls(model=Path(model), max_bytes=int(get("max_bytes", DEFAULT_MAX_BYTES)), backend=get("backend", "auto"),
                   threads=int(threads) if threads else None, max_batch=int(max_batch) if max_batch else 16,
                   batch_wait_ms=float(get("batch_wait_ms", 0.0)), bf16=get("bf16", "False") == "True",
                   device=get("device", "auto"),
                   **{k: (float if t == "float" else int)(get(k)) for k, t in limits.items() if get(k) is not None})

"""The production app: the lesson's "chuck it up in a Starlette web API", made safe to run.

The model is loaded once per process (``create_app``; ``app_from_env`` for uvicorn's factory
mode with several workers). Request bodies are bounded twice: by Content-Length before reading
and by counting bytes while streaming. Images are decoded by ``images.open_image`` (the one
definition of a readable image) in a thread pool, and forwarded on one dedicated inference
thread, so the event loop never blocks. Client mistakes get a JSON ``{"error": ...}`` with a
4xx status, never a 5xx. See docs/serve.md for the routes, limits and measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ursa.errors import ImageError, UrsaError
from ursa.vision.images import sniff_format
from ursa.inference.predictor import Prediction, Predictor, default_threads, load_learner

log = logging.getLogger("ursa.apps.serve")

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
MAX_BATCH_FILES = 64
WEB = Path(__file__).parent / "web"
ENV_PREFIX = "URSA_SERVE_"  # settings handed to worker processes in factory mode

# What each way an upload can fail to be an image means for the client.
IMAGE_STATUS = {"empty": 422, "not_image": 415, "unsupported": 415, "truncated": 400, "corrupt": 400,
                "too_large": 400, "missing": 422}

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class ApiError(Exception):
    """A client mistake: its HTTP status and one line saying what to do instead."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


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


def parse_bytes(text: str | int) -> int:
    """Read a size like 10MB, 512KB or 1000000 (KB/MB/GB are powers of 1024, as `ursa download`)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)i?b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UrsaError(f"--max-bytes {text!r}: write a size such as 10MB, 500KB or 1000000")
    n = int(float(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()])
    if n < 1:
        raise UrsaError(f"--max-bytes {text!r}: must be at least 1 byte")
    return n


def _human(n: int) -> str:
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


# ---------------------------------------------------------------------------------------------
# Threads: decoding in a small pool, every forward on one inference thread


def set_torch_threads(n: int) -> None:
    """Fix this thread's torch (OpenMP) thread count.

    Each thread that runs torch ops gets its own OpenMP team. Preprocessing ops are small, and
    with 2 threads on a busy 2-core machine they took ~40 ms instead of ~1 ms (a thread waiting
    at a barrier for a descheduled partner), so decode threads use 1 and the inference thread
    uses --threads. get_num_threads() first: torch initialises a thread's count lazily from a
    process-wide value on its first op, which would otherwise overwrite what is set here.
    """
    import torch

    torch.get_num_threads()
    torch.set_num_threads(n)


class ThreadPool:
    """A ThreadPoolExecutor made on first use (and again after shutdown) with a torch thread count."""

    def __init__(self, workers: int, torch_threads: int, name: str) -> None:
        self.workers, self.torch_threads, self.name = workers, torch_threads, name
        self._pool: ThreadPoolExecutor | None = None

    def get(self) -> ThreadPoolExecutor:
        """The executor, created when needed."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name,
                                            initializer=set_torch_threads, initargs=(self.torch_threads,))
        return self._pool

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on this pool, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.get(), fn, *args)

    def shutdown(self) -> None:
        """Stop the threads; queued work is dropped, running work finishes."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


# ---------------------------------------------------------------------------------------------
# Micro-batching


class MicroBatcher:
    """Groups concurrent requests into one forward pass; one inference thread, never the event loop.

    While a forward runs, new requests queue; the next forward takes up to ``max_batch`` of them
    at once. With ``wait_ms`` > 0 the first request of an idle server also waits that long for
    company. ``max_batch`` = 1 turns batching off. docs/serve.md records what this buys on 2 cores.
    """

    def __init__(self, run: Callable[[list[Any]], list[Prediction]], max_batch: int = 16,
                 wait_ms: float = 0.0, pool: ThreadPool | None = None) -> None:
        self.run, self.max_batch, self.wait_s = run, max(1, max_batch), max(0.0, wait_ms) / 1000
        self.pool = pool or ThreadPool(1, 1, "ursa-infer")
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._draining = False
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.items = 0

    async def submit(self, x: Any) -> Prediction:
        """The prediction for one preprocessed image, computed in some batch."""
        loop = asyncio.get_running_loop()
        if self.max_batch == 1:
            self.batches += 1
            self.items += 1
            return (await self.pool.run(self.run, [x]))[0]
        fut: asyncio.Future = loop.create_future()
        self._pending.append((x, fut))
        if not self._draining:
            self._draining = True
            self._task = loop.create_task(self._drain())  # referenced, so it is not garbage-collected
        return await fut

    async def _drain(self) -> None:
        """Run queued requests in batches until none are left (then stop: no task lives forever)."""
        try:
            while self._pending:
                if self.wait_s and len(self._pending) < self.max_batch:
                    await asyncio.sleep(self.wait_s)
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                batch = [(x, f) for x, f in batch if not f.done()]  # the client may have gone
                if not batch:
                    continue
                try:
                    results = await self.pool.run(self.run, [x for x, _ in batch])
                except Exception as e:  # a bug, not client input: every waiter learns of it
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(e)
                    continue
                self.batches += 1
                self.items += len(batch)
                for (_, f), r in zip(batch, results):
                    if not f.done():
                        f.set_result(r)
        finally:
            self._draining = False

    def shutdown(self) -> None:
        """Stop the inference thread (made again on next use, e.g. by a second TestClient)."""
        self.pool.shutdown()


# ---------------------------------------------------------------------------------------------
# Request bodies


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to be over max_bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "Content-Length is not a number")
        if int(declared) > max_bytes:
            raise ApiError(413, f"request body of {_human(int(declared))} is over the limit of {_human(max_bytes)}; "
                                "send a smaller image (or start the server with a larger --max-bytes)")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > max_bytes:
            raise ApiError(413, f"request body is over the limit of {_human(max_bytes)}; send a smaller image "
                                "(or start the server with a larger --max-bytes)")
    return bytes(buf)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _is_multipart(request: Request) -> bool:
    return _content_type(request).startswith("multipart/")


def _is_urlencoded(request: Request) -> bool:
    return _content_type(request) == "application/x-www-form-urlencoded"


async def parse_form(request: Request, body: bytes) -> Any:
    """Multipart form from an already size-checked body (replayed, so nothing is read twice)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {k: v for k, v in request.scope.items() if k != "app"}  # errors come back as exceptions
    try:
        return await Request(scope, replay).form(max_files=1000, max_fields=1000)
    except (MultiPartException, HTTPException) as e:
        raise ApiError(400, f"malformed multipart body ({getattr(e, 'message', None) or getattr(e, 'detail', e)})") from None
    except (ValueError, KeyError, UnicodeDecodeError, AssertionError) as e:
        raise ApiError(400, f"malformed multipart body ({type(e).__name__})") from None


async def _upload_bytes(value: Any, field: str) -> tuple[str, bytes]:
    if not isinstance(value, UploadFile):
        raise ApiError(422, f"form field {field!r} must be a file upload, not text")
    data = await value.read()
    await value.close()
    return value.filename or "upload", data


async def _close_form(form: Any) -> None:
    with contextlib.suppress(Exception):
        await form.close()


def image_error(e: ImageError) -> ApiError:
    """Map why an upload is not a usable image to a status and a message for the client."""
    status = IMAGE_STATUS.get(e.kind, 400)
    hint = {415: "; send a JPEG, PNG, GIF, WEBP, BMP or TIFF image", 422: "; choose an image file to upload"}.get(status, "")
    return ApiError(status, f"{e.reason}{hint}")


# ---------------------------------------------------------------------------------------------
# The app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(model_path: str | Path | None = None, *, config: ServeConfig | None = None,
               predictor: Predictor | None = None, **settings: Any) -> Starlette:
    """The web app around one model, loaded now (once per process), ready for uvicorn or TestClient."""
    if config is None:
        if model_path is None:
            raise UrsaError("create_app needs a model path")
        config = ServeConfig(model=Path(model_path), **settings)
    pred = predictor or load_learner(config.model, backend=config.backend, threads=config.threads, bf16=config.bf16)
    threads = config.threads or default_threads()
    # onnxruntime has its own intra-op pool: torch on the inference thread only stacks and softmaxes.
    infer_pool = ThreadPool(1, threads if pred.backend == "torch" else 1, "ursa-infer")
    decode_pool = ThreadPool(max(2, default_threads()), 1, "ursa-decode")
    batcher = MicroBatcher(pred.predict_tensors, max_batch=config.max_batch, wait_ms=config.batch_wait_ms,
                           pool=infer_pool)
    info = {**pred.describe(), "max_bytes": config.max_bytes, "max_batch_files": MAX_BATCH_FILES,
            "micro_batch": config.max_batch}
    page = (WEB / "serve.html").read_bytes()
    assets = {name: (WEB / name).read_bytes() for name in ("serve.js", "serve.css")}

    async def predict_one(data: bytes) -> Prediction:
        try:
            x = await decode_pool.run(pred.preprocess, data)
        except ImageError as e:
            raise image_error(e) from None
        return await batcher.submit(x)

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets:
            return _error(404, f"no such file: /static/{name}")
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return Response(assets[name], media_type=f"{kind}; charset=utf-8", headers=PAGE_HEADERS)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "backend": info["backend"]})

    async def model(request: Request) -> Response:
        return JSONResponse(info)

    async def predict(request: Request) -> Response:
        try:
            body = await read_body(request, config.max_bytes)
            if _is_multipart(request):
                form = await parse_form(request, body)
                try:
                    files = form.getlist("file")
                    if not files:
                        got = ", ".join(sorted(set(form.keys()))) or "nothing"
                        hint = " (use /predict/batch for several files)" if "files" in form else ""
                        raise ApiError(422, f"no form field 'file' (got {got}); upload the image as field 'file'{hint}")
                    if len(files) > 1:
                        raise ApiError(422, "several 'file' fields: send one image here, or use /predict/batch with field 'files'")
                    _, data = await _upload_bytes(files[0], "file")
                finally:
                    await _close_form(form)
            else:
                data = body
                if not data:
                    raise ApiError(422, "empty request: send an image as the body or as multipart field 'file'")
                if _is_urlencoded(request) and sniff_format(data[:16]) is None:
                    # curl --data-binary sends images with this type; a real url-encoded form has no file.
                    raise ApiError(422, "a url-encoded form cannot carry a file: upload the image as multipart field 'file'")
            result = await predict_one(data)
        except ApiError as e:
            return _error(e.status, e.message)
        except ClientDisconnect:
            return Response(status_code=400)
        return JSONResponse(result.to_json())

    async def predict_batch(request: Request) -> Response:
        try:
            body = await read_body(request, config.max_bytes)
            if not _is_multipart(request):
                raise ApiError(422, "send the images as multipart form fields named 'files'")
            form = await parse_form(request, body)
            try:
                values = form.getlist("files")
                if not values:
                    got = ", ".join(sorted(set(form.keys()))) or "nothing"
                    raise ApiError(422, f"no form field 'files' (got {got}); upload each image as a field named 'files'")
                if len(values) > MAX_BATCH_FILES:
                    raise ApiError(422, f"{len(values)} files: at most {MAX_BATCH_FILES} per request")
                uploads = [await _upload_bytes(v, "files") for v in values]
            finally:
                await _close_form(form)
        except ApiError as e:
            return _error(e.status, e.message)
        except ClientDisconnect:
            return Response(status_code=400)

        async def one(name: str, data: bytes) -> dict[str, Any]:
            try:
                return {"file": name, **(await predict_one(data)).to_json()}
            except ApiError as e:
                return {"file": name, "error": e.message, "status": e.status}

        return JSONResponse(list(await asyncio.gather(*(one(n, d) for n, d in uploads))))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, "internal error (a bug in ursa serve; see the server log)")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        batcher.shutdown()
        decode_pool.shutdown()

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/static/{name}", asset, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/model", model, methods=["GET"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/predict/batch", predict_batch, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.predictor, app.state.batcher, app.state.config = pred, batcher, config
    return app


def app_from_env() -> Starlette:
    """uvicorn factory for --workers > 1: each worker process loads the model once from the env settings."""
    return create_app(config=ServeConfig.from_env())


# ---------------------------------------------------------------------------------------------
# Running it


def check_port(host: str, port: int) -> None:
    """Fail with one clear line before loading anything when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UrsaError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None


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
        _Server(ucfg).run()
        return
    # Check the model in this process (clear error, exit 2) before forking workers that load it.
    load_learner(config.model, backend=config.backend, threads=1)
    os.environ.update(config.to_env())
    if ready:
        ready(f"http://{host}:{port}")
    uvicorn.run("ursa.apps.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                access_log=access_log, log_level=log_level, timeout_graceful_shutdown=10, server_header=False)


class _Server(uvicorn.Server):
    """uvicorn's server, except that a signal ends it with status 0 instead of being re-raised afterwards."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

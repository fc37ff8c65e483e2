"""The production app: the lesson's "chuck it up in a Starlette web API", made safe to run.

The model is loaded once per process (``create_app``; ``app_from_env`` for uvicorn's factory
mode with several workers). Images are decoded by ``images.open_image`` (the one definition of
a readable image) in a thread pool and forwarded on one dedicated inference thread, so the event
loop never blocks. One client cannot stall the others (``limits``): pixels are counted from the
header before any decode, a request has at most ``decode_window`` images in the pool at a time,
each request has a deadline (503) and its body read timeouts (408). The routes are plain
functions that find the model and its threads on ``request.app.state``. Client mistakes get a
JSON ``{"error": ...}`` with a 4xx status, never a 5xx. See docs/serve.md for the routes,
limits and measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ursa.apps.serve.batching import MicroBatcher, ThreadPool
from ursa.apps.serve.body import close_form, image_error, is_multipart, one_image, parse_form, read_body, upload_bytes
from ursa.apps.serve.explain import explain
from ursa.apps.serve.config import MAX_BATCH_FILES, ServeConfig
from ursa.apps.serve.limits import DecodeGate, PixelBudget, check_image_pixels, check_request_pixels
from ursa.apps.web import ApiError, Assets, TimedH11Protocol, asset, error_response, quiet_repeats
from ursa.apps.serve.model import batch_runner, decode_side, default_threads, load_model
from ursa.errors import ImageError, ModelOutputError, UrsaError
from ursa.inference.results import Prediction

log = logging.getLogger("ursa.apps.serve")

PAGE_FILES = ("serve.html", "serve.js", "serve.css", "explain.js")
STATIC_FILES = ("serve.js", "serve.css", "explain.js")  # what /static/{name} sends; the page itself is at /
IMG_SRC = "'self' blob: data:"  # the page previews the chosen file from a blob: URL


async def predict_one(request: Request, data: bytes, gate: DecodeGate) -> Prediction:
    """Check the header's pixel count, decode through the request's gate, then wait for a place in a micro-batch."""
    state = request.app.state
    cost = check_image_pixels(data, state.decode_side, state.config.max_pixels)
    return await predict_checked(request, data, gate, cost)


async def predict_checked(request: Request, data: bytes, gate: DecodeGate, cost: int) -> Prediction:
    """Decode (already checked to cost `cost` pixels) on the pool and forward in some micro-batch."""
    state = request.app.state
    try:
        x = await gate.decode(state.predictor.preprocess, data, cost)
    except ImageError as e:
        raise image_error(e) from None
    return await state.batcher.submit(x)


def request_threshold(request: Request) -> Any:
    """?threshold= : a probability, or none/off (never unsure); absent: the model's stored threshold ("model")."""
    raw = request.query_params.get("threshold")
    if raw is None:
        return "model"
    if raw.strip().lower() in ("", "none", "off"):
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ApiError(422, f"threshold: expected a probability from 0 to 1 (or 'none'), got {raw[:40]!r}")
    return value


def judged(result: Prediction, threshold: Any) -> Prediction:
    """The answer judged by the request's threshold when it gave one."""
    return result if threshold == "model" else result.with_threshold(threshold)


def new_gate(request: Request) -> DecodeGate:
    """The decode pool as one request sees it: its own window, the process's pixel budget."""
    state = request.app.state
    return DecodeGate(state.decode_pool.run, state.pixel_budget, state.config.decode_window)


def too_slow(config: ServeConfig) -> ApiError:
    """503 for a request that did not finish in time: the server is busy, not the client wrong."""
    return ApiError(503, f"the server is busy: this request did not finish within {config.request_timeout:g} s; "
                         "try again later (or send fewer images per request)", {"Retry-After": "5"})


async def static_file(request: Request) -> Response:
    """The page's script and style sheet; any other name is a 404, never a path on disk."""
    name = request.path_params["name"]
    if name not in STATIC_FILES:
        return error_response(404, f"no such file: /static/{name}")
    return request.app.state.assets.response(name)


async def health(request: Request) -> Response:
    """For load balancers and scripts: the process is up and has its model."""
    return JSONResponse({"status": "ok", "backend": request.app.state.info["backend"]})


async def model(request: Request) -> Response:
    """What the model is (classes, architecture, metrics) and the server's limits."""
    return JSONResponse(request.app.state.info)


async def predict(request: Request) -> Response:
    """One image, as the raw body or as multipart field 'file'."""
    config: ServeConfig = request.app.state.config
    try:
        threshold = request_threshold(request)
        data = await one_image(request, config)
        try:
            async with asyncio.timeout(config.request_timeout):
                result = judged(await predict_one(request, data, new_gate(request)), threshold)
        except TimeoutError:
            raise too_slow(config) from None
    except ApiError as e:
        return e.response()
    except ClientDisconnect:
        return Response(status_code=400)
    return JSONResponse(result.to_json())


async def predict_batch(request: Request) -> Response:
    """Several images as multipart fields 'files'; each answer or error in order, so one bad file spoils nothing."""
    state = request.app.state
    config: ServeConfig = state.config
    try:
        threshold = request_threshold(request)
        body = await read_body(request, config)
        if not is_multipart(request):
            raise ApiError(422, "send the images as multipart form fields named 'files'")
        form = await parse_form(request, body)
        try:
            values = form.getlist("files")
            if not values:
                got = ", ".join(sorted(set(form.keys()))) or "nothing"
                raise ApiError(422, f"no form field 'files' (got {got}); upload each image as a field named 'files'")
            if len(values) > MAX_BATCH_FILES:
                raise ApiError(422, f"{len(values)} files: at most {MAX_BATCH_FILES} per request")
            uploads = [await upload_bytes(v, "files") for v in values]
        finally:
            await close_form(form)
        # Headers first: an image over the limit is refused alone, a request over it as a whole, before any decode.
        costs: list[int | ApiError] = []
        for _, data in uploads:
            try:
                costs.append(check_image_pixels(data, state.decode_side, config.max_pixels))
            except ApiError as e:
                costs.append(e)
        check_request_pixels([c for c in costs if isinstance(c, int)], config.max_request_pixels)
    except ApiError as e:
        return e.response()
    except ClientDisconnect:
        return Response(status_code=400)

    gate = new_gate(request)  # at most config.decode_window of this request's images in the pool at once

    async def one(name: str, data: bytes, cost: int | ApiError) -> dict[str, Any]:
        try:
            if isinstance(cost, ApiError):
                raise cost
            return {"file": name, **judged(await predict_checked(request, data, gate, cost), threshold).to_json()}
        except ApiError as e:
            return {"file": name, "error": e.message, "status": e.status}

    try:
        async with asyncio.timeout(config.request_timeout):
            out = await asyncio.gather(*(one(n, d, c) for (n, d), c in zip(uploads, costs)))
    except TimeoutError:
        return too_slow(config).response()
    return JSONResponse(list(out))


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 as the same JSON error as every other mistake."""
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail))


async def server_error(request: Request, exc: Exception) -> Response:
    """A bug: logged with its traceback, answered with one line and no details (a damaged model: its one line)."""
    if isinstance(exc, ModelOutputError):  # NaN probabilities: the model file is at fault, not the request
        log.error("%s", exc)
        return error_response(500, str(exc))
    log.exception("unexpected error on %s %s", request.method, request.url.path)  # once, then counted: quiet_repeats
    return error_response(500, "internal error (a bug in ursa serve; see the server log)")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Stop the app's threads when the server shuts down."""
    yield
    app.state.batcher.shutdown()
    app.state.decode_pool.shutdown()


ROUTES = [
    Route("/", asset("serve.html"), methods=["GET"]),
    Route("/static/{name}", static_file, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/model", model, methods=["GET"]),
    Route("/predict", predict, methods=["POST"]),
    Route("/predict/batch", predict_batch, methods=["POST"]),
    Route("/explain", explain, methods=["POST"]),
]


def create_app(model_path: str | Path | None = None, *, config: ServeConfig | None = None,
               predictor: Any = None, **settings: Any) -> Starlette:
    """The web app around one model, loaded now (once per process), ready for uvicorn or TestClient.

    `predictor`: an ``OnnxPredictor`` (numpy arrays, no torch) or a torch ``Predictor``; by default
    ``model.load_model`` picks one by the backend rule and imports torch only when torch must run.
    """
    if config is None:
        if model_path is None:
            raise UrsaError("create_app needs a model path")
        config = ServeConfig(model=Path(model_path), **settings)
    why = "given"
    if predictor is None:
        predictor, why = load_model(config.model, config.backend, config.threads, config.bf16, config.device)
    pred = predictor
    threads = config.threads or default_threads()
    # onnxruntime has its own intra-op pool: torch on the inference thread only stacks and softmaxes.
    infer_pool = ThreadPool(1, threads if pred.backend == "torch" else 1, "ursa-infer")
    app = Starlette(routes=ROUTES, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.config, app.state.predictor, app.state.backend_reason = config, pred, why
    app.state.batcher = MicroBatcher(batch_runner(pred), max_batch=config.max_batch,
                                     wait_ms=config.batch_wait_ms, pool=infer_pool)
    app.state.decode_pool = ThreadPool(max(2, default_threads()), 1, "ursa-decode")
    app.state.decode_side = decode_side(pred)  # the short side images are decoded at (JPEG draft)
    # Decodes in flight hold at most two of the largest images' pixels (or any number of small ones).
    app.state.pixel_budget = PixelBudget(2 * config.max_pixels)
    app.state.info = {**pred.describe(), "max_bytes": config.max_bytes, "max_batch_files": MAX_BATCH_FILES,
                      "micro_batch": config.max_batch, "max_pixels": config.max_pixels,
                      "max_request_pixels": config.max_request_pixels, "request_timeout": config.request_timeout}
    app.state.assets = Assets(PAGE_FILES, img_src=IMG_SRC)
    return app


def app_from_env() -> Starlette:
    """uvicorn factory for --workers > 1: each worker process loads the model once from the env settings."""
    config = ServeConfig.from_env()
    quiet_repeats()  # in each worker process, after uvicorn set up its logging
    TimedH11Protocol.header_timeout = config.header_timeout  # this worker's connections (uvicorn made its Config)
    return create_app(config=config)

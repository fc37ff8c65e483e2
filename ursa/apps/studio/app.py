"""The studio's local web app (Starlette): one page from an empty folder to a served model.

Only this machine's browser may use it: ``HostGuard`` (Host and Origin must be this server), and
every POST must carry a JSON or image content type, which a page elsewhere cannot send without a
preflight this app never answers. Bodies are capped (``read_body``). The lifespan owns the
studio: a running job is cancelled when the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ursa.apps.studio.jobs import PREVIEW, Busy, TrainOptions
from ursa.apps.studio.project import ProjectError
from ursa.apps.studio.review import Review
from ursa.apps.studio.workspace import Studio
from ursa.apps.web import (API_HEADERS, ApiError, Assets, HostGuard, Server, asset, clip, open_when_started,
                           page_url, read_body, server_config)
from ursa.errors import ImageError, UrsaError
from ursa.util.net import check_port

PAGE_FILES = ("studio.html", "studio.js", "studio.css")
MAX_JSON_BYTES = 64 * 1024
MAX_IMAGE_BYTES = 25 * 1024 * 1024  # one photo or frame
READ_TIMEOUT = 20.0
IMAGE_TYPES = ("image/", "application/octet-stream")
DOWNLOADS = ("model.safetensors", "model.onnx", "model.int8.onnx")
PICTURES = ("batch.png", "losses.png", "top_losses.png")  # the run's pictures the page shows
MAX_URLS = 5000  # one URL list
EVENTS_SECONDS = 30.0  # one event stream's life; the page opens another while a job runs


def studio_of(request: Request) -> Studio:
    return request.app.state.studio


def review_of(request: Request) -> Review:
    """The latest run's review, or ApiError 409 before there is one."""
    review = studio_of(request).review
    if review is None:
        raise ApiError(409, "no model yet: train one first")
    return review


class Answer(JSONResponse):
    """JSON in ASCII: a file or folder name that is not UTF-8 (its bytes held as surrogates) goes out as \\udcNN
    escapes, and a JSON body sends it back unchanged, instead of failing the whole answer."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def answer(data: Any, status: int = 200) -> JSONResponse:
    return Answer(data, status_code=status, headers=API_HEADERS)


def fail(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A client mistake as {"error": message}, as web.error_response answers it, names that are not UTF-8 included."""
    return Answer({"error": message}, status_code=status, headers=headers)


async def json_body(request: Request) -> dict[str, Any]:
    """A small JSON object, or ApiError."""
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise ApiError(415, "send JSON (Content-Type: application/json)")
    raw = await read_body(request, MAX_JSON_BYTES, read_timeout=READ_TIMEOUT, body_timeout=READ_TIMEOUT)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "expected a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "expected a JSON object")
    return body


async def image_body(request: Request) -> bytes:
    """An image's bytes sent as the whole body, or ApiError."""
    if not request.headers.get("content-type", "").startswith(IMAGE_TYPES):
        raise ApiError(415, "send the image's bytes (Content-Type: image/...)")
    return await read_body(request, MAX_IMAGE_BYTES, hint="; send one image at a time", read_timeout=READ_TIMEOUT,
                           body_timeout=4 * READ_TIMEOUT)


def guarded(fn: Any) -> Any:
    """An endpoint whose client mistakes (ApiError, ProjectError, a lost client) become their one-line answers."""
    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except ApiError as e:
            return fail(e.status, e.message, e.headers)
        except ProjectError as e:
            return fail(400, str(e))
        except Busy as e:
            return fail(409, str(e))
        except ClientDisconnect:
            return Response(status_code=400)
    return endpoint


@guarded
async def state(request: Request) -> Response:
    studio = studio_of(request)
    await run_in_threadpool(studio.refresh)
    return answer(await run_in_threadpool(studio.state))


@guarded
async def images(request: Request) -> Response:
    q = request.query_params
    offset = int(q["offset"]) if q.get("offset", "").isdigit() else 0
    return answer(await run_in_threadpool(studio_of(request).page, q.get("class", ""), offset))


@guarded
async def thumb(request: Request) -> Response:
    studio, q = studio_of(request), request.query_params
    path = studio.project.image_path(q.get("class", ""), q.get("name", ""))
    try:
        data = await run_in_threadpool(studio.thumbs.get, path)
    except (ImageError, OSError):
        return fail(415, "this image does not decode")
    return Response(data, media_type="image/jpeg", headers={**API_HEADERS, "Cache-Control": "private, max-age=3600"})


@guarded
async def heat(request: Request) -> Response:
    """A project image with the latest model's heat map of evidence over it (the top losses' "why")."""
    studio, q = studio_of(request), request.query_params
    path = studio.project.image_path(q.get("class", ""), q.get("name", ""))
    try:
        png = await run_in_threadpool(lambda: studio.live.heat_map(path.read_bytes()))
    except (ImageError, OSError):
        return fail(415, "this image does not decode")
    except (LookupError, UrsaError) as e:
        return fail(409, str(e))
    return Response(png, media_type="image/png", headers=API_HEADERS)


@guarded
async def classes(request: Request) -> Response:
    """{action: create | rename | remove, name, new}: one change to the class folders."""
    body, project = await json_body(request), studio_of(request).project
    action, name = str(body.get("action", "")), str(body.get("name", ""))
    if action == "create":
        done: Any = await run_in_threadpool(project.create, name)
    elif action == "rename":
        done = await run_in_threadpool(project.rename, name, str(body.get("new", "")))
    elif action == "remove":
        done = str(await run_in_threadpool(project.remove, name))
    else:
        raise ApiError(400, f"expected action create, rename or remove, got {clip(action)!r}")
    return answer({"done": done, "classes": await run_in_threadpool(project.counts)})


@guarded
async def add(request: Request) -> Response:
    """An image's bytes into ?class=C (&name=file name for uploads; none for a webcam frame)."""
    q = request.query_params
    data = await image_body(request)
    studio = studio_of(request)
    added = await run_in_threadpool(studio.project.add, q.get("class", ""), data, q.get("name", ""))
    return answer(added.to_json())


@guarded
async def urls(request: Request) -> Response:
    """{class, urls}: a URL list downloaded into the class through `ursa download` (a job)."""
    body, studio = await json_body(request), studio_of(request)
    cls, lines = str(body.get("class", "")), body.get("urls")
    if not isinstance(lines, list) or not lines or len(lines) > MAX_URLS or not all(isinstance(u, str) for u in lines):
        raise ApiError(400, f"expected urls: a list of 1 to {MAX_URLS} addresses")
    studio.project.folder(cls)  # an existing class, or its one line
    return answer((await run_in_threadpool(studio.jobs.download, cls, lines)).to_json())


@guarded
async def preview(request: Request) -> Response:
    """A batch of augmented training images, as `ursa show` draws it (a job)."""
    await json_body(request)
    return answer((await run_in_threadpool(studio_of(request).jobs.preview)).to_json())


def preview_png(request: Request) -> Response:
    path = studio_of(request).jobs.runs / "preview" / PREVIEW
    if not path.is_file():
        return fail(404, "no batch preview yet")
    return FileResponse(path, media_type="image/png", headers=API_HEADERS)


@guarded
async def train(request: Request) -> Response:
    body = await json_body(request)
    try:
        options = TrainOptions.from_json(body)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    job = await run_in_threadpool(studio_of(request).jobs.train, options)
    return answer(job.to_json())


@guarded
async def cancel(request: Request) -> Response:
    await json_body(request)
    job = await run_in_threadpool(studio_of(request).jobs.cancel)
    return answer(job.to_json() if job else None)


async def events(request: Request) -> Response:
    """Server-sent events: the current job's state (epochs, console) whenever it changes, until it ends."""
    studio = studio_of(request)

    async def stream() -> AsyncIterator[str]:
        yield "retry: 1000\n\n"
        loop = asyncio.get_running_loop()
        end, last = loop.time() + EVENTS_SECONDS, ""
        while loop.time() < end and not await request.is_disconnected():
            job = studio.jobs.current
            snap = await run_in_threadpool(job.to_json) if job else {"state": "idle"}
            text = json.dumps(snap)
            if text != last:
                last = text
                if snap["state"] != "running":
                    await run_in_threadpool(studio.refresh)
                yield f"data: {text}\n\n"
            if snap["state"] != "running":
                return
            await asyncio.sleep(0.5)
    return StreamingResponse(stream(), media_type="text/event-stream", headers=API_HEADERS)


@guarded
async def results(request: Request) -> Response:
    studio = studio_of(request)
    await run_in_threadpool(studio.refresh)
    if studio.review is None:
        return answer({"run": None, "problem": studio.problem})
    summary = await run_in_threadpool(studio.review.summary)
    return answer({**summary, "ship": studio.ship()})


@guarded
async def clean_open(request: Request) -> Response:
    await json_body(request)
    review = review_of(request)
    await run_in_threadpool(review.open_cleaner)
    return answer(review.cleaner_state())


@guarded
async def clean_decide(request: Request) -> Response:
    body, review = await json_body(request), review_of(request)
    name = str(body.get("name", ""))
    try:
        item = await run_in_threadpool(review.decide, name, str(body.get("action", "")), str(body.get("label") or ""))
    except KeyError:
        raise ApiError(404, f"{clip(name)!r} is not an image of this project") from None
    except (ValueError, LookupError) as e:
        raise ApiError(400, str(e)) from None
    return answer({"item": item, "summary": review.session.decisions.summary()})


@guarded
async def clean_apply(request: Request) -> Response:
    await json_body(request)
    review = review_of(request)
    if review.session is None:
        raise ApiError(409, "open the cleaner and decide first")
    return answer(await run_in_threadpool(review.apply))


@guarded
async def predict(request: Request) -> Response:
    """One picture (a webcam frame, a dropped file) through the latest run's ONNX model: serve's answer."""
    data = await image_body(request)
    try:
        return answer(await run_in_threadpool(studio_of(request).live.predict, data))
    except ImageError as e:
        raise ApiError(415, f"not a readable image: {e.reason}") from None
    except LookupError as e:
        raise ApiError(409, str(e)) from None


@guarded
async def int8(request: Request) -> Response:
    await json_body(request)
    run = review_of(request).run
    return answer((await run_in_threadpool(studio_of(request).jobs.int8, run)).to_json())


def run_file(request: Request, names: tuple[str, ...], **options: Any) -> Response:
    """A file of the latest run, by one of its fixed names only."""
    name, review = request.path_params["name"], studio_of(request).review
    if name not in names or review is None or not (review.run / name).is_file():
        return fail(404, f"{clip(name)!r} is not a file of the latest run")
    return FileResponse(review.run / name, headers=API_HEADERS, **options)


def download(request: Request) -> Response:
    """The model file, ONNX or INT8 as a download."""
    return run_file(request, DOWNLOADS, filename=request.path_params["name"])


def picture(request: Request) -> Response:
    """One of the latest run's pictures (the batch it trained on, the curves), shown in the page."""
    return run_file(request, PICTURES, media_type="image/png")


def no_content(request: Request) -> Response:
    return Response(status_code=204)


ROUTES = [
    Route("/", asset("studio.html")),
    Route("/studio.js", asset("studio.js")),
    Route("/studio.css", asset("studio.css")),
    Route("/favicon.ico", no_content),
    Route("/api/state", state),
    Route("/api/images", images),
    Route("/thumb", thumb),
    Route("/heat", heat),
    Route("/api/classes", classes, methods=["POST"]),
    Route("/api/add", add, methods=["POST"]),
    Route("/api/urls", urls, methods=["POST"]),
    Route("/api/preview", preview, methods=["POST"]),
    Route("/preview.png", preview_png),
    Route("/api/train", train, methods=["POST"]),
    Route("/api/cancel", cancel, methods=["POST"]),
    Route("/api/events", events),
    Route("/api/results", results),
    Route("/api/clean/open", clean_open, methods=["POST"]),
    Route("/api/clean/decide", clean_decide, methods=["POST"]),
    Route("/api/clean/apply", clean_apply, methods=["POST"]),
    Route("/api/predict", predict, methods=["POST"]),
    Route("/api/int8", int8, methods=["POST"]),
    Route("/download/{name}", download),
    Route("/run/{name}", picture),
]


def create_app(studio: Studio, host: str = "127.0.0.1", port: int = 8766) -> Starlette:
    """The studio's app over one Studio, answering only requests addressed to host:port."""
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(studio.close)

    app = Starlette(routes=ROUTES, middleware=[Middleware(HostGuard, host=host, port=port)], lifespan=lifespan)
    app.state.studio, app.state.assets = studio, Assets(PAGE_FILES, img_src="'self' blob:")
    return app


def serve(studio: Studio, host: str = "127.0.0.1", port: int = 8766, open_browser: bool = True,
          echo: Callable[[str], None] = print) -> None:
    """Run the studio until Ctrl+C; every image is already a file, so stopping loses nothing."""
    check_port(host, port)
    url = page_url(host, port)
    server = Server(server_config(create_app(studio, host, port), host, port, log_level="warning", access_log=False))
    if open_browser:
        open_when_started(server, url)
    echo(f"studio at {url} (Ctrl+C to stop): project {studio.project.root}, runs in {studio.runs}")
    server.run()

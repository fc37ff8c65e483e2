"""The cleaner's local web app (Starlette): the page, its state, decisions, and the data set's own images.

Only this machine's browser may use it (``HostGuard``: Host and Origin must be this server), it
sends no file but the page's own and the data set's images, and it writes only through
``Decisions`` (the two CSV files in the data folder).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ursa.apps.clean.session import CleanSession
from ursa.apps.web import (API_HEADERS, ApiError, Assets, HostGuard, Server, asset, clip, error_response, open_when_started,
                           page_url, read_body, server_config)
from ursa.errors import ImageError
from ursa.util.net import check_port
from ursa.vision.images import open_image

PAGE_FILES = ("clean.html", "clean.js", "clean.css")
MAX_JSON_BYTES = 64 * 1024  # a decision is under 1 KB; anything near this is not from the page
READ_TIMEOUT = 10.0  # seconds for a decision's body to arrive
# What a browser shows as is; anything else that decodes (TIFF and the like) is sent as a PNG.
IMAGE_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "GIF": "image/gif",
               "WEBP": "image/webp", "BMP": "image/bmp"}


def state(request: Request) -> Response:
    """The page's whole model: items, views, summary."""
    return JSONResponse(request.app.state.session.state(), headers=API_HEADERS)


async def json_fields(request: Request, names: tuple[str, ...], optional: tuple[str, ...] = (), *,
                      max_bytes: int = MAX_JSON_BYTES, hint: str = "") -> dict[str, str] | Response:
    """The named fields of a page's small JSON body as strings, or the answer to send instead (415, 400, 408, 413)."""
    if not request.headers.get("content-type", "").startswith("application/json"):
        return PlainTextResponse("send JSON\n", status_code=415)
    try:
        raw = await read_body(request, max_bytes, hint=hint, read_timeout=READ_TIMEOUT, body_timeout=READ_TIMEOUT)
        body = json.loads(raw)
        return {**{k: str(body[k]) for k in names}, **{k: str(body.get(k) or "") for k in optional}}
    except ApiError as e:
        return e.response()
    except ClientDisconnect:  # the tab was closed mid-request: nobody to answer
        return Response(status_code=400)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return error_response(400, f"expected JSON {{{', '.join(names + optional)}}}")


async def decide(request: Request) -> Response:
    """Record one decision sent as JSON {name, action, label}; answers the item and the new summary."""
    session: CleanSession = request.app.state.session
    body = await json_fields(request, ("name", "action"), ("label",),
                             hint="; a decision is one small JSON object {name, action, label}")
    if isinstance(body, Response):
        return body
    name, action, label = body["name"], body["action"], body["label"]
    try:
        item = session.decisions.decide(name, action, label)
    except KeyError:
        return error_response(404, f"{clip(name)!r} is not an image of this data set")
    except ValueError as e:
        return error_response(400, str(e))
    except OSError as e:
        return error_response(500, f"cannot save the decision: {e}")
    return JSONResponse({"item": item, "summary": session.decisions.summary()}, headers=API_HEADERS)


def image(request: Request) -> Response:
    """One image of the data set by its name in the data set, never by a path: the raw bytes when a browser can show them."""
    session: CleanSession = request.app.state.session
    i = session.index.get(request.query_params.get("path", ""))
    if i is None:
        return PlainTextResponse("not an image of this data set\n", status_code=404)
    path = session.files[i]
    if not inside(path, session.root):  # a symlink that leads out of DATA
        return PlainTextResponse("outside the data folder\n", status_code=403)
    try:
        data = path.read_bytes()
        im, info = open_image(data, min_size=64, with_info=True)
    except (OSError, ImageError):
        return PlainTextResponse("unreadable image\n", status_code=415)
    media = IMAGE_TYPES.get(info.format)
    if media is None:  # TIFF and the like: browsers cannot show them, send a PNG of it
        buf = io.BytesIO()
        open_image(data).save(buf, "PNG")
        data, media = buf.getvalue(), "image/png"
    return Response(data, media_type=media, headers={**API_HEADERS, "Cache-Control": "private, max-age=300"})


def no_content(request: Request) -> Response:
    """The favicon browsers ask for: nothing, rather than a 404 in the console."""
    return Response(status_code=204)


def inside(path: Path, root: Path) -> bool:
    """Whether path, symlinks followed, is in root."""
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


ROUTES = [
    Route("/", asset("clean.html")),
    Route("/clean.js", asset("clean.js")),
    Route("/clean.css", asset("clean.css")),
    Route("/api/state", state),
    Route("/api/decide", decide, methods=["POST"]),
    Route("/image", image),
    Route("/favicon.ico", no_content),
]


def create_app(session: CleanSession, host: str = "127.0.0.1", port: int = 8765) -> Starlette:
    """The cleaner's app over one session, answering only requests addressed to host:port."""
    return local_app(ROUTES, session, PAGE_FILES, host, port)


def local_app(routes: list, session: Any, page_files: tuple[str, ...], host: str, port: int) -> Starlette:
    """A local page's app (the cleaner's, the labelling page's): its routes over one session, for this machine's browser only."""
    app = Starlette(routes=routes, middleware=[Middleware(HostGuard, host=host, port=port)])
    app.state.session, app.state.assets = session, Assets(page_files)
    return app


def serve(session: CleanSession, host: str = "127.0.0.1", port: int = 8765, open_browser: bool = True,
          echo: Callable[[str], None] = print) -> None:
    """Run the cleaner until Ctrl+C; decisions are already on disk, so stopping loses nothing."""
    check_port(host, port)
    url = page_url(host, port)
    s = session.decisions.summary()
    app = create_app(session, host, port)

    def started() -> None:
        echo(f"cleaner at {url} (Ctrl+C to stop); {s['decided']} decision(s) so far")
        echo(f"decisions save to {session.decisions.cleaned_path} and {session.decisions.log_path}")

    run_page(app, host, port, open_browser, started)
    run = Path(session.model_name).parent  # its config.json: the same split, and the retrain scores unchanged pictures
    again = f" --config {run}" if session.model_name and (run / "config.json").is_file() else ""
    echo(f"retrain on the cleaned set: ursa train {session.root} --csv {session.decisions.cleaned_path}{again}")


def run_page(app: Starlette, host: str, port: int, open_browser: bool, before: Callable[[], None]) -> None:
    """Serve a local page's app until Ctrl+C (``before`` runs first), opening the browser once it listens."""
    url = page_url(host, port)
    server = Server(server_config(app, host, port, log_level="warning", access_log=False))
    if open_browser:
        open_when_started(server, url)
    before()
    server.run()

"""The labelling page (Starlette): the ranked pictures with the model's guess; Enter confirms, a number picks a class.

Built like the cleaner's page and on its parts: ``HostGuard`` (only this machine's browser, POST
only from this page's origin), ``read_body`` (a small JSON body, bounded in size and time), the
cleaner's image route (a picture by its name in the pool, never by a path) and its server. It
writes only through ``Filing``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ursa.apps.clean.app import image, json_fields, local_app, no_content, run_page, state
from ursa.apps.label.filing import Filing
from ursa.apps.web import API_HEADERS, asset, clip, error_response, page_url
from ursa.util.net import check_port

PAGE_FILES = ("label.html", "label.js", "clean.css", "label.css")  # the cleaner's look, and this page's own
MAX_JSON_BYTES = 16 * 1024  # a decision is {name, label}: well under 1 KB


@dataclass
class LabelSession:
    """What the page shows and writes: the ranked pictures (``diagnose.pool.Suggestion``) and the filing."""

    root: Path  # the pool (the cleaner's image route serves files under it)
    data: Path  # where the class folders are
    suggestions: list[Any]
    filing: Filing
    unreadable: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.files = [self.root / s.file for s in self.suggestions]
        self.index = {s.file: i for i, s in enumerate(self.suggestions)}

    @property
    def retrain(self) -> str:
        return f"ursa train {self.data}"

    def item(self, i: int) -> dict[str, Any]:
        s = self.suggestions[i]
        label, dest = self.filing.filed.get(s.file, (None, None))
        return {**s.to_json(), "status": "filed" if label else None, "label": label, "dest": dest}

    def state(self) -> dict[str, Any]:
        """The page's whole model."""
        return {"pool": str(self.root), "data": str(self.data), "classes": self.filing.classes,
                "items": [self.item(i) for i in range(len(self.suggestions))], "summary": self.summary(),
                "unreadable": len(self.unreadable), "log": str(self.filing.log_path), "retrain": self.retrain}

    def summary(self) -> dict[str, Any]:
        mine = sum(1 for s in self.suggestions if s.file in self.filing.filed)
        return {**self.filing.summary(), "shown": len(self.suggestions), "left": len(self.suggestions) - mine}


async def file_one(request: Request) -> Response:
    """File one picture sent as JSON {name, label}: moved into DATA/label/; answers the item and the summary."""
    session: LabelSession = request.app.state.session
    body = await json_fields(request, ("name", "label"), max_bytes=MAX_JSON_BYTES,
                             hint="; send one small JSON object {name, label}")
    if isinstance(body, Response):
        return body
    name, label = body["name"], body["label"]
    i = session.index.get(name)
    if i is None:
        return error_response(404, f"{clip(name)!r} is not one of the pictures shown")
    try:
        session.filing.file(name, label, session.suggestions[i].guess)
    except ValueError as e:
        return error_response(400, str(e))
    except FileNotFoundError:
        return error_response(409, f"{clip(name)!r} is no longer in the pool; reload the page")
    except OSError as e:
        return error_response(500, f"cannot file the picture: {e}")
    return JSONResponse({"item": session.item(i), "summary": session.summary()}, headers=API_HEADERS)


ROUTES = [
    Route("/", asset("label.html")),
    Route("/label.js", asset("label.js")),
    Route("/clean.css", asset("clean.css")),
    Route("/label.css", asset("label.css")),
    Route("/api/state", state),
    Route("/api/file", file_one, methods=["POST"]),
    Route("/image", image),
    Route("/favicon.ico", no_content),
]


def create_app(session: LabelSession, host: str = "127.0.0.1", port: int = 8766) -> Starlette:
    """The labelling app over one session, answering only requests addressed to host:port."""
    return local_app(ROUTES, session, PAGE_FILES, host, port)


def serve(session: LabelSession, host: str = "127.0.0.1", port: int = 8766, open_browser: bool = True,
          echo: Callable[[str], None] = print) -> None:
    """Run the page until Ctrl+C; every filing is on disk as it happens, so stopping loses nothing."""
    check_port(host, port)

    def started() -> None:
        echo(f"labelling page at {page_url(host, port)} (Ctrl+C to stop); {len(session.suggestions)} picture(s), "
             f"{session.filing.summary()['filed']} filed so far")
        echo(f"pictures move into {session.data}/<class>/; the log is {session.filing.log_path}")

    run_page(create_app(session, host, port), host, port, open_browser, started)
    if session.filing.filed:
        echo(f"retrain with: {session.retrain}")

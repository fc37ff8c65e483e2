"""Request bodies for `ursa serve`: read within a size limit, parse forms, and say what was wrong with them.

Bodies are bounded twice: by Content-Length before reading and by counting bytes while
streaming, and in time: a body that stops arriving or trickles in is a 408 (``web.read_body``).
Every mistake is an ``ApiError``: a 4xx status and one line saying what to do instead.
"""

from __future__ import annotations

import contextlib
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from ursa.apps.serve.config import ServeConfig
from ursa.apps.web import ApiError
from ursa.apps.web import read_body as read_limited
from ursa.errors import ImageError
from ursa.vision.images import sniff_format

# What each way an upload can fail to be an image means for the client.
IMAGE_STATUS = {"empty": 422, "not_image": 415, "unsupported": 415, "truncated": 400, "corrupt": 400,
                "too_large": 413, "missing": 422}


MAX_BYTES_HINT = "; send a smaller image (or start the server with a larger --max-bytes)"


async def read_body(request: Request, config: ServeConfig) -> bytes:
    """The whole body within the server's size limit and read timeouts (413 / 408 otherwise)."""
    return await read_limited(request, config.max_bytes, hint=MAX_BYTES_HINT, read_timeout=config.read_timeout,
                              body_timeout=config.body_timeout)


def content_type(request: Request) -> str:
    """The media type of the body, lower case, without parameters."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_multipart(request: Request) -> bool:
    """Whether the body is a multipart form (an upload from a page or `curl -F`)."""
    return content_type(request).startswith("multipart/")


def is_urlencoded(request: Request) -> bool:
    """Whether the body claims to be a url-encoded form (what `curl --data-binary` sends by default)."""
    return content_type(request) == "application/x-www-form-urlencoded"


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


async def one_image(request: Request, config: ServeConfig) -> bytes:
    """The bytes of the one image a request carries: the raw body, or multipart field 'file' (422 otherwise)."""
    body = await read_body(request, config)
    if is_multipart(request):
        form = await parse_form(request, body)
        try:
            files = form.getlist("file")
            if not files:
                got = ", ".join(sorted(set(form.keys()))) or "nothing"
                hint = " (use /predict/batch for several files)" if "files" in form else ""
                raise ApiError(422, f"no form field 'file' (got {got}); upload the image as field 'file'{hint}")
            if len(files) > 1:
                raise ApiError(422, "several 'file' fields: send one image here, or use /predict/batch with field 'files'")
            _, data = await upload_bytes(files[0], "file")
        finally:
            await close_form(form)
        return data
    if not body:
        raise ApiError(422, "empty request: send an image as the body or as multipart field 'file'")
    if is_urlencoded(request) and sniff_format(body[:16]) is None:
        # curl --data-binary sends images with this type; a real url-encoded form has no file.
        raise ApiError(422, "a url-encoded form cannot carry a file: upload the image as multipart field 'file'")
    return body


async def upload_bytes(value: Any, field: str) -> tuple[str, bytes]:
    """(file name, bytes) of one uploaded form field; a text field is a 422."""
    if not isinstance(value, UploadFile):
        raise ApiError(422, f"form field {field!r} must be a file upload, not text")
    data = await value.read()
    await value.close()
    return value.filename or "upload", data


async def close_form(form: Any) -> None:
    """Release a form's spooled files, whatever state parsing left them in."""
    with contextlib.suppress(Exception):
        await form.close()


def image_error(e: ImageError) -> ApiError:
    """Map why an upload is not a usable image to a status and a message for the client."""
    status = IMAGE_STATUS.get(e.kind, 400)
    hint = {415: "; send a JPEG, PNG, GIF, WEBP, BMP or TIFF image", 422: "; choose an image file to upload"}.get(status, "")
    return ApiError(status, f"{e.reason}{hint}")

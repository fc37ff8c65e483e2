"""What one request may cost `ursa serve`: decoded pixels per image and per request, and its share of the decode pool.

The model looks at ``input_size`` pixels, so a server has no use for an 80 Mpx decode. Each
image's header is read first (microseconds, on the event loop) and the pixels its decode will
really produce are estimated: a JPEG is decoded at 1/2, 1/4 or 1/8 scale (``draft``, as
``open_image`` does), any other format at full size. An image over ``max_pixels`` (or a request
over ``max_request_pixels``) is a 413 before any decoding. Decodes then go through a
``DecodeGate``: at most ``window`` images of one request are in the pool at a time, so other
requests interleave with a big batch, and a pixel budget shared by the process bounds how much
memory decodes hold at once, whatever the number of cores.
"""

from __future__ import annotations

import asyncio
import io
import math
import warnings
from typing import Any, Callable

from PIL import Image

from ursa.apps.web import ApiError
from ursa.util.semaphore import WeightedSemaphore

DRAFT_MODES = ("RGB", "L", "CMYK", "YCbCr")  # JPEG modes open_image decodes at reduced size
SMALL_DECODE = 2_000_000  # decodes this small skip the budget: their memory is a few MB


def mpx(pixels: int) -> str:
    """Pixels as megapixels for a message."""
    return f"{pixels / 1e6:.1f} Mpx" if pixels < 1e8 else f"{pixels / 1e6:,.0f} Mpx"


def decoded_pixels(data: bytes, short_side: int) -> tuple[int, int, int] | None:
    """(pixels the decode will produce, width, height) from the header alone; None when there is no usable header.

    None leaves the verdict to the decode itself, which says precisely what is wrong (not an
    image, truncated, a decompression bomb). Progressive JPEGs count at full size: libjpeg keeps
    every coefficient of one in memory, even when it scales the output down.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                fmt, mode, progressive = im.format, im.mode, bool(im.info.get("progressive") or im.info.get("progression"))
    except Exception:  # noqa: BLE001 - any unreadable header: the decode reports it
        return None
    if w <= 0 or h <= 0:
        return None
    k = 1
    if fmt == "JPEG" and mode in DRAFT_MODES and not progressive:
        scale = min(w, h) / float(short_side)
        if scale >= 2:  # what PIL's draft picks for the size open_image asks for
            rw, rh = max(1, int(w / scale)), max(1, int(h / scale))
            s = min(w // rw, h // rh)
            k = next(sc for sc in (8, 4, 2, 1) if s >= sc)
    return math.ceil(w / k) * math.ceil(h / k), w, h


def check_image_pixels(data: bytes, short_side: int, max_pixels: int) -> int:
    """The decode cost of one upload in pixels; ApiError 413 when over max_pixels."""
    found = decoded_pixels(data, short_side)
    if found is None:
        return 0
    pixels, w, h = found
    if pixels > max_pixels:
        raise ApiError(413, f"image of {w}x{h} pixels needs {mpx(pixels)} decoded, over this server's limit of "
                            f"{mpx(max_pixels)}; the model looks at {short_side} px or so, so resize it first "
                            "(a JPEG is decoded at reduced size and may be larger)")
    return pixels


def check_request_pixels(costs: list[int], max_request_pixels: int) -> None:
    """ApiError 413 when one request's images need more decoded pixels in all than max_request_pixels."""
    total = sum(costs)
    if total > max_request_pixels:
        raise ApiError(413, f"the {len(costs)} images of this request need {mpx(total)} decoded in all, over this "
                            f"server's limit of {mpx(max_request_pixels)} per request; send them in smaller batches "
                            "or resize them first")


class PixelBudget(WeightedSemaphore):
    """A weighted semaphore over decoded pixels in flight (``util.semaphore``): bounds decode memory by pixels, not by threads.

    A decode that fits starts at once (no queue to stand in, so a small one never waits behind a
    big one); one larger than the whole budget still runs when nothing else holds any.
    """


class DecodeGate:
    """One request's way into the decode pool: at most ``window`` of its images at a time, within the budget."""

    def __init__(self, run: Callable[..., Any], budget: PixelBudget, window: int) -> None:
        self.run, self.budget = run, budget
        self.window = asyncio.Semaphore(max(1, window))

    async def decode(self, fn: Callable[[bytes], Any], data: bytes, cost: int) -> Any:
        """fn(data) on the pool once this request has a free slot and the budget has room for cost."""
        async with self.window:
            if cost <= SMALL_DECODE:
                return await self.run(fn, data)
            await self.budget.acquire(cost)
            try:
                return await self.run(fn, data)
            finally:
                self.budget.release(cost)

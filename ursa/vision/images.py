"""The one definition of a readable image, shared by verify, data, predict and serve.

An image is readable when Pillow can open it, its declared size is under the pixel limit (so a
decompression bomb is refused before any memory is spent), and it decodes *fully* (Pillow's
``verify()`` alone misses truncated files). Whatever its mode, it comes out as 8-bit RGB with
its EXIF orientation applied. JPEGs can be decoded at reduced size (``draft``), which is much
faster than decoding full-size and resizing.

A source is a path, bytes, a binary file, or (from Python, as a fastai user passes it) a PIL image
or a numpy array (HxW or HxWx3/4, uint8): those go through the same checks as a PNG of their
pixels (``in_memory_png``), so every reader answers the same for the same pixels.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ursa.errors import ImageError

# Pillow's own default bomb limit (~89 Mpx, e.g. 9459x9459); above it we refuse.
MAX_PIXELS = 89_478_485
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".jfif", ".mpo"}
)
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "MPO"})

Source = str | Path | bytes | BinaryIO | Image.Image | np.ndarray


@dataclass(frozen=True)
class ImageInfo:
    """What decoding one file found: format, original mode and size."""

    format: str
    mode: str
    size: tuple[int, int]
    frames: int = 1


def is_image_file(path: Path) -> bool:
    """Decide by extension which files in a folder are meant to be images (content is checked later)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _name(source: Source) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    if isinstance(source, np.ndarray):
        return "<numpy array>"
    return getattr(source, "name", "<upload>") if not isinstance(source, bytes) else "<upload>"


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any mode to 8-bit RGB; transparent pixels become white, as a viewer shows them."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits rather than clipping everything to white.
        hi = 65535 if im.mode.startswith("I;16") else max(1, im.getextrema()[1])
        im = im.point(lambda v: v * (255.0 / hi)).convert("L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


# Pillow's modes that Image.reduce() averages correctly; the others are converted to RGB first.
_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "I", "F", "CMYK", "YCbCr"})
_DRAFT_MODES = frozenset({"RGB", "L", "CMYK", "YCbCr"})


def _ends(source: Source, n: int = 4096) -> tuple[bytes, bytes, int] | None:
    """The first 16 and last n bytes of a file or upload and its length; None for anything else (or unreadable)."""
    try:
        if isinstance(source, bytes):
            return source[:16], source[-n:], len(source)
        if isinstance(source, (str, Path)):
            with open(source, "rb") as f:
                head = f.read(16)
                size = f.seek(0, io.SEEK_END)
                f.seek(max(0, size - n))
                return head, f.read(n), size
        if hasattr(source, "seek") and hasattr(source, "read"):
            where = source.tell()
            try:
                source.seek(0)
                head = source.read(16)
                size = source.seek(0, io.SEEK_END)
                source.seek(max(0, size - n))
                return head, source.read(n), size
            finally:
                source.seek(where)
    except (OSError, ValueError):
        return None
    return None


def cut_short(source: Source) -> bool:
    """Whether the file stops before its format's end: JPEG without its end-of-image marker, PNG without IEND,
    GIF without its trailer, a BMP or RIFF (WebP) shorter than its header says. Read from the bytes, so a file that fails
    to decode is told truncated or corrupt by what it holds, not by the decoder's wording."""
    ends = _ends(source)
    if ends is None:
        return False
    head, tail, size = ends
    if head.startswith(b"\xff\xd8"):
        # cameras may append bytes after the marker, so anywhere near the end; in a file that fits the window,
        # only after the last start-of-scan (a header's own bytes may hold FF D9)
        scan = tail.rfind(b"\xff\xda") if size <= len(tail) else -1
        return b"\xff\xd9" not in tail[scan + 2 if scan >= 0 else 0:]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND" not in tail
    if head[:4] in (b"GIF8",):
        return not tail.rstrip(b"\0").endswith(b";")
    if head[:2] == b"BM" and len(head) >= 6:  # BMP: the file's size is in its header
        return int.from_bytes(head[2:6], "little") > size
    if head[:4] == b"RIFF" and len(head) >= 8:
        return int.from_bytes(head[4:8], "little") + 8 > size
    return False


@contextlib.contextmanager
def _decoding(name: str, source: Source | None = None) -> Iterator[None]:
    """Turn whatever Pillow raises on a bad file into one ImageError with a kind (truncated: read from the bytes)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(name, f"image too large (decompression bomb): {e}", "too_large") from None
    except UnidentifiedImageError:
        raise ImageError(name, "not an image (Pillow cannot identify the content)", "not_image") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError) as e:
        msg = str(e) or type(e).__name__
        kind = "truncated" if isinstance(e, EOFError) or (source is not None and cut_short(source)) else "corrupt"
        raise ImageError(name, f"cannot decode image ({msg})", kind) from None
    except MemoryError:
        raise ImageError(name, "image too large to decode in memory", "too_large") from None


def in_memory_png(source: Image.Image | np.ndarray, name: str) -> bytes:
    """A PIL image or a uint8 array (HxW, HxWx3 or HxWx4) as PNG bytes (lossless); the caller's object is untouched."""
    if isinstance(source, np.ndarray):
        a: Any = source
        if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
            raise ImageError(name, f"expected a uint8 array of shape HxW, HxWx3 or HxWx4, got {a.dtype} {a.shape}",
                             "not_image")
        if a.size == 0:
            raise ImageError(name, f"expected a non-empty image array, got shape {a.shape}", "empty")
        source = Image.fromarray(np.ascontiguousarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a))
    w, h = source.size
    if w * h > MAX_PIXELS:
        raise ImageError(name, f"image too large: {w}x{h} pixels is over the limit of {MAX_PIXELS:,}", "too_large")
    buf = io.BytesIO()
    source.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _open_checked(source: Source, name: str, max_pixels: int) -> tuple[Image.Image, ImageInfo]:
    """Open lazily (header only) and refuse a bomb or an unsupported format before any pixel is decoded."""
    if isinstance(source, (Image.Image, np.ndarray)):
        source = in_memory_png(source, name)
    if isinstance(source, bytes):
        if not source:
            raise ImageError(name, "empty file (0 bytes)", "empty")
        fp: BinaryIO | str | Path = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        p = Path(source)
        if not p.exists():
            raise ImageError(name, "file not found", "missing")
        if p.is_dir():
            raise ImageError(name, "is a folder, not an image", "not_image")
        if p.stat().st_size == 0:
            raise ImageError(name, "empty file (0 bytes)", "empty")
        fp = p
    else:
        fp = source
    im = Image.open(fp)
    w, h = im.size
    if w * h > max_pixels or w <= 0 or h <= 0:
        raise ImageError(
            name,
            f"image too large: {w}x{h} pixels is over the limit of {max_pixels:,} "
            "(possible decompression bomb); shrink it or raise --max-size",
            "too_large",
        )
    fmt = im.format or "unknown"
    if fmt not in SUPPORTED_FORMATS:
        raise ImageError(name, f"unsupported image format {fmt}", "unsupported")
    return im, ImageInfo(fmt, im.mode, (w, h), getattr(im, "n_frames", 1))


def _draft_scale(info: ImageInfo, min_size: int | None, max_side: int | None) -> float:
    """How much a JPEG may be scaled down while decoding: short side >= min_size, long side >= max_side."""
    if info.format not in ("JPEG", "MPO") or info.mode not in _DRAFT_MODES:
        return 1.0
    w, h = info.size
    scales = [min(w, h) / float(min_size)] if min_size else []
    scales += [max(w, h) / float(max_side)] if max_side else []
    return min(scales) if scales else 1.0


def _reduce(im: Image.Image, max_side: int) -> Image.Image:
    """Shrink by a whole factor (box average) while the long side stays >= max_side."""
    factor = max(im.size) // max_side
    if factor < 2:
        return im
    if im.mode not in _REDUCIBLE_MODES:  # palette, 1-bit, 16-bit: average colours, not indices
        im = _to_rgb(im)
    return im.reduce(factor)


def read_header(source: Source, *, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Format, mode and declared size from the header alone, so a caller can budget the decode first."""
    name = _name(source)
    with _decoding(name, source):
        im, info = _open_checked(source, name, max_pixels)
        im.close()
    return info


def decode_cost(info: ImageInfo, max_side: int | None = None) -> int:
    """Bytes of memory ``open_image(..., max_side=max_side)`` needs at its peak, from the header alone."""
    w, h = info.size
    scale = _draft_scale(info, None, max_side)
    if scale >= 2:  # libjpeg scales by 1/2, 1/4 or 1/8 while decoding
        step = 8 if scale >= 8 else 4 if scale >= 4 else 2
        w, h = -(-w // step), -(-h // step)
    # Pillow keeps 1 byte per pixel for 1/L/P, 2 for 16-bit grey, 4 for everything else.
    per_pixel = 1 if info.mode in ("1", "L", "P") else 2 if info.mode.startswith("I;16") else 4
    decoded = w * h * per_pixel
    converted = w * h * 8 if info.mode not in _REDUCIBLE_MODES else 0  # RGBA, then RGB, before reducing
    factor = max(1, max(w, h) // max_side) if max_side else 1
    result = (w // factor) * (h // factor) * 4 * 2  # EXIF rotation and RGB conversion copies
    return decoded + converted + result


def open_image(
    source: Source,
    *,
    min_size: int | None = None,
    max_pixels: int = MAX_PIXELS,
    with_info: bool = False,
    max_side: int | None = None,
) -> Image.Image | tuple[Image.Image, ImageInfo]:
    """Open, fully decode and convert to RGB, or raise ImageError saying why not.

    ``min_size``: the short side the caller needs; JPEGs are then decoded at the smallest
    1/2, 1/4 or 1/8 scale that still gives at least that (PIL ``draft``). ``max_side``: the
    long side the caller needs; JPEGs are decoded at reduced scale the same way, other formats are
    reduced right after decoding, so the copies made afterwards stay small (``decode_cost``).
    Every byte is still decoded, so a truncated or corrupt file fails either way.
    """
    name = _name(source)
    with _decoding(name, source):
        im, info = _open_checked(source, name, max_pixels)
        w, h = info.size
        scale = _draft_scale(info, min_size, max_side)
        if scale >= 2:
            im.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
        im.load()  # full decode: truncated data fails here
        if max_side:
            im = _reduce(im, max_side)
        im = ImageOps.exif_transpose(im) or im
        rgb = _to_rgb(im)
        rgb.load()
    return (rgb, info) if with_info else rgb


def check_image(source: Source, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Decode fully and return what was found, raising ImageError for anything unusable."""
    _, info = open_image(source, max_pixels=max_pixels, with_info=True)  # type: ignore[misc]
    return info


def sniff_format(head: bytes) -> str | None:
    """Tell an image type from its first bytes (magic numbers), never from a name or header."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None

"""Test data made on the fly, so a fresh clone runs every test without ../shared/datasets.

Each maker writes a small deterministic folder (same seed, same bytes) in the shape of one of the
real sets beside the repository on the project's machine (../shared/datasets, which a user's clone
does not have; benchmarks still use them):

- ``digits``: hand-drawn-looking digits 0 1 2 6 7, 28x28 grayscale PNGs (the shape of mnist_dev):
  far from ImageNet photos; with stray marks a frozen body is weak and fine-tuning pays;
- ``broken``: the eight kinds of file that do not decode, under the real set's names;
- ``odd_photos``: web originals' oddities: extensions that lie about the content, RGBA, palette,
  animated GIF, a picture over 2000 px, .JPG/.jpeg;
- ``url_lists``: the download command's real input format: three course repositories' lists.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DIGITS = ("0", "1", "2", "6", "7")


def _ellipse(cx: float, cy: float, rx: float, ry: float, a0: float = 0.0, a1: float = 360.0, n: int = 24):
    return [(cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
            for a in np.linspace(a0, a1, n)]


def _strokes(digit: str, rng: np.random.Generator) -> list[list[tuple[float, float]]]:
    """Polylines of one digit in a unit box (y down), control points jittered like handwriting."""
    j = lambda: float(rng.uniform(-0.06, 0.06))  # noqa: E731
    if digit == "0":
        return [_ellipse(0.5 + j(), 0.5 + j(), 0.26 + j() / 2, 0.4 + j() / 2)]
    if digit == "1":
        top = (0.55 + j(), 0.1 + j())
        lines = [[top, (0.5 + j(), 0.9 + j())]]
        if rng.random() < 0.5:
            lines.append([(0.38 + j(), 0.28 + j()), top])
        return lines
    if digit == "2":
        arc = _ellipse(0.5 + j(), 0.32 + j(), 0.25, 0.2, 200, 380, 12)
        return [arc + [(0.25 + j(), 0.88 + j()), (0.8 + j(), 0.88 + j())]]
    if digit == "6":
        cx, cy = 0.5 + j(), 0.66 + j()
        return [[(0.7 + j(), 0.1 + j()), (0.42 + j(), 0.3 + j()), (cx - 0.22, cy)], _ellipse(cx, cy, 0.22, 0.2)]
    if digit == "7":
        return [[(0.2 + j(), 0.12 + j()), (0.8 + j(), 0.12 + j()), (0.42 + j(), 0.9 + j())]]
    raise ValueError(f"expected one of {DIGITS}, got {digit!r}")


def _wobble(line: list[tuple[float, float]], rng: np.random.Generator, amount: float) -> list[tuple[float, float]]:
    """A shaky hand: each segment split in two, its middle pushed sideways."""
    out = [line[0]]
    for (x0, y0), (x1, y1) in zip(line, line[1:]):
        mx, my = (x0 + x1) / 2 + rng.normal(0, amount), (y0 + y1) / 2 + rng.normal(0, amount)
        out += [(mx, my), (x1, y1)]
    return out


def digit_image(digit: str, rng: np.random.Generator, size: int = 28, stray: float = 0.0,
                wobble: float = 0.03) -> Image.Image:
    """One digit: white strokes on black, random slant, scale, shift, pen width and wobble, drawn at 4x
    and reduced; a stray mark in a ``stray`` share of them (0.3 makes a frozen ImageNet body weak)."""
    big = size * 4
    im = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(im)
    angle = math.radians(rng.uniform(-25, 25))
    scale = rng.uniform(0.5, 0.95)
    shear = rng.uniform(-0.35, 0.35)
    dx, dy = rng.uniform(-0.1, 0.1, 2)
    width = int(rng.integers(5, 15))
    cos, sin = math.cos(angle), math.sin(angle)

    def place(p: tuple[float, float]) -> tuple[float, float]:
        x, y = p[0] - 0.5, p[1] - 0.5
        x += shear * y
        x, y = cos * x - sin * y, sin * x + cos * y
        return ((0.5 + dx + scale * x) * big, (0.5 + dy + scale * y) * big)

    lines = [_wobble(line, rng, wobble) for line in _strokes(digit, rng)]
    if rng.random() < stray:  # a stray mark
        x, y = rng.uniform(0.1, 0.9, 2)
        lines.append([(x, y), (x + rng.uniform(-0.3, 0.3), y + rng.uniform(-0.3, 0.3))])
    for line in lines:
        draw.line([place(p) for p in line], fill=int(rng.integers(180, 256)), width=width, joint="curve")
    return im.resize((size, size), Image.Resampling.BOX)


def digits(root: Path, per_class: int = 100, seed: int = 0, **style) -> Path:
    """root/<digit>/<n>.png for the digits 0 1 2 6 7 (the shape of mnist_dev); returns root.

    ``style``: digit_image's ``stray`` and ``wobble``.
    """
    rng = np.random.default_rng(seed)
    for d in DIGITS:
        (root / d).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            digit_image(d, rng, **style).save(root / d / f"{i:03d}.png")
    return root


def photo(rng: np.random.Generator, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A smooth, photo-like picture (gradients and blobs plus a little noise) that compresses like a photo."""
    w, h = size
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 6, (min(h, 256), min(w, 256), 3))
    arr = np.asarray(im, dtype=np.float32)
    arr[: noise.shape[0], : noise.shape[1]] += noise
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return im if mode == "RGB" else im.convert(mode)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_declaring(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels: a decompression bomb in 100 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# name -> the kind open_image gives it (the real broken set's names)
BROKEN = {
    "bomb_40000x40000.png": "too_large",
    "corrupted_scan.jpg": "corrupt",
    "header_only.jpg": "truncated",
    "html_error_page.jpg": "not_image",
    "text_file.png": "not_image",
    "truncated.png": "truncated",
    "truncated_60pct.jpg": "truncated",
    "zero_bytes.jpg": "empty",
}


def broken(root: Path, seed: int = 0) -> Path:
    """The eight files that do not decode, made from a photo-like picture (the shape of the real broken set)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    jpeg = _encode(photo(rng, (400, 300)), "JPEG", quality=90)
    png = _encode(photo(rng, (300, 200)), "PNG")
    scan = bytearray(jpeg)
    start = jpeg.find(b"\xff\xda") + 200  # inside the entropy-coded scan
    n = len(jpeg) // 3
    scan[start:start + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    files = {
        "bomb_40000x40000.png": png_declaring(40000, 40000),
        "corrupted_scan.jpg": bytes(scan),
        "header_only.jpg": jpeg[: jpeg.find(b"\xff\xda") + 14],
        "html_error_page.jpg": b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>"
                               b"<body><h1>Forbidden</h1></body></html>\n",
        "text_file.png": b"this is not an image\n",
        "truncated.png": png[: len(png) // 2],
        "truncated_60pct.jpg": jpeg[: len(jpeg) * 6 // 10],
        "zero_bytes.jpg": b"",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def odd_photos(root: Path, seed: int = 0) -> Path:
    """root/<class>/...: pictures that all decode but trip up naive loaders (the shape of bears_fullsize)."""
    rng = np.random.default_rng(seed)
    made: list[tuple[str, bytes]] = []
    for cls in ("black", "grizzly", "teddy"):
        p = lambda size=(320, 240), mode="RGB": photo(rng, size, mode)  # noqa: E731
        frames = [p((120, 90)).convert("P") for _ in range(3)]
        gif = io.BytesIO()
        frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
        rgba = p((260, 200), "RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
        made += [
            (f"{cls}/plain.jpg", _encode(p(), "JPEG", quality=85)),
            (f"{cls}/upper.JPG", _encode(p((300, 400)), "JPEG", quality=85)),
            (f"{cls}/long.jpeg", _encode(p((500, 200)), "JPEG", quality=85)),
            (f"{cls}/png_named.jpg", _encode(p((200, 150)), "PNG")),
            (f"{cls}/gif_named.jpg", _encode(p((150, 150)).convert("P"), "GIF")),
            (f"{cls}/webp_named.jpg", _encode(p((240, 180)), "WEBP", quality=80)),
            (f"{cls}/webp_named.png", _encode(p((180, 240)), "WEBP", quality=80)),
            (f"{cls}/rgba.png", _encode(rgba, "PNG")),
            (f"{cls}/palette.png", _encode(p((220, 160)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")),
            (f"{cls}/palette_transparent.png", _encode(p((160, 160)).convert("P"), "PNG", transparency=0)),
            (f"{cls}/animated.gif", gif.getvalue()),
            (f"{cls}/grey.jpg", _encode(p((240, 320), "L"), "JPEG", quality=85)),
            (f"{cls}/cmyk.jpg", _encode(p((200, 200), "CMYK"), "JPEG", quality=85)),
        ]
    made.append(("black/huge.jpg", _encode(photo(rng, (2400, 1600)), "JPEG", quality=70)))
    for rel, data in made:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


RAW_IMAGE_URL = "x-raw-image:///d937e6490875ce6d59e8f883748a5e9a5b9e1c35d0b050a5b91b5c1610ba94e8"


def _token(rng: np.random.Generator, n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), n))


def url_lists(root: Path, per_list: int = 320, seed: int = 0) -> Path:
    """root/<repo>/urls_{black,grizzly,teddys}.{txt,csv}: one URL a line, as three course repositories wrote them.

    Blank lines (runs of them), a duplicate or two, a ``.csv`` name on a plain list, percent-encoded
    names, query strings, commas inside a path, and one non-HTTP ``x-raw-image:///`` line.
    """
    rng = np.random.default_rng(seed)
    styles = {
        "ActionMichael__fastai-learning-Rev.2019": (".txt", lambda: f"https://encrypted-tbn0.gstatic.com/images?q=tbn:ANd9Gc{_token(rng, 60)}&s"),
        "chwang733__data": (".txt", lambda: rng.choice([
            f"https://upload.wikimedia.org/wikipedia/commons/thumb/0/08/{_token(rng, 8)}_Schwarzb%C3%A4r.jpg/220px-{_token(rng, 8)}.jpg",
            f"https://defenders.org/sites/default/files/styles/feature/public/{_token(rng, 12)}.png?itok={_token(rng, 8)}",
            f"https://res.cloudinary.example/image/upload/w_300,h_200,c_fill/{_token(rng, 10)}.jpg",
            f"https://images-na.ssl-images-amazon.com/images/I/{_token(rng, 11)}._SL1500_.jpg"])),
        "huahang__fastai_study": (".csv", lambda: f"https://encrypted-tbn0.gstatic.com/images?q=tbn%3AANd9Gc{_token(rng, 60)}&usqp=CAU"),
    }
    for repo, (ext, url) in styles.items():
        (root / repo).mkdir(parents=True, exist_ok=True)
        for cls in ("black", "grizzly", "teddys"):
            urls = [str(url()) for _ in range(per_list)]
            lines = list(urls)
            lines.insert(per_list // 2, urls[3])  # a duplicate, dropped by the parser
            if repo.startswith("Action"):
                lines[100:100] = [""] * 40  # a run of blank lines
                lines.append("")
            if repo.startswith("huahang") and cls == "grizzly":
                lines.insert(7, RAW_IMAGE_URL)
            (root / repo / f"urls_{cls}{ext}").write_text("\n".join(lines) + "\n")
    return root


LABEL_COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 220)}


def label_sets(root: Path, n: int = 72, size: int = 64, seed: int = 0) -> Path:
    """Multi-label pictures (the shape of planet's CSV): grey noise with a blob of each colour the image is labelled
    with; every subset of red/green/blue, the empty set included. Writes the images and ``labels.csv`` (name,label:
    the labels separated by a space, an empty cell for none)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = list(LABEL_COLOURS)
    subsets = [[c for k, c in enumerate(names) if m >> k & 1] for m in range(2 ** len(names))]
    lines = ["name,label"]
    for i in range(n):
        chosen = subsets[i % len(subsets)]
        px = rng.integers(90, 160, (size, size, 3)).astype(np.uint8)
        im = Image.fromarray(px)
        draw = ImageDraw.Draw(im)
        spots = rng.permutation(4)[: len(chosen)]
        for c, q in zip(chosen, spots):
            x0, y0 = (q % 2) * size // 2 + int(rng.integers(2, 8)), (q // 2) * size // 2 + int(rng.integers(2, 8))
            r = size // 2 - 12
            draw.ellipse([x0, y0, x0 + r, y0 + r], fill=LABEL_COLOURS[c])
        im.save(root / f"img{i:03d}.png")
        lines.append(f"img{i:03d}.png,{' '.join(chosen)}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def lopsided_digits(root: Path, small: str = "7", n_train: int = 60, n_small: int = 6, n_valid: int = 20,
                    seed: int = 0, **style) -> Path:
    """Digits with one class lopsided: ``n_train`` training images of each digit but ``small``, which has
    ``n_small``; ``n_valid`` validation images of every digit (so the small class's recall is read on as
    many pictures as the others'). Writes root/<digit>/<n>.png and root.parent/<root.name>.csv
    (name,label,is_valid); returns the CSV's path."""
    rng = np.random.default_rng(seed)
    lines = ["name,label,is_valid"]
    for d in DIGITS:
        (root / d).mkdir(parents=True, exist_ok=True)
        n = (n_small if d == small else n_train) + n_valid
        for i in range(n):
            digit_image(d, rng, **style).save(root / d / f"{i:03d}.png")
            lines.append(f"{d}/{i:03d}.png,{d},{i >= n - n_valid}")
    csv = root.parent / f"{root.name}.csv"
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv

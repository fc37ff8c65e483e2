"""The one definition of a readable image: every kind of bad file gets a named reason."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from ursa.errors import ImageError
from ursa.vision.images import check_image, open_image, sniff_format
from tests.conftest import make_image


def _png_claiming(path: Path, w: int, h: int) -> Path:
    """A tiny PNG whose header declares w x h pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")
    path.write_bytes(body)
    return path


@pytest.mark.parametrize("name,kind", [
    ("zero_bytes.jpg", "empty"),
    ("html_error_page.jpg", "not_image"),
    ("text_file.png", "not_image"),
    ("truncated.png", "truncated"),
    ("truncated_60pct.jpg", "truncated"),
    ("header_only.jpg", "truncated"),
    ("bomb_40000x40000.png", "too_large"),
    ("corrupted_scan.jpg", "corrupt"),
])
def test_shared_broken_files_are_refused_with_a_reason(shared_datasets, name, kind):
    with pytest.raises(ImageError) as e:
        open_image(shared_datasets / "broken" / name)
    assert e.value.kind == kind
    assert name in str(e.value)


def test_made_bad_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, not an image")
    good = make_image(tmp_path / "good.jpg", size=(200, 150), fmt="JPEG")
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _png_claiming(tmp_path / "bomb.png", 30000, 30000)
    kinds = {}
    for f in ["empty.jpg", "text.jpg", "cut.jpg", "bomb.png"]:
        with pytest.raises(ImageError) as e:
            open_image(tmp_path / f)
        kinds[f] = e.value.kind
    assert kinds == {"empty.jpg": "empty", "text.jpg": "not_image", "cut.jpg": "truncated", "bomb.png": "too_large"}
    with pytest.raises(ImageError, match="not found"):
        open_image(tmp_path / "nope.jpg")


def test_modes_become_rgb_with_white_behind_transparency(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    im = open_image(tmp_path / "t.png")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)
    Image.new("RGB", (10, 10), (0, 0, 255)).convert("P").save(tmp_path / "p.gif")
    assert open_image(tmp_path / "p.gif").getpixel((5, 5)) == (0, 0, 255)
    Image.new("CMYK", (10, 10), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = open_image(tmp_path / "c.jpg").getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60
    Image.new("I;16", (10, 10), 65535).save(tmp_path / "g16.png")
    assert open_image(tmp_path / "g16.png").getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    im.save(tmp_path / "o.jpg", exif=exif.tobytes())
    assert open_image(tmp_path / "o.jpg").size == (20, 40)


def test_jpeg_draft_decodes_at_reduced_size(tmp_path):
    make_image(tmp_path / "big.jpg", size=(2000, 1500), fmt="JPEG")
    full = open_image(tmp_path / "big.jpg")
    small = open_image(tmp_path / "big.jpg", min_size=300)
    assert full.size == (2000, 1500)
    assert 300 <= min(small.size) < 750  # 1/2 or 1/4 scale, never below what was asked


def test_full_size_originals_all_decode(shared_datasets):
    files = [p for p in (shared_datasets / "bears_fullsize").rglob("*") if p.is_file()]
    assert len(files) > 100
    for f in files:
        info = check_image(f)
        assert info.format in {"JPEG", "PNG", "GIF", "WEBP", "MPO"}


def test_sniff_format_by_magic_numbers():
    assert sniff_format(b"\xff\xd8\xff\xe0rest") == "JPEG"
    assert sniff_format(b"\x89PNG\r\n\x1a\nxxxx") == "PNG"
    assert sniff_format(b"RIFF1234WEBPVP8 ") == "WEBP"
    assert sniff_format(b"<!DOCTYPE html>") is None

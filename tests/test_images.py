"""The one definition of a readable image: every kind of bad file gets a named reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from ursa.errors import ImageError
from ursa.vision.images import check_image, open_image, sniff_format
from tests.conftest import make_image
from tests.synthetic_sets import BROKEN, png_declaring


@pytest.mark.parametrize("name,kind", sorted(BROKEN.items()))
def test_broken_files_are_refused_with_a_reason(broken_dir, name, kind):
    with pytest.raises(ImageError) as e:
        open_image(broken_dir / name)
    assert e.value.kind == kind
    assert name in str(e.value)


def test_made_bad_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, not an image")
    good = make_image(tmp_path / "good.jpg", size=(200, 150), fmt="JPEG")
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "bomb.png").write_bytes(png_declaring(30000, 30000))
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


def test_odd_web_originals_all_decode(odd_photos_dir):
    """Extensions that lie, RGBA, palette, animated GIF, CMYK, a 2400 px picture: all decode, by content."""
    files = [p for p in odd_photos_dir.rglob("*") if p.is_file()]
    assert len(files) == 40
    formats = {}
    for f in files:
        info = check_image(f)
        formats[f.name] = info.format
        assert open_image(f, min_size=224).mode == "RGB"
    assert formats["png_named.jpg"] == "PNG" and formats["webp_named.png"] == "WEBP" and formats["gif_named.jpg"] == "GIF"
    assert set(formats.values()) == {"JPEG", "PNG", "GIF", "WEBP"}


def test_sniff_format_by_magic_numbers():
    assert sniff_format(b"\xff\xd8\xff\xe0rest") == "JPEG"
    assert sniff_format(b"\x89PNG\r\n\x1a\nxxxx") == "PNG"
    assert sniff_format(b"RIFF1234WEBPVP8 ") == "WEBP"
    assert sniff_format(b"<!DOCTYPE html>") is None


def test_truncated_or_corrupt_is_read_from_the_bytes_not_from_the_decoders_words(tmp_path):
    """A file that fails to decode is 'truncated' when it stops before its format's end marker, else 'corrupt'."""
    import io as _io

    import numpy as np

    from PIL import Image as _Image

    from ursa.errors import ImageError
    from ursa.vision.images import cut_short, open_image

    rng = np.random.default_rng(0)
    pic = _Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP"):
        buf = _io.BytesIO()
        pic.save(buf, fmt)
        data = buf.getvalue()
        assert not cut_short(data), fmt
        assert cut_short(data[: len(data) * 6 // 10]), fmt
        with pytest.raises(ImageError) as e:
            open_image(data[: len(data) * 6 // 10])
        assert e.value.kind == "truncated", (fmt, e.value)
    # a small JPEG whose comment holds FF D9, cut in its scan: truncated (the marker counts only after the scan starts)
    buf = _io.BytesIO()
    _Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG", comment=b"x\xff\xd9y")
    small = buf.getvalue()
    assert b"\xff\xd9" in small[: small.rfind(b"\xff\xda")] and cut_short(small[:-40]) and not cut_short(small)
    # a scan spoiled in the middle with its end intact is corrupt, camera bytes after the end marker too
    from tests.synthetic_sets import broken

    scan = (broken(tmp_path / "broken") / "corrupted_scan.jpg").read_bytes() + b"camera trailer"
    assert not cut_short(scan)
    with pytest.raises(ImageError) as e:
        open_image(scan)
    assert e.value.kind == "corrupt", e.value

"""ursa verify: broken files are set aside with a reason, nothing vanishes without a record."""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ursa.cli import main
from ursa.errors import ImageError
from ursa.vision.images import open_image
from ursa.acquire.verify import REPORT_COLUMNS, VerifyError, verify_images
from tests.synthetic_sets import BROKEN, png_declaring

def _jpeg(size=(48, 32), color=(120, 80, 40), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_folder(root: Path) -> Path:
    """A class folder with good images, every kind of broken file, and odd-mode images."""
    good, odd = root / "good", root / "odd"
    good.mkdir(parents=True)
    odd.mkdir()
    for i in range(3):
        (good / f"ok{i}.jpg").write_bytes(_jpeg(color=(i * 60, 100, 200)))
    whole = _jpeg((200, 150), (10, 20, 30))
    (good / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (good / "zero.jpg").write_bytes(b"")
    (good / "text.jpg").write_text("this is not a picture\n")
    (good / "bomb.png").write_bytes(png_declaring(60000, 60000))
    ppm = io.BytesIO()
    Image.new("RGB", (8, 8)).save(ppm, "PPM")
    (good / "netpbm.jpg").write_bytes(ppm.getvalue())  # Pillow reads it, ursa does not support it
    (good / "notes.txt").write_text("where these came from\n")
    (good / ".hidden.jpg").write_bytes(b"")  # hidden: ignored, even though broken
    (odd / "cmyk.jpg").write_bytes(_jpeg(mode="CMYK", color=(0, 128, 255, 0)))
    Image.fromarray((np.arange(32 * 32, dtype=np.uint16) * 60).reshape(32, 32)).save(odd / "deep.png")
    frames = [Image.new("RGB", (20, 20), (i * 80, 0, 0)) for i in range(3)]
    frames[0].save(odd / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    Image.new("RGBA", (30, 30), (255, 0, 0, 128)).save(odd / "alpha.png")
    return root


def read_report(folder: Path) -> list[dict[str, str]]:
    with open(folder / "verify.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows


def by_file(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {r["file"]: r for r in rows}


def test_made_files_get_the_right_status(tmp_path):
    root = make_folder(tmp_path / "data")
    s = verify_images(root, workers=1, progress=False)
    rows = by_file(read_report(root))
    assert (root / "verify.csv").read_text().splitlines()[0] == ",".join(REPORT_COLUMNS)
    expected_bad = {
        "good/truncated.jpg": "truncated",
        "good/zero.jpg": "empty",
        "good/text.jpg": "not_image",
        "good/bomb.png": "too_large",
        "good/netpbm.jpg": "unsupported",
    }
    for rel, kind in expected_bad.items():
        assert rows[rel]["status"] == "quarantined", rel
        assert rows[rel]["reason"].startswith(kind + ":"), rows[rel]
        assert f"moved to _quarantine/{rel}" in rows[rel]["reason"]
        assert not (root / rel).exists()
        assert (root / "_quarantine" / rel).exists()
    for rel in ("good/ok0.jpg", "good/ok1.jpg", "good/ok2.jpg", "odd/cmyk.jpg", "odd/deep.png", "odd/alpha.png"):
        assert rows[rel]["status"] == "ok", rel
    assert rows["odd/anim.gif"]["status"] == "ok"
    assert "3 frames" in rows["odd/anim.gif"]["reason"]
    assert "good/notes.txt" not in rows and (root / "good" / "notes.txt").exists()
    assert (root / "good" / ".hidden.jpg").exists()
    assert s.ignored == ["good/notes.txt"]
    assert (s.ok, s.quarantined, s.deleted, s.fixed) == (7, 5, 0, 0)
    assert s.problems == {"truncated": 1, "empty": 1, "not_image": 1, "too_large": 1, "unsupported": 1}
    assert (root / "_quarantine" / "good" / "zero.jpg").stat().st_size == 0  # moved as is


def test_broken_set_is_all_quarantined(tmp_path, broken_dir):
    root = tmp_path / "data"
    shutil.copytree(broken_dir, root / "junk")
    s = verify_images(root, workers=1, progress=False)
    rows = by_file(read_report(root))
    for name, kind in BROKEN.items():
        r = rows[f"junk/{name}"]
        assert r["status"] == "quarantined" and r["reason"].startswith(kind + ":"), r
        assert (root / "_quarantine" / "junk" / name).read_bytes() == (broken_dir / name).read_bytes()
    assert s.quarantined == 8 and s.ok == 0
    assert list((root / "junk").iterdir()) == []


def test_second_run_is_idempotent_and_keeps_the_record(tmp_path):
    root = make_folder(tmp_path / "data")
    verify_images(root, workers=1, progress=False)
    quarantine = sorted(p.relative_to(root) for p in (root / "_quarantine").rglob("*"))
    s2 = verify_images(root, workers=1, progress=False)
    assert (s2.ok, s2.quarantined, s2.deleted, s2.fixed) == (7, 0, 0, 0)
    assert sorted(p.relative_to(root) for p in (root / "_quarantine").rglob("*")) == quarantine
    rows = read_report(root)
    moved = [r for r in rows if r["status"] == "quarantined"]
    assert len(moved) == 5  # the first run's moves are still on record, once each
    assert sum(r["status"] == "ok" for r in rows) == 7


def test_delete_removes_but_records(tmp_path):
    root = make_folder(tmp_path / "data")
    s = verify_images(root, delete=True, workers=1, progress=False)
    rows = by_file(read_report(root))
    assert s.deleted == 5 and s.quarantined == 0
    assert rows["good/zero.jpg"]["status"] == "deleted"
    assert rows["good/zero.jpg"]["reason"].startswith("empty:")
    assert not (root / "good" / "zero.jpg").exists()
    assert not (root / "_quarantine").exists()


def test_quarantine_never_overwrites(tmp_path):
    root = tmp_path / "data"
    (root / "c").mkdir(parents=True)
    (root / "_quarantine" / "c").mkdir(parents=True)
    (root / "_quarantine" / "c" / "x.jpg").write_bytes(b"earlier")
    (root / "_quarantine" / "c" / "x-1.jpg").write_bytes(b"earlier too")
    (root / "c" / "x.jpg").write_bytes(b"not an image at all")
    verify_images(root, workers=1, progress=False)
    assert (root / "_quarantine" / "c" / "x.jpg").read_bytes() == b"earlier"
    assert (root / "_quarantine" / "c" / "x-1.jpg").read_bytes() == b"earlier too"
    assert (root / "_quarantine" / "c" / "x-2.jpg").read_bytes() == b"not an image at all"
    assert "moved to _quarantine/c/x-2.jpg" in by_file(read_report(root))["c/x.jpg"]["reason"]


def test_fix_converts_to_rgb_and_keeps_originals(tmp_path):
    root = make_folder(tmp_path / "data")
    originals = {p.name: p.read_bytes() for p in (root / "odd").iterdir()}
    big = Image.new("RGB", (400, 100), (1, 2, 3))
    big.save(root / "good" / "wide.jpg", quality=90)
    s = verify_images(root, fix=True, max_size=100, workers=1, progress=False)
    rows = by_file(read_report(root))
    assert rows["odd/cmyk.jpg"]["status"] == "fixed"
    assert rows["odd/cmyk.jpg"]["reason"].startswith("fixed: converted from CMYK")
    assert rows["odd/deep.png"]["reason"].startswith("fixed: converted from I")  # 16-bit grey
    assert rows["odd/alpha.png"]["reason"].startswith("fixed: converted from RGBA")
    assert rows["odd/anim.gif"]["reason"].startswith("fixed: converted from P")
    assert rows["good/wide.jpg"]["reason"].startswith("fixed: shrunk from 400x100 to 100x25")
    assert rows["good/ok0.jpg"]["status"] == "ok"
    for name in ("cmyk.jpg", "deep.png", "alpha.png"):  # same name, now RGB
        with Image.open(root / "odd" / name) as im:
            assert im.mode == "RGB", name
    with Image.open(root / "odd" / "anim.png") as im:  # a GIF becomes a PNG copy
        assert im.mode == "RGB" and im.format == "PNG"
    assert not (root / "odd" / "anim.gif").exists()
    with Image.open(root / "good" / "wide.jpg") as im:
        assert im.size == (100, 25)
    for name, data in originals.items():  # nothing lost: every original is in quarantine
        assert (root / "_quarantine" / "odd" / name).read_bytes() == data
    assert s.fixed == 5 and s.quarantined == 5
    assert not list(root.rglob(".*.part"))
    s2 = verify_images(root, fix=True, max_size=100, workers=1, progress=False)
    assert (s2.ok, s2.fixed, s2.quarantined) == (8, 0, 0)


def test_process_pool_gives_the_same_answers(tmp_path):
    roots = []
    for name in ("a", "b"):
        root = make_folder(tmp_path / name)
        for i in range(20):  # more than one batch so the pool really runs
            (root / "good" / f"extra{i}.jpg").write_bytes(_jpeg(color=(i, i, i)))
        roots.append(root)
    s1 = verify_images(roots[0], workers=1, progress=False)
    s2 = verify_images(roots[1], workers=2, progress=False)
    assert s1.to_dict()["problems"] == s2.to_dict()["problems"]
    assert sorted(map(tuple, (r.values() for r in read_report(roots[0])))) == sorted(
        map(tuple, (r.values() for r in read_report(roots[1])))
    )


def test_ok_means_what_open_image_means(tmp_path):
    root = make_folder(tmp_path / "data")
    before = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file() and p.suffix != ".txt"}
    readable = {}
    for rel, p in before.items():
        if rel.split("/")[-1].startswith("."):
            continue
        try:
            open_image(p)
            readable[rel] = True
        except ImageError:
            readable[rel] = False
    verify_images(root, workers=1, progress=False)
    rows = by_file(read_report(root))
    assert {rel: rows[rel]["status"] == "ok" for rel in readable} == readable


def test_odd_images_all_decode(tmp_path, odd_photos_dir):
    """Lying extensions, RGBA, palette, animated GIF, CMYK, 2400 px: nothing quarantined, nothing renamed."""
    root = tmp_path / "data"
    shutil.copytree(odd_photos_dir / "black", root / "black")
    s = verify_images(root, workers=1, progress=False)
    assert s.ok == 14 and s.quarantined == 0
    assert sorted(p.name for p in (root / "black").iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in (odd_photos_dir / "black").iterdir())


def test_cli(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    assert main(["verify", str(root), "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "quarantined       5" in out and "ok                7" in out
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert "folder not found" in capsys.readouterr().err
    assert main(["verify", str(root), "--max-size", "100"]) == 2
    assert "--fix" in capsys.readouterr().err
    with pytest.raises(VerifyError):
        verify_images(root, workers=0)


def test_read_only_folder_is_refused_even_for_root(tmp_path):
    root = make_folder(tmp_path / "data")
    root.chmod(0o555)
    try:
        with pytest.raises(VerifyError, match="read-only"):
            verify_images(root, workers=1, progress=False)
        assert (root / "good" / "zero.jpg").exists() and not (root / "verify.csv").exists()
    finally:
        root.chmod(0o755)


def _make_unreadable(path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """chmod 000; as root that does not stop reads, so then every open() of this file raises PermissionError."""
    path.chmod(0)
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        return "chmod"
    import builtins

    real_open = builtins.open
    target = path.resolve()

    def denying_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == target:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denying_open)  # Pillow and verify both open through builtins.open
    return "simulated (running as root)"


def test_unreadable_file_is_reported_and_left_in_place(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "c").mkdir(parents=True)
    (root / "c" / "ok.jpg").write_bytes(_jpeg())
    secret = root / "c" / "secret.jpg"
    secret.write_bytes(_jpeg(color=(1, 2, 3)))
    _make_unreadable(secret, monkeypatch)
    try:
        for delete in (False, True):  # not corrupt, so neither moved nor deleted
            s = verify_images(root, delete=delete, workers=1, progress=False)
            assert (s.ok, s.unreadable, s.quarantined, s.deleted) == (1, 1, 0, 0)
            assert not s.problems
            assert secret.exists() and not (root / "_quarantine").exists()
            row = by_file(read_report(root))["c/secret.jpg"]
            assert row["status"] == "unreadable"
            assert "permission denied" in row["reason"] and "chmod u+r" in row["reason"]
        assert "could not be read (permission denied)" in s.format()
        assert s.to_dict()["unreadable"] == 1
    finally:
        secret.chmod(0o644)

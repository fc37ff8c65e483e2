"""ursa suggest: the most informative pictures come first; the labelling page files them and survives kill -9."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ursa.apps.label import Filing
from ursa.cli import main
from ursa.diagnose.suggest import MIXES, Mix, class_need, percentile, rank_pool, uncertainty

from tests.conftest import SAMPLE, start_page, wait_until


# ---------------------------------------------------------------------------------------------
# The ranking on made-up model answers: which pictures are informative is known by construction.


def _pool(seed: int = 0):
    """60 clear pictures of 3 classes, 6 the model is torn on, 4 out of every class (far from all training pictures)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(3, 16) * 4
    y = rng.integers(0, 3, 60)
    feats = centres[y] + rng.normal(0, 0.3, (60, 16))
    probs = np.full((60, 3), 0.02)
    probs[np.arange(60), y] = 0.96
    torn = (centres[0] + centres[1]) / 2 + rng.normal(0, 0.3, (6, 16))
    torn_p = np.tile([0.48, 0.47, 0.05], (6, 1))
    far = np.hstack([np.zeros((4, 8)), np.eye(4, 8) * 4]) + rng.normal(0, 0.3, (4, 16))  # features no class has, unlike each other
    far_p = np.tile([0.5, 0.3, 0.2], (4, 1))
    reference = centres[rng.integers(0, 3, 30)] + rng.normal(0, 0.3, (30, 16))  # the labelled pictures
    return (np.vstack([feats, torn, far]), np.vstack([probs, torn_p, far_p]), reference,
            set(range(60, 66)), set(range(66, 70)))


@pytest.mark.parametrize("name", list(MIXES))
def test_every_mix_puts_the_torn_and_the_out_of_class_pictures_first(name):
    feats, probs, reference, torn, far = _pool()
    unknown = 1 - (feats / np.linalg.norm(feats, axis=1, keepdims=True)) @ (
        reference / np.linalg.norm(reference, axis=1, keepdims=True)).T.max(1)
    r = rank_pool(probs, feats, MIXES[name], 10, unknown=unknown, need=np.array([0.0, 1.0, 0.0]), reference=reference)
    top = set(r.order.tolist())
    mix = MIXES[name]
    if mix.typical >= mix.uncertainty > 0 or (mix.typical and not mix.uncertainty):
        assert len(top & set(range(60))) >= 3, (name, sorted(top))  # typical pictures too, not only odd and torn ones
    elif not mix.uncertainty:  # coverage alone knows nothing of the probabilities: the far ones, then spread out
        assert far <= top
    elif mix.typical:
        assert len(top & (torn | far)) >= 8, (name, sorted(top))
    else:
        assert top == torn | far, (name, sorted(top))
    assert len(r.reasons) == 10 and set(r.reasons) <= {"unsure", "unknown", "need", "typical", "coverage"}


def test_coverage_spreads_the_pick_over_near_copies():
    """Ten copies of one confusing picture and five other confusing ones: margin alone takes copies, coverage does not."""
    rng = np.random.default_rng(1)
    copies = np.tile(rng.normal(0, 1, 16), (10, 1)) + rng.normal(0, 0.01, (10, 16))
    others = rng.normal(0, 1, (5, 16))
    clear = rng.normal(0, 1, (40, 16))
    feats = np.vstack([copies, others, clear])
    probs = np.vstack([np.tile([0.5, 0.5], (10, 1)), np.tile([0.55, 0.45], (5, 1)), np.tile([0.97, 0.03], (40, 1))])
    only_margin = set(rank_pool(probs, feats, Mix(), 6).order.tolist())
    spread = set(rank_pool(probs, feats, MIXES["margin+coverage"], 6).order.tolist())
    assert len(only_margin & set(range(10))) == 6  # the fault the coverage term is there to fix
    assert len(spread & set(range(10))) == 1 and len(spread & set(range(10, 15))) == 5


def test_signals_and_their_checks():
    p = np.array([[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]])
    assert uncertainty(p).tolist() == pytest.approx([1.0, 0.2, 0.0])
    assert uncertainty(p, "entropy")[0] == pytest.approx(1.0) and uncertainty(p, "entropy")[2] == pytest.approx(0.0, abs=1e-6)
    assert percentile(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == pytest.approx([1.0, 0.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="expected one of margin, entropy, got 'mean'"):
        Mix(measure="mean")
    with pytest.raises(ValueError, match="expected finite numbers >= 0"):
        Mix(diversity=-1)
    curve = {"classes": ["a", "b"], "class_fits": [{"a": 1.0, "b": 0.5, "c": 0}, {"a": 4.0, "b": 0.5, "c": 0}],
             "n_per_class": [[10, 10], [40, 40]], "valid_counts": [20, 20]}
    need = class_need(curve, ["b", "a"])  # in the model's class order
    assert need[0] == pytest.approx(4 * need[1])
    assert class_need(curve, ["a", "c"]) is None


# ---------------------------------------------------------------------------------------------
# The command on a real model: out-of-class pictures first, unreadable ones skipped and counted.


def _noise(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(path)
    return path


def test_suggest_ranks_out_of_class_pictures_first_and_skips_unreadable(tmp_path: Path, tiny_model, capsys):
    pool = tmp_path / "pool"
    (pool / "more").mkdir(parents=True)
    for cls in ("black", "grizzly", "teddy"):
        for f in sorted((SAMPLE / cls).iterdir())[:6]:
            shutil.copy(f, pool / f.name)
    odd = {_noise(pool / "more" / f"noise{i}.png", i).relative_to(pool).as_posix() for i in range(3)}
    Image.new("RGB", (80, 80), (0, 90, 255)).save(pool / "more" / "blue.png")
    odd.add("more/blue.png")
    n_readable = sum(1 for f in pool.rglob("*") if f.is_file())
    (pool / "cut.jpg").write_bytes(b"\xff\xd8\xff not really")
    assert main(["suggest", str(pool), "--model", str(tiny_model), "-n", "8", "--json", "--quiet"]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert len(rows) == 8 and all(set(r) >= {"file", "guess", "prob", "reason", "why"} for r in rows)
    assert odd <= {r["file"] for r in rows[:6]}, rows
    assert "skipped 1 unreadable picture(s): cut.jpg" in out.err
    assert "cut.jpg" not in out.out
    assert main(["suggest", str(pool), "--model", str(tiny_model), "-n", "3", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["rank", "file", "guess", "prob", "why"] and f"3 of {n_readable} pictures" in table


def test_user_errors_are_one_line(tmp_path: Path, tiny_model, capsys):
    assert main(["suggest", str(tmp_path / "nope"), "--model", str(tiny_model)]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["suggest", str(tmp_path / "empty"), "--model", str(tiny_model), "--quiet"]) == 2
    assert "no pictures left to label" in capsys.readouterr().err
    assert main(["suggest", str(tmp_path / "empty"), "--model", str(tiny_model), "--mix", "best"]) == 2
    assert "--mix: expected one of" in capsys.readouterr().err
    assert main(["suggest", str(tmp_path / "empty"), "--model", str(tmp_path / "nope.safetensors")]) == 2
    assert "model file not found" in capsys.readouterr().err
    assert main(["suggest", str(tmp_path / "empty"), "--model", str(tiny_model), "--label", "--data",
                 str(tmp_path / "nodata"), "--no-browser", "--port", str(_free_port())]) == 2
    assert "give --data with the folder of class folders" in capsys.readouterr().err
    assert not any(p.name.startswith(".ursa") for p in (tmp_path / "empty").iterdir())  # the pool's lock went with it


# ---------------------------------------------------------------------------------------------
# Filing: the log first, a move that never overwrites, and a replay that finishes what a kill interrupted.


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _contents(*folders: Path) -> list[str]:
    """The sha256 of every picture under the folders (a picture in two places counts twice)."""
    return sorted(_digest(f) for d in folders for f in d.rglob("*") if f.is_file() and f.suffix == ".jpg")


def _log(pool: Path) -> list[dict[str, str]]:
    with open(pool / "label_log.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _two_folders(tmp_path: Path, n: int = 4) -> tuple[Path, Path, list[str]]:
    pool, data = tmp_path / "pool", tmp_path / "data"
    shutil.copytree(SAMPLE, data)
    pool.mkdir()
    names = []
    for i, f in enumerate(sorted((SAMPLE / "grizzly").iterdir())[:n]):
        shutil.copy(f, pool / f.name)
        names.append(f.name)
    return pool, data, names


def test_filing_moves_never_overwrites_and_is_idempotent(tmp_path: Path):
    pool, data, names = _two_folders(tmp_path)
    before = _contents(pool, data)
    filing = Filing(pool, data, ["black", "grizzly", "teddy"])
    dest, moved = filing.file(names[0], "grizzly", "grizzly")  # the same name is in data/grizzly already
    assert moved and dest == f"grizzly/{Path(names[0]).stem}-1.jpg"
    assert filing.file(names[0], "teddy") == (dest, False)  # a second press moves nothing
    assert not (pool / names[0]).exists() and _contents(pool, data) == before
    with pytest.raises(ValueError, match="unknown class"):
        filing.file(names[1], "panda")
    assert [r["file"] for r in _log(pool)] == [names[0]]


def test_replay_finishes_moves_a_kill_interrupted(tmp_path: Path):
    pool, data, names = _two_folders(tmp_path)
    before = _contents(pool, data)
    filing = Filing(pool, data, ["black", "grizzly", "teddy"])
    filing.file(names[0], "black")
    # killed after writing the row, before the link (1), and after the link, before unlinking the pool's name (2)
    filing._append(["t", names[1], "grizzly", "teddy", f"teddy/{names[1]}"])
    filing._append(["t", names[2], "grizzly", "black", f"black/{names[2]}"])
    os.link(pool / names[2], data / "black" / names[2])
    with open(pool / "label_log.csv", "ab") as f:
        f.write(b"2026-01-01T00:00:00,cut sho")  # and a row cut short
    again = Filing(pool, data, ["black", "grizzly", "teddy"])
    assert again.replay() == 2 and again.skipped_rows == 1
    assert sorted(p.name for p in pool.glob("*.jpg")) == [names[3]]
    assert (data / "teddy" / names[1]).is_file() and (data / "black" / names[2]).is_file()
    assert _contents(pool, data) == before  # nothing lost, nothing twice
    assert again.replay() == 0  # a second start has nothing left to do


# ---------------------------------------------------------------------------------------------
# The page in chromium, through the real command, with a kill -9 in the middle.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(pool: Path, data: Path, model: Path, port: int, log: Path) -> subprocess.Popen:
    return start_page(["suggest", str(pool), "--model", str(model), "--label", "--data", str(data), "--port", str(port),
                       "--no-browser", "--quiet", "-n", "10"], port, log)


@pytest.mark.browser
def test_label_in_the_browser_and_survive_kill_9(browser, tmp_path: Path, tiny_model, artifacts: Path):
    pool, data, names = _two_folders(tmp_path, 5)
    before = _contents(pool, data)
    n_data = len(list(data.rglob("*.jpg")))
    port = _free_port()
    proc = _start(pool, data, tiny_model, port, tmp_path / "page1.log")
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("body[data-ready='1'] .card.focused")
        wait_until(page, "[...document.images].every(i => i.complete)")
        page.screenshot(path=str(artifacts / "suggest_label.png"))
        state = page.evaluate("S.state")
        classes = state["classes"]
        first = page.locator(".card.focused").get_attribute("data-name")
        guess = next(it["guess"] for it in state["items"] if it["file"] == first)
        page.keyboard.press("Enter")  # the guess is right
        page.wait_for_selector(f".card.status-filed[data-name='{first}']")
        second = page.locator(".card.focused").get_attribute("data-name")
        assert second != first
        page.keyboard.press(str(classes.index("teddy") + 1))  # the guess is wrong: teddy
        page.wait_for_selector(f".card.status-filed[data-name='{second}']")
        assert "retrain with: ursa train" in page.locator("#retrain").inner_text()
        assert not errors, errors
    finally:
        page.close()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert not (pool / first).exists() and not (pool / second).exists()
    assert _digest(data / "teddy" / second) in before
    assert any(_digest(p) == _digest(SAMPLE / "grizzly" / first) for p in (data / guess).glob(f"{Path(first).stem}*.jpg"))
    # a third picture killed between its log row and its link, and the log cut mid-line
    # (one whose name data/black does not hold already: that would be another picture under a reused name, which
    # the replay rightly leaves in the pool; which names are left depends on the page's order)
    third = next(n for n in names if n not in (first, second) and not (data / "black" / n).exists())
    with open(pool / "label_log.csv", "a", encoding="utf-8") as f:
        f.write(f"2026-12-06T00:00:00,{third},grizzly,black,black/{third}\n2026-12-06T00:00:01,cut")

    port = _free_port()
    proc = _start(pool, data, tiny_model, port, tmp_path / "page2.log")
    page = browser.new_page()
    try:
        assert (data / "black" / third).is_file() and not (pool / third).exists()  # the replay finished it
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("body[data-ready='1'] .card.focused")
        shown = page.locator(".card").evaluate_all("cs => cs.map(c => c.dataset.name)")
        assert sorted(shown) == sorted(set(names) - {first, second, third})
        assert page.locator("#summary").inner_text().startswith("3 filed")
        fourth = page.locator(".card.focused").get_attribute("data-name")
        page.keyboard.press(str(classes.index("grizzly") + 1))
        page.wait_for_selector(f".card.status-filed[data-name='{fourth}']")
    finally:
        page.close()
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    assert "retrain with: ursa train" in (tmp_path / "page2.log").read_text()
    assert _contents(pool, data) == before  # every picture once: nothing lost, nothing duplicated
    assert len(list(data.rglob("*.jpg"))) == n_data + 4 and len(list(pool.glob("*.jpg"))) == 1
    assert [r["file"] for r in _log(pool) if len(r) == 5 and r["file"]] [-1] == fourth


def test_a_second_page_on_the_same_pool_is_refused(tmp_path: Path, tiny_model, capsys):
    from ursa.apps.label import LABEL_LOCK, LOCK_WHAT
    from ursa.util.lock import FolderLock

    pool, data, _ = _two_folders(tmp_path, 2)
    with FolderLock(pool, LABEL_LOCK, LOCK_WHAT):
        code = main(["suggest", str(pool), "--model", str(tiny_model), "--label", "--data", str(data), "--no-browser",
                     "--port", str(_free_port()), "--quiet"])
    assert code == 2 and "pool folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Review: hostile folders and a tampered log never lose, move or loop.


def test_a_class_name_taken_by_a_file_is_refused_not_looped(tmp_path: Path):
    pool, data, names = _two_folders(tmp_path)
    shutil.rmtree(data / "teddy")
    (data / "teddy").write_text("a note, not a folder")
    filing = Filing(pool, data, ["black", "grizzly", "teddy"])
    with pytest.raises(NotADirectoryError, match="teddy"):  # was: an endless loop appending rows to the log
        filing.file(names[0], "teddy")
    assert (pool / names[0]).is_file() and (data / "teddy").read_text() == "a note, not a folder"
    assert not (pool / "label_log.csv").exists()  # refused before the intent row


def test_a_link_in_the_pool_is_not_filed_as_a_link(tmp_path: Path):
    pool, data, names = _two_folders(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.jpg").write_bytes((pool / names[0]).read_bytes())
    os.symlink("../elsewhere/x.jpg", pool / "x.jpg")
    filing = Filing(pool, data, ["black", "grizzly", "teddy"])
    with pytest.raises(ValueError, match="link"):  # was: a dangling link filed into data/black
        filing.file("x.jpg", "black")
    assert (pool / "x.jpg").is_symlink() and not list(data.rglob("x*.jpg"))


@pytest.mark.parametrize("name", ["label_log.csv", "sub", ".", "", "../outside.jpg"])
def test_replay_of_a_tampered_row_moves_nothing(tmp_path: Path, name: str):
    pool, data, names = _two_folders(tmp_path)
    (pool / "sub").mkdir()
    (tmp_path / "outside.jpg").write_bytes(b"theirs")
    filing = Filing(pool, data, ["black", "grizzly", "teddy"])
    filing.file(names[0], "black")
    before = _contents(pool, data)
    filing._append(["t", name, "", "black", f"black/{Path(name).name or 'x'}.jpg"])
    again = Filing(pool, data, ["black", "grizzly", "teddy"])
    assert again.replay() == 0 and again.skipped_rows == 1  # was: the log itself moved into data; a folder crashed every start
    assert (pool / "label_log.csv").is_file() and (pool / "sub").is_dir() and (tmp_path / "outside.jpg").is_file()
    assert _contents(pool, data) == before


def test_a_pool_overlapping_the_data_folder_is_refused(tmp_path: Path, tiny_model, capsys):
    pool, data, names = _two_folders(tmp_path)
    (data / "unlabelled").mkdir()
    shutil.copy(pool / names[0], data / "unlabelled" / names[0])
    inner = pool / "labelled"
    shutil.copytree(data, inner)
    before = _contents(tmp_path)
    for p, d in ((data, data), (data / "unlabelled", data), (pool, inner)):  # was: the page opened on them
        assert main(["suggest", str(p), "--model", str(tiny_model), "--label", "--data", str(d), "--no-browser",
                     "--quiet", "--port", str(_free_port())]) == 2
        assert "apart from the data folder" in capsys.readouterr().err
    assert _contents(tmp_path) == before and not list(tmp_path.rglob("label_log.csv"))


def test_filing_across_file_systems_copies_whole_and_synced_before_the_pool_name_goes(tmp_path: Path, monkeypatch):
    import errno

    import ursa.apps.label.filing as filing_mod

    pool, data, names = _two_folders(tmp_path)
    before = _contents(pool, data)
    calls = []

    def no_link(src, dst, *a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    real_fsync, real_unlink = os.fsync, os.unlink
    monkeypatch.setattr(filing_mod.os, "link", no_link)
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "unlink", lambda p, *a, **k: (calls.append(("unlink", Path(p).name)), real_unlink(p, *a, **k))[1])
    dest, moved = Filing(pool, data, ["black", "grizzly", "teddy"]).file(names[1], "black")
    assert moved and (data / dest).is_file() and not (pool / names[1]).exists()
    assert _contents(pool, data) == before and not list(data.rglob(".*.tmp"))
    gone = calls.index(("unlink", names[1]))
    assert calls[:gone].count("fsync") >= 2  # the log row and the copy (was: the copy never synced before the unlink)


def test_a_reused_name_in_a_refilled_pool_is_not_filed_under_the_old_label(tmp_path: Path):
    pool, data, names = _two_folders(tmp_path)
    filing = Filing(pool, data, ["black", "grizzly", "teddy"])
    filing.file(names[0], "black")
    shutil.copy(pool / names[1], pool / names[0])  # a new batch: another picture, the camera's same name
    before = _contents(pool, data)
    again = Filing(pool, data, ["black", "grizzly", "teddy"])
    assert again.replay() == 0  # was: moved into data/black under the old row, unasked
    assert (pool / names[0]).is_file() and _contents(pool, data) == before
    dest, moved = again.file(names[0], "teddy")  # was: "already filed", nothing moved
    assert moved and dest.startswith("teddy/") and not (pool / names[0]).exists()

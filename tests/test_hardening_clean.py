"""Issue 29, the cleaner: one `ursa clean` per data folder, and cleaned.csv rebuilt from the whole log."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

from ursa.apps import clean

ROOT = Path(__file__).resolve().parents[1]


def _cleaned(root: Path) -> dict[str, str]:
    with open(root / "cleaned.csv", newline="") as f:
        return {r["name"]: r["label"] for r in csv.DictReader(f)}


def test_two_cleaners_on_one_folder_lose_no_decision(tmp_path: Path) -> None:
    """A excludes 20 pictures, B relabels 20 others, interleaved: cleaned.csv holds all 40 (the log has them)."""
    names = [f"a/{i}.jpg" for i in range(40)] + [f"b/{i}.jpg" for i in range(40)]
    labels = [n.split("/")[0] for n in names]
    a = clean.Decisions(tmp_path, names, labels, ["a", "b"])
    b = clean.Decisions(tmp_path, names, labels, ["a", "b"])
    for i in range(20):
        a.decide(f"a/{i}.jpg", "exclude")
        b.decide(f"b/{i}.jpg", "relabel", "a")
    rows = _cleaned(tmp_path)
    assert not any(f"a/{i}.jpg" in rows for i in range(20))  # A's exclusions
    assert all(rows[f"b/{i}.jpg"] == "a" for i in range(20))  # B's relabels
    assert len(rows) == 60
    assert b.summary()["excluded"] == 20 and b.summary()["relabelled"] == 20  # B sees A's decisions too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HOLD = """
import sys, time
from ursa.util.lock import FolderLock
with FolderLock(sys.argv[1], ".ursa-clean.lock", "data folder"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_cleaner_on_a_folder_is_refused_naming_the_first(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from ursa.cli import main

    data = tmp_path / "data"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        Image.new("RGB", (32, 32), (10, 200, 10)).save(data / c / "x.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(data)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = main(["clean", str(data), "--model", str(tmp_path / "model.safetensors"), "--no-browser",
                   "--port", str(_free_port()), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and f"pid {holder.pid}" in err and "another ursa process" in err, err
        assert len(err.strip().splitlines()) == 1, err
    finally:
        holder.kill()
        holder.wait()
    assert not (data / "cleaned.csv").exists() and not (data / "clean_log.csv").exists()


def test_the_cleaner_releases_its_lock_when_it_stops(tmp_path: Path, capsys) -> None:
    """A failed start (no model file there) leaves no lock file in the user's folder and no lock held."""
    from PIL import Image

    from ursa.cli import main
    from ursa.util.lock import FolderLock

    data = tmp_path / "data"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        Image.new("RGB", (32, 32), (10, 200, 10)).save(data / c / "x.png")
    rc = main(["clean", str(data), "--model", str(tmp_path / "nope.safetensors"), "--no-browser",
               "--port", str(_free_port()), "--quiet"])
    assert rc == 2
    assert not (data / ".ursa-clean.lock").exists()
    with FolderLock(data, ".ursa-clean.lock", "data folder"):
        pass


def test_a_lock_in_a_folder_ursa_cannot_write_is_one_line(tmp_path: Path) -> None:
    import pytest

    from ursa.errors import WriteError
    from ursa.util.lock import FolderLock

    (tmp_path / ".ursa.lock").symlink_to(tmp_path / "elsewhere")  # O_NOFOLLOW: never a lock through a link
    with pytest.raises(WriteError, match="cannot create ursa's lock file"):
        FolderLock(tmp_path, ".ursa.lock", "run folder").acquire()
    assert not (tmp_path / "elsewhere").exists()

"""ursa studio under a demanding user: the cleaner's lock shared with `ursa clean`, names that are not UTF-8
or not NFC, URL lists into any class name, and training children that end with the studio."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image
from starlette.testclient import TestClient

from conftest import ROOT, SAMPLE
from ursa.apps.studio import Studio, create_app
from ursa.apps.studio.jobs import Job
from ursa.util.files import csv_row_values


def jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_studios_cleaner_and_ursa_clean_refuse_each_other_naming_the_holder(tiny_run: Path, tmp_path: Path, capsys):
    from ursa.apps.clean import CLEAN_LOCK, LOCK_WHAT
    from ursa.cli import main
    from ursa.util.lock import FolderLock

    project, runs = tmp_path / "bears", tmp_path / "runs"
    shutil.copytree(SAMPLE, project)
    shutil.copytree(tiny_run, runs / "run-1")
    studio = Studio(project, runs, threads=1)
    with TestClient(create_app(studio, "127.0.0.1", 8766), base_url="http://127.0.0.1:8766") as c:
        assert c.get("/api/results").json()["run"] == str(runs / "run-1")
        with FolderLock(project, CLEAN_LOCK, LOCK_WHAT):  # `ursa clean` is running on the folder
            opened = c.post("/api/clean/open", json={}).json()
            assert "another ursa process" in opened["error"] and f"pid {os.getpid()}" in opened["error"]  # the panel says so
            assert studio.review.session is None
        opened = c.post("/api/clean/open", json={}).json()  # it finished: the studio's cleaner opens
        assert "error" not in opened and opened["losses"], opened
        port = _port()
        assert main(["clean", str(project), "--model", str(runs / "run-1" / "model.safetensors"), "--no-browser",
                     "--port", str(port)]) == 2  # and now `ursa clean` is the one refused, in one line
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "another ursa process" in err and f"pid {os.getpid()}" in err, err
        first = opened["classes"][0]
        name, other = [r["name"] for r in opened["losses"] if r["label"] != first][:2]
        assert c.post("/api/clean/decide", json={"name": name, "action": "exclude"}).status_code == 200
        assert c.post("/api/clean/decide", json={"name": other, "action": "relabel", "label": first}).status_code == 200
        c.post("/api/classes", json={"action": "rename", "name": first, "new": "renamed"})  # after the model pass
        assert c.post("/api/clean/apply", json={}).json() == {"relabelled": 0, "excluded": 1, "skipped": 1}
        assert (project / other).is_file() and not (project / first).exists()  # left as it is; the class not made again
        assert not (project / name).exists() and len(list((project / "_removed").rglob(Path(name).name))) == 1
        with FolderLock(project, CLEAN_LOCK, LOCK_WHAT):  # applied: the studio let go of the folder
            pass
        c.post("/api/clean/open", json={})
    assert studio.review.lock is None  # the studio's end released it too
    with FolderLock(project, CLEAN_LOCK, LOCK_WHAT):
        pass


def test_names_that_are_not_utf8_or_in_nfd_never_break_the_page(tmp_path: Path):
    project = tmp_path / "proj"
    nfd = unicodedata.normalize("NFD", "café")  # as macOS writes names
    (project / nfd).mkdir(parents=True)
    (project / nfd / "a.jpg").write_bytes(jpeg_bytes(1))
    (project / "ok").mkdir()
    (project / "ok" / "b.jpg").write_bytes(jpeg_bytes(2))
    raw = os.fsencode(str(project))
    os.mkdir(raw + b"/bad\xff")  # a folder whose name is not UTF-8
    with open(raw + b"/ok/pic\xfe.jpg", "wb") as f:
        f.write(jpeg_bytes(3))
    studio = Studio(project, tmp_path / "runs")
    with TestClient(create_app(studio, "127.0.0.1", 8766), base_url="http://127.0.0.1:8766") as c:
        state = c.get("/api/state")
        assert state.status_code == 200
        assert [k["name"] for k in state.json()["classes"]] == ["bad\udcff", nfd, "ok"]  # sent back as \udcff
        assert c.get("/api/images", params={"class": "ok"}).json()["names"][0] == "pic\udcfe.jpg"
        bad = c.post("/api/add", params={"class": "bad\ufffd", "name": "x.jpg"}, content=jpeg_bytes(4),
                     headers={"Content-Type": "image/jpeg"})  # what the page sends for that class: one line, no 500
        assert bad.status_code == 400 and "no class" in bad.json()["error"]
        nfc = unicodedata.normalize("NFC", "café")
        assert c.get("/api/images", params={"class": nfc}).json()["names"] == ["a.jpg"]  # found by its NFC name
        added = c.post("/api/add", params={"class": nfc, "name": "x.jpg"}, content=jpeg_bytes(5),
                       headers={"Content-Type": "image/jpeg"})
        assert added.status_code == 200 and (project / nfd / "x.jpg").is_file()  # into the folder that is there
        twin = c.post("/api/classes", json={"action": "create", "name": nfc})  # a second "café" would be a trap
        assert twin.status_code == 400 and "exists already" in twin.json()["error"]
        (project / "tea").mkdir()
        assert c.post("/api/classes", json={"action": "rename", "name": "tea", "new": nfc}).status_code == 400
        assert c.post("/api/classes", json={"action": "remove", "name": nfc}).status_code == 200
    assert sorted(os.listdir(project)) == ["_removed", "bad\udcff", "ok", "tea"]
    (kept,) = (project / "_removed").iterdir()
    assert sorted(os.listdir(kept)) == ["a.jpg", "x.jpg"]  # moved whole, never deleted


def test_a_url_list_lands_in_classes_named_with_equals_or_a_leading_dash(tmp_path: Path):
    studio = Studio(tmp_path / "proj", tmp_path / "runs")
    for cls in ("a=b", "-rf"):
        studio.project.create(cls)
        job = studio.jobs.download(cls, ["http://127.0.0.1:9/cat.jpg"])
        job.proc.wait(120)
        assert job.state == "done", job.tail()
    with (studio.project.root / "downloads.csv").open(newline="") as f:
        head, *rows = [csv_row_values(r) for r in csv.reader(f)]  # "-rf" is stored as "'-rf" (no formula)
    col = {k: i for i, k in enumerate(head)}
    assert [(r[col["class"]], r[col["status"]]) for r in rows] == [("a=b", "refused"), ("-rf", "refused")]  # private
    assert studio.project.classes() == ["-rf", "a=b"]  # no class "a" made from "a=b"


def test_a_job_ends_when_the_studio_is_killed(tmp_path: Path):
    """kill -9 of the studio: its child (here a second studio, a long-running `ursa` command) ends too."""
    out, port = tmp_path / "child.pid", _port()
    child = [sys.executable, "-m", "ursa", "studio", str(tmp_path / "other"), "--no-browser", "--port", str(port)]
    parent = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path\n"
              "from ursa.apps.studio.jobs import Job\n"
              f"job = Job('train', {child!r}, Path({str(tmp_path)!r}), Path({str(tmp_path / 'console.txt')!r}))\n"
              f"job.start(); Path({str(out)!r}).write_text(str(job.proc.pid)); time.sleep(600)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", parent], env=env)
    try:
        end = time.monotonic() + 60
        while True:  # the child is up once it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < end, (tmp_path / "console.txt").read_text()
                time.sleep(0.1)
        pid = int(out.read_text())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        end = time.monotonic() + 30
        while _alive(pid):
            assert time.monotonic() < end, "the studio's child outlived it"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        if out.exists() and _alive(int(out.read_text())):
            os.kill(int(out.read_text()), signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_the_studio_and_the_cleaners_lock_name_import_without_torch():
    """`import ursa.apps.clean` loads its names lazily: the studio (and the notebook's lock) pay no torch import."""
    code = ("import sys; import ursa.apps.clean as c; from ursa.apps.clean import CLEAN_LOCK, LOCK_WHAT\n"
            "import ursa.apps.studio, ursa.apps.studio.review, ursa.cli.studio\n"
            "assert 'torch' not in sys.modules, 'torch'\n"
            "assert callable(c.prepare) and c.CLEAN_LOCK == '.ursa-clean.lock' and 'prepare' in dir(c)\n"
            "print('ok')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_applying_decisions_moves_files_on_a_file_system_without_hard_links(tmp_path: Path, monkeypatch):
    from ursa.apps.studio import review

    (tmp_path / "a").mkdir()
    src, taken = tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg"
    src.write_bytes(b"photo")
    taken.parent.mkdir()
    taken.write_bytes(b"another")

    def no_links(a, b):
        raise PermissionError(1, "Operation not permitted")  # what exFAT and some network shares answer

    monkeypatch.setattr(os, "link", no_links)
    moved = review.move_no_clobber(src, taken)
    assert moved.parent == taken.parent and moved != taken and moved.read_bytes() == b"photo" and not src.exists()
    assert taken.read_bytes() == b"another"  # never over a file that is there


def test_a_frame_arriving_as_its_class_is_removed_never_brings_the_class_back(tmp_path: Path, monkeypatch):
    from ursa.apps.studio import Project, ProjectError, project as project_module

    p = Project(tmp_path / "proj")
    p.create("cats")
    looked_up = p.folder

    def then_removed(cls):  # Remove clicked between the frame's look-up and its write
        folder = looked_up(cls)
        monkeypatch.setattr(p, "folder", looked_up)
        p.remove(cls)
        return folder

    monkeypatch.setattr(p, "folder", then_removed)
    try:
        p.add("cats", jpeg_bytes(9))
    except ProjectError as e:
        assert "removed or renamed" in str(e)
    else:
        raise AssertionError("the frame was written")
    assert p.classes() == [] and project_module.REMOVED in os.listdir(p.root)  # not made again by the write

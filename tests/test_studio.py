"""ursa studio without a browser: the project's folders, a cancelled training, a kill -9 mid-capture,
the live answer equal to serve's, and the same guards as the cleaner."""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from conftest import ROOT, make_image
from ursa.apps.studio import Project, ProjectError, Studio, create_app
from ursa.apps.studio.jobs import TrainOptions
from ursa.vision.images import check_image


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (ursa's own hidden lock aside) -> sha256 of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def jpeg_bytes(seed: int, size=(80, 60)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def two_classes(root: Path, n: int = 20) -> Path:
    for k, (name, colour) in enumerate((("red", (210, 40, 40)), ("blue", (40, 60, 210)))):
        for i in range(n):
            make_image(root / name / f"{name}{i}.jpg", tuple(int(c) ^ (i * 7) for c in colour), size=(64, 64))
    return root


# --- the project's folders ----------------------------------------------------------------------


def test_classes_are_folders_and_removing_one_moves_it_never_deletes(tmp_path: Path):
    p = Project(tmp_path / "proj")
    p.create("cats")
    p.create("dogs")
    with pytest.raises(ProjectError, match="exists already"):
        p.create("cats")
    for bad in ("", "_hidden", ".dot", "a/b", "x\ny", "models"):
        with pytest.raises(ProjectError):
            p.create(bad)
    for i in range(3):
        assert p.add("cats", jpeg_bytes(i), f"photo {i}.JPG").ok
    before = snapshot(p.root / "cats")
    assert sorted(before) == ["photo-0.jpg", "photo-1.jpg", "photo-2.jpg"]
    assert p.rename("cats", "kittens") == "kittens" and p.classes() == ["dogs", "kittens"]
    with pytest.raises(ProjectError, match="exists already"):
        p.rename("kittens", "dogs")
    moved = p.remove("kittens")
    assert p.classes() == ["dogs"]
    assert moved.parent == p.root / "_removed" and snapshot(moved) == before  # every byte kept, recoverable
    from ursa.vision.data import load_dataset

    for i in range(6):
        make_image(p.root / "birds" / f"b{i}.png")
        make_image(p.root / "dogs" / f"d{i}.png")
    assert load_dataset(p.root, valid_pct=0.5).classes == ["birds", "dogs"]  # training never reads _removed/


def test_an_upload_is_written_whole_and_a_broken_one_goes_to_quarantine_with_the_reason(tmp_path: Path):
    p = Project(tmp_path / "proj")
    p.create("cats")
    good = jpeg_bytes(1)
    a = p.add("cats", good, "../../etc/passwd.jpg")  # a name is a name, never a path
    assert a.ok and a.name == "passwd.jpg" and (p.root / "cats" / "passwd.jpg").read_bytes() == good
    b = p.add("cats", good, "passwd.jpg")  # never over an existing file
    assert b.name == "passwd-2.jpg" and b.duplicate_of == "cats/passwd.jpg"  # and flagged: the same picture
    png = p.add("cats", make_image(tmp_path / "x.png").read_bytes(), "x.jpg")
    assert png.name == "x.png"  # the suffix the bytes call for
    broken = p.add("cats", good[: len(good) // 2], "cut.jpg")
    assert not broken.ok and broken.reason.startswith("truncated")
    assert broken.name == "_quarantine/cats/cut.jpg" and (p.root / broken.name).read_bytes() == good[: len(good) // 2]
    rows = list(csv.DictReader((p.root / "verify.csv").open()))
    assert [(r["file"], r["status"]) for r in rows] == [("cats/cut.jpg", "quarantined")] and "truncated" in rows[0]["reason"]
    assert sorted(p.images("cats")) == ["passwd-2.jpg", "passwd.jpg", "x.png"] and p.counts() == {"cats": 3}
    with pytest.raises(ProjectError):
        p.image_path("cats", "../verify.csv")
    p.create("dogs")
    p.add("dogs", good, "same.jpg")
    assert ["cats/passwd.jpg", "dogs/same.jpg"] in p.leakage()  # one picture in two classes


def test_a_temp_file_left_by_a_kill_is_swept_and_nothing_else(tmp_path: Path):
    p = Project(tmp_path / "proj")
    p.create("cats")
    left = p.root / "cats" / ".cam-1.jpg.abcd1234.tmp"
    mine = p.root / "cats" / ".notes.txt.abcd1234.tmp"
    for f in (left, mine):
        f.write_bytes(b"half")
        os.utime(f, (time.time() - 60, time.time() - 60))
    assert p.sweep() == [left] and mine.exists()


# --- training in a child process ----------------------------------------------------------------


def test_a_cancelled_training_leaves_the_projects_images_untouched(tmp_path: Path):
    project = two_classes(tmp_path / "proj")
    before = snapshot(project)
    studio = Studio(project, tmp_path / "runs")
    job = studio.jobs.train(TrainOptions(epochs=100, budget=0, size=64))
    with pytest.raises(Exception, match="running"):
        studio.jobs.train(TrainOptions())  # one at a time
    end = time.monotonic() + 120
    while not job.run.exists() and job.state == "running":  # cancel once it has started writing its run
        assert time.monotonic() < end, job.tail()
        time.sleep(0.1)
    studio.jobs.cancel()
    assert job.state == "cancelled" and job.proc.returncode is not None
    assert snapshot(project) == before  # nothing added, changed or removed in the project
    assert job.console.is_file() and job.console.parent == tmp_path / "runs"


# --- kill -9 mid-capture ------------------------------------------------------------------------


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, body: bytes, ctype: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request(method, path, body=body, headers={"Content-Type": ctype, "Host": f"127.0.0.1:{port}"})
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"null")


def test_kill_9_mid_capture_loses_at_most_the_frame_being_written(tmp_path: Path):
    project, port = tmp_path / "proj", _port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ursa", "studio", str(project), "--no-browser", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < end, proc.stdout.read().decode() if proc.poll() else "no port"
                time.sleep(0.1)
        assert _request(port, "POST", "/api/classes", b'{"action": "create", "name": "cam"}', "application/json")[0] == 200
        acked: dict[str, bytes] = {}
        sent: list[bytes] = []
        stop = threading.Event()

        def capture() -> None:  # the page's webcam loop: frame after frame
            k = 0
            while not stop.is_set():
                frame = jpeg_bytes(100 + k, (320, 240))
                sent.append(frame)
                try:
                    status, answer = _request(port, "POST", "/api/add?class=cam", frame, "image/jpeg")
                except OSError:
                    return
                assert status == 200 and answer["ok"]
                acked[answer["name"]] = frame
                k += 1

        t = threading.Thread(target=capture, daemon=True)
        t.start()
        while len(acked) < 15:
            assert t.is_alive() and time.monotonic() < end + 60
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # mid-capture: the next frame is on its way
        proc.wait(10)
        stop.set()
        t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    folder = project / "cam"
    on_disk = {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}
    for name, frame in acked.items():  # every frame answered is there, whole
        assert on_disk.get(name) == frame, name
    extra = set(on_disk) - set(acked)
    assert len(extra) <= 1  # the frame being written (complete: written whole or not at all)
    for name in extra:
        assert on_disk[name] in sent
    for name in on_disk:
        check_image(folder / name)  # every file decodes: no half-written image under an image's name
    assert len([p for p in folder.iterdir() if p.name.startswith(".")]) <= 1  # at most its hidden temp file


# --- live prediction is serve's answer ----------------------------------------------------------


def test_live_prediction_is_what_serve_answers_on_the_validation_images(tiny_run: Path):
    from ursa.apps.serve import create_app as serve_app
    from ursa.apps.studio.review import Live

    live = Live(threads=1)
    live.load(tiny_run)
    rows = [r for r in csv.DictReader((tiny_run / "split.csv").open()) if r["is_valid"].lower() in ("true", "1")]
    root = Path(json.loads((tiny_run / "config.json").read_text())["data"])
    assert len(rows) >= 20
    with TestClient(serve_app(tiny_run / "model.safetensors")) as client:
        for r in rows:
            data = (root / r["name"]).read_bytes()
            ours = live.predict(data)
            ours.pop("ms")
            theirs = client.post("/predict", content=data, headers={"Content-Type": "image/jpeg"}).json()
            assert {k: theirs[k] for k in ours} == ours, r["name"]  # the same label, probabilities, unsure, unknown


# --- the same guards as the cleaner -------------------------------------------------------------


@pytest.fixture
def client(tmp_path: Path):
    studio = Studio(tmp_path / "proj", tmp_path / "runs")
    studio.project.create("cats")
    with TestClient(create_app(studio, "127.0.0.1", 8766), base_url="http://127.0.0.1:8766") as c:
        yield c, studio


def test_only_this_page_may_change_the_project(client):
    c, studio = client
    frame = jpeg_bytes(0)
    assert c.post("/api/add?class=cats", content=frame, headers={"Content-Type": "image/jpeg"}).status_code == 200
    other = {"Origin": "http://evil.example", "Content-Type": "image/jpeg"}
    assert c.post("/api/add?class=cats", content=frame, headers=other).status_code == 403
    assert c.post("/api/add?class=cats", content=frame, headers={"Host": "evil.example:8766", "Content-Type": "image/jpeg"}).status_code == 403
    form = c.post("/api/classes", content=b"action=remove&name=cats", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415  # what a form elsewhere can send is refused
    assert c.post("/api/add?class=cats", content=frame, headers={"Content-Type": "text/plain"}).status_code == 415
    big = c.post("/api/add?class=cats", content=b"\xff" * (25 * 1024 * 1024 + 1), headers={"Content-Type": "image/jpeg"})
    assert big.status_code == 413 and "over the limit" in big.json()["error"]
    assert c.get("/thumb", params={"class": "cats", "name": "../../etc/passwd"}).status_code == 400
    outside = make_image(studio.project.root.parent / "secret.png")
    (studio.project.root / "cats" / "link.png").symlink_to(outside)
    assert c.get("/thumb", params={"class": "cats", "name": "link.png"}).status_code == 400
    assert c.get("/download/config.json").status_code == 404
    assert c.post("/api/predict", content=frame, headers={"Content-Type": "image/jpeg"}).status_code == 409  # no model yet
    assert c.post("/api/train", json={"epochs": "lots"}).status_code == 400
    bad = c.post("/api/train", json={"balance": "oversample"})
    assert bad.status_code == 400 and "expected one of auto, none" in bad.json()["error"]
    assert studio.project.counts() == {"cats": 2}  # the photo and the user's link, nothing else
    page = c.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"] and "https://" not in page.text


def test_a_second_studio_on_the_project_and_runs_inside_it_are_refused_in_one_line(tmp_path: Path, capsys):
    from ursa.cli import main
    from ursa.cli.studio import STUDIO_LOCK
    from ursa.util.lock import FolderLock

    project = tmp_path / "proj"
    assert main(["studio", str(project), "--runs", str(project / "runs"), "--no-browser", "--port", str(_port())]) == 2
    assert "must be outside the data folder" in capsys.readouterr().err
    with FolderLock(project, STUDIO_LOCK, "project folder"):
        assert main(["studio", str(project), "--no-browser", "--port", str(_port())]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_url_list_goes_through_downloads_safe_fetcher(client):
    c, studio = client
    r = c.post("/api/urls", json={"class": "cats", "urls": ["http://127.0.0.1:9/cat.jpg", " "]})
    assert r.status_code == 200 and r.json()["kind"] == "download"
    assert c.post("/api/urls", json={"class": "nope", "urls": ["http://x/y.jpg"]}).status_code == 400
    job = studio.jobs.current
    job.proc.wait(120)
    assert job.state == "done", job.tail()
    rows = list(csv.DictReader((studio.project.root / "downloads.csv").open()))
    assert [(r["url"], r["status"]) for r in rows] == [("http://127.0.0.1:9/cat.jpg", "refused")]  # a private address
    assert studio.project.counts() == {"cats": 0}


def test_ship_makes_the_checked_int8_copy_and_says_the_exact_commands(tiny_run: Path, tmp_path: Path):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "run-1")  # a run the CLI wrote: the studio picks it up
    data = Path(json.loads((tiny_run / "config.json").read_text())["data"])
    studio = Studio(data, runs)
    with TestClient(create_app(studio, "127.0.0.1", 8766), base_url="http://127.0.0.1:8766") as c:
        r = c.get("/api/results").json()
        assert r["files"] == {"model.safetensors": True, "model.onnx": True, "model.int8.onnx": False}
        assert r["ship"]["serve"] == f"ursa serve {runs / 'run-1' / 'model.safetensors'}"
        assert f"-v {runs / 'run-1' / 'model.onnx'}:/model/model.onnx:ro ursa-serve" in r["ship"]["docker"][1]
        assert c.post("/api/int8", json={}).json()["kind"] == "int8"
        studio.jobs.current.proc.wait(300)
        assert studio.jobs.current.state == "done", studio.jobs.current.tail()
        r = c.get("/api/results").json()
        assert r["files"]["model.int8.onnx"] and r["int8"]["agreement"] >= 0.9
        got = c.get("/download/model.int8.onnx")
        assert got.status_code == 200 and got.content == (runs / "run-1" / "model.int8.onnx").read_bytes()
        assert c.get("/run/batch.png").headers["content-type"] == "image/png"
        name = r["top_losses"][0][0]  # a top loss with the model's evidence over it, as serve's /explain draws it
        heat = c.get("/heat", params={"class": name.split("/")[0], "name": name.split("/", 1)[1]})
        assert heat.status_code == 200 and Image.open(io.BytesIO(heat.content)).format == "PNG"


def test_a_batch_preview_is_ursa_shows_grid(tmp_path: Path):
    project = two_classes(tmp_path / "proj", n=6)
    studio = Studio(project, tmp_path / "runs")
    with TestClient(create_app(studio, "127.0.0.1", 8766), base_url="http://127.0.0.1:8766") as c:
        assert c.get("/preview.png").status_code == 404
        assert c.post("/api/preview", json={}).json()["kind"] == "preview"
        studio.jobs.current.proc.wait(180)
        assert studio.jobs.current.state == "done", studio.jobs.current.tail()
        got = c.get("/preview.png")
        assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size[0] > 100
    assert not (project / "batch.png").exists()  # written beside the runs, never into the project


def test_a_home_like_folder_is_refused_in_one_line_and_left_alone(tmp_path: Path, monkeypatch, capsys):
    """`ursa studio ~` would show Documents and Music as empty classes (and the page can move a class aside)."""
    from ursa.apps.studio import not_a_project
    from ursa.cli import main

    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "letter.pdf").write_bytes(b"%PDF-1.4")
    (home / "Music").mkdir()
    (home / "Music" / "song.mp3").write_bytes(b"ID3")
    make_image(home / "Pictures" / "a.jpg")
    before = sorted(p.relative_to(home) for p in home.rglob("*"))
    assert "Documents, Music" in not_a_project(home)
    import ursa.apps.studio as studio_pkg

    def must_not_serve(*a, **k):
        raise AssertionError("the studio started on a folder that is no project")
    monkeypatch.setattr(studio_pkg, "serve", must_not_serve)
    with socket.socket() as sock:  # a port nobody holds (check_port would refuse a taken one first)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["studio", str(home), "--no-browser", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a project folder" in err and "Documents" in err, err
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == before  # nothing made, no lock, no runs folder
    assert not (tmp_path / "home-runs").exists()
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    assert not_a_project(tmp_path / "elsewhere") == "the home folder" and not_a_project(Path("/")) != ""
    # a project (class folders of images, an empty new class, a missing folder) is one
    make_image(tmp_path / "bears" / "teddy" / "t.jpg")
    (tmp_path / "bears" / "grizzly").mkdir()
    assert not_a_project(tmp_path / "bears") == "" and not_a_project(tmp_path / "new") == ""
    make_image(tmp_path / "split" / "train" / "teddy" / "t.jpg")  # train/ and valid/ of class folders
    make_image(tmp_path / "split" / "valid" / "teddy" / "v.jpg")
    (tmp_path / "bears" / "grizzly" / "Thumbs.db").write_bytes(b"\0")  # a file manager's sidecar only
    assert not_a_project(tmp_path / "split") == "" and not_a_project(tmp_path / "bears") == ""


def test_the_pages_training_options_become_the_commands_flags():
    from ursa.apps.studio.jobs import TrainOptions

    opts = TrainOptions.from_json({"epochs": "3", "budget": 0, "size": "", "balance": "sampler"})
    assert opts.argv() == ["--epochs", "3", "--budget", "0", "--balance", "sampler"]
    assert TrainOptions.from_json({"balance": ""}).argv() == []  # auto: the recipe decides
    for body in ({"balance": 3}, {"balance": "--epochs"}, {"size": "31"}, {"epochs": True}):
        with pytest.raises(ValueError, match="expected"):
            TrainOptions.from_json(body)

"""ursa clean: rankings find planted problems, decisions survive everything, the page is safe and works."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ursa.apps import clean
from ursa.apps.clean import decisions, ranking
from ursa.cli import main
from ursa.errors import UrsaError

from tests.conftest import SAMPLE, make_image, start_page, wait_until

PORT = 8765  # the Host header the in-process app is told is its own


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file except the two CSVs the cleaner owns."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in (clean.CLEANED_NAME, clean.LOG_NAME):
            out[p.relative_to(root).as_posix()] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def _inject(root: Path) -> dict[str, str]:
    """An exact copy, a resized re-encoded copy and a broken file, planted in a copy of the sample."""
    src = sorted((root / "grizzly").glob("*.jpg"))[3]
    exact = root / "grizzly" / "zz_exact_copy.jpg"
    shutil.copyfile(src, exact)
    im = Image.open(src).convert("RGB")
    resized = root / "teddy" / "zz_resized_copy.jpg"  # across classes: one of the two labels is wrong
    im.resize((im.width * 2 // 3, im.height * 2 // 3), Image.Resampling.LANCZOS).save(resized, "JPEG", quality=70)
    broken = root / "black" / "zz_broken.jpg"
    data = src.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    return {"src": rel(src), "exact": rel(exact), "resized": rel(resized), "broken": rel(broken)}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_model):
    """The sample plus planted duplicates and a broken file, scored once by the tiny model."""
    root = tmp_path_factory.mktemp("planted") / "bears"
    shutil.copytree(SAMPLE, root)
    names = _inject(root)
    ds, scores, ranks = clean.prepare(root, tiny_model, quiet=True)
    return root, names, ds, scores, ranks


# ---------------------------------------------------------------------------------------------
# Rankings on synthetic numbers, where the answer is known.


def _blobs(n_per: int = 60, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim)) * 3
    x = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(3), n_per)
    return x, y


def test_confident_learning_finds_flipped_labels_first():
    x, y = _blobs()
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(y), 9, replace=False)
    noisy = y.copy()
    noisy[flipped] = (noisy[flipped] + 1 + rng.integers(0, 2, 9)) % 3
    oof = ranking.out_of_fold_probs(x, noisy, 3)
    assert oof.shape == (180, 3) and np.allclose(oof.sum(1), 1)
    issues, quality, confident = ranking.label_issues(noisy, oof)
    assert len(set(issues[:9].tolist()) & set(flipped.tolist())) >= 8
    assert list(quality[issues]) == sorted(quality[issues])  # most likely errors first
    assert len(issues) <= 12  # few false alarms on clean points
    assert set(np.flatnonzero(confident)) <= set(issues.tolist())  # confident learning's set is in the list
    assert set(np.flatnonzero(oof.argmax(1) != noisy)) <= set(issues.tolist())  # and so is every disagreement


def _scores(probs, labels, emb, hashes=None, unreadable=None) -> clean.Scores:
    n = len(labels)
    probs = np.asarray(probs, dtype=np.float32)
    loss = -np.log(probs[np.arange(n), labels])
    for i in unreadable or {}:
        probs[i] = np.nan
        loss[i] = np.nan
    return clean.Scores([f"c{labels[i]}/img{i}.jpg" for i in range(n)], np.asarray(labels), ["a", "b", "c"], probs,
                        loss.astype(np.float32), np.asarray(emb, dtype=np.float32), hashes or [f"h{i}" for i in range(n)],
                        dict(unreadable or {}))


def test_rank_orders_top_losses_and_skips_unreadable():
    x, y = _blobs(20)
    rng = np.random.default_rng(3)
    probs = rng.dirichlet([1, 1, 1], size=len(y))
    s = _scores(probs, y, x, unreadable={5: "truncated: cut short"})
    r = clean.rank(s)
    assert 5 not in r.top_losses and len(r.top_losses) == len(y) - 1
    losses = s.loss[r.top_losses]
    assert np.all(np.diff(losses) <= 0)
    assert np.isnan(r.quality[5]) and r.suggested[5] == -1 and 5 not in r.issues


def test_duplicates_exact_and_near_within_and_across_classes():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(8, 64)).astype(np.float32)
    emb[3] = emb[1] + 0.01 * rng.normal(size=64)  # near-duplicate of 1
    emb[6] = emb[2] * 3  # same direction: cosine 1 (embeddings are normalised)
    hashes = [f"h{i}" for i in range(8)]
    hashes[7] = hashes[0]  # byte-identical files
    hashes[5] = hashes[4] = "same-broken"  # identical unreadable files: still an exact pair
    readable = np.ones(8, dtype=bool)
    readable[[4, 5]] = False
    pairs = ranking.find_duplicates(emb, hashes, readable, threshold=0.95)
    got = {(p.a, p.b): p for p in pairs}
    assert set(got) == {(1, 3), (2, 6), (0, 7), (4, 5)}
    assert got[(0, 7)].exact and got[(4, 5)].exact and not got[(1, 3)].exact
    assert pairs[0].exact and pairs[1].exact  # exact first, then by similarity
    assert got[(2, 6)].similarity == pytest.approx(1.0, abs=1e-4)

    same = np.tile(emb[:1], (5, 1))  # five copies of one placeholder image: four pairs, not ten
    pairs = ranking.find_duplicates(same, ["p"] * 5, threshold=0.95)
    assert [(p.a, p.b, p.exact) for p in pairs] == [(0, 1, True), (0, 2, True), (0, 3, True), (0, 4, True)]
    many = ranking.find_duplicates(np.tile(emb[:1], (60, 1)), [f"h{i}" for i in range(60)], max_pairs=25, block=7)
    assert len(many) == 25 and all(not p.exact for p in many)


# ---------------------------------------------------------------------------------------------
# Decisions: log replay, last decision wins, cleaned.csv.


def _decisions(root: Path) -> clean.Decisions:
    names = ["black/a.jpg", "black/b.jpg", "grizzly/c.jpg", "teddy/d e,f.jpg"]
    return clean.Decisions(root, names, ["black", "black", "grizzly", "teddy"], ["black", "grizzly", "teddy"])


def test_decisions_save_as_made_and_replay_last_wins(tmp_path: Path):
    d = _decisions(tmp_path)
    d.decide("black/a.jpg", "relabel", "grizzly")
    d.decide("black/b.jpg", "exclude")
    d.decide("black/b.jpg", "keep")  # changed her mind: kept after all
    d.decide("grizzly/c.jpg", "exclude")
    d.decide("teddy/d e,f.jpg", "relabel", "black")
    d.decide("teddy/d e,f.jpg", "undo")
    cleaned = _rows(tmp_path / "cleaned.csv")
    assert cleaned == [{"name": "black/a.jpg", "label": "grizzly"}, {"name": "black/b.jpg", "label": "black"},
                       {"name": "teddy/d e,f.jpg", "label": "teddy"}]
    log = _rows(tmp_path / "clean_log.csv")
    assert [r["action"] for r in log] == ["relabel", "exclude", "keep", "exclude", "relabel", "undo"]
    assert log[0]["old_label"] == "black" and log[0]["new_label"] == "grizzly" and log[0]["time"]
    with pytest.raises(ValueError):
        d.decide("black/a.jpg", "relabel", "polar")
    with pytest.raises(KeyError):
        d.decide("../etc/passwd", "exclude")
    assert len(_rows(tmp_path / "clean_log.csv")) == 6  # refused decisions leave no trace

    again = _decisions(tmp_path)  # a restart: the log is the source of truth
    assert again.load() == 6
    assert again.state == d.state
    assert again.item("black/b.jpg") == {"name": "black/b.jpg", "status": "keep", "label": "black"}
    assert again.item("teddy/d e,f.jpg")["status"] is None
    assert again.summary() == {"total": 4, "decided": 3, "kept": 1, "excluded": 1, "relabelled": 1}


def test_log_survives_a_cut_line_and_refuses_a_foreign_file(tmp_path: Path):
    d = _decisions(tmp_path)
    d.decide("black/a.jpg", "exclude")
    with open(tmp_path / "clean_log.csv", "a", encoding="utf-8") as f:
        f.write("2024-01-01T00:00:00,black/b.jpg,bl")  # a crash in the middle of a line
    again = _decisions(tmp_path)
    assert again.load() == 1 and again.skipped_rows == 1
    again.decide("grizzly/c.jpg", "relabel", "teddy")  # appended on a fresh line, not glued on
    third = _decisions(tmp_path)
    assert third.load() == 2
    assert third.label_of("black/a.jpg") is None and third.label_of("grizzly/c.jpg") == "teddy"

    other = tmp_path / "other"
    other.mkdir()
    (other / "clean_log.csv").write_text("my,own,notes\n1,2,3\n")
    with pytest.raises(UrsaError, match="not a log"):
        _decisions(other).load()
    assert (other / "clean_log.csv").read_text() == "my,own,notes\n1,2,3\n"


# ---------------------------------------------------------------------------------------------
# The real model on the sample with planted problems; export; retraining on cleaned.csv.


def test_planted_duplicates_and_broken_file_are_found(planted):
    root, names, ds, scores, ranks = planted
    idx = {n: i for i, n in enumerate(scores.names)}
    pairs = {frozenset((scores.names[p.a], scores.names[p.b])): p for p in ranks.duplicates}
    exact = pairs[frozenset((names["src"], names["exact"]))]
    assert exact.exact
    near = pairs[frozenset((names["src"], names["resized"]))]
    assert not near.exact and near.similarity >= ranks.threshold
    assert scores.unreadable[idx[names["broken"]]].startswith("truncated")
    assert idx[names["broken"]] not in ranks.top_losses
    assert len(ranks.top_losses) == len(scores.names) - 1
    assert scores.emb.shape[1] == 2 * 1280 and np.isfinite(scores.loss[ranks.top_losses]).all()
    p = scores.probs[ranks.top_losses]
    assert np.allclose(p.sum(1), 1, atol=1e-4)


def test_export_writes_the_rankings(planted, tmp_path: Path, tiny_model, capsys):
    root, names, *_ = planted
    before = _snapshot(root)
    out = tmp_path / "export"
    assert main(["clean", str(root), "--model", str(tiny_model), "--export", str(out), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "likely label error" in said and "1 unreadable" in said
    assert said.splitlines()[0] == "model pass: ONNX Runtime (model.onnx is current)"  # train wrote it beside the model
    top = _rows(out / "top_losses.csv")
    assert list(top[0]) == ["name", "label", "predicted", "loss"] and len(top) == 122
    assert [float(r["loss"]) for r in top] == sorted((float(r["loss"]) for r in top), reverse=True)
    issues = _rows(out / "label_issues.csv")
    assert all(list(r) == ["name", "label", "suggested", "quality", "confident_learning"] for r in issues)
    assert [float(r["quality"]) for r in issues] == sorted(float(r["quality"]) for r in issues)
    dups = _rows(out / "duplicates.csv")
    assert {"a": names["src"], "b": names["exact"]}.items() <= dups[0].items() or \
        {"b": names["src"], "a": names["exact"]}.items() <= dups[0].items()
    assert dups[0]["exact"] == "true"
    assert _rows(out / "unreadable.csv")[0]["name"] == names["broken"]
    assert _snapshot(root) == before and not (root / "cleaned.csv").exists()  # export writes only into DIR


def test_onnx_and_torch_model_passes_rank_alike(planted, tiny_model, tmp_path: Path):
    """The cleaner runs on a current model.onnx (no torch model pass) and ranks as torch does, within tolerance."""
    root, names, ds, fast, fast_ranks = planted
    lone = tmp_path / "model.safetensors"  # the same model without its export: torch
    shutil.copy2(tiny_model, lone)
    _, slow, slow_ranks = clean.prepare(root, lone, quiet=True)
    assert fast.backend == "ONNX Runtime (model.onnx is current)"
    assert slow.backend.startswith("torch (no model.onnx beside the model")
    assert fast.names == slow.names and fast.unreadable == slow.unreadable and fast.pool == slow.pool
    ok = fast.readable
    assert np.abs(fast.probs[ok] - slow.probs[ok]).max() < 1e-4, "raw softmax on both (no temperature)"
    assert fast.emb.shape == slow.emb.shape and np.abs(fast.emb - slow.emb).max() < 1e-3
    assert fast_ranks.top_losses[:10] == slow_ranks.top_losses[:10]
    assert fast_ranks.issues[:5] == slow_ranks.issues[:5]
    assert np.nanmax(np.abs(fast_ranks.quality - slow_ranks.quality)) < 1e-2
    exact = {frozenset((p.a, p.b)) for p in fast_ranks.duplicates if p.exact}
    assert exact and exact == {frozenset((p.a, p.b)) for p in slow_ranks.duplicates if p.exact}
    sims = {frozenset((p.a, p.b)): p.similarity for p in slow_ranks.duplicates}
    for p in fast_ranks.duplicates:
        if abs(p.similarity - fast_ranks.threshold) > 1e-3:  # clear of the threshold: found by both
            assert abs(sims[frozenset((p.a, p.b))] - p.similarity) < 1e-3


def test_user_errors_exit_2(tmp_path: Path, tiny_model, capsys):
    assert main(["clean", str(tmp_path / "nope"), "--model", str(tiny_model), "--export", str(tmp_path / "o")]) == 2
    other = tmp_path / "other"
    for c in ("cats", "dogs"):
        for k in range(6):
            make_image(other / c / f"{k}.jpg", color=(k * 40, 90, 20))
    assert main(["clean", str(other), "--model", str(tiny_model), "--export", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "trained on classes" in err and "Traceback" not in err


@pytest.mark.slow
def test_train_on_cleaned_csv(sample_copy: Path, tmp_path: Path):
    names = sorted(p.relative_to(sample_copy).as_posix() for p in sample_copy.rglob("*.jpg"))
    d = clean.Decisions(sample_copy, names, [n.split("/")[0] for n in names], ["black", "grizzly", "teddy"])
    d.decide(names[0], "exclude")
    d.decide(names[1], "relabel", "teddy")
    out = tmp_path / "run"
    rc = main(["train", str(sample_copy), "--csv", str(sample_copy / "cleaned.csv"), "--out", str(out),
               "--epochs", "1", "--unfreeze-epochs", "0", "--size", "64", "--quiet"])
    assert rc == 0 and (out / "model.safetensors").exists()
    split = {r["name"]: r["label"] for r in _rows(out / "split.csv")}
    assert len(split) == len(names) - 1 and names[0] not in split and split[names[1]] == "teddy"


# ---------------------------------------------------------------------------------------------
# The app: safety and the API, without a browser.


@pytest.fixture
def small_app(tmp_path: Path):
    """An app over three real files (one broken) and one symlink that leads out of the data folder."""
    from starlette.testclient import TestClient

    root = tmp_path / "data"
    make_image(root / "a" / "one.jpg", (200, 20, 20), (80, 60), "JPEG")
    make_image(root / "b" / "two.png", (20, 200, 20), (60, 80), "PNG")
    (root / "b" / "three.jpg").write_bytes(b"<html>not a picture</html>")
    secret = tmp_path / "secret.jpg"
    make_image(secret, (1, 2, 3), (40, 40), "JPEG")
    (root / "a" / "link.jpg").symlink_to(secret)
    files = [root / "a" / "one.jpg", root / "a" / "link.jpg", root / "b" / "two.png", root / "b" / "three.jpg"]
    names = [f.relative_to(root).as_posix() for f in files]
    probs = np.array([[.9, .1], [.5, .5], [.2, .8], [np.nan, np.nan]], dtype=np.float32)
    s = clean.Scores(names, np.array([0, 0, 1, 1]), ["a", "b"], probs, np.array([.1, .7, .2, np.nan], np.float32),
                     np.eye(4, 8, dtype=np.float32), ["x", "y", "z", "w"], {3: "not_image: not an image"})
    r = clean.Rankings([1, 2, 0], [], np.array([.9, .5, .8, np.nan]), np.array([0, 1, 1, -1]), [])
    d = clean.Decisions(root, names, ["a", "a", "b", "b"], ["a", "b"])
    session = clean.CleanSession(root, files, s, r, d, [False, True, False, False], "m.safetensors")
    client = TestClient(clean.create_app(session, "127.0.0.1", PORT), base_url=f"http://127.0.0.1:{PORT}")
    return root, client


def test_only_the_data_sets_own_images_are_served(small_app):
    root, client = small_app
    r = client.get("/image", params={"path": "a/one.jpg"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == (root / "a" / "one.jpg").read_bytes()  # the raw bytes
    assert client.get("/image", params={"path": "b/two.png"}).headers["content-type"] == "image/png"
    for bad in ("../../etc/passwd", "/etc/passwd", str(root / "a" / "one.jpg"), "a/../a/one.jpg", "a/one.jpg/..", ""):
        assert client.get("/image", params={"path": bad}).status_code == 404, bad
    assert client.get("/image?path=..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert client.get("/image", params={"path": "a/link.jpg"}).status_code == 403  # symlink out of DATA
    assert client.get("/image", params={"path": "b/three.jpg"}).status_code == 415  # does not decode
    assert client.get("/etc/passwd").status_code == 404


def test_state_changes_only_from_our_own_origin(small_app):
    root, client = small_app
    before = _snapshot(root)
    body = {"name": "a/one.jpg", "action": "relabel", "label": "b"}
    evil = [{"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "http://127.0.0.1:9999"},
            {"Host": "evil.example"}, {"Host": f"evil.example:{PORT}"}, {"Sec-Fetch-Site": "cross-site"}]
    for headers in evil:
        r = client.post("/api/decide", json=body, headers=headers)
        assert r.status_code == 403, headers
    assert client.get("/api/state", headers={"Host": "rebound.example"}).status_code == 403  # DNS rebinding
    assert not (root / "clean_log.csv").exists() and not (root / "cleaned.csv").exists()
    assert client.post("/api/decide", content="name=a/one.jpg&action=exclude",
                       headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 415
    assert client.post("/api/decide", json={"name": "a/zzz.jpg", "action": "exclude"}).status_code == 404
    assert client.post("/api/decide", json={"name": "a/one.jpg", "action": "delete"}).status_code == 400
    r = client.post("/api/decide", json=body, headers={"Origin": f"http://127.0.0.1:{PORT}"})
    assert r.status_code == 200 and r.json()["item"] == {"name": "a/one.jpg", "status": "relabel", "label": "b"}
    r = client.post("/api/decide", json={"name": "b/three.jpg", "action": "exclude"},
                    headers={"Origin": f"http://localhost:{PORT}", "Host": f"localhost:{PORT}"})
    assert r.status_code == 200 and r.json()["summary"]["excluded"] == 1
    assert _rows(root / "cleaned.csv") == [{"name": "a/one.jpg", "label": "b"}, {"name": "a/link.jpg", "label": "a"},
                                           {"name": "b/two.png", "label": "b"}]
    state = client.get("/api/state").json()
    assert state["items"][0]["status"] == "relabel" and state["items"][3]["error"].startswith("not_image")
    assert state["views"]["unreadable"] == [3] and state["views"]["losses"] == [1, 2, 0]
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("http-equiv", "")  # no external URLs
    assert _snapshot(root) == before


def test_read_only_data_folder_is_refused_before_anything_is_written(planted, monkeypatch):
    root, _, ds, scores, ranks = planted
    real_access = os.access
    monkeypatch.setattr(decisions.os, "access", lambda p, mode: False if Path(p) == root else real_access(p, mode))
    with pytest.raises(UrsaError, match="read-only"):
        clean.start_session(ds, scores, ranks)
    assert not (root / "cleaned.csv").exists() and not (root / "clean_log.csv").exists()


def test_a_cleaned_csv_it_did_not_write_is_never_overwritten(tmp_path: Path):
    (tmp_path / "cleaned.csv").write_text("name,label\nblack/a.jpg,black\n")  # e.g. from fastai's widget
    with pytest.raises(UrsaError, match="will not overwrite"):
        clean.check_writable(tmp_path)
    clean.check_writable(tmp_path, tmp_path / "cleaned.csv")  # given as the input: the starting point
    d = _decisions(tmp_path)
    d.decide("black/a.jpg", "exclude")
    clean.check_writable(tmp_path)  # now the log says ursa owns it
    # Loaded from cleaned.csv, the excluded image is no longer an item: its log rows are not errors.
    later = clean.Decisions(tmp_path, ["black/b.jpg"], ["black"], ["black", "grizzly"])
    assert later.load() == 0 and later.other_rows == 1 and later.skipped_rows == 0


# ---------------------------------------------------------------------------------------------
# The page in headless chromium.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(session: clean.CleanSession, port: int):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(clean.create_app(session, "127.0.0.1", port), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            return server, thread
        time.sleep(0.05)
    raise RuntimeError("server did not start")


@pytest.mark.browser
def test_clean_in_the_browser(browser, sample_copy: Path, tiny_model, artifacts: Path):
    names = _inject(sample_copy)
    before = _snapshot(sample_copy)
    ds, scores, ranks = clean.prepare(sample_copy, tiny_model, quiet=True)
    session = clean.start_session(ds, scores, ranks, model_name="tiny_run/model.safetensors")
    port = _free_port()
    server, thread = _serve(session, port)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        url = f"http://127.0.0.1:{port}/"
        page.goto(url)
        page.wait_for_selector("body[data-ready='1'] .card.focused")
        wait_until(page, "[...document.images].slice(0, 8).every(i => i.complete)")
        page.screenshot(path=str(artifacts / "clean_losses.png"))

        first = page.locator(".card.focused").get_attribute("data-name")
        label = scores.classes[scores.labels[scores.names.index(first)]]
        target = next(c for c in scores.classes if c != label)
        page.keyboard.press(str(scores.classes.index(target) + 1))  # relabel the worst image
        page.wait_for_selector(f".card.status-relabel[data-name='{first}']")
        second = page.locator(".card.focused").get_attribute("data-name")  # focus moved on by itself
        assert second != first
        page.keyboard.press("x")
        page.wait_for_selector(f".card.status-exclude[data-name='{second}']")
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("k")  # then changes her mind about the second one...
        page.wait_for_selector(f".card.status-keep[data-name='{second}']")
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("Delete")  # ...and excludes it after all: the last decision wins
        page.wait_for_selector(f".card.status-exclude[data-name='{second}']")

        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        assert "relabel" in page.locator(f".card[data-name='{first}']").get_attribute("class")
        assert page.locator(f".card[data-name='{first}'] .badge").inner_text().strip().lower() == f"→ {target}"
        assert "status-exclude" in page.locator(f".card[data-name='{second}']").get_attribute("class")
        assert page.locator("#summary").inner_text().startswith("2 decided")

        page.click("button[data-view='issues']")
        page.wait_for_selector("button[data-view='issues'][aria-selected='true']")
        page.screenshot(path=str(artifacts / "clean_issues.png"))
        page.keyboard.press("Enter")
        page.wait_for_selector("#zoom:not([hidden]) #zoom-card .card")
        wait_until(page, "document.getElementById('zoom-img').complete")
        page.screenshot(path=str(artifacts / "clean_zoom.png"))
        page.keyboard.press("Escape")

        page.click("button[data-view='duplicates']")
        page.wait_for_selector(".pair")
        wait_until(page, "[...document.images].slice(0, 4).every(i => i.complete)")
        page.screenshot(path=str(artifacts / "clean_duplicates.png"))
        shown = page.locator(".pair").first.locator(".card").evaluate_all("cs => cs.map(c => c.dataset.name)")
        assert set(shown) == {names["src"], names["exact"]}
        assert page.locator(".pair").first.locator(".tag.exact").count() == 1

        page.click("button[data-view='unreadable']")
        page.wait_for_selector(".broken")
        page.screenshot(path=str(artifacts / "clean_unreadable.png"))
        page.click("button[data-view='changes']")
        page.wait_for_selector(".card")
        assert page.locator(".card").count() == 2
        page.screenshot(path=str(artifacts / "clean_changes.png"))
        page.keyboard.press("?")
        page.screenshot(path=str(artifacts / "clean_help.png"))
        assert not errors, errors
    finally:
        page.close()
        server.should_exit = True
        thread.join(10)

    log = _rows(sample_copy / "clean_log.csv")
    assert [(r["file"], r["action"]) for r in log] == [(first, "relabel"), (second, "exclude"), (second, "keep"),
                                                       (second, "exclude")]
    cleaned = {r["name"]: r["label"] for r in _rows(sample_copy / "cleaned.csv")}
    assert cleaned[first] == target and second not in cleaned and len(cleaned) == len(scores.names) - 1
    assert _snapshot(sample_copy) == before  # no image moved, rewritten or deleted
    resumed = clean.start_session(ds, scores, ranks)  # restarting the command resumes too
    assert resumed.decisions.label_of(first) == target and resumed.decisions.label_of(second) is None



# ---------------------------------------------------------------------------------------------
# Hardening: a restart on the same port, bounded request bodies, clipped echoes, swept temp files.


def _start_cleaner(data: Path, model: Path, port: int, log: Path):
    """`ursa clean` in a child process; returns it once it answers on port (or fails the test with its output)."""
    return start_page(["clean", str(data), "--model", str(model), "--port", str(port), "--no-browser", "--quiet"],
                      port, log)


def _hold_connection(port: int) -> socket.socket:
    """A browser-like keep-alive connection that has made a request and stays open."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"GET /favicon.ico HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: keep-alive\r\n\r\n".encode())
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        assert chunk, "the cleaner closed the connection"
        got += chunk
    assert got.startswith(b"HTTP/1.1 204")
    return s


@pytest.mark.slow
def test_restarts_on_its_port_right_after_kill_9_or_ctrl_c_with_a_browser_connected(tiny_model, tmp_path: Path):
    """Issue 17 item 9: "Address already in use" for a minute after a kill with a client connected."""
    import signal

    sample_copy = tmp_path / "bears"  # four pictures a class: the cleaner starts three times, and ports are the point
    for folder in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
        (sample_copy / folder.name).mkdir(parents=True)
        for picture in sorted(folder.iterdir())[:4]:
            shutil.copy2(picture, sample_copy / folder.name / picture.name)

    port = _free_port()
    held = []
    procs = []
    try:
        first = _start_cleaner(sample_copy, tiny_model, port, tmp_path / "first.log")
        procs.append(first)
        held.append(_hold_connection(port))
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        second = _start_cleaner(sample_copy, tiny_model, port, tmp_path / "second.log")  # at once, same port
        procs.append(second)
        held.append(_hold_connection(port))
        second.send_signal(signal.SIGINT)  # Ctrl-C, the browser still connected
        assert second.wait(30) == 0, (tmp_path / "second.log").read_text()
        third = _start_cleaner(sample_copy, tiny_model, port, tmp_path / "third.log")
        procs.append(third)
        assert "Traceback" not in (tmp_path / "second.log").read_text()
    finally:
        for s in held:
            s.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_huge_or_deeply_nested_body_is_refused_and_echoed_names_are_clipped(small_app):
    """Issue 17 item 10: a 50 MB JSON body was read whole, and a 404 echoed the whole name back."""
    import json

    root, client = small_app
    js = {"content-type": "application/json"}
    big = json.dumps({"name": "a/one.jpg", "action": "keep", "label": "x" * 70_000})
    r = client.post("/api/decide", content=big, headers=js)
    assert r.status_code == 413 and "64 KB" in r.json()["error"], r.text

    def chunks():  # no Content-Length: counted while it streams
        yield b'{"name": "'
        for _ in range(20):
            yield b"y" * 10_000

    r = client.post("/api/decide", content=chunks(), headers=js)
    assert r.status_code == 413, r.text
    r = client.post("/api/decide", content="[" * 50_000, headers=js)  # under the cap, too deep for json
    assert r.status_code == 400 and "expected JSON" in r.json()["error"]
    long = "a/" + "z" * 20_000 + ".jpg"
    r = client.post("/api/decide", json={"name": long, "action": "keep"})
    assert r.status_code == 404 and len(r.text) < 400 and "…" in r.json()["error"], r.text[:500]
    r = client.post("/api/decide", json={"name": "a/one.jpg", "action": "q" * 20_000})
    assert r.status_code == 400 and len(r.text) < 400 and "unknown action" in r.json()["error"]
    r = client.post("/api/decide", json={"name": "a/one.jpg", "action": "relabel", "label": "c" * 20_000})
    assert r.status_code == 400 and len(r.text) < 400 and "unknown class" in r.json()["error"]
    assert not (root / "clean_log.csv").exists()
    r = client.post("/api/decide", json={"name": "a/one.jpg", "action": "exclude"})  # still works after all that
    assert r.status_code == 200 and r.json()["summary"]["excluded"] == 1


def test_temp_files_left_by_a_kill_are_swept_on_start_and_nothing_else(tmp_path: Path):
    """Issue 17 item 10: `.cleaned.csv.*.tmp` left by a kill -9 mid-save was never removed."""
    from types import SimpleNamespace

    root = tmp_path / "data"
    files = [make_image(root / "black" / "a.jpg", size=(64, 64), fmt="JPEG"),
             make_image(root / "teddy" / "b.jpg", size=(64, 64), fmt="JPEG")]
    outside = tmp_path / "outside.txt"
    outside.write_text("not in the data folder")
    stale = [root / ".cleaned.csv.ab12cd_9.tmp", root / ".clean_log.csv.zzzzzzzz.tmp",
             root / ".verify.csv.q1w2e3r4.tmp", root / "black" / ".c.jpg.k3j4h5g6.tmp"]
    kept = [root / ".cleaned.csv.backup.tmp",  # not atomic_path's 8 characters
            root / ".cleaned.csv.abcdefgh.tmp.bak", root / "cleaned.csv.abcdefgh.tmp", root / "notes.tmp",
            root / ".other.csv.abcdefgh.tmp",  # not a file ursa writes
            root / "black" / ".notes.txt.abcdefgh.tmp",  # not an image's temp
            root / "black" / "deep" / ".d.jpg.abcdefgh.tmp"]  # deeper than a class folder
    fresh = root / ".cleaned.csv.fresh123.tmp"  # maybe a save in progress right now
    for p in stale + kept + [fresh]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("name,label\n")
    link = root / ".cleaned.csv.linklink.tmp"
    link.symlink_to(outside)
    an_hour_ago = time.time() - 3600
    for p in stale + kept + [link]:
        os.utime(p, (an_hour_ago, an_hour_ago), follow_symlinks=False)

    names = [f.relative_to(root).as_posix() for f in files]
    scores = clean.Scores(names, np.array([0, 1]), ["black", "teddy"], np.array([[.9, .1], [.2, .8]], np.float32),
                          np.array([.1, .2], np.float32), np.eye(2, 8, dtype=np.float32), ["x", "y"], {})
    ranks = clean.Rankings([0, 1], [], np.array([.9, .8]), np.array([0, 1]), [])
    session = clean.start_session(SimpleNamespace(root=root, files=files, is_valid=[False, True]), scores, ranks)
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept + [fresh]) and link.is_symlink() and outside.read_text().startswith("not in")
    assert all(f.exists() for f in files) and session.decisions.summary()["decided"] == 0

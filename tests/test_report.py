"""report.json's keys and shapes, report.html self-contained, train's run folder, and the page in chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ursa.diagnose.advice import History
from ursa.diagnose.interpret import Interpretation
from ursa.diagnose.report import write_report

CLASSES = ["black", "grizzly", "teddy"]


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic(tmp_path: Path) -> tuple[Interpretation, History]:
    """Eight real little images with known predictions, and a history that overfits at the end."""
    rng = np.random.default_rng(1)
    targets = [0, 0, 0, 1, 1, 1, 2, 2]
    paths, files = [], []
    for i, t in enumerate(targets):
        p = tmp_path / "imgs" / CLASSES[t] / f"{i}<b>.jpg"  # a name that needs escaping in HTML
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(p)
        paths.append(p)
        files.append(f"{CLASSES[t]}/{p.name}")
    probs = np.full((8, 3), 0.05)
    preds = [0, 1, 0, 1, 1, 0, 2, 2]
    for i, p in enumerate(preds):
        probs[i, p] = 0.9
    interp = Interpretation(CLASSES, files, paths, np.array(targets), probs, "valid", [("teddy/bad.jpg", "corrupt")])
    rows = [{"epoch": e, "stage": "frozen", "train_loss": t, "valid_loss": v, "error_rate": r, "accuracy": 1 - r,
             "seconds": 1.0} for e, (t, v, r) in enumerate([(0.6, 0.3, 0.1), (0.3, 0.2, 0.05), (0.2, 0.25, 0.06),
                                                            (0.1, 0.3, 0.07)])]
    return interp, History(rows)


def test_report_json_keys_and_shapes(tmp_path):
    interp, h = synthetic(tmp_path)
    files = write_report(tmp_path / "out", interp, h)
    d = json.loads(files["json"].read_text())
    for key in ("classes", "confusion_matrix", "most_confused", "per_class", "error_rate", "top_losses"):
        assert key in d, key
    assert d["classes"] == CLASSES
    cm = d["confusion_matrix"]
    assert len(cm) == 3 and all(len(r) == 3 for r in cm)
    assert cm == [[2, 1, 0], [1, 2, 0], [0, 0, 2]], "rows = actual, columns = predicted"
    assert d["most_confused"] == [["black", "grizzly", 1], ["grizzly", "black", 1]]
    assert all(len(t) == 3 and isinstance(t[2], int) for t in d["most_confused"])
    assert set(d["per_class"]) == set(CLASSES)
    assert d["per_class"]["black"]["precision"] == pytest.approx(2 / 3)
    assert d["per_class"]["black"]["recall"] == pytest.approx(2 / 3)
    assert d["error_rate"] == pytest.approx(2 / 8)
    assert len(d["top_losses"]) == 8
    for row in d["top_losses"]:
        file, actual, pred, loss, prob = row
        assert isinstance(file, str) and actual in CLASSES and pred in CLASSES
        assert isinstance(loss, float) and 0 <= prob <= 1
    losses = [r[3] for r in d["top_losses"]]
    assert losses == sorted(losses, reverse=True)
    assert {r[0] for r in d["top_losses"][:2]} == {"black/1<b>.jpg", "grizzly/5<b>.jpg"}
    assert [a["rule"] for a in d["advice"]] == ["too_many_epochs"]
    assert [r["name"] for r in d["rules"]] == ["diverged", "lr_too_low", "too_few_epochs", "too_many_epochs"]
    assert [r["fired"] for r in d["rules"]] == [False, False, False, True]
    assert d["skipped"] == [["teddy/bad.jpg", "corrupt"]]
    assert len(d["history"]) == 4


def test_report_html_is_self_contained_and_escaped(tmp_path):
    interp, h = synthetic(tmp_path)
    plot = tmp_path / "losses.png"
    Image.new("RGB", (200, 120), "white").save(plot)
    files = write_report(tmp_path / "out", interp, h, plots={"losses": plot}, info={"title": "t <x>"})
    html = files["html"].read_text()
    stripped = re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]*", "", html)
    assert not re.search(r"https?:|//[a-z]|url\(|@import|href=", stripped), "no external URL or link"
    srcs = re.findall(r"src='([^']*)'", html)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert html.count("<div class='card") == 8
    assert "<b>.jpg" not in html and "&lt;b&gt;.jpg" in html
    assert "t &lt;x&gt;" in html
    for section in ("advice", "confusion", "top-losses", "training", "skipped"):
        assert f"id='{section}'" in html
    assert "error is getting worse" in html
    assert (tmp_path / "out" / "confusion_matrix.png").is_file() and (tmp_path / "out" / "top_losses.png").is_file()


def test_report_without_interpretation_still_says_the_advice(tmp_path):
    rows = [{"epoch": 0, "stage": "frozen", "train_loss": float("nan"), "valid_loss": float("nan"),
             "error_rate": 0.5, "accuracy": 0.5, "seconds": 1.0}]
    files = write_report(tmp_path, None, History(rows, stopped_diverged=True), info={"classes": CLASSES})
    d = json.loads(files["json"].read_text())  # strict JSON: NaN became null
    assert d["classes"] == CLASSES and d["confusion_matrix"] is None
    assert d["advice"][0]["rule"] == "diverged" and d["history"][0]["valid_loss"] is None
    assert [r["fired"] for r in d["rules"]] == [True, None, None, None]
    assert "learning rate too high" in files["html"].read_text()


@pytest.mark.slow
def test_train_writes_plots_advice_and_report_into_the_run_folder(tiny_run):
    for name in ("history.csv", "losses.png", "lr.png", "metrics.png", "advice.txt", "report.html", "report.json",
                 "confusion_matrix.png", "top_losses.png", "model.safetensors"):
        assert (tiny_run / name).is_file(), name
    for name in ("losses.png", "lr.png", "metrics.png"):
        with Image.open(tiny_run / name) as im:
            assert im.format == "PNG"
    d = json.loads((tiny_run / "report.json").read_text())
    last = d["history"][-1]
    assert d["error_rate"] == pytest.approx(last["error_rate"], abs=1e-6), "get_preds agrees with training"
    assert sum(map(sum, d["confusion_matrix"])) == d["n_items"]
    assert set(d["plots"]) == {"losses", "lr", "metrics"}
    assert "rules checked:" in (tiny_run / "advice.txt").read_text()


@pytest.mark.browser
def test_report_page_in_chromium(tiny_run, browser, artifacts):
    """Open the training report offline; every image decodes, nothing is fetched; keep a screenshot."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto((tiny_run / "report.html").as_uri())
    page.wait_for_load_state("load")
    assert page.title() == "ursa training report"
    broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length")
    assert broken == 0
    assert page.evaluate("document.images.length") >= 4  # curves, confusion matrix, thumbnails
    assert page.locator("#advice").is_visible() and page.locator("#top-losses .card").count() >= 1
    assert page.locator(".stat b").first.inner_text().endswith("%")
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    page.screenshot(path=str(artifacts / "report.png"), full_page=True)
    page.close()
    assert (artifacts / "report.png").stat().st_size > 10_000

"""The report's insight: a confusion matrix you can click, worst images per class, the embedding map, the insight sections."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ursa.diagnose.embedding import pca_2d
from ursa.diagnose.interpret import Interpretation
from ursa.diagnose.report import write_report

CLASSES = ["black", "grizzly", "teddy"]


def make_interp(tmp_path: Path) -> Interpretation:
    """Twelve real little images with known predictions and features that cluster by label."""
    rng = np.random.default_rng(3)
    targets = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    preds = [0, 0, 1, 2, 1, 1, 0, 1, 2, 2, 2, 2]
    paths, files = [], []
    for i, t in enumerate(targets):
        p = tmp_path / "imgs" / CLASSES[t] / f"{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(p)
        paths.append(p)
        files.append(f"{CLASSES[t]}/{p.name}")
    probs = np.full((12, 3), 0.1)
    for i, p in enumerate(preds):
        probs[i, p] = 0.8
    feats = np.eye(3)[targets] * 3 + rng.normal(0, 0.3, (12, 3))
    return Interpretation(CLASSES, files, paths, np.array(targets), probs, "valid", [], np.concatenate([feats, feats], 1))


INSIGHT = {
    "calibration": {"temperature": 1.7, "threshold": 0.62, "target_precision": 0.95, "ece_before": 0.08,
                    "ece_after": 0.02, "kept": 0.8, "kept_precision": 0.96, "n": 12},
    "curve": {"classes": CLASSES, "fractions": [0.1, 0.2, 0.4, 0.7, 1.0],
              "n_per_class": [[3, 3, 3], [6, 6, 6], [12, 12, 12], [21, 21, 21], [30, 30, 30]],
              "errors": [[0.4, 0.5], [0.3, 0.3], [0.2, 0.25], [0.15, 0.15], [0.1, 0.12]],
              "class_errors": [[[0.4, 0.4, 0.4]] * 2] * 5, "valid_counts": [4, 4, 4],
              "fit": {"a": 1.0, "b": 0.5, "c": 0.0}, "class_fits": [{"a": 1.0, "b": 0.5, "c": 0.0}] * 3,
              "verdict": {"falling": True}, "words": "error 11.0% with ~30 per class; the curve is still falling",
              "seconds": 2.0},
    "leakage": {"n_pairs": 1, "pairs": [{"train": "black/0.jpg", "valid": "black/1.jpg", "distance": 4, "exact": False,
                                         "labels": ["black", "black"]}], "method": "hashes", "dedupe_split": False},
    "data": {"per_class": {"black": [30, 4], "grizzly": [30, 4], "teddy": [30, 4]}, "warning": None},
}


def write(tmp_path: Path) -> dict[str, Path]:
    from ursa.diagnose.insight_plots import plot_curve

    interp = make_interp(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("batch", "reliability"):
        Image.new("RGB", (120, 90), "white").save(out / f"{name}.png")
    plot_curve(INSIGHT["curve"], out / "curve.png")
    leak = dict(INSIGHT["leakage"], root=str(tmp_path / "imgs"))
    return write_report(out, interp, insight={**INSIGHT, "leakage": leak})


def test_pca_map_separates_clusters_and_is_deterministic():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (20, 8)) + np.eye(8)[0] * 3, rng.normal(0, 0.1, (20, 8)) + np.eye(8)[1] * 3])
    coords, explained = pca_2d(x)
    assert coords.shape == (40, 2) and coords.min() >= 0 and coords.max() <= 1 + 1e-9
    assert explained[0] > 0.8
    a, b = coords[:20].mean(0), coords[20:].mean(0)
    assert np.linalg.norm(a - b) > 0.5
    assert np.array_equal(pca_2d(x)[0], coords)
    assert pca_2d(np.zeros((0, 4)))[0].shape == (0, 2)


def test_report_has_the_insight_sections_and_json(tmp_path):
    files = write(tmp_path)
    d = json.loads(files["json"].read_text())
    assert d["calibration"]["temperature"] == 1.7 and d["leakage"]["n_pairs"] == 1
    assert d["curve"]["words"].startswith("error 11.0%") and d["data"]["per_class"]["black"] == [30, 4]
    assert len(d["embedding"]["coords"]) == 12 and d["embedding"]["method"].startswith("PCA")
    html = files["html"].read_text()
    for section in ("data", "confusion", "embedding", "calibration", "curve", "leakage"):
        assert f"id='{section}'" in html, section
    stripped = re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]*", "", html)
    assert not re.search(r"https?:|//[a-z]|url\(|@import|href=", stripped), "no external URL or link"
    assert html.count("class='cell ") == 9 and html.count("class='worst'") == 3
    assert html.count("<circle class='pt") == 12 and html.count("<circle class='ring'") == 3, "3 mistakes ringed"
    data = json.loads(re.search(r"<script type='application/json' id='ursa-data'>(.*?)</script>", html).group(1))
    assert len(data["items"]) == 12 and all(it["th"] for it in data["items"]), "every item has a thumbnail"


def test_report_without_features_has_no_map_but_a_clickable_matrix(tmp_path):
    interp = make_interp(tmp_path)
    interp.features = None
    html = write_report(tmp_path / "o", interp)["html"].read_text()
    assert "id='embedding'" not in html and "class='cell " in html and "id='ursa-data'" in html


@pytest.mark.browser
def test_click_a_cell_see_its_images_in_chromium(tmp_path, browser, artifacts):
    files = write(tmp_path)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors, requests = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(files["html"].as_uri())
    page.wait_for_load_state("load")
    panel = page.locator("#explore-panel")
    assert not panel.is_visible()
    # black predicted as grizzly: one image (item 2)
    page.locator("button.cell[data-a='0'][data-p='1']").click()
    assert panel.is_visible()
    assert page.locator("#explore-title").inner_text() == "1 image(s) of black predicted as grizzly"
    cards = page.locator("#explore-grid .card")
    assert cards.count() == 1 and "black/2.jpg" in cards.first.inner_text()
    assert "grizzly 0.80" in cards.first.inner_text() and "actually black" in cards.first.inner_text()
    assert page.evaluate("document.querySelector('#explore-grid img').naturalWidth") > 0, "the thumbnail decodes"
    # the diagonal: teddy right four times
    page.locator("button.cell[data-a='2'][data-p='2']").click()
    assert cards.count() == 4 and page.locator("#explore-grid .card.miss").count() == 0
    assert page.locator("button.cell[data-a='2'][data-p='0']").is_disabled(), "an empty cell has nothing to open"
    # a class's worst images, highest loss first
    page.locator("button.worst[data-c='1']").click()
    assert page.locator("#explore-title").inner_text().startswith("Worst images of grizzly")
    assert cards.count() == 4 and "grizzly/6.jpg" in cards.first.inner_text(), "the mistake first"
    page.locator("#explore-close").click()
    assert not panel.is_visible()
    # the map: hover a mistake, see its image
    page.locator("#embedding-map circle.pt.wrong").first.hover()
    tip = page.locator("#map-tip")
    assert tip.is_visible() and "predicted as" in tip.inner_text()
    assert page.evaluate("document.querySelector('#map-tip img').naturalWidth") > 0
    page.screenshot(path=str(artifacts / "report_explore.png"), full_page=True)
    assert not errors, errors
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    page.close()

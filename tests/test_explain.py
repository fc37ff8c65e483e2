"""Heat maps (issue 23, "why it answered that"): exact evidence maps, where they point, both backends, the CLI."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import HELDOUT, load_benchmark


@pytest.fixture(scope="module")
def bench():
    """benchmarks/explain.py: the generated patch pictures and the tiny network."""
    yield load_benchmark("explain")
    sys.modules.pop("bench_explain", None)


def test_jacobian_exact_decomposition_and_gradcam(one_thread):
    """J is autograd's gradient; the exact maps sum to the logit margin less the head's bias; the drawn maps are Grad-CAM's."""
    import torch
    from torch import nn

    from ursa.inference.evidence import contrast, evidence, head_jacobian, place_maps
    from ursa.vision.models import Classifier, HeadConfig

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU6())
    model = Classifier(body, HeadConfig(16, 3, hidden=32, dropout=0.2)).eval()
    for m in model.head:
        if isinstance(m, nn.BatchNorm1d):  # not the identity a fresh BatchNorm is
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_()
    x = torch.randn(4, 3, 32, 32)
    x[0, :, :8, :8] = 9.0  # saturates ReLU6 in places: ties at the maximum are split
    f = model.features(x).detach().requires_grad_(True)
    y = model.head(f)
    logits, jac = head_jacobian(model.head, f.detach())
    assert torch.allclose(logits, y.detach())
    for j in range(3):
        grad, = torch.autograd.grad(y[:, j].sum(), f, retain_graph=True)
        assert torch.allclose(grad, jac[:, j], atol=1e-6)
    margin = lambda v: v - (v.sum(1, keepdim=True) - v) / 2  # noqa: E731 - the mean of the other two
    with torch.no_grad():
        fmap = model.body(x)
        exact = place_maps(fmap, contrast(jac), "concat", "exact")
        bias = logits - (jac @ f.detach().unsqueeze(2)).squeeze(2)
    assert exact.shape == (4, 3, 8, 8)
    assert torch.allclose(exact.sum((2, 3)), margin(logits) - margin(bias), atol=1e-5)
    # what ursa draws is Grad-CAM of the margin: the same as autograd's, without autograd
    _, drawn = evidence(model, x)
    a = fmap.clone().requires_grad_(True)
    score = margin(model.head(model.pool(a)))
    for j in range(3):
        grad, = torch.autograd.grad(score[:, j].sum(), a, retain_graph=True)
        gradcam = (grad.mean((2, 3), keepdim=True) * a).sum(1)
        assert torch.allclose(drawn[:, j], gradcam.detach(), atol=1e-5)


def test_a_head_it_cannot_map_is_refused_by_name():
    from torch import nn

    from ursa.inference.evidence import NoEvidenceMaps, head_jacobian
    import torch

    with pytest.raises(NoEvidenceMaps, match="got GELU"):
        head_jacobian(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)), torch.zeros(1, 4))
    from ursa.inference.evidence import check_head

    with pytest.raises(NoEvidenceMaps, match="got GELU"):
        check_head(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)))
    with pytest.raises(NoEvidenceMaps, match="got ReLU"):
        check_head(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    check_head(nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(), nn.Linear(4, 2)))  # ursa's head without hidden layer


def test_map_peaks_on_the_patch_that_decides_the_class(bench, one_thread):
    """Trained on pictures whose class is a small square's colour (a yellow distractor in each), the map's peak is on it."""
    import torch

    from ursa.inference.evidence import evidence

    x, y, _ = bench.patch_images(320, seed=0)
    torch.manual_seed(1)  # an initialisation on which the exact map's peak misses the square in 41% of the pictures
    model = bench.train(bench.tiny_classifier(), bench.to_input(x), y, epochs=10, seed=1)
    xt, yt, boxes = bench.patch_images(64, seed=1)
    logits, maps = evidence(model, bench.to_input(xt))
    pred = logits.argmax(1).numpy()
    drawn = maps.numpy()[np.arange(len(pred)), pred]
    assert (pred == yt).mean() >= 0.9
    hit, _ = bench.pointing(drawn, boxes, 64)
    assert hit >= 0.9, f"the map's peak was on the deciding square in {hit:.0%} of the pictures"
    # a map that ignores the picture fails the same check: the test can fail
    flat_hit, _ = bench.pointing(np.random.default_rng(0).random(drawn.shape), boxes, 64)
    assert flat_hit < 0.5


def test_overlay_blends_where_the_evidence_is_and_captions(tmp_path):
    from ursa.inference.explain import Explanation, overlay_name, write_overlay
    from ursa.inference.results import Prediction

    pixels = np.full((32, 32, 3), 128, np.uint8)
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0], heat[3, 3] = 5.0, -7.0  # negative evidence is not drawn
    e = Explanation(Prediction("teddy", 1, {"black": 0.1, "teddy": 0.9}), heat, pixels)
    im = np.asarray(e.overlay())
    assert im.shape == (32 + 22, 32, 3)
    assert abs(int(im[2, 2, 0]) - 128) > 40 and np.array_equal(im[30, 30], [128, 128, 128])
    assert e.weights().max() == 1.0 and e.weights().min() == 0.0
    assert e.to_json()["evidence"]["class"] == "teddy"
    assert overlay_name(Path("a/b c.jpg"), e.prediction) == "b_c.teddy-0.900.png"
    first = write_overlay(tmp_path, Path("x.jpg"), e)
    (tmp_path / "mine.png").write_bytes(b"user's")
    second = write_overlay(tmp_path, Path("x.jpg"), e)
    assert first.name == "x.teddy-0.900.png" and second.name == "x.teddy-0.900-2.png"
    assert first.read_bytes()[:4] == b"\x89PNG" and (tmp_path / "mine.png").read_bytes() == b"user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png", "x.teddy-0.900-2.png", "x.teddy-0.900.png"]


@pytest.fixture(scope="module")
def exported(tiny_model: Path, tmp_path_factory) -> Path:
    """A copy of the tiny model with a fresh model.onnx beside it."""
    from ursa.inference.export import export_onnx

    d = tmp_path_factory.mktemp("explain")
    shutil.copy2(tiny_model, d / "model.safetensors")
    export_onnx(d / "model.safetensors")
    return d / "model.safetensors"


def test_torch_and_onnx_maps_agree(exported, one_thread):
    from ursa.inference.explain import explain_arrays
    from ursa.inference.predictor import load_predictor
    from ursa.inference.runtime import load_onnx

    files = sorted(HELDOUT.glob("*.jpg"))[:4]
    torch_pred = load_predictor(exported, backend="torch", device="cpu")
    onnx_pred = load_onnx(exported.with_suffix(".onnx"))
    a = explain_arrays(torch_pred, [torch_pred.preprocess(f) for f in files])
    b = explain_arrays(onnx_pred, [onnx_pred.preprocess(f) for f in files])
    for ea, eb in zip(a, b):
        assert ea.prediction.label == eb.prediction.label
        assert ea.heat.shape == eb.heat.shape == (4, 4)  # 128 px on EfficientNet-Lite0
        assert np.abs(ea.heat - eb.heat).max() <= 1e-3 * max(1.0, float(np.abs(ea.heat).max()))
        assert np.abs(ea.pixels.astype(int) - eb.pixels.astype(int)).max() <= 1


def test_cli_predict_explain_writes_one_overlay_per_picture(exported, tmp_path, capsys, one_thread):
    from PIL import Image

    from ursa.cli import main

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for f in sorted(HELDOUT.glob("*.jpg"))[:3]:
        shutil.copy2(f, imgs / f.name)
    (imgs / "broken.jpg").write_bytes(b"not a picture")
    for backend in ("onnx", "torch"):
        out = tmp_path / f"why-{backend}"
        rc = main(["predict", str(exported), str(imgs), "--explain", str(out), "--backend", backend])
        said = capsys.readouterr()
        assert rc == 1 and "1 of 4 images could not be read" in said.err  # the broken one is skipped and counted
        pngs = sorted(out.glob("*.png"))
        assert len(pngs) == 3, said
        for png, line in zip(pngs, [ln for ln in said.out.splitlines() if ln.strip()]):
            label = line.split(": ")[1].split(" ")[0]
            assert f".{label}-" in png.name
            assert Image.open(png).size == (128, 128 + 22)
        assert f"wrote 3 overlays to {out}" in said.err


def test_explain_refuses_an_output_folder_inside_the_pictures_or_unwritable(exported, tmp_path, capsys):
    from ursa.cli import main

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy2(sorted(HELDOUT.glob("*.jpg"))[0], imgs / "a.jpg")
    assert main(["predict", str(exported), str(imgs), "--explain", str(imgs / "why")]) == 2
    assert not (imgs / "why").exists()
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    assert main(["predict", str(exported), str(imgs / "a.jpg"), "--explain", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert f"{a_file}: cannot make this folder for the overlays" in err and "Traceback" not in err
    assert a_file.read_text() == "mine"


def test_write_new_without_hard_links_still_never_replaces(tmp_path, monkeypatch):
    import os

    from ursa.util.files import write_new

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "a.png").write_bytes(b"user's")
    got = write_new(tmp_path / "a.png", b"ours")
    assert got.name == "a-2.png" and got.read_bytes() == b"ours" and (tmp_path / "a.png").read_bytes() == b"user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-2.png", "a.png"]  # no temp file left


def test_an_onnx_file_without_evidence_says_to_export_again(exported, tmp_path, capsys):
    """Exports before heat maps have no evidence output: one line naming the file, exit 2."""
    import onnx

    from ursa.cli import main

    proto = onnx.load(str(exported.with_suffix(".onnx")))
    out = next(o for o in proto.graph.output if o.name == "evidence")
    proto.graph.output.remove(out)
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    img = sorted(HELDOUT.glob("*.jpg"))[0]
    assert main(["predict", str(old), str(img), "--explain", str(tmp_path / "why")]) == 2
    err = capsys.readouterr().err
    assert "old.onnx: has no evidence-map output" in err and "ursa export" in err and "Traceback" not in err
    assert main(["predict", str(old), str(img)]) == 0  # without --explain it predicts as before


def test_report_shows_overlays_for_the_top_losses(tiny_run):
    """The training report's "Why it answered that": one overlay per top loss, after the top losses."""
    import json

    page = (tiny_run / "report.html").read_text()
    assert page.index("id='top-losses'") < page.index("id='why-top-losses'")
    section = page.split("id='why-top-losses'")[1].split("</section>")[0]
    n = json.loads((tiny_run / "report.json").read_text())["n_items"]
    assert section.count("src='data:image/png;base64,") == min(12, n) > 0
    assert "no heat maps" not in section


def test_slim_install_draws_overlays_without_torch(exported, tmp_path):
    """`ursa predict model.onnx --explain DIR` with torch, timm and torchvision unimportable."""
    from tests.test_slim import blocked

    img = sorted(HELDOUT.glob("*.jpg"))[0]
    out = tmp_path / "why"
    r = blocked("predict", str(exported.with_suffix(".onnx")), str(img), "--explain", str(out), "--json")
    assert r.returncode == 0, r.stderr
    import json

    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(answer["overlay"]).parent == out and Path(answer["overlay"]).is_file()
    assert Path(answer["overlay"]).name.startswith(img.stem + "." + answer["label"] + "-")


def test_with_tta_the_answer_is_the_averaged_one_and_the_map_the_plain_views(exported, one_thread):
    from ursa.inference.explain import explain_arrays
    from ursa.inference.runtime import load_onnx

    plain, tta = load_onnx(exported.with_suffix(".onnx")), load_onnx(exported.with_suffix(".onnx"), tta=True)
    if len(tta.views) < 2:
        pytest.skip("the tiny model was trained without flips")
    files = sorted(HELDOUT.glob("*.jpg"))[:3]
    xs = [tta.preprocess(f) for f in files]
    got = explain_arrays(tta, xs)
    for e, want, base in zip(got, tta.predict_arrays(xs), explain_arrays(plain, xs)):
        assert e.prediction.probs == want.probs  # the TTA answer, as predict gives it
        if e.prediction.label == base.prediction.label:
            assert np.array_equal(e.heat, base.heat)  # the map of the plain view


def test_report_section_says_whose_evidence_when_tta_changed_the_answer():
    from ursa.diagnose.explain_html import overlays_html
    from ursa.diagnose.interpret import Interpretation

    interp = Interpretation(["a", "b"], ["x.jpg", "y.jpg"], [Path("x.jpg"), Path("y.jpg")], [0, 1],
                            [[0.9, 0.1], [0.6, 0.4]])
    html = overlays_html(interp, {"items": [(0, "AAAA", "a"), (1, "BBBB", "b")], "note": None})
    assert html.count("<figure class='card") == 2 and html.count("map: evidence for") == 1
    assert "evidence for b, the answer without TTA" in html  # y.jpg: answered a (with TTA), mapped b
    assert overlays_html(interp, None) == ""
    assert "no heat maps: old export" in overlays_html(interp, {"items": [], "note": "no heat maps: old export"})

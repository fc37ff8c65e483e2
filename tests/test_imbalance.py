"""Lopsided classes (issue 26): the recipe notices them and counters them, a user can turn that off, and the
balanced error and per-class recall show beside the error rate (epoch table, history.csv, report, model file)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests import synthetic_sets
from tests.conftest import ROOT
from ursa.diagnose.recall import balanced_error, class_recall
from ursa.inference.header import read_header
from ursa.training.balance import DEFAULT, balanced_loss, choose_balance, class_prior, sample_weights
from ursa.training.config import ConfigError, LearnerConfig, TrainConfig
from ursa.training.sources import CachedFeatures
from ursa.training.features import FeatureCache

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = "7"


# --- the decision and the remedies, as functions --------------------------------------------------------------------


def test_auto_counters_lopsided_counts_and_leaves_even_ones_alone():
    mode, why = choose_balance({"a": 60, "b": 6, "c": 55}, "auto")
    assert mode == DEFAULT and "a has 60" in why and "b 6" in why and "--balance none" in why
    assert choose_balance({"a": 60, "b": 40}, "auto")[0] == "none"
    assert choose_balance({"a": 60, "b": 6}, "none") == ("none", "--balance")
    assert choose_balance({"a": 60, "b": 6}, "sampler") == ("sampler", "--balance")
    assert choose_balance({"a": 60, "b": 0}, "auto")[0] == "none"  # one class with images: nothing to balance


def test_balanced_loss_is_cross_entropy_unless_asked():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 0, 0, 1, 0])
    prior = class_prior([90, 9, 1])
    plain = torch.nn.functional.cross_entropy(logits, y)
    assert torch.equal(balanced_loss(logits, y, LearnerConfig()), plain)
    adjusted = balanced_loss(logits, y, LearnerConfig(balance="logit_adjust", class_prior=prior))
    assert torch.allclose(adjusted, torch.nn.functional.cross_entropy(logits + torch.tensor(prior).log(), y))
    w = balanced_loss(logits, y, LearnerConfig(balance="weights", class_prior=prior))
    assert not torch.allclose(w, plain) and not torch.allclose(adjusted, plain)


def test_balanced_sampler_draws_classes_evenly_and_repeats_with_its_seed():
    y = torch.tensor([0] * 90 + [1] * 10)
    cfg = LearnerConfig(balance="sampler")
    assert sample_weights(LearnerConfig(), y) is None
    cache = FeatureCache([torch.randn(100, 4)], y, torch.randn(4, 4), torch.tensor([0, 1, 0, 1]), 32, False)

    def drawn(seed: int) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(seed)
        src = CachedFeatures(torch.nn.Linear(4, 2), cache, 10, g, weights=sample_weights(cfg, y))
        return torch.cat([yb for _, yb in src.batches(0)])

    a = torch.cat([drawn(s) for s in range(20)])
    assert 0.4 < a.float().mean() < 0.6, "about as many of the small class as of the large one"
    assert torch.equal(drawn(3), drawn(3)) and not torch.equal(drawn(3), drawn(4))


def test_balance_option_is_checked():
    with pytest.raises(ConfigError, match="--balance: expected auto or none or weights or sampler or logit_adjust"):
        TrainConfig(data=ROOT, balance="oversample")
    with pytest.raises(ConfigError, match="--balance"):
        TrainConfig.from_json({"data": str(ROOT), "balance": ["none"]})
    assert TrainConfig.from_json({"data": str(ROOT)}).balance == "auto"  # a run from before: the default
    assert TrainConfig.from_json(TrainConfig(data=ROOT, balance="none").to_json()).balance == "none"


def test_sampler_is_refused_under_torchrun(tmp_path):
    from ursa.training.dist import Dist
    from ursa.training.recipe import prepare

    with pytest.raises(ConfigError, match="--balance sampler: under torchrun"):  # before any image is read
        prepare(TrainConfig(data=tmp_path / "nothing", out=tmp_path / "run", balance="sampler"), dist=Dist(world=2))


def test_balanced_error_and_recall():
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    pred = np.zeros(10, dtype=int)  # never says the small class: 20% error, but half the classes missed
    assert class_recall(pred, y, 3)[:2].tolist() == [1.0, 0.0] and np.isnan(class_recall(pred, y, 3)[2])
    assert balanced_error(pred, y, 3) == pytest.approx(0.5)


def test_curve_names_the_small_classes():
    from ursa.training.curve import LearningCurve

    fr = [0.1, 0.2, 0.4, 0.7, 1.0]
    n = np.array([[6 * f, 6 * f, 60 * f] for f in fr]) * np.array([10, 1, 1])  # a: 60, b: 6, c: 60 at 100%
    errors = np.array([[0.5, 0.5], [0.4, 0.4], [0.3, 0.3], [0.25, 0.25], [0.2, 0.2]])
    class_err = np.stack([np.stack([[0.1, 0.9 - 0.1 * i, 0.1]] * 2) for i in range(5)])
    curve = LearningCurve(["a", "b", "c"], fr, n, errors, class_err, [20, 2, 20])
    small = curve.small_classes()
    assert [s["class"] for s in small] == ["b"] and small[0]["n"] == 6 and small[0]["more"] == 50
    assert "about 50 more images of b (it has 6, the median class 60" in curve.words()
    assert curve.to_json()["verdict"]["small_classes"][0]["class"] == "b"


# --- end to end: a lopsided synthetic set, trained with the default and with --balance none ---------------------------


@pytest.fixture(scope="module")
def lopsided(tmp_path_factory):
    """Hard digits (stray marks: a frozen body leaves ~10% error), 60 training images of each digit but 7, which has 6;
    20 validation images of every digit. Trained twice on the frozen stage (--budget 0): the default, and
    --balance none through the command line."""
    from ursa.training.recipe import train

    root = tmp_path_factory.mktemp("lopsided")
    csv = synthetic_sets.lopsided_digits(root / "digits", small=SMALL, stray=0.3)
    auto = train(TrainConfig(data=root / "digits", csv=csv, out=root / "auto", budget=0, size=64, quiet=True))
    r = subprocess.run([sys.executable, "-m", "ursa", "train", str(root / "digits"), "--csv", str(csv), "--out",
                        str(root / "none"), "--budget", "0", "--balance", "none", "--size", "64", "--quiet"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    return auto, root / "none", r.stdout


def _recall(run) -> dict:
    return json.loads(read_header(run / "model.safetensors")["metrics"])["recall"]


def test_the_default_raises_the_small_class_recall(lopsided):
    auto, none, _ = lopsided
    a, n = _recall(auto.out), _recall(none)
    # 20 validation pictures of the small class: at least 3 more of them found than without the remedy
    assert a[SMALL] >= n[SMALL] + 0.15, (a, n)
    err = lambda run: json.loads(read_header(run / "model.safetensors")["metrics"])["error_rate"]  # noqa: E731
    assert err(auto.out) <= err(none) + 2 / 100, "overall no worse by more than two of the 100 pictures"


def test_recipe_json_records_the_decision_and_the_switch_off(lopsided):
    auto, none, stdout = lopsided
    ra = json.loads((auto.out / "recipe.json").read_text())
    rn = json.loads((none / "recipe.json").read_text())
    assert ra["balance"] == DEFAULT and "lopsided classes" in ra["balance_why"] and f"{SMALL} 6" in ra["balance_why"]
    assert rn["balance"] == "none" and rn["balance_why"] == "--balance"
    assert json.loads((none / "config.json").read_text())["balance"] == "none"  # --config RUN replays it
    assert "balance none" in stdout


def test_balanced_error_appears_where_promised(lopsided):
    auto, none, stdout = lopsided
    rows = (none / "history.csv").read_text().splitlines()
    assert rows[0].split(",")[6] == "balanced_error"
    assert all(0 <= float(r.split(",")[6]) <= 1 for r in rows[1:])
    meta = json.loads(read_header(none / "model.safetensors")["metrics"])
    assert 0 < meta["balanced_error"] <= 1 and set(meta["recall"]) == {"0", "1", "2", "6", "7"}
    report = json.loads((none / "report.json").read_text())
    assert report["balanced_error"] == pytest.approx(meta["balanced_error"])
    assert report["recipe"]["balance"] == "none"
    html = (none / "report.html").read_text()
    assert "Balanced error" in html and "<td>balance</td>" in html
    assert "balanced error " in stdout and f"lowest recall: {SMALL} " in stdout
    assert auto.metrics["balanced_error"] is not None

"""The learning curve: subsets, the power-law fit, and its verdict on a set where more data helps and one where it does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ursa.training.curve import CurveSettings, fit_power_law, learning_curve, stratified_subset
from ursa.training.features import FeatureCache
from ursa.vision.models import HeadConfig, create_head

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ["a", "b", "c"]


def synthetic_cache(separation: float, n_train: int = 600, n_valid: int = 300, dim: int = 32,
                    seed: int = 0) -> FeatureCache:
    """Gaussian classes in `dim` (x2, as a concat pool gives) features: far apart, or close enough that few examples overfit."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (3, dim)) * separation

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = np.arange(n) % 3
        x = means[y] + rng.normal(0, 1, (n, dim))
        x = np.concatenate([x, x + rng.normal(0, 0.1, x.shape)], 1)
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y)

    xt, yt = draw(n_train)
    xv, yv = draw(n_valid)
    return FeatureCache([xt], yt, xv, yv, 64, False)


def make_head() -> torch.nn.Module:
    return create_head(HeadConfig(n_features=32, n_classes=3))


def test_stratified_subset_keeps_each_class_share():
    y = np.repeat([0, 1, 2], [100, 50, 20])
    idx = stratified_subset(y, 0.2, np.random.default_rng(0))
    assert np.bincount(y[idx]).tolist() == [20, 10, 4]
    assert len(set(idx.tolist())) == len(idx) and np.all(np.diff(idx) > 0)
    assert np.bincount(y[stratified_subset(y, 0.01, np.random.default_rng(0))]).tolist() == [2, 2, 2]


def test_power_law_fit_recovers_a_known_law_and_never_rises():
    n = np.array([25, 50, 100, 175, 250], dtype=float)
    law = fit_power_law(n, 0.8 * n ** -0.5 + 0.02)
    assert law.b == pytest.approx(0.5, rel=0.1) and law.c == pytest.approx(0.02, abs=0.01)
    assert law(1000) < law(250) < law(25)
    rising = fit_power_law(n, [0.01, 0.02, 0.03, 0.04, 0.05])
    assert rising.a == 0 and rising(1000) == pytest.approx(rising(25)), "more data never predicted to hurt"


def test_curve_falls_where_more_data_helps():
    curve = learning_curve(synthetic_cache(0.3), make_head, CLASSES, CurveSettings(draws=2, epochs=3))
    mean = curve.errors.mean(1)
    assert curve.errors.shape == (5, 2) and curve.class_errors.shape == (5, 2, 3)
    assert curve.n_per_class[-1].tolist() == [200, 200, 200] and curve.n_per_class[0].tolist() == [20, 20, 20]
    assert mean[0] > mean[-1] + 0.05, mean
    v = curve.verdict()
    assert v["falling"], (mean, v)
    assert v["best_class"]["class"] in CLASSES and v["best_class"]["more"] == 80
    assert v["drop_with_40pct_more"] > 0
    words = curve.words()
    assert "still falling" in words and "more images of" in words, words


def test_curve_is_flat_where_more_data_does_not_help():
    curve = learning_curve(synthetic_cache(3.0), make_head, CLASSES, CurveSettings(draws=2, epochs=3))
    v = curve.verdict()
    assert not v["falling"], (curve.errors, v)
    assert v["flat_from"] <= 0.2
    assert "will not help" in curve.words()
    d = curve.to_json()
    assert d["verdict"]["falling"] is False and len(d["errors"]) == 5


def test_curve_names_a_class_that_more_images_will_not_fix():
    """Class 'e' holds pictures of the other classes (wrong labels): its error stays high however many there are."""
    rng = np.random.default_rng(1)
    means = rng.normal(0, 1, (4, 32)) * 3.0

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = np.arange(n) % 5
        src = np.where(y == 4, rng.integers(0, 4, n), y)  # 'e' looks like a random other class
        x = means[src] + rng.normal(0, 1, (n, 32))
        return torch.tensor(np.concatenate([x, x], 1), dtype=torch.float32), torch.tensor(y)

    xt, yt = draw(500)
    xv, yv = draw(250)
    cache = FeatureCache([xt], yt, xv, yv, 64, False)
    curve = learning_curve(cache, lambda: create_head(HeadConfig(n_features=32, n_classes=5)), list("abcde"),
                           CurveSettings(draws=2, epochs=3))
    v = curve.verdict()
    assert v["stuck_class"] is not None and v["stuck_class"]["class"] == "e", (curve.class_errors[-1], v)
    assert "e is wrong" in curve.words() and "check its labels" in curve.words()

"""Calibration: temperature scaling fixes an over-confident model, ECE, the unsure threshold, and the reliability plot."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ursa.diagnose import calibration as cal


def calibrated_set(n: int = 2000, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true probability of each label (labels drawn from it): perfectly calibrated."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, k))
    p = cal.softmax(logits)
    y = np.array([rng.choice(k, p=row) for row in p])
    return logits, y


def test_temperature_scaling_lowers_the_error_of_an_over_confident_model():
    logits, y = calibrated_set()
    over = 4.0 * logits  # the same ranking, four times too sure
    c = cal.calibrate(over, y)
    assert c.temperature == pytest.approx(4.0, rel=0.15)
    assert c.ece_before > 0.15, "the raw model is clearly over-confident"
    assert c.ece_after < 0.04 and c.ece_after < c.ece_before / 4
    assert c.nll_after < c.nll_before
    assert (cal.softmax(over, c.temperature).argmax(1) == over.argmax(1)).all(), "no prediction changes"
    under = 0.5 * logits
    assert cal.fit_temperature(under, y) == pytest.approx(0.5, rel=0.15), "an under-confident model is sharpened"
    assert cal.fit_temperature(logits, y) == pytest.approx(1.0, rel=0.1)


def test_ece_and_reliability_bins():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    y = np.array([0, 1, 0, 0])
    bins = cal.reliability(probs, y)
    assert len(bins) == cal.N_BINS and sum(b["count"] for b in bins) == 4
    full = [b for b in bins if b["count"]]
    assert [b["count"] for b in full] == [2, 2]
    assert full[0]["accuracy"] == 1.0 and full[1]["accuracy"] == 0.5
    assert cal.ece(probs, y) == pytest.approx((2 * 0.45 + 2 * 0.45) / 4)
    assert math.isnan(cal.ece(np.zeros((0, 2)), np.zeros(0)))


def test_threshold_is_the_lowest_that_reaches_the_target_precision():
    # confidences high to low; right, right, right, wrong, right, wrong
    conf = np.array([0.99, 0.97, 0.9, 0.8, 0.7, 0.6])
    right = np.array([1, 1, 1, 0, 1, 0], dtype=bool)
    probs = np.stack([conf, 1 - conf], 1)
    y = np.where(right, 0, 1)
    assert cal.choose_threshold(probs, y, 0.8) == pytest.approx(0.7), "4 of 5 kept at 0.7 are right"
    assert cal.choose_threshold(probs, y, 0.95) == pytest.approx(0.9)
    assert cal.choose_threshold(probs, y, 0.5) == pytest.approx(0.6), "every answer kept"
    kept, precision = cal.coverage(probs, y, 0.7)
    assert kept == pytest.approx(5 / 6) and precision == pytest.approx(0.8)
    wrong_first = np.stack([np.array([0.99, 0.6]), np.array([0.01, 0.4])], 1)
    assert cal.choose_threshold(wrong_first, np.array([1, 1]), 0.95) is None, "not even the surest answer is right"
    ties = np.stack([np.array([0.9, 0.9, 0.8]), np.array([0.1, 0.1, 0.2])], 1)
    assert cal.choose_threshold(ties, np.array([0, 1, 0]), 0.6) == pytest.approx(0.8), "a tie is kept or dropped whole"
    assert cal.choose_threshold(ties, np.array([0, 1, 0]), 0.9) is None


def test_calibration_for_the_model_file_and_the_report(tmp_path):
    from ursa.diagnose.insight_plots import plot_reliability

    logits, y = calibrated_set(600)
    c = cal.calibrate(3 * logits, y, target_precision=0.9)
    meta = c.to_meta()
    assert set(meta) == {"temperature", "threshold", "target_precision", "ece_before", "ece_after"}
    assert meta["target_precision"] == 0.9 and 0 <= meta["threshold"] <= 1 and meta["temperature"] > 0
    assert c.kept_precision >= 0.9 and 0 < c.kept <= 1
    assert "unsure" in c.summary() and "->" in c.summary()
    png = plot_reliability(cal.reliability(cal.softmax(3 * logits), y), cal.reliability(cal.softmax(3 * logits, c.temperature), y),
                           c.ece_before, c.ece_after, c.temperature, tmp_path / "reliability.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError):
        cal.calibrate(logits, y, target_precision=0)


def test_target_precision_is_checked_with_the_other_options(tmp_path):
    from ursa.training.config import ConfigError, TrainConfig

    assert TrainConfig(data=tmp_path).target_precision == 0.95
    for bad in (0, 1.5, float("nan"), "high"):
        with pytest.raises(ConfigError, match=r"^--target-precision: expected a number in \(0, 1\]"):
            TrainConfig(data=tmp_path, target_precision=bad)


def test_a_validation_set_with_too_few_mistakes_keeps_the_raw_probabilities():
    """All answers right: the NLL falls forever as T -> 0; the fit must not make the model claim certainty."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 22)
    logits = rng.normal(0, 0.5, (22, 3))
    logits[np.arange(22), y] += 2.0  # every answer right, none certain
    c = cal.calibrate(logits, y)
    assert c.mistakes == 0 and c.temperature == 1.0 and "too few" in c.summary()
    assert cal.fit_temperature(logits, y) >= cal.T_RANGE[0]

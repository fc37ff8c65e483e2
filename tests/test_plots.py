"""Every plot: a valid PNG on disk, written atomically, with the panels it promises."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ursa.diagnose import plots

ROWS = [
    {"epoch": 0, "stage": "frozen", "train_loss": 0.9, "valid_loss": 0.4, "error_rate": 0.12, "accuracy": 0.88},
    {"epoch": 1, "stage": "frozen", "train_loss": 0.5, "valid_loss": 0.3, "error_rate": 0.08, "accuracy": 0.92},
    {"epoch": 2, "stage": "unfrozen", "train_loss": 0.3, "valid_loss": 0.25, "error_rate": 0.05, "accuracy": 0.95},
]
EPOCHS = [(i + 1) / 10 for i in range(30)]
LOSSES = [1.1 * math.exp(-i / 12) + 0.05 * ((i * 7) % 3) for i in range(30)]
LRS = [3e-3 * math.sin(math.pi * (i % 10 + 1) / 11) * (0.1 if i >= 20 else 1) for i in range(30)]


def assert_png(path: Path) -> tuple[int, int]:
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        assert im.width > 100 and im.height > 100
        size = im.size
    assert not list(path.parent.glob(f".{path.name}.*")), "no temp file left behind"
    return size


def test_losses(tmp_path):
    fig = plots.losses_figure(LOSSES, EPOCHS, ROWS)
    assert len(fig.axes) == 1
    assert_png(plots.plot_losses(LOSSES, EPOCHS, ROWS, tmp_path / "losses.png"))


def test_losses_of_a_diverged_run_use_a_log_axis(tmp_path):
    losses = LOSSES[:10] + [50.0, 500.0, math.inf, math.nan]
    fig = plots.losses_figure(losses, EPOCHS[:14], ROWS[:1])
    assert fig.axes[0].get_yscale() == "log"
    assert_png(plots.plot_losses(losses, EPOCHS[:14], ROWS[:1], tmp_path / "losses.png"))


def test_lr(tmp_path):
    fig = plots.lr_figure(LRS, EPOCHS, ROWS)
    assert len(fig.axes) == 1
    notes = [t.get_text() for t in fig.axes[0].texts]
    assert any(t.startswith("frozen peak") for t in notes) and any(t.startswith("unfrozen peak") for t in notes)
    assert_png(plots.plot_lr(LRS, EPOCHS, tmp_path / "lr.png", ROWS))


def test_metrics(tmp_path):
    fig = plots.metrics_figure(ROWS)
    assert len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["validation error rate", "loss per epoch"]
    assert_png(plots.plot_metrics(ROWS, tmp_path / "metrics.png"))


def test_plots_of_an_empty_history_still_draw(tmp_path):
    assert_png(plots.plot_metrics([], tmp_path / "m.png"))
    assert_png(plots.plot_lr([], [], tmp_path / "l.png"))
    assert_png(plots.plot_losses([], [], [], tmp_path / "x.png"))


def test_lr_find(tmp_path):
    lrs = [1e-7 * (1e8) ** (i / 99) for i in range(100)]
    smoothed = [1.2 - 0.9 / (1 + math.exp(-(math.log10(lr) + 3.5) * 2)) for lr in lrs[:90]] + [2, 3, 5, 9]
    sugg = {"valley": (lrs[50], smoothed[50]), "steep": (lrs[40], smoothed[40])}
    fig = plots.lr_find_figure(lrs[:94], smoothed, smoothed, sugg)
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and ax.get_xscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("valley") for t in labels) and any(t.startswith("steep") for t in labels)
    assert ax.get_ylim()[1] < 5, "the blow-up at the end does not squash the curve"
    assert_png(plots.plot_lr_find(lrs[:94], smoothed, smoothed, sugg, tmp_path / "lr_find.png"))


@pytest.mark.parametrize("n", [2, 3, 12])
def test_confusion_matrix(tmp_path, n):
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 20, size=(n, n))
    classes = [f"class{i}" for i in range(n)]
    fig = plots.confusion_figure(cm, classes)
    ax = fig.axes[0]
    assert len(fig.axes) == 1
    assert [t.get_text() for t in ax.get_xticklabels()] == classes
    assert len(ax.texts) == n * n, "every cell shows its count"
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "actual"
    assert_png(plots.plot_confusion_matrix(cm, classes, tmp_path / "cm.png"))


def test_top_losses_grid(tmp_path):
    images = [Image.new("RGB", (60, 40), (40 * i, 100, 200)) for i in range(5)]
    titles = [f"grizzly/black\n{2.0 - i / 10:.2f} / 0.9" for i in range(5)]
    fig = plots.top_losses_figure(images, titles, ncols=3)
    assert len(fig.axes) == 5
    assert fig.axes[0].get_title() == titles[0]
    assert_png(plots.plot_top_losses(images, titles, tmp_path / "top.png", ncols=3))


def test_plot_training_writes_the_three_run_plots(tmp_path):
    out = plots.plot_training(LOSSES, LRS, EPOCHS, ROWS, tmp_path)
    assert sorted(p.name for p in out.values()) == ["losses.png", "lr.png", "metrics.png"]
    for p in out.values():
        assert_png(p)

"""LR finder: the schedule and suggestions on synthetic curves, real sweeps frozen and unfrozen
(state restored exactly), the measured suggestion on the bundled sample, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from ursa.util.numbers import smooth
from ursa.training.lr_find import (
    END_LR,
    START_LR,
    LRFinderResult,
    lr_schedule,
    suggest_steep,
    suggest_valley,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedule_is_exponential_from_1e7_to_10():
    lrs = lr_schedule()
    assert len(lrs) == 100
    assert lrs[0] == pytest.approx(START_LR) and lrs[-1] == pytest.approx(END_LR)
    ratios = {round(b / a, 9) for a, b in zip(lrs, lrs[1:])}
    assert len(ratios) == 1, "a constant factor per step: equal spacing on a log axis"


def test_smoothing_is_debiased_and_passes_nan_through():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    out = smooth([1.0, math.nan, 1.0])
    assert math.isnan(out[1]) and out[2] == pytest.approx(1.0)


def _curve(n=100, drop_at=-3.0):
    """A clean lr_find shape: flat, falling around 10**drop_at, then blowing up."""
    lrs = lr_schedule(num_it=n)
    losses = []
    for lr in lrs:
        x = math.log10(lr)
        losses.append(1.2 - 0.9 / (1 + math.exp(-(x - drop_at) * 2)) + (0 if x < -0.5 else (x + 0.5) ** 2 * 3))
    return lrs, losses


def test_suggestions_on_a_synthetic_curve():
    lrs, losses = _curve()
    steep, _ = suggest_steep(lrs, losses)
    valley, _ = suggest_valley(lrs, losses)
    assert 10**-3.5 < steep < 10**-2.5, "steepest where the sigmoid falls fastest"
    assert 10**-4 < valley < 10**-1.5, "inside the long falling stretch"
    fastai_steep = suggest_steep(lrs, losses, window=1)[0]  # fastai's one-step slope
    assert abs(math.log10(steep / fastai_steep)) < 0.1, "a clean curve: the same point, give or take a step"


def test_steep_is_not_fooled_by_one_noisy_step():
    lrs, losses = _curve()
    losses = list(losses)
    losses[12] -= 0.05  # a lucky batch on the flat start
    assert suggest_steep(lrs, losses)[0] > 1e-5
    assert suggest_steep(lrs, losses, window=1)[0] < 1e-5  # fastai's neighbour slope picks the noise


def test_suggestions_of_degenerate_sweeps():
    assert suggest_valley([1e-3], [1.0]) == (1e-3, 1.0)
    assert math.isnan(suggest_valley([], [])[0])
    assert suggest_steep([1e-3], [1.0]) == (1e-3, 1.0)


# --- real sweeps ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learner(sample_dir):
    """A fresh learner on the bundled sample at 128 px (the default backbone, untrained head)."""
    from tests.conftest import sample_learner

    return sample_learner(128)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()])


def _assert_same(model, snap):
    state, grads, modes = snap
    now = model.state_dict()
    changed = [k for k in state if not torch.equal(state[k], now[k])]
    assert not changed, f"lr_find changed {changed[:5]}"
    assert any("running_mean" in k for k in state), "BatchNorm running stats are part of the check"
    assert [p.requires_grad for p in model.parameters()] == grads
    assert [m.training for m in model.modules()] == modes


@pytest.mark.slow
def test_frozen_sweep_restores_everything_and_suggests_about_3e3(learner, tmp_path):
    learner.freeze()
    snap, rng = _snapshot(learner.model), torch.get_rng_state()
    res = learner.lr_find(plot=tmp_path / "lr_find.png")
    _assert_same(learner.model, snap)
    assert torch.equal(rng, torch.get_rng_state())
    assert learner.recorder.batch_losses == [] and learner.recorder.rows == [], "the sweep is not training history"
    assert isinstance(res, LRFinderResult) and res.frozen and res.cached
    assert 2 < len(res.lrs) <= 100 and res.lrs[0] == pytest.approx(1e-7)
    assert len(res.losses) == len(res.lrs) == len(res.smoothed)
    # Measured on the bundled sample: valley ~1e-3..2e-3 at 128 and 224 px; fastai's usual pick is 3e-3.
    assert 3e-4 <= res.suggestion <= 3e-2, f"valley {res.suggestion:.2e} not within a decade of 3e-3"
    assert 0 < res.steep < 1
    with Image.open(tmp_path / "lr_find.png") as im:
        assert im.format == "PNG"
    lines = res.explain()
    assert lines[0].startswith("valley") and lines[1].startswith("steep")
    json.dumps(res.to_dict())


@pytest.fixture
def small_batches(learner):
    """Batches of 8 for the sweeps through the whole network (CPU time, not coverage, is what shrinks)."""
    bs = learner.dls.bs
    learner.dls.bs = 8
    yield learner
    learner.dls.bs = bs


@pytest.mark.slow
def test_unfrozen_sweep_restores_body_batchnorm_stats(small_batches):
    learner = small_batches
    learner.unfreeze()
    try:
        snap = _snapshot(learner.model)
        res = learner.lr_find(num_it=3, cached=False)
        _assert_same(learner.model, snap)
        assert not res.frozen and not res.cached and len(res.lrs) == 3
    finally:
        learner.freeze()


@pytest.mark.slow
def test_frozen_sweep_without_the_cache_runs_the_model(small_batches):
    learner = small_batches
    learner.freeze()
    snap = _snapshot(learner.model)
    res = learner.lr_find(num_it=2, cached=False)
    _assert_same(learner.model, snap)
    assert res.frozen and not res.cached


def test_lr_find_sweeps_cycle_through_a_small_training_set():
    """Fewer batches than steps: the sweep (the LRFinder callback in the learner's loop) goes round again."""
    from types import SimpleNamespace

    from ursa.training.config import LearnerConfig
    from ursa.training.learner import Learner
    from ursa.training.lr_find import LRFinder
    from ursa.training.optim import make_optimizer

    calls = []
    head = torch.nn.Linear(2, 2)

    class ThreeBatches:
        n_batches, module = 3, head

        def train_modes(self):
            head.train()

        def batches(self, epoch):
            for b in range(3):
                calls.append(b)
                yield torch.randn(4, 2), torch.tensor([0, 1, 0, 1])

        def forward(self, xb):
            return head(xb)

        def end_epoch(self):
            pass

    learn = Learner(SimpleNamespace(bs=4), head, LearnerConfig(quiet=True, wd=0.0))
    before = {k: v.clone() for k, v in head.state_dict().items()}
    schedule = lr_schedule(1e-5, 1e-3, 10)
    finder = LRFinder(learn, schedule)
    opt = make_optimizer([{"params": list(head.parameters()), "lr": schedule[0]}], 0.0)
    learn.run(5, ThreeBatches(), opt, validate=False, cbs=[finder])
    assert len(finder.losses) == 10 and calls == [0, 1, 2] * 3 + [0]
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items()), "restored after the sweep"
    assert learn.recorder.rows == [] and learn.epochs_done == 0, "a sweep is not training history"


# --- CLI -----------------------------------------------------------------------------------------


def _toy_data(root):
    """Three classes of tiny noisy colour images: enough to exercise the command end to end."""
    import numpy as np

    rng = np.random.default_rng(0)
    for c, colour in (("red", (200, 40, 40)), ("green", (40, 200, 40)), ("blue", (40, 40, 200))):
        (root / c).mkdir(parents=True)
        for k in range(8):
            a = np.clip(rng.normal(colour, 30, size=(48, 64, 3)), 0, 255).astype("uint8")
            Image.fromarray(a).save(root / c / f"{k}.jpg")
    return root


@pytest.mark.slow
def test_cli_lr_find_prints_suggestions_and_writes_the_plot(tmp_path, capsys):
    from ursa.cli import main

    data, out = _toy_data(tmp_path / "data"), tmp_path / "lrf"
    rc = main(["lr-find", str(data), "--out", str(out), "--size", "64", "--bs", "8", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "suggested learning rate:" in text and "use it: ursa train" in text
    # One number: the suggestion printed is the one the command line uses (issue 28: 2.5e-04 then --lr 2e-04).
    import re

    numbers = set(re.findall(r"\d\.\de-\d\d", text.split("suggested learning rate:")[1].split("plot:")[0]))
    assert len(numbers) == 1, text
    with Image.open(out / "lr_find.png") as im:
        assert im.format == "PNG"
    d = json.loads((out / "lr_find.json").read_text())
    assert d["suggestion"] in (d["valley"], d["default"]) and d["default"] == 3e-3 and len(d["lrs"]) == len(d["losses"])


def test_cli_lr_find_refuses_to_write_into_the_data_folder(tmp_path, capsys):
    from ursa.cli import main

    data = _toy_data(tmp_path / "data")
    assert main(["lr-find", str(data), "--out", str(data / "lrf"), "--quiet"]) == 2
    assert "outside the data folder" in capsys.readouterr().err
    assert not (data / "lrf").exists()

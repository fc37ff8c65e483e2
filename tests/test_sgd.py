"""SGD from scratch (issue 6): the lesson's maths, divergence detection, and the animations.

Everything runs on 100 points and at most a few dozen animation frames, so the file takes seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from ursa import sgd
from ursa.cli import main
from ursa.errors import UrsaError


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return sgd.make_data(n=100, seed=0)


# --- the lesson's maths ----------------------------------------------------------------------


def test_make_data_is_the_lessons_line_plus_uniform_noise(data):
    x, y = data
    assert x.shape == (100, 2) and y.shape == (100,)
    assert torch.all(x[:, 1] == 1)  # the column of ones that carries the intercept
    assert x[:, 0].min() >= -1 and x[:, 0].max() < 1
    noise = y - x @ torch.tensor([3.0, 2.0])
    assert noise.min() >= 0 and noise.max() < 1  # torch.rand: uniform on [0, 1)
    x2, y2 = sgd.make_data(n=100, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # seeded: the same every run
    assert not torch.equal(y, sgd.make_data(n=100, seed=1)[1])


def test_mse_is_the_mean_of_squared_errors():
    assert sgd.mse(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 4.0, 0.0])).item() == pytest.approx(13 / 3)


def test_update_takes_one_step_down_the_hand_computed_gradient(data):
    x, y = data
    a = torch.tensor([-1.0, 1.0], requires_grad=True)
    # d/da mean((x@a - y)^2) = 2/n x^T (x@a - y)
    expected_grad = 2 / len(x) * x.T @ (x @ a.detach() - y)
    expected_loss = sgd.mse(x @ a.detach(), y).item()
    loss = sgd.update(a, x, y, lr=0.1)
    assert loss == pytest.approx(expected_loss)
    assert torch.allclose(a.detach(), torch.tensor([-1.0, 1.0]) - 0.1 * expected_grad, atol=1e-6)
    assert torch.all(a.grad == 0)  # zeroed, or the next step would add to it


def test_full_batch_gradient_descent_finds_the_line(data):
    x, y = data
    r = sgd.fit(x, y, lr=0.1, steps=100)
    assert not r.diverged and r.diverged_at is None
    assert abs(r.a[0].item() - 3.0) < 0.15 and abs(r.a[1].item() - 2.5) < 0.15
    assert r.final_loss < 0.1
    assert len(r.losses) == len(r.snapshots) == 101  # the start, then every step
    assert torch.equal(r.snapshots[0], torch.tensor(sgd.START_A))
    assert r.losses[0] > 5 > 1 > r.losses[30] > r.losses[-1]


def test_too_high_lr_is_reported_as_diverged_not_nan(data):
    x, y = data
    r = sgd.fit(x, y, lr=1.1, steps=100)
    assert r.diverged is True
    assert r.diverged_at is not None and 1 <= r.diverged_at < 100
    assert len(r.snapshots) == len(r.losses) == r.diverged_at + 1  # updating stopped there
    assert all(math.isfinite(v) for v in r.losses) and torch.all(torch.isfinite(r.a))
    assert sgd.has_diverged(r.final_loss, r.losses[0])
    assert not any(sgd.has_diverged(v, r.losses[0]) for v in r.losses[:-1])
    assert "diverged" in r.describe()


def test_has_diverged_catches_nan_inf_and_blow_ups():
    assert sgd.has_diverged(float("nan"), 7.0)
    assert sgd.has_diverged(float("inf"), 7.0)
    assert sgd.has_diverged(2e6, 1e5)  # past the absolute limit
    assert sgd.has_diverged(701.0, 7.0)  # 100x its start
    assert not sgd.has_diverged(699.0, 7.0)
    assert not sgd.has_diverged(50.0, 0.001)  # a tiny start does not make ordinary losses "blow up"


def test_minibatch_sgd_also_converges_and_is_reproducible(data):
    x, y = data
    r = sgd.fit(x, y, lr=0.1, steps=100, batch_size=10, seed=0)
    assert not r.diverged
    assert abs(r.a[0].item() - 3.0) < 0.15 and abs(r.a[1].item() - 2.5) < 0.15
    assert r.final_loss < 0.1
    full = sgd.fit(x, y, lr=0.1, steps=100)
    assert r.losses != full.losses  # it really used mini-batches
    again = sgd.fit(x, y, lr=0.1, steps=100, batch_size=10, seed=0)
    assert again.losses == r.losses
    assert sgd.fit(x, y, lr=0.1, steps=100, batch_size=10, seed=1).losses != r.losses


@pytest.mark.parametrize(
    "kwargs", [{"lr": 0.0}, {"lr": -1.0}, {"lr": float("nan")}, {"steps": 0}, {"batch_size": 0}, {"batch_size": 101}]
)
def test_fit_refuses_settings_that_cannot_train(data, kwargs):
    with pytest.raises(UrsaError):
        sgd.fit(*data, **kwargs)


def test_frame_steps_shows_every_step_or_an_even_spread():
    assert sgd.frame_steps(101) == list(range(101))
    spread = sgd.frame_steps(1001, max_frames=201)
    assert len(spread) == 201 and spread[0] == 0 and spread[-1] == 1000
    assert spread == sorted(set(spread))


@pytest.mark.parametrize("text", ["abc", "0.1,,x", "", "0.1,-1", "0,0.1", "nan", "1,2,3,4,5,6,7"])
def test_parse_lrs_rejects_bad_lists(text):
    with pytest.raises(UrsaError):
        sgd.parse_lrs(text)


def test_parse_lrs_reads_a_comma_list():
    assert sgd.parse_lrs("0.01, 0.1,1.1") == [0.01, 0.1, 1.1]


# --- the animations, through the command ------------------------------------------------------


def test_cli_gif_has_one_frame_per_step(tmp_path, capsys):
    out = tmp_path / "fit.gif"
    assert main(["sgd", "--steps", "12", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "GIF"
        assert im.n_frames == 13  # the starting guess, then one frame per step
    printed = capsys.readouterr().out
    assert "step    0  loss 7.6552" in printed and "step   10  loss" in printed
    assert "wrote" in printed and str(out) in printed
    assert [p.name for p in tmp_path.iterdir()] == ["fit.gif"]  # no temp file left behind


def test_animation_subsamples_long_runs_to_the_documented_count(data, tmp_path):
    x, y = data
    r = sgd.fit(x, y, lr=0.1, steps=12)
    out = sgd.save_animation(sgd.animate(x, y, [r], max_frames=5), tmp_path / "few.gif")
    with Image.open(out) as im:
        assert im.n_frames == len(sgd.frame_steps(13, max_frames=5)) == 5


def test_cli_html_is_a_self_contained_animation(tmp_path):
    out = tmp_path / "fit.html"
    assert main(["sgd", "--steps", "8", "-q", "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert 'class="animation"' in page and "new Animation(frames" in page
    assert page.count("data:image/png;base64,") == 9  # every frame embedded
    assert "http://" not in page and "https://" not in page  # works offline


def test_cli_too_high_lr_reports_divergence_and_exits_0(tmp_path, capsys):
    out = tmp_path / "boom.gif"
    assert main(["sgd", "--lr", "1.1", "--steps", "40", "-q", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "diverged" in printed and "nan" not in printed.lower()
    diverged_at = sgd.fit(*sgd.make_data(), lr=1.1, steps=40).diverged_at
    with Image.open(out) as im:
        assert im.n_frames == diverged_at + 1  # the animation ends where updating stopped


def test_cli_compare_writes_panels_and_loss_curves(tmp_path, capsys):
    out = tmp_path / "compare.gif"
    assert main(["sgd", "--compare", "0.01,0.1,1.1", "--steps", "20", "-q", "--out", str(out)]) == 0
    losses_png = tmp_path / "compare_losses.png"
    with Image.open(out) as im:
        assert im.format == "GIF" and im.n_frames == 21
        assert im.width > 2.5 * im.height  # three panels side by side
    with Image.open(losses_png) as im:
        im.verify()
        assert im.format == "PNG"
    printed = capsys.readouterr().out
    assert "diverged" in printed and str(out) in printed and str(losses_png) in printed


@pytest.mark.parametrize(
    "args",
    [
        ["--lr", "-1"],
        ["--lr", "0"],
        ["--compare", "abc"],
        ["--compare", "0.1", "--lr", "0.1"],
        ["--batch-size", "0"],
        ["--steps", "0"],
    ],
)
def test_cli_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, args):
    out = tmp_path / "x.gif"
    assert main(["sgd", *args, "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("name", ["x.png", "x", "x.GIFF"])
def test_cli_unknown_output_format_exits_2(tmp_path, name):
    assert main(["sgd", "--out", str(tmp_path / name)]) == 2


def test_cli_mp4_without_ffmpeg_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sgd.shutil, "which", lambda name: None)
    assert main(["sgd", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "ffmpeg" in capsys.readouterr().err


def test_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    import matplotlib.animation

    class CrashingWriter(matplotlib.animation.PillowWriter):
        def finish(self):
            raise RuntimeError("writer crashed")

    monkeypatch.setattr(matplotlib.animation, "PillowWriter", CrashingWriter)
    out = tmp_path / "keep.gif"
    out.write_bytes(b"old")
    x, y = sgd.make_data()
    anim = sgd.animate(x, y, [sgd.fit(x, y, lr=0.1, steps=3)])
    with pytest.raises(RuntimeError, match="writer crashed"):
        sgd.save_animation(anim, out)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.gif"]

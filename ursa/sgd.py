"""SGD from scratch: the lesson's tiniest neural network, a straight line fitted by hand.

Read it top to bottom; the training part is four functions:

* ``make_data``: 100 points on the line y = 3x + 2, plus noise from ``torch.rand``;
* ``mse``: how wrong a guess is (mean squared error);
* ``update``: one step of gradient descent: loss, gradients by autograd, ``a.sub_(lr * a.grad)``;
* ``fit``: repeat ``update`` (on all the points, or on a random mini-batch each step), record the
  loss and the guess after every step, and stop if the loss blows up.

Each point is a row ``(x, 1)`` of ``x``, so ``x @ a`` is ``a[0] * x + a[1]``: a line with slope
``a[0]`` and intercept ``a[1]``. The noise ``torch.rand`` is uniform on [0, 1) with mean 0.5, so the
best line has slope about 3 and intercept about 2.5, not 2.

The rest draws what happened: ``animate`` moves the line over the scatter plot, one frame per
step (at most ``MAX_FRAMES``), ``save_animation`` writes it as GIF, MP4 or HTML, and
``save_loss_plot`` draws the loss curves. Matplotlib is imported only there, and figures are
drawn by the Agg canvas directly, so nothing here changes pyplot's global backend.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ursa.errors import UrsaError
from ursa.util.files import atomic_path

if TYPE_CHECKING:
    from matplotlib.animation import FuncAnimation

TRUE_A = (3.0, 2.0)  # the line the points come from: slope 3, intercept 2
START_A = (-1.0, 1.0)  # the lesson's first guess: slope -1, intercept 1
DIVERGE_LIMIT = 1e6  # a loss above this has blown up, whatever it started at
DIVERGE_FACTOR = 100.0  # ... and so has one 100x its start (or above 100, if it started below 1)
MAX_FRAMES = 201  # animations show every step up to 200 steps; longer runs are evenly subsampled
ANIMATION_SUFFIXES = (".gif", ".mp4", ".html")
FRAME_INTERVAL_MS = 50  # 20 frames a second: 100 steps play in about 5 seconds


# --- the lesson ------------------------------------------------------------------------------


def make_data(n: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the lesson's points from a seeded generator, so every run sees the same data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.ones(n, 2)  # column 1 stays all ones: it multiplies the intercept a[1]
    x[:, 0].uniform_(-1, 1, generator=g)  # column 0 is the x coordinate, uniform in [-1, 1)
    a = torch.tensor(TRUE_A)
    y = x @ a + torch.rand(n, generator=g)  # noise in [0, 1): the best intercept is about 2.5
    return x, y


def mse(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Score a guess with one number that autograd can differentiate: lower is better."""
    return ((y_hat - y) ** 2).mean()


def update(a: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
    """Take one gradient-descent step in place; this is all that 'training' means."""
    y_hat = x @ a
    loss = mse(y_hat, y)
    loss.backward()  # fills a.grad with d(loss)/d(a)
    with torch.no_grad():  # the step itself is not part of the model, so don't record it
        a.sub_(lr * a.grad)  # walk downhill, lr times the slope
        a.grad.zero_()  # .backward() adds to .grad, so clear it for the next step
    return loss.item()


@dataclass
class FitResult:
    """Everything a run did, so it can be printed, checked and animated afterwards."""

    a: torch.Tensor  # the final guess (slope, intercept)
    losses: list[float]  # losses[i] is the loss on all points of snapshots[i]
    snapshots: list[torch.Tensor]  # the guess before any step, then after each step
    lr: float
    batch_size: int | None  # None: full-batch gradient descent
    diverged: bool = False
    diverged_at: int | None = None  # the step whose loss blew up; updating stopped there

    @property
    def final_loss(self) -> float:
        """The loss of the final guess (the one that blew up, if it diverged)."""
        return self.losses[-1]

    def describe(self) -> str:
        """Say in one line how the run ended, for titles and the terminal."""
        if self.diverged:
            return f"lr {self.lr:g}: diverged at step {self.diverged_at} (loss {self.final_loss:.3g})"
        return f"lr {self.lr:g}: loss {self.final_loss:.4f}"


def has_diverged(loss: float, start: float) -> bool:
    """Spot a loss that has blown up, before it turns into inf and then NaN."""
    too_big = loss > DIVERGE_LIMIT or loss > DIVERGE_FACTOR * max(start, 1.0)
    return not math.isfinite(loss) or too_big


def check_settings(lr: float, steps: int, batch_size: int | None, n: int) -> None:
    """Refuse settings that cannot train, with a message that says which one and why."""
    if not math.isfinite(lr) or lr <= 0:
        raise UrsaError(f"learning rate must be a positive number, got {lr:g}")
    if steps < 1:
        raise UrsaError(f"steps must be at least 1, got {steps}")
    if n < 2:
        raise UrsaError(f"need at least 2 points to fit a line, got {n}")
    if batch_size is not None and not 1 <= batch_size <= n:
        raise UrsaError(f"batch size must be from 1 to the number of points ({n}), got {batch_size}")


def fit(
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float = 0.1,
    steps: int = 100,
    batch_size: int | None = None,
    seed: int = 0,
    start: Sequence[float] = START_A,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Fit the line by repeated updates, keeping every step so the run can be replayed."""
    check_settings(lr, steps, batch_size, len(x))
    g = torch.Generator().manual_seed(seed)  # picks the mini-batches, reproducibly
    a = torch.tensor([float(v) for v in start], requires_grad=True)  # nn.Parameter in the lesson

    def full_loss() -> float:  # the loss on all points, whatever batch the step used
        with torch.no_grad():
            return mse(x @ a, y).item()

    losses = [full_loss()]
    snapshots = [a.detach().clone()]
    diverged_at = None
    for t in range(1, steps + 1):
        if log is not None and (t - 1) % 10 == 0:  # like the lesson: the loss every 10 steps
            log(f"step {t - 1:>4}  loss {losses[-1]:.4f}")
        if batch_size is None:
            update(a, x, y, lr)  # gradient descent: every point, every step
        else:
            idx = torch.randperm(len(x), generator=g)[:batch_size]  # a fresh random mini-batch
            update(a, x[idx], y[idx], lr)  # stochastic gradient descent
        losses.append(full_loss())
        snapshots.append(a.detach().clone())
        if has_diverged(losses[-1], losses[0]):
            diverged_at = t  # stop here: more steps would only give inf, then NaN
            break
    if log is not None:
        if diverged_at is not None:
            log(f"step {diverged_at:>4}  loss {losses[-1]:.4g}: diverged, lr {lr:g} is too high")
        else:
            log(f"step {steps:>4}  loss {losses[-1]:.4f}  (a = {_fmt(snapshots[-1])})")
    return FitResult(
        a=snapshots[-1],
        losses=losses,
        snapshots=snapshots,
        lr=lr,
        batch_size=batch_size,
        diverged=diverged_at is not None,
        diverged_at=diverged_at,
    )


def _fmt(a: torch.Tensor) -> str:
    return f"({a[0].item():.3f}, {a[1].item():.3f})"


# --- drawing it ------------------------------------------------------------------------------


def frame_steps(n_snapshots: int, max_frames: int = MAX_FRAMES) -> list[int]:
    """Choose which steps become frames: all of them, or an even spread incl. first and last."""
    if n_snapshots <= max_frames:
        return list(range(n_snapshots))
    if max_frames < 2:
        raise ValueError("max_frames must be at least 2")
    return [i * (n_snapshots - 1) // (max_frames - 1) for i in range(max_frames)]


def parse_lrs(text: str) -> list[float]:
    """Read '--compare 0.01,0.1,1.1' strictly, so a typo is an error and not a silent default."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    lrs = []
    for p in parts:
        try:
            lr = float(p)
        except ValueError:
            raise UrsaError(
                f"--compare wants learning rates separated by commas, e.g. 0.01,0.1,1.1; got {p!r}"
            ) from None
        if not math.isfinite(lr) or lr <= 0:
            raise UrsaError(f"--compare learning rates must be positive numbers, got {p!r}")
        lrs.append(lr)
    if not 1 <= len(lrs) <= 6:
        raise UrsaError(f"--compare takes 1 to 6 learning rates, got {len(lrs)}")
    return lrs


def check_out(out: Path, suffixes: Sequence[str] = ANIMATION_SUFFIXES) -> None:
    """Refuse an output the writers can't produce before spending time on the run."""
    suffix = out.suffix.lower()
    if suffix not in suffixes:
        got = out.suffix or "no suffix"
        raise UrsaError(f"{out}: the file name must end in {_one_of(suffixes)} (got {got!r})")
    if suffix == ".mp4" and shutil.which("ffmpeg") is None:
        raise UrsaError(f"{out}: writing .mp4 needs ffmpeg, which is not installed; use .gif or .html")
    if out.exists() and out.is_dir():
        raise UrsaError(f"{out} is a folder; give a file name ending in {_one_of(suffixes)}")


def _one_of(options: Sequence[str]) -> str:
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def animate(
    x: torch.Tensor,
    y: torch.Tensor,
    runs: Sequence[FitResult],
    max_frames: int = MAX_FRAMES,
) -> FuncAnimation:
    """Replay runs side by side, one panel each, so the line can be watched finding the points."""
    from matplotlib.animation import FuncAnimation
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    class SaveOnlyCanvas(FigureCanvasAgg):
        """Agg, drawing only when a frame is saved: FuncAnimation would otherwise draw each twice."""

        def draw_idle(self, *args: object, **kwargs: object) -> None:
            pass

    fig = Figure(figsize=(4.2 * len(runs), 3.8), dpi=80, layout="constrained")
    SaveOnlyCanvas(fig)  # draw with Agg, without touching pyplot's global backend
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    xs = torch.tensor([-1.0, 1.0])  # a line needs two points: the ends of the x range
    ys = y.tolist()
    y_lo, y_hi = min(ys), max(ys)
    pad = 0.25 * (y_hi - y_lo)
    axes[0].set_ylabel("y", fontsize=9)
    lines, notes = [], []
    for ax, run in zip(axes, runs):
        ax.scatter(x[:, 0].tolist(), ys, c="orange", s=12)
        (line,) = ax.plot(xs.tolist(), [0.0, 0.0], lw=2)
        ax.set_xlim(-1.1, 1.1)
        ax.set_xticks([-1, -0.5, 0, 0.5, 1])
        ax.set_ylim(y_lo - pad, y_hi + pad)  # a diverging line flies out of the picture
        ax.set_title(run.describe(), fontsize=10, color="red" if run.diverged else "black")
        ax.set_xlabel("x", fontsize=9)
        note = ax.text(0.03, 0.97, "", transform=ax.transAxes, va="top", fontsize=9, family="monospace")
        lines.append(line)
        notes.append(note)
    steps = frame_steps(max(len(r.snapshots) for r in runs), max_frames)
    label = fig.suptitle("step 0", fontsize=10)

    def draw(step: int) -> list:
        label.set_text(f"step {step}")  # also makes every frame different, so none is merged
        for line, note, run in zip(lines, notes, runs):
            i = min(step, len(run.snapshots) - 1)  # a run that stopped stays where it stopped
            a = run.snapshots[i]
            line.set_ydata((a[0] * xs + a[1]).tolist())
            note.set_text(f"a = {_fmt(a)}\nloss {run.losses[i]:.4g}")
        return [label, *lines, *notes]

    draw(0)
    fig.canvas.draw()  # lay the figure out once, with room for the titles ...
    fig.set_layout_engine("none")  # ... then keep it: re-laying out every frame is most of the cost

    return FuncAnimation(fig, draw, frames=steps, interval=FRAME_INTERVAL_MS, blit=False, repeat=False)


def save_animation(anim: FuncAnimation, out: Path) -> Path:
    """Write the animation in the format the file name asks for, atomically."""
    from matplotlib.animation import FFMpegWriter, PillowWriter

    check_out(out)
    suffix = out.suffix.lower()
    fps = 1000 / FRAME_INTERVAL_MS
    with atomic_path(out, keep_suffix=True) as tmp:
        if suffix == ".html":
            tmp.write_text(_jshtml_page(anim, out.stem), encoding="utf-8")
        elif suffix == ".mp4":
            anim.save(tmp, writer=FFMpegWriter(fps=fps))
        else:
            anim.save(tmp, writer=PillowWriter(fps=fps))  # pure Python, no ffmpeg needed
    return out


def save_loss_plot(runs: Sequence[FitResult], out: Path) -> Path:
    """Draw every run's loss on one log scale, where 'too slow' and 'blew up' look obvious."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_out(out, (".png",))
    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for run in runs:
        (line,) = ax.plot(range(len(run.losses)), run.losses, label=run.describe())
        if run.diverged:
            ax.plot([len(run.losses) - 1], [run.losses[-1]], "x", color=line.get_color(), ms=10)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean squared error, log scale)")
    ax.legend(fontsize=8)
    with atomic_path(out, keep_suffix=True) as tmp:
        fig.savefig(tmp)
    return out


def _jshtml_page(anim: FuncAnimation, title: str) -> str:
    import html

    import matplotlib

    with matplotlib.rc_context({"animation.embed_limit": 500}):  # MB: never drop frames silently
        body = anim.to_jshtml(default_mode="once")
    # The player's only outside reference is a CDN stylesheet for its button icons; replace it
    # with plain characters so the page works offline, as the rest of ursa does.
    body = re.sub(r"<link[^>]*font-awesome[^>]*>", "", body)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_ICON_CSS}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


_ICON_CSS = """
.anim-buttons .fa { font-style: normal; display: inline-block; }
.fa-minus::before { content: "\\2212"; }
.fa-plus::before { content: "+"; }
.fa-fast-backward::before { content: "\\23EE"; }
.fa-step-backward::before { content: "\\275A\\25C0"; }
.fa-play::before { content: "\\25B6"; }
.fa-pause::before { content: "\\275A\\275A"; }
.fa-step-forward::before { content: "\\25B6\\275A"; }
.fa-fast-forward::before { content: "\\23ED"; }
.fa-flip-horizontal { transform: scaleX(-1); }
"""

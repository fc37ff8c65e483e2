"""`ursa sgd`: the lesson's SGD-from-scratch demo, animated."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ursa.cli.common import Quiet
from ursa.errors import UrsaError


def sgd_cmd(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Animation to write: .gif, .html (a self-contained page) or .mp4 (needs ffmpeg).",
        ),
    ],
    lr: Annotated[
        Optional[float], typer.Option(help="Learning rate: how far each step walks downhill. [default: 0.1]")
    ] = None,
    steps: Annotated[int, typer.Option(help="How many updates to make.")] = 100,
    batch_size: Annotated[
        Optional[int],
        typer.Option("--batch-size", help="Points per step (mini-batch SGD). Default: all 100 (gradient descent)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the points and the mini-batches.")] = 0,
    compare: Annotated[
        Optional[str],
        typer.Option(
            help="Learning rates to fit side by side, e.g. 0.01,0.1,1.1 (too low, good, too high); "
            "also writes OUT's name + _losses.png."
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Watch gradient descent fit a line to 100 points: the lesson's SGD from scratch, animated."""
    from ursa import sgd

    if compare is not None and lr is not None:
        raise UrsaError("use either --lr (one run) or --compare (several learning rates), not both")
    lrs = sgd.parse_lrs(compare) if compare is not None else [0.1 if lr is None else lr]
    x, y = sgd.make_data(seed=seed)
    for rate in lrs:  # refuse bad settings before any run starts or any file is touched
        sgd.check_settings(rate, steps, batch_size, len(x))
    sgd.check_out(out)
    losses_png = out.with_name(out.stem + "_losses.png")
    how = "gradient descent" if batch_size is None else f"SGD, mini-batches of {batch_size}"
    runs = []
    for rate in lrs:
        if not quiet:
            print(f"lr {rate:g}, {steps} steps, {how}:")
        runs.append(
            sgd.fit(x, y, lr=rate, steps=steps, batch_size=batch_size, seed=seed, log=None if quiet else print)
        )
    for run in runs:
        if run.diverged:
            print(
                f"diverged: with lr {run.lr:g} the loss grew from {run.losses[0]:.4g} to "
                f"{run.final_loss:.4g} by step {run.diverged_at}, so updating stopped there"
                + ("" if compare is not None else "; try a smaller --lr (0.1 works)")
            )
    anim = sgd.animate(x, y, runs)
    n_frames = len(sgd.frame_steps(max(len(r.snapshots) for r in runs)))
    if not quiet:
        print(f"drawing {n_frames} frames...")
    sgd.save_animation(anim, out)
    print(f"wrote {out} ({n_frames} frames, {out.stat().st_size / 1024:.0f} KiB)")
    if compare is not None:
        sgd.save_loss_plot(runs, losses_png)
        print(f"wrote {losses_png} (loss curves, log scale)")

"""The run writer: everything a run leaves in its folder, written once, at the end.

config.json, split.csv, history.csv, the curves, advice.txt, report.html/json and the model
file (plus best.safetensors when the error got worse at the end). A run that diverged gets the
same folder without a model file, so the user can read why. Nothing is written into the data
folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from ursa.diagnose.advice import Advice, advise, write_advice
from ursa.diagnose.interpret import Interpretation
from ursa.diagnose.plots import plot_losses, plot_lr, plot_metrics
from ursa.diagnose.report import run_plots, write_report
from ursa.training.config import TrainConfig
from ursa.training.learner import Learner
from ursa.util.files import atomic_write_text
from ursa.vision.data import ImageDataset


@dataclass
class RunFiles:
    """What the run folder holds and what the failure-mode rules said (computed once)."""

    out: Path
    model: Path | None
    best: Path | None
    advice: list[Advice]
    notes: list[str] = field(default_factory=list)
    report: dict[str, Path] = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        """The run diverged: there is no model file, and the advice says why."""
        return any(a.rule == "diverged" for a in self.advice)


def write_run(out: Path, learn: Learner, cfg: TrainConfig, ds: ImageDataset, info: dict[str, Any] | None = None,
              console: Console | None = None) -> RunFiles:
    """Write the run folder; no model file when the learner diverged (its advice says why)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = cfg.to_json()
    r = learn.recorder
    atomic_write_text(out / "history.csv", r.history_csv())
    plot_losses(r.batch_losses, r.batch_epochs, r.rows, out / "losses.png")
    plot_lr(r.batch_lrs, r.batch_epochs, out / "lr.png", r.rows)
    plot_metrics(r.rows, out / "metrics.png")
    h = r.history(learn.diverged)
    advice = advise(h)
    notes: list[str] = []
    earlier = (out / "model.safetensors").exists()
    if not (learn.diverged and earlier):  # an earlier run's model keeps the settings and split it was made with
        atomic_write_text(out / "config.json", json.dumps(config, indent=1) + "\n")
        ds.write_split(out / "split.csv")
    if learn.diverged or any(a.rule == "diverged" for a in advice):
        notes.append("No model file was written by this run." + (
            " (model.safetensors, config.json and split.csv in this folder are from an earlier run.)" if earlier else ""))
        write_advice(out / "advice.txt", advice, h, notes)
        report = write_report(out, None, h, run_plots(out), {"title": "ursa training report: diverged",
                                                             "run folder": str(out)}, notes)
        return RunFiles(out, None, None, advice, notes, report)
    model = learn.export(out / "model.safetensors", config=config)
    best = None
    b = learn.best
    if any(a.rule == "too_many_epochs" for a in advice) and b.state is not None and b.row is not None:
        metrics = {k: b.row[k] for k in ("valid_loss", "error_rate", "accuracy")}
        metrics["epoch"] = b.epoch
        best = learn.export(out / "best.safetensors", metrics=metrics, config=config, state=b.state)
        notes.append(f"The weights of epoch {b.epoch} (error rate {b.row['error_rate']:.4f}) are saved as "
                     f"{best.name}: use it instead of model.safetensors, or retrain with fewer epochs.")
    write_advice(out / "advice.txt", advice, h, notes)
    report: dict[str, Path] = {}
    try:  # the model file is written: a report problem must not fail the run
        probs, y = learn.get_preds()
        idx = ds.valid_idx
        interp = Interpretation(list(ds.classes), [ds.rel(i) for i in idx], [ds.files[i] for i in idx], y.numpy(),
                                probs.float().numpy(), "valid", list(ds.skipped))
        info = {"title": "ursa training report", "run folder": str(out), "model": "model.safetensors",
                "arch": learn.model.arch, "input size": learn.dls.size, **(info or {})}
        report = write_report(out, interp, h, run_plots(out), info, notes)
    except Exception as e:  # noqa: BLE001 - reported, never fatal
        (console or learn.console).print(f"[yellow]warning:[/] could not write the report: {type(e).__name__}: {e}",
                                         highlight=False)
    return RunFiles(out, model, best, advice, notes, report)

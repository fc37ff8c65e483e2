"""The run writer: everything a run leaves in its folder, written once, at the end.

config.json, split.csv, history.csv, the curves, advice.txt, report.html/json and the model
file with its ONNX export beside it (model.onnx, so predict and serve run ONNX Runtime; a failed
export only warns), plus best.safetensors when the error got worse at the end. One pass over the validation
images gives the final model's logits and body features: the temperature and the "unsure"
threshold are fitted on the logits before the model file is written (they go into its
``calibration``; reliability.png shows them), and the features place the images on the report's
embedding map. A run that diverged gets the same folder without a model file, so the user can
read why. Nothing is written into the data folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console

from ursa.acquire.licenses import license_summary, summary_line
from ursa.diagnose.advice import Advice, advise, write_advice
from ursa.diagnose.calibration import Calibration
from ursa.diagnose.insight_plots import plot_curve
from ursa.diagnose.label_report import write_label_report
from ursa.diagnose.interpret import Interpretation
from ursa.diagnose.plots import plot_losses, plot_lr, plot_metrics
from ursa.diagnose.recall import recall_by_class
from ursa.diagnose.report import run_plots, write_report
from ursa.inference.export import write_onnx_beside
from ursa.inference.task import SINGLE_LABEL
from ursa.training.callbacks import metric_values
from ursa.training.config import TrainConfig
from ursa.training.learner import Learner
from ursa.training.reference import fit_open_world
from ursa.training.refit import LEFT_OUT, Refit
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
    calibration: Calibration | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds: calibration, report
    recall: dict = field(default_factory=dict)  # per class, of the model file's weights on the validation images

    @property
    def diverged(self) -> bool:
        """The run diverged: there is no model file, and the advice says why."""
        return any(a.rule == "diverged" for a in self.advice)


def write_run(out: Path, learn: Learner, cfg: TrainConfig, ds: ImageDataset, info: dict[str, Any] | None = None,
              console: Console | None = None, insight: dict[str, Any] | None = None,
              notes: Sequence[str] = (), refit: Refit | None = None) -> RunFiles:
    """Write the run folder; no model file when the learner diverged (its advice says why).

    ``insight``: what the recipe measured (``data``, ``leakage``, ``curve``), for the report;
    ``notes``: what the recipe has to say (advice.txt and the report show them); ``refit``: --refit's
    second fit, whose weights the model file holds when it was used (the figures stay ``learn``'s).
    """
    out = Path(out)
    console = console or learn.console
    insight = dict(insight or {})
    if insight.get("curve"):
        plot_curve(insight["curve"], out / "curve.png")
    out.mkdir(parents=True, exist_ok=True)
    config = cfg.to_json()
    r = learn.recorder
    atomic_write_text(out / "history.csv", r.history_csv())
    plot_losses(r.batch_losses, r.batch_epochs, r.rows, out / "losses.png")
    plot_lr(r.batch_lrs, r.batch_epochs, out / "lr.png", r.rows)
    plot_metrics(r.rows, out / "metrics.png")
    h = r.history(learn.diverged)
    advice = advise(h)
    notes = list(notes)
    refitted = refit is not None and refit.used
    timings: dict[str, float] = {}
    # A fit that diverged after the recipe put back the best epoch's weights (learn.kept_row) still has a good model.
    failed = learn.diverged or (any(a.rule == "diverged" for a in advice) and learn.kept_row is None)
    logits, y, feats, cal = (None, None, None, None) if failed else _valid_pass(learn, cfg, out, console, timings)
    if learn.vanished:
        notes.append(vanished_note(learn.vanished_names()))
        console.print(f"[yellow]warning:[/] {notes[-1]}", highlight=False)
    earlier = (out / "model.safetensors").exists()
    if not (learn.diverged and earlier):  # an earlier run's model keeps the settings and split it was made with
        atomic_write_text(out / "config.json", json.dumps(config, indent=1) + "\n")
        ds.write_split(out / "split.csv")
    if failed:
        notes.append("No model file was written by this run." + (
            " (model.safetensors, config.json and split.csv in this folder are from an earlier run.)" if earlier else ""))
        write_advice(out / "advice.txt", advice, h, notes)
        report = write_report(out, None, h, run_plots(out), {"title": "ursa training report: diverged",
                                                             "run folder": str(out)}, notes, insight=insight)
        return RunFiles(out, None, None, advice, notes, report)
    if refit is not None:  # a model file is written: say whose weights it holds
        notes.append(refit.note())
    if cal is not None:
        insight["calibration"] = cal.to_json()
    probs = learn.task.calibrated(logits, cal) if logits is not None else None  # what predict will say: calibrated
    t = time.perf_counter()
    single = learn.task.name == SINGLE_LABEL  # prediction sets and the answer mix are one-class-per-picture figures
    if refitted:  # no unseen pictures are left to set the refit model's thresholds on
        world, insight["open_world"] = {"openset": {}, "conformal": {}}, {"unknown": {"fitted": False, "note": LEFT_OUT},
                                                                          "sets": None}
    else:
        world, insight["open_world"] = fit_open_world(learn, ds, cfg.keep, feats, probs if single else None,
                                                      y if single else None, console)
    timings["open_world"] = time.perf_counter() - t  # one pass over the training images
    licenses = _licenses(ds, console)
    thresholds = learn.task.thresholds(cal)  # multi-label: each label's, chosen on the validation images
    recall, metrics = kept_metrics(learn, ds, logits if single else None, y)  # recall per class: one class per picture
    if refitted:
        metrics = {**(metrics or {}), "refit": refit.meta()}  # the weights are the refit's (predict and serve read it)
    model = learn.export(out / "model.safetensors", metrics=metrics, config=config,
                         calibration=cal.to_meta() if cal else None, open_world=world, licenses=licenses,
                         thresholds=thresholds, state=refit.state if refitted else None)
    t = time.perf_counter()
    onnx_file = write_onnx_beside(model)  # the fast path by default (predict, serve); a failure only warns
    timings["onnx"] = time.perf_counter() - t
    if cfg.int8 and onnx_file is not None:
        t = time.perf_counter()
        notes.append(_int8_copy(onnx_file, model, cfg, console) + (
            " (The refit model trained on those validation pictures: the agreement is the figure that counts.)"
            if refitted else ""))
        timings["int8"] = time.perf_counter() - t
    best = None
    b = learn.best
    beaten = cfg.epoch_kept == "last" and cfg.unfreeze_epochs is None and b.beats(r.rows)  # what best would keep
    too_many = any(a.rule == "too_many_epochs" for a in advice)
    if ((beaten or too_many) and b.state is not None and b.row is not None
            and learn.kept_row is None and not refitted):  # the recipe already put the best weights in the model file
        metrics = metric_values(b.row)
        metrics["epoch"] = b.epoch
        best = learn.export(out / "best.safetensors", metrics=metrics, config=config, state=b.state, licenses=licenses,
                            thresholds=thresholds)
        notes.append(f"The weights of epoch {b.epoch} (error rate {b.row['error_rate']:.4f}) are saved as "
                     f"{best.name}: " + ("use it instead of model.safetensors, or retrain with fewer epochs."
                                         if too_many else "the epoch --epoch-kept best would keep."))
    write_advice(out / "advice.txt", advice, h, notes)
    report: dict[str, Path] = {}
    t = time.perf_counter()
    try:  # the model file is written: a report problem must not fail the run
        if logits is None:
            raise RuntimeError("no validation predictions")
        idx = [i for i in ds.valid_idx if i not in learn.vanished]  # _valid_pass left those rows out
        info = {"title": "ursa training report", "run folder": str(out), "model": "model.safetensors",
                "arch": learn.model.arch, "input size": learn.dls.size, "licences": summary_line(licenses), **(info or {})}
        if single:
            skipped = list(ds.skipped) + [(name, VANISHED) for name in learn.vanished_names()]
            interp = Interpretation(list(ds.classes), [ds.rel(i) for i in idx], [ds.files[i] for i in idx], y, probs,
                                    "valid", skipped, feats)
            report = write_report(out, interp, h, run_plots(out), info, notes, insight=insight, model=model)
        else:  # per-label figures, errors and confused pairs (diagnose.label_report)
            report = write_label_report(out, [ds.rel(i) for i in idx], probs, learn.task.targets(y), ds.classes,
                                        thresholds, h, run_plots(out), info, notes, insight, ds.root)
    except Exception as e:  # noqa: BLE001 - reported, never fatal
        console.print(f"[yellow]warning:[/] could not write the report: {type(e).__name__}: {e}", highlight=False)
    timings["report"] = time.perf_counter() - t
    return RunFiles(out, model, best, advice, notes, report, cal, timings, recall)


def kept_metrics(learn: Learner, ds: ImageDataset, logits, y) -> tuple[dict, dict | None]:
    """The model file's metrics: the kept epoch's figures and, from the validation pass, each class's recall."""
    rows = learn.recorder.rows
    last = learn.kept_row or (rows[-1] if rows else None)
    if last is None:
        return {}, None
    metrics = metric_values(last)
    if logits is None or not len(y):
        return {}, metrics
    recall = recall_by_class(logits.argmax(1), y, ds.classes)
    return recall, {**metrics, "recall": recall}


VANISHED = "changed or vanished on disk during training"


def _licenses(ds: ImageDataset, console: Console) -> dict[str, Any]:
    """The images' licences from the data folder's downloads.csv (``{}`` without one); a bad manifest only warns."""
    try:
        found = license_summary(ds.files, ds.root)
    except Exception as e:  # noqa: BLE001 - provenance is a summary: it never fails a run
        console.print(f"[yellow]warning:[/] licences not summarised: {type(e).__name__}: {e}", highlight=False)
        return {}
    if found:
        console.print(f"licences: {summary_line(found)} (from {ds.root}/downloads.csv; `ursa credits` lists them)",
                      highlight=False)
    return found


def vanished_note(names: Sequence[str]) -> str:
    """The run's one sentence about images that could not be read any more while it trained."""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"{len(names)} image(s) {VANISHED} and were skipped (not trained on, not in the validation figures): "
            f"{shown}; run `ursa verify` on the data folder.")


def _valid_pass(learn: Learner, cfg: TrainConfig, out: Path, console: Console, timings: dict[str, float]):
    """The final model's validation logits, targets and features, and the calibration fitted on them (None on failure)."""
    t = time.perf_counter()
    try:
        logits_t, y_t, feats_t = learn.get_logits(features=True)
        keep = (y_t >= 0).numpy()  # images that changed or vanished since the scan are not in the figures
        logits, y = logits_t.numpy().astype("float64")[keep], y_t.numpy()[keep]
        feats = feats_t.numpy()[keep] if feats_t is not None else None
    except Exception as e:  # noqa: BLE001 - the model file matters more than the report
        console.print(f"[yellow]warning:[/] no validation pass: {type(e).__name__}: {e}", highlight=False)
        return None, None, None, None
    timings["valid_pass"] = time.perf_counter() - t  # the report needed this pass before calibration existed
    if len(y) == 0:
        return logits, y, feats, None
    t = time.perf_counter()
    cal = learn.task.calibrate(logits, y, list(learn.dls.classes), cfg.target_precision, out / "reliability.png")
    timings["calibration"] = time.perf_counter() - t
    console.print(cal.summary(), highlight=False)
    return logits, y, feats, cal


def _int8_copy(onnx_file: Path, model: Path, cfg: TrainConfig, console: Console) -> str:
    """--int8: the checked INT8 copy, or why there is none; never fails the run (the fp32 files stay)."""
    from ursa.errors import UrsaError
    from ursa.inference.quantize import export_int8

    try:
        path, rep = export_int8(onnx_file, model, cfg.data, say=lambda line: console.print(line, highlight=False))
    except UrsaError as e:
        console.print(f"[yellow]warning:[/] no INT8 copy: {e}", highlight=False)
        return f"No INT8 copy was written: {e}"
    return (f"INT8 copy: {path.name} ({rep['method']}), top-1 agreement with fp32 {100 * rep['agreement']:.1f}%, "
            f"error rate {100 * rep['error_fp32']:.2f}% -> {100 * rep['error_int8']:.2f}%.")

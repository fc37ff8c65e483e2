"""A cleaning session: data and model in, scores and rankings computed, decisions replayed; what the page shows."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rich.console import Console

from ursa.apps.clean.decisions import Decisions, check_writable
from ursa.apps.clean.ranking import DUP_THRESHOLD, Rankings, rank
from ursa.apps.clean.scores import Scores, score_dataset
from ursa.apps.clean.sweep import sweep_temp_files
from ursa.inference.modelfile import load_model
from ursa.inference.placement import Placement, place
from ursa.inference.runtime import backend_line, current_onnx_with_features
from ursa.util.device import describe
from ursa.util.progress import make_console, progress_bar
from ursa.vision.data import dedupe_setting, load_dataset, split_settings

log = logging.getLogger("ursa")


@dataclass
class CleanSession:
    """Everything the app serves: the data, the model's scores, the rankings and the decisions."""

    root: Path
    files: list[Path]
    scores: Scores
    ranks: Rankings
    decisions: Decisions
    is_valid: list[bool]
    model_name: str = ""
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {n: i for i, n in enumerate(self.scores.names)}

    def state(self) -> dict[str, Any]:
        """The page's whole model, as JSON-ready values (NaN becomes null)."""
        s, r = self.scores, self.ranks
        pred = s.pred
        items = []
        for i, name in enumerate(s.names):
            ok = i not in s.unreadable
            d = self.decisions.item(name)
            items.append({
                "name": name, "label": s.classes[s.labels[i]], "valid": bool(self.is_valid[i]),
                "pred": s.classes[pred[i]] if ok else None,
                "prob": json_number(s.probs[i, pred[i]]) if ok else None,
                "loss": json_number(s.loss[i]), "quality": json_number(r.quality[i]),
                "suggested": s.classes[r.suggested[i]] if r.suggested[i] >= 0 else None,
                "confident": bool(r.confident[i]) if r.confident is not None else False,
                "error": s.unreadable.get(i), "status": d["status"], "new_label": d["label"],
            })
        return {
            "data": str(self.root), "model": self.model_name, "classes": s.classes, "items": items,
            "views": {
                "losses": r.top_losses,
                "issues": r.issues,
                "duplicates": [{"a": p.a, "b": p.b, "similarity": p.similarity, "exact": p.exact} for p in r.duplicates],
                "unreadable": sorted(s.unreadable),
            },
            "method": r.method, "threshold": r.threshold, "summary": self.decisions.summary(),
            "files": {"cleaned": str(self.decisions.cleaned_path), "log": str(self.decisions.log_path)},
        }


def json_number(v: Any) -> float | None:
    """A float for JSON, rounded; None (null) for NaN and infinities, which JSON cannot carry."""
    v = float(v)
    return None if not np.isfinite(v) else round(v, 5)


def prepare(data: Path, model_path: Path, csv_path: Path | None = None, threshold: float = DUP_THRESHOLD,
            quiet: bool = False, console: Console | None = None, timings: dict[str, float] | None = None,
            device: "str | Placement" = "auto", say: Callable[[str], None] | None = None) -> tuple[Any, Scores, Rankings]:
    """Load data and model, score every item (with a progress bar) and rank: the shared first half.

    The model pass runs on ONNX Runtime when a current MODEL.onnx with the body-features output sits
    beside the model (and ONNX Runtime can use ``device``), torch on ``device`` otherwise;
    ``Scores.backend`` says which and why. ``say`` hears the device line once, before the pass.
    """
    console = console or make_console(quiet)
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    where = place(device)
    fast, why = current_onnx_with_features(model_path, device=where)  # ONNX Runtime from a current model.onnx, else torch
    backend = backend_line(fast, why)
    log.info("clean: model pass on %s", backend)
    model, meta = (None, fast.meta) if fast is not None else load_model(model_path)
    ds = load_dataset(data, csv_path, *split_settings(meta.config), dedupe=dedupe_setting(meta.config))  # the run's split
    if say is not None:  # after the checks of model and data, so their errors stay one line
        say(fast.device_line() if fast is not None else describe(where.torch()))
    t1 = time.perf_counter()
    with progress_bar(console, quiet) as prog:
        task = prog.add_task("predictions and embeddings", total=len(ds))
        scores = score_dataset(ds, model, meta, progress=lambda k: prog.update(task, advance=k), onnx=fast,
                               backend=backend, device=None if fast is not None else where.torch())
    t2 = time.perf_counter()
    ranks = rank(scores, threshold)
    timings.update(load=t1 - t0, model_pass=t2 - t1, rankings=time.perf_counter() - t2)
    return ds, scores, ranks


def start_session(ds: Any, scores: Scores, ranks: Rankings, model_name: str = "",
                  csv_path: Path | None = None) -> CleanSession:
    """Sweep abandoned temp files, replay the log and sync cleaned.csv with it; refuses data folders it cannot write to."""
    root = Path(ds.root)
    check_writable(root, csv_path)
    sweep_temp_files(root)  # what a kill -9 mid-save left behind (ursa's own temp names only)
    decisions = Decisions(root, scores.names, [scores.classes[k] for k in scores.labels], scores.classes)
    decisions.load()
    if decisions.skipped_rows:
        log.warning("%s: %d damaged row(s) ignored (or naming a class the data no longer has)",
                    decisions.log_path, decisions.skipped_rows)
    if decisions.log_path.exists():
        decisions.write_cleaned()  # the log is the truth: bring cleaned.csv in line after any crash
    return CleanSession(root, list(ds.files), scores, ranks, decisions, list(ds.is_valid), model_name)

"""``ursa.ImageClassifierCleaner``: fastai's cleaner widget over ``ursa clean``'s ranking and log.

The session is ``ursa clean``'s (``apps.clean.prepare`` + ``start_session``): the same model pass,
the same ranking (top losses), the same crash-safe ``DATA/clean_log.csv`` (appended and fsynced
per decision, replayed on start, last decision wins) mirrored in ``DATA/cleaned.csv``. Each
dropdown shows the decision the log holds, so what you chose is still there after switching
category or split, and after restarting the kernel (fastai#3084 loses both). No image is moved or
deleted: "<Delete>" excludes it from cleaned.csv. Like ``ursa clean`` it holds the data folder's
lock (``util.lock``) while open, so a second cleaner is refused, not raced; ``close()`` lets go.
ipywidgets 8, so it renders in JupyterLab too.
"""

from __future__ import annotations

import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ursa.apps.clean import CLEAN_LOCK, LOCK_WHAT, check_writable, prepare, start_session
from ursa.errors import ImageError, UrsaError
from ursa.util.lock import FolderLock
from ursa.vision.images import open_image

KEEP, DELETE = "<Keep>", "<Delete>"
SPLITS = ("Train", "Valid")
THUMB = 150


class ImageClassifierCleaner(widgets.VBox):
    """Pick a category and a split; the highest-loss images of it, each with Keep / Delete / another class."""

    def __init__(self, learn: Any, data: str | Path | None = None, csv: str | Path | None = None,
                 max_n: int = 12) -> None:
        model, data, csv = self._sources(learn, data, csv)
        csv = Path(csv) if csv else None
        check_writable(Path(data), csv)
        # One cleaner per data folder, this widget or `ursa clean`: a second is refused (BusyError) before the
        # slow pass; held until close() or the kernel ends (the kernel drops the lock however it ends).
        self.lock: FolderLock | None = None  # set first: a refused widget is still closed (and released) cleanly
        self.lock = FolderLock(Path(data), CLEAN_LOCK, LOCK_WHAT).acquire()
        try:
            ds, scores, ranks = prepare(Path(data), model, csv, quiet=True)
            self.session = start_session(ds, scores, ranks, model.name, csv)
        except BaseException:
            self.release()
            raise
        self.max_n = max_n
        classes = list(scores.classes)
        self.category = widgets.Dropdown(options=classes, value=classes[0], description="category")
        self.split = widgets.Dropdown(options=list(SPLITS), value=SPLITS[0], description="split")
        self.grid = widgets.GridBox(layout=widgets.Layout(grid_template_columns=f"repeat(4, {THUMB + 20}px)"))
        self.names: list[str] = []  # the items shown, highest loss first
        self.choices: list[widgets.Dropdown] = []  # one per item shown, in the same order
        self.category.observe(lambda _: self._fill(), names="value")
        self.split.observe(lambda _: self._fill(), names="value")
        super().__init__([widgets.HBox([self.category, self.split]), self.grid])
        self._fill()

    @staticmethod
    def _sources(learn: Any, data: Any, csv: Any) -> tuple[Path, Any, Any]:
        """The model file and data folder: a vision_learner's (its export, else a copy in a temp folder), or given."""
        if isinstance(learn, (str, Path)):
            if data is None:
                raise UrsaError(f"ImageClassifierCleaner({str(learn)!r}): give data= (the folder the model was trained on)")
            return Path(learn), data, csv
        cfg = getattr(learn, "cfg", None)
        if cfg is None or not hasattr(learn, "export"):
            raise UrsaError(f"ImageClassifierCleaner: expected a vision_learner or a model file, got {type(learn).__name__}")
        model = learn.exported
        if model is None:
            model = learn.export(Path(tempfile.mkdtemp(prefix="ursa-clean-")) / "model.safetensors")
        return model, data if data is not None else cfg.data, csv if csv is not None else cfg.csv

    @property
    def decisions(self) -> Any:
        """``ursa clean``'s Decisions: the log, cleaned.csv, the state per file."""
        return self.session.decisions

    def _value(self, name: str) -> str:
        action, label = self.decisions.state.get(name, ("", ""))
        if action == "exclude":
            return DELETE
        if action == "relabel":
            return label
        return KEEP

    def _fill(self) -> None:
        s = self.session
        scores = s.scores
        c = scores.classes.index(self.category.value)
        valid = self.split.value == "Valid"
        order = [i for i in s.ranks.top_losses if scores.labels[i] == c and s.is_valid[i] == valid][: self.max_n]
        self.names, self.choices, cells = [], [], []
        for i in order:
            name = scores.names[i]
            try:
                im = open_image(s.files[i], max_side=THUMB)
            except ImageError:
                continue
            im.thumbnail((THUMB, THUMB))
            buf = BytesIO()
            im.save(buf, format="PNG")
            pick = widgets.Dropdown(options=[KEEP, DELETE, *scores.classes], value=self._value(name),
                                    layout=widgets.Layout(width=f"{THUMB}px"))
            pick.observe(lambda change, n=name: self._decide(n, change["new"]), names="value")
            self.names.append(name)
            self.choices.append(pick)
            cells.append(widgets.VBox([widgets.Image(value=buf.getvalue(), format="png"),
                                       widgets.Label(f"{name} ({scores.loss[i]:.2f})"), pick]))
        self.grid.children = cells

    def _decide(self, name: str, value: str) -> None:
        """One decision into the log (and cleaned.csv) as soon as a dropdown changes."""
        if value == KEEP:
            self.decisions.decide(name, "keep")
        elif value == DELETE:
            self.decisions.decide(name, "exclude")
        else:
            self.decisions.decide(name, "relabel", value)

    def release(self) -> None:
        """Let another cleaner (or `ursa clean`) have the data folder; the decisions made stay in the log."""
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None

    def close(self) -> None:
        """Close the widget and release the data folder."""
        self.release()
        super().close()

    def summary(self) -> dict[str, int]:
        """total, decided, kept, excluded, relabelled."""
        return self.decisions.summary()

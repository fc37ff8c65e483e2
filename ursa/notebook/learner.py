"""``ursa.vision_learner``: fastai's verbs over ursa's recipe, for a notebook.

A thin layer: ``vision_learner`` turns the data and keyword settings into a ``TrainConfig`` and
builds the learner exactly as ``ursa train`` does (``training.recipe.prepare``: the image probe,
the plan's size and flips, decode once, the backbone, the training ``Learner`` on ``--device
auto``); ``fine_tune`` runs the recipe's stages (``training.recipe.fit_stages``); ``export``
writes the model file as the run writer does (calibrated on the validation set, model.onnx
beside it). Pictures show inline; the epoch table and the progress bars are rich's notebook
output.
"""

from __future__ import annotations

import dataclasses
from html import escape
from pathlib import Path
from typing import Any

from ursa.diagnose.calibration import calibrate
from ursa.inference.export import write_onnx_beside
from ursa.notebook.data import ImageDataLoaders
from ursa.notebook.pictures import Picture, show
from ursa.training.config import ConfigError, TrainConfig
from ursa.training.learner import Learner
from ursa.training.lr_find import LRFinderResult
from ursa.training.recipe import fit_stages, prepare
from ursa.util.files import check_outside
from ursa.util.progress import make_console
from ursa.vision import DEFAULT_ARCH

# TrainConfig's fields a notebook does not set: the data comes from the ImageDataLoaders, nothing is written to `out`
# (refit: `ursa train --refit` retrains once the run's figures are measured; a notebook's fine_tune does not).
NOT_SETTINGS = ("data", "csv", "valid_pct", "out", "arch", "refit")


class SuggestedLR(float):
    """lr_find's answer: a float (the suggestion, as `ursa lr-find` makes it) that also carries the sweep."""

    result: LRFinderResult

    def __new__(cls, result: LRFinderResult) -> "SuggestedLR":
        self = super().__new__(cls, result.suggestion)
        self.result = result
        return self

    @property
    def valley(self) -> float:
        return self.result.valley

    @property
    def steep(self) -> float:
        return self.result.steep

    def plot(self) -> Picture:
        """Loss against learning rate, both suggestions marked (lr_find.png's picture)."""
        from ursa.diagnose.plots import lr_find_figure

        r = self.result
        return Picture.from_figure(lr_find_figure(r.lrs, r.losses, r.smoothed, r.suggestions()), "lr_find")

    def __repr__(self) -> str:
        return (f"SuggestedLR({float(self):.2e}: {self.result.suggestion_why}; "
                f"valley={self.valley:.2e}, steep={self.steep:.2e})")


def vision_learner(dls: ImageDataLoaders, arch: str = DEFAULT_ARCH, **settings: Any) -> "VisionLearner":
    """A learner for ``dls`` with a pretrained ``arch`` body (frozen), built as ``ursa train`` builds it.

    ``settings``: any of ``TrainConfig``'s options (``epochs``, ``lr``, ``budget``, ``unfreeze_epochs``,
    ``size``, ``flips``, ``bs``, ``device`` (default auto), ``quiet``, ...), checked as the CLI checks them.
    """
    if not isinstance(dls, ImageDataLoaders):
        raise ConfigError(f"vision_learner: expected an ursa.ImageDataLoaders, got {type(dls).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)} - set(NOT_SETTINGS)
    for k in settings:
        if k not in known:
            raise ConfigError(f"vision_learner: expected one of TrainConfig's settings ({', '.join(sorted(known))}), "
                              f"got {k!r}")
    settings.setdefault("bs", dls.bs)
    # The split is the ImageDataLoaders' (its seed), also when seed= sets another training seed.
    cfg = TrainConfig(data=dls.path, csv=dls.csv, valid_pct=dls.valid_pct, arch=arch,
                      **{"seed": dls.seed, "split_seed": dls.seed, **settings})
    console = make_console(cfg.quiet)
    learn, ds, plan = prepare(cfg, console)
    learn.freeze()  # fastai's vision_learner: the pretrained body frozen, the head to train
    return VisionLearner(dataclasses.replace(cfg, flips=plan.flips), learn, dls, plan, console)


class VisionLearner:
    """fastai's verbs: lr_find, fine_tune, fit_one_cycle, freeze/unfreeze, export; ``learner`` is the training Learner."""

    def __init__(self, cfg: TrainConfig, learner: Learner, dls: ImageDataLoaders, plan: Any, console: Any) -> None:
        self.cfg, self.learner, self.dls, self.plan, self.console = cfg, learner, dls, plan, console
        self.exported: Path | None = None

    @property
    def model(self) -> Any:
        return self.learner.model

    @property
    def dataset(self) -> Any:
        """The dataset as the learner read it (the run's split)."""
        return self.learner.dls.dataset

    @property
    def history(self) -> list[dict]:
        """One row per epoch: epoch, stage, train_loss, valid_loss, error_rate, accuracy, seconds."""
        return list(self.learner.recorder.rows)

    def lr_find(self, show_plot: bool = True, **kwargs: Any) -> SuggestedLR:
        """Sweep learning rates (the state is restored after); the plot inline, the valley returned as a float."""
        # As `ursa lr-find`: the recipe's rate is kept while the loss still falls there (lr_find.suggest)
        kwargs.setdefault("default", self.cfg.lr if self.model.is_frozen else self.cfg.unfreeze_lrs[1])
        s = SuggestedLR(self.learner.lr_find(**kwargs))
        if show_plot:
            show(s.plot())
        return s

    def fine_tune(self, epochs: int | None = None, base_lr: float | None = None, **settings: Any) -> None:
        """The default recipe: ``epochs`` frozen epochs (default 4) at ``base_lr``, then fine-tuning when it pays
        and fits the budget (``budget=``; ``unfreeze_epochs=N``: the lesson's fixed N), the best epoch kept
        (``epoch_kept="last"``: the last, as fastai's)."""
        changes = {**settings, **({"epochs": epochs} if epochs is not None else {}),
                   **({"lr": base_lr} if base_lr is not None else {})}
        self.cfg = dataclasses.replace(self.cfg, **changes) if changes else self.cfg
        if changes.get("budget") is not None:  # given here: counted as --budget would be
            self.plan.give_budget(self.cfg.budget, self.cfg.time_limit)
        fit_stages(self.cfg, self.learner, self.plan, self.console)
        self.learner.drop_features()

    def fit_one_cycle(self, n_epoch: int, lr: float | slice | None = None, **kwargs: Any) -> None:
        """One-cycle training of what is unfrozen (``slice(lo, hi)``: layer-group rates), as the Learner's."""
        self.learner.fit_one_cycle(n_epoch, self.cfg.lr if lr is None else lr, **kwargs)

    def freeze(self) -> None:
        self.learner.freeze()

    def unfreeze(self) -> None:
        self.learner.unfreeze()

    def export(self, path: str | Path = "model.safetensors") -> Path:
        """The model file ``ursa train`` writes (weights + metadata, calibrated on the validation set) and model.onnx beside it."""
        path = Path(path)
        check_outside(path.parent, self.cfg.data, "model file's folder")
        logits, y, _ = self.learner.get_logits()
        cal = calibrate(logits.numpy().astype("float64"), y.numpy(), self.cfg.target_precision) if len(y) else None
        path.parent.mkdir(parents=True, exist_ok=True)
        from ursa.acquire.licenses import license_summary

        ds = self.dls.dataset
        out = self.learner.export(path, config=self.cfg.to_json(), calibration=cal.to_meta() if cal else None,
                                  licenses=license_summary(ds.files, ds.root))
        write_onnx_beside(out)
        self.exported = out
        return out

    def predict(self, item: Any) -> tuple[str, int, dict[str, float]]:
        """(label, index, probs) for one image (a path, bytes, a PIL image or a numpy array), uncalibrated, on this model."""
        from ursa.inference.metaschema import ModelMeta
        from ursa.inference.predictor import Predictor

        d = self.learner.dls
        meta = ModelMeta(arch=self.model.arch, classes=list(d.classes), input_size=d.size, mean=list(d.mean),
                         std=list(d.std), head=dataclasses.asdict(self.model.head_cfg))
        return Predictor(self.model, meta, device=self.learner.device).predict(item)

    def _repr_html_(self) -> str:
        c, rows = self.cfg, self.history
        facts = {"arch": c.arch, "input size": f"{self.learner.dls.size} px", "flips": c.flips,
                 "device": str(self.learner.device), "classes": ", ".join(self.dls.classes),
                 "epochs trained": self.learner.epochs_done}
        if self.exported is not None:
            facts["model file"] = str(self.exported)
        head = "".join(f"<tr><th style='text-align:left'>{escape(k)}</th><td>{escape(str(v))}</td></tr>"
                       for k, v in facts.items())
        table = ""
        if rows:
            cols = ["epoch", "stage", "train_loss", "valid_loss", "error_rate", "accuracy", "balanced_error"]
            body = "".join("<tr>" + "".join(f"<td>{r.get(k):.4f}</td>" if isinstance(r.get(k), float)
                                            else f"<td>{r.get(k, '')}</td>" for k in cols) + "</tr>" for r in rows)
            table = "<table><tr>" + "".join(f"<th>{k}</th>" for k in cols) + f"</tr>{body}</table>"
        return f"<div><b>ursa learner</b><table>{head}</table>{table}</div>"

    def __repr__(self) -> str:
        last = self.history[-1] if self.history else None
        tail = f", error_rate {last['error_rate']:.4f} after {self.learner.epochs_done} epochs" if last else ", untrained"
        return f"VisionLearner({self.cfg.arch} at {self.learner.dls.size} px on {self.learner.device}{tail})"

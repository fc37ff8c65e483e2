"""Configuration as data: what a run and a learner are told, validated once, saved with the result.

`TrainConfig` is every option of the training recipe (`ursa train`); `LearnerConfig` is the part
a `Learner` is built with. Both are frozen: the CLI makes one, the recipe hands the learner its
part, the run folder gets `config.json`, and the model file's metadata a copy, so later stages
(interpret, clean, a retrain) read what the run used instead of guessing.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ursa.errors import UrsaError
from ursa.util.device import check_device_name
from ursa.vision import DEFAULT_ARCH, FLIPS
from ursa.vision.data import SEED, VALID_PCT, split_settings

FEATURE_BACKENDS = ("auto", "torch")
# Where decoded pixels live: auto (memory when they fit ursa.vision.loaders.MEMORY_BUDGET), memory, stream (per batch).
PIXEL_MODES = ("auto", "memory", "stream")
FLIP_CHOICES = ("auto", *FLIPS)
# Lopsided classes (training/balance.py): auto decides from the counts, none trains plainly, or one remedy.
BALANCES = ("auto", "none", "weights", "sampler", "logit_adjust")
# Which epoch's weights the default recipe's model file holds: the best on the validation pictures, or the last.
EPOCHS_KEPT = ("best", "last")
# Seconds `ursa train` plans for by default, start to model file, counted in seconds of the reference machine
# (2 CPU cores; training/plan.py counts images x epochs x FLOPs, no clock): a few minutes on a laptop.
DEFAULT_BUDGET = 120.0
# Small images upsampled to the recipe's smallest size (128 px) get this many times DEFAULT_BUDGET, and so this many
# times the fine-tuning epoch cap (24). An epoch at 128 px costs a third of one at 224 px, and on the seven small-image
# sets of the benchmark it was better than 120 s on six and even on one (held-out, mean 0.136 -> 0.106; captcha_glyphs
# 0.350 -> 0.278, uci_digits 0.236 -> 0.172 over six seeds; docs/train.md). training/plan.py choose_budget.
SMALL_IMAGE_BUDGET_FACTOR = 2


class ConfigError(UrsaError):
    """An option has a value the recipe cannot use; the message says what was expected and what was given."""


SEED_MAX = 2**32 - 1  # numpy's seeds are 0..2**32-1 (torch's go further): one range for every seed
_SHOW = reprlib.Repr()
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlevel = 60, 60, 3  # a 25-digit number or a deep --config value: short


def shown(value: object) -> str:
    """A value as the message shows it: repr (newlines escaped), cut short, however deep or long."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    return _SHOW.repr(value)


def _expect(ok: bool, option: str, expected: str, given: object) -> None:
    if not ok:
        raise ConfigError(f"{option}: expected {expected}, got {shown(given)}")


def _number(v: object) -> bool:
    try:  # a huge integer overflows a float: not a number an option can mean
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:
        return False


def _whole(v: object, lo: int = 0, hi: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def check_seed(option: str, v: object) -> int:
    """A seed every library takes (0 to 2**32-1), or one line."""
    _expect(_whole(v, 0, SEED_MAX), option, f"a whole number from 0 to {SEED_MAX}", v)
    return v  # type: ignore[return-value]


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_bools(config: Any) -> None:
    """Every bool field of a config dataclass holds true or false (JSON's "false" is a string, and truthy)."""
    for f in fields(config):
        if f.type in ("bool", bool):
            v = getattr(config, f.name)
            _expect(isinstance(v, bool), _option(f.name), "true or false", v)


@dataclass(frozen=True)
class LearnerConfig:
    """How a Learner trains, fixed when it is built (per-stage settings are arguments of fit_one_cycle)."""

    wd: float = 0.01  # AdamW weight decay
    label_smoothing: float = 0.0
    seed: int = SEED  # shuffling, augmentation of the feature cache's views
    augment: bool = True  # internal: off only where tests compare training paths exactly
    cache: bool = True  # frozen stage: train the head on cached body features (same result, faster)
    views: int | None = None  # augmented views in the feature cache, cycled over epochs; None: one per epoch
    # Internal (tests compare engines with it): "auto" runs the cache's body pass on ONNX Runtime when it can.
    feature_backend: str = "auto"
    bf16_features: bool = False  # bfloat16 autocast for the cache's body pass (torch engine)
    # BatchNorm statistics kept fixed while fine-tuning (docs/train.md): switching to the batch statistics of
    # 32 augmented images changed the features under the trained head and made the loss jump.
    bn_stats_frozen: bool = True
    spill_dir: Path | None = None  # internal: set by the recipe (RUN/features), where a large cache is memory-mapped
    device: str = "auto"  # a torch device name or auto, resolved by ursa.util.device.resolve_device (CUDA, MPS, the CPU)
    quiet: bool = False  # no progress bars
    # Lopsided classes (training/balance.py): the remedy the recipe chose (never auto here) and the
    # training images' share of each class it uses (weights, logit adjustment).
    balance: str = "none"
    class_prior: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _check_bools(self)
        _expect(self.balance in BALANCES[1:], "balance", " or ".join(BALANCES[1:]), self.balance)
        _expect(self.class_prior is None or (isinstance(self.class_prior, tuple) and all(
            _number(p) and 0 < p <= 1 for p in self.class_prior)), "class_prior", "shares in (0, 1]", self.class_prior)
        check_seed("--seed", self.seed)
        _expect(_number(self.wd) and self.wd >= 0, "--wd", "a number >= 0", self.wd)
        _expect(_number(self.label_smoothing) and 0 <= self.label_smoothing < 1, "--label-smoothing",
                "a number in [0, 1)", self.label_smoothing)
        _expect(self.views is None or _whole(self.views, 1), "--views",
                "a whole number >= 1", self.views)
        _expect(self.feature_backend in FEATURE_BACKENDS, "feature_backend", " or ".join(FEATURE_BACKENDS),
                self.feature_backend)
        check_device_name(self.device)


@dataclass(frozen=True)
class TrainConfig:
    """Every option of `ursa train`, with the lesson's defaults; invalid values fail at construction."""

    data: Path
    out: Path = Path("runs/latest")
    csv: Path | None = None
    # Multi-label (docs/multilabel.md): the CSV's label cells hold label sets, label_delim between the labels.
    multi_label: bool = False
    label_delim: str = " "
    arch: str = DEFAULT_ARCH
    pretrained: bool = True
    size: int | None = None  # input size; None: the recipe decides from the images (training/plan.py)
    flips: str = "auto"  # which mirror images augment training: none, horizontal, all; auto: from the images
    valid_pct: float = VALID_PCT
    seed: int = SEED
    split_seed: int | None = None  # seed of the validation split; None: the same as seed
    epochs: int = 4  # frozen epochs (head only)
    lr: float = 3e-3
    # Seconds for the whole run, counted (not timed) in seconds of the reference machine. After the frozen
    # stage the recipe fine-tunes only when the frozen body is weak on this data and the rest of the
    # budget fits enough epochs (training/plan.py): the same decision on any machine, idle or busy.
    # None: DEFAULT_BUDGET, or twice it for small images (the recipe decides from the images: plan.choose_budget).
    budget: float | None = None
    # Wall seconds after which fine-tuning is cut (a safety cap; the run then says it was cut); None: 4 x budget.
    time_limit: float | None = None
    # Internal, set by --config RUN: {"from": RUN, "size": .., "fine_tune_epochs": ..}: that run's decisions,
    # replayed without deciding again, and its split.csv, against which changed validation pictures are scored.
    replay: dict | None = None
    # Fine-tuning epochs; None: the budget decides. A number gives the lesson's recipe exactly
    # (--unfreeze-epochs 2 after 4 frozen epochs), 0 the frozen stage alone.
    unfreeze_epochs: int | None = None
    unfreeze_lr: tuple[float, float] | None = None  # (lo, hi); None: (lr/300, lr/3), fastai's fine_tune spread
    unfreeze_size: int | None = None  # progressive resizing: fine-tune at a smaller size (cheaper)
    bf16: bool = False  # bfloat16 autocast while fine-tuning
    bs: int = 32
    wd: float = LearnerConfig.wd
    label_smoothing: float = LearnerConfig.label_smoothing
    cache: bool = LearnerConfig.cache
    views: int | None = LearnerConfig.views
    bf16_features: bool = LearnerConfig.bf16_features
    bn_stats_frozen: bool = LearnerConfig.bn_stats_frozen
    # Insight (docs/insight.md): near-duplicate groups kept on one side of the split; the learning
    # curve on the cached features (opt-in: 15 head fits added 15-30 s to a 50-180 s bears run on
    # 2 shared cores, where AdamW's step dominates); the precision the "unsure" threshold aims at.
    dedupe_split: bool = False
    curve: bool = False
    target_precision: float = 0.95
    # Lopsided classes (training/balance.py): auto counters a lopsided set with the remedy that paid, none trains
    # as if the classes were equally common, or a remedy by name (weights, sampler, logit_adjust).
    balance: str = "auto"
    # Open world (docs/open-world.md): the share of validation images the "none of these" threshold keeps.
    keep: float = 0.95
    # Deploy (docs/deploy.md): also write model.int8.onnx, checked against fp32 on the validation images.
    int8: bool = False
    # Refit (docs/train.md): once the first fit has chosen its epochs on the validation images, train again on
    # every image with the same decisions; the model file holds the refit weights, the figures are the first model's.
    refit: bool = False
    # The epoch the default recipe keeps: best (the fewest wrong validation pictures, when it beats the last), or last
    # (the schedule's end, as fastai's fine_tune: its reported error is then not chosen on the pictures it is scored on).
    epoch_kept: str = "best"
    # How to run, not what to compute (not saved in config.json, nor in the model file): where the
    # network runs (--device: auto, cpu, cuda, cuda:N, mps) and where decoded pixels live (--pixels).
    device: str = "auto"
    pixels: str = "auto"
    quiet: bool = False

    def __post_init__(self) -> None:
        for name in ("data", "out", "csv"):  # from a --config file any JSON value can arrive here
            v = getattr(self, name)
            _expect(isinstance(v, (str, os.PathLike)) or (name == "csv" and v is None), _option(name), "a path", v)
            if v is not None:
                object.__setattr__(self, name, Path(v))
        if self.unfreeze_lr is not None:
            _expect(isinstance(self.unfreeze_lr, (list, tuple)), "--unfreeze-lr", "LO,HI with 0 < LO <= HI",
                    self.unfreeze_lr)
            object.__setattr__(self, "unfreeze_lr", tuple(self.unfreeze_lr))
        self.validate()

    def validate(self) -> None:
        """Check every option once, here, with messages that say what was expected and what was given.

        Every field by type and range (a --config file can hold any JSON: "false" is not false).
        """
        _check_bools(self)
        for opt, v in (("--arch", self.arch), ("--flips", self.flips), ("--pixels", self.pixels),
                       ("--device", self.device)):
            _expect(isinstance(v, str) and bool(v.strip()), opt, "a name", v)
        for opt, v in (("--size", self.size), ("--unfreeze-size", self.unfreeze_size)):
            _expect(v is None or _whole(v, 32, 1024), opt, "a whole number from 32 to 1024", v)
        _expect(_number(self.valid_pct) and 0 < self.valid_pct < 1, "--valid-pct", "a number between 0 and 1",
                self.valid_pct)
        check_seed("--seed", self.seed)
        if self.split_seed is not None:
            check_seed("--split-seed", self.split_seed)
        for opt, v in (("--epochs", self.epochs), ("--unfreeze-epochs", self.unfreeze_epochs)):
            _expect(v is None or _whole(v), opt, "a whole number >= 0", v)
        _expect(self.epochs + (self.unfreeze_epochs or 0) > 0,
                "--epochs/--unfreeze-epochs", "at least one epoch in all", (self.epochs, self.unfreeze_epochs))
        _expect(self.budget is None or (_number(self.budget) and self.budget >= 0), "--budget",
                "seconds >= 0 (0: the frozen stage only)", self.budget)
        _expect(self.time_limit is None or (_number(self.time_limit) and self.time_limit > 0), "--time-limit",
                "wall seconds > 0", self.time_limit)
        r = self.replay
        _expect(r is None or (isinstance(r, dict) and isinstance(r.get("from", ""), str)
                              and (r.get("size") is None or _whole(r["size"], 32, 1024))
                              and (r.get("fine_tune_epochs") is None or _whole(r["fine_tune_epochs"], 0, 1000))
                              and (r.get("tune_size") is None or _whole(r["tune_size"], 32, 1024))
                              and (r.get("budget") is None or (_number(r["budget"]) and r["budget"] >= 0))),
                "replay", "an earlier run's folder and its decisions (size and tune_size 32-1024, "
                "fine_tune_epochs >= 0, budget >= 0)", r)
        _expect(isinstance(self.label_delim, str) and len(self.label_delim) > 0 and "\n" not in self.label_delim,
                "--label-delim", "one or more characters (not a newline)", self.label_delim)
        _expect(not self.multi_label or self.csv is not None, "--multi-label",
                "--csv labels.csv too (a CSV of name,labels: a folder per class gives each image one label)", self.csv)
        _expect(not (self.multi_label and self.curve), "--curve", "off with --multi-label (the learning curve counts "
                "one class per picture)", self.curve)
        _expect(not (self.multi_label and self.refit), "--refit", "off with --multi-label (each label's threshold is "
                "chosen on the validation images, which a refit trains on)", self.refit)
        _expect(self.flips in FLIP_CHOICES, "--flips", " or ".join(FLIP_CHOICES), self.flips)
        _expect(self.epoch_kept in EPOCHS_KEPT, "--epoch-kept", " or ".join(EPOCHS_KEPT), self.epoch_kept)
        _expect(self.balance in BALANCES, "--balance", " or ".join(BALANCES), self.balance)
        _expect(self.pixels in PIXEL_MODES, "--pixels", " or ".join(PIXEL_MODES), self.pixels)
        check_device_name(self.device)
        _expect(_number(self.lr) and self.lr > 0, "--lr", "a positive number", self.lr)
        if self.unfreeze_lr is not None:
            lo_hi = self.unfreeze_lr
            _expect(len(lo_hi) == 2 and all(_number(v) for v in lo_hi) and 0 < lo_hi[0] <= lo_hi[1],
                    "--unfreeze-lr", "LO,HI with 0 < LO <= HI",
                    ",".join(map(shown, lo_hi[:3])) + (",..." if len(lo_hi) > 3 else ""))
        _expect(_whole(self.bs, 2), "--bs", "a whole number >= 2", self.bs)
        _expect(_number(self.target_precision) and 0 < self.target_precision <= 1, "--target-precision",
                "a number in (0, 1]", self.target_precision)
        _expect(_number(self.keep) and 0 < self.keep <= 1, "--keep", "a share of validation images in (0, 1]", self.keep)
        self.learner_config()  # the learner's own checks (wd, label smoothing, views)

    @property
    def label_sets(self) -> str | None:
        """The separator of the CSV's label sets with --multi-label (``vision.labelsets.load_labelled``), else None."""
        return self.label_delim if self.multi_label else None

    @property
    def split_seed_used(self) -> int:
        """The seed the validation split is drawn with."""
        return split_settings({"seed": self.seed, "split_seed": self.split_seed})[1]

    @property
    def unfreeze_lrs(self) -> tuple[float, float]:
        """(lo, hi) learning rates of fine-tuning: slice(lr/300, lr/3) = (1e-5, 1e-3) unless given (docs/train.md)."""
        return self.unfreeze_lr or (self.lr / 300, self.lr / 3)

    def learner_config(self, spill_dir: Path | None = None, device: str = "cpu") -> LearnerConfig:
        """The learner's part of this config (device: the resolved one, e.g. "cuda:0")."""
        return LearnerConfig(
            wd=self.wd, label_smoothing=self.label_smoothing, seed=self.seed, cache=self.cache, views=self.views,
            bf16_features=self.bf16_features, bn_stats_frozen=self.bn_stats_frozen, spill_dir=spill_dir,
            device=device, quiet=self.quiet,
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly dict (paths as strings) for config.json and the model file's metadata."""
        d = asdict(self)
        for how in ("quiet", "device", "pixels"):  # how it ran, not what it computed: a model file is device-free
            d.pop(how)
        for k in ("data", "out", "csv"):
            d[k] = None if d[k] is None else str(d[k])
        d["unfreeze_lr"] = None if self.unfreeze_lr is None else list(self.unfreeze_lr)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], **overrides: Any) -> "TrainConfig":
        """Rebuild from to_json()'s dict (unknown keys from newer versions ignored), then apply overrides."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "budget" not in d:  # a config.json from before the budget recipe: its values were the old defaults
            if kw.get("unfreeze_epochs") == 0:
                kw["unfreeze_epochs"] = None  # the old default (frozen only): the budget decides now
            if kw.get("bn_stats_frozen") is False:
                kw.pop("bn_stats_frozen")  # the old default made the loss jump when unfreezing
        kw.update(overrides)
        return cls(**kw)


def read_run_config(run: str | Path) -> dict[str, Any] | None:
    """The config.json of a run folder (or of the folder holding a model file); None when there is none."""
    run = Path(run)
    path = run / "config.json" if run.is_dir() else run.parent / "config.json"
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ConfigError(f"{path}: not a readable run config (JSON nested too deep); remove it or train again") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable run config ({e}); remove it or train again") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d

"""The training loop: fastai's verbs (fit_one_cycle, freeze, unfreeze, save, load, export) on torch.

One-cycle schedule from torch's OneCycleLR with AdamW, discriminative learning rates through
layer groups (``max_lr=slice(lo, hi)``), a recorder of per-batch loss/LR and per-epoch metrics,
a progress bar with rate and ETA, and an epoch table like fastai's. While the body is frozen,
the head can be trained on cached body features (see ``ursa.training.features``), which gives the same
result as running the frozen body every batch, many times faster.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from rich.console import Console


from ursa.vision.loaders import DataLoaders
from ursa.errors import DivergedError, UrsaError
from ursa.vision.models import Classifier
from ursa.util.progress import progress_bar

HISTORY_COLUMNS = ["epoch", "stage", "train_loss", "valid_loss", "error_rate", "accuracy", "seconds"]


class StopTraining(Exception):
    """Raised by an epoch callback to end fit early (with a reason shown to the user)."""


@dataclass
class Recorder:
    """Everything a plot or the advisor needs: per-batch loss and LR, per-epoch rows."""

    batch_losses: list[float] = field(default_factory=list)
    batch_lrs: list[float] = field(default_factory=list)
    batch_epochs: list[float] = field(default_factory=list)  # fractional epoch of each batch
    rows: list[dict] = field(default_factory=list)

    def history_csv(self) -> str:
        """history.csv text: epoch,stage,train_loss,valid_loss,error_rate,accuracy,seconds."""
        lines = [",".join(HISTORY_COLUMNS)]
        for r in self.rows:
            lines.append(",".join(_fmt_cell(r[c]) for c in HISTORY_COLUMNS))
        return "\n".join(lines) + "\n"


def _fmt_cell(v: object) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6f}"
    return str(v)


def lr_groups(max_lr: float | slice, n_groups: int) -> list[float]:
    """fastai's slice(lo, hi): geometric spread from lo (early body) to hi (head); a float: all equal."""
    if isinstance(max_lr, slice):
        lo, hi = max_lr.start, max_lr.stop
        if lo is None:
            return [hi / 10] * (n_groups - 1) + [hi]
        if n_groups == 1:
            return [hi]
        step = (hi / lo) ** (1 / (n_groups - 1))
        return [lo * step**i for i in range(n_groups)]
    return [float(max_lr)] * n_groups


class Learner:
    """Model + data + optimiser settings, with fastai's verbs."""

    def __init__(
        self,
        dls: DataLoaders,
        model: Classifier,
        wd: float = 0.01,
        label_smoothing: float = 0.0,
        use_cache: bool = True,
        bf16: bool = False,
        quiet: bool = False,
        console: Console | None = None,
        seed: int = 42,
        augment: bool = True,
        spill_dir: Path | None = None,
    ) -> None:
        self.dls, self.model = dls, model
        self.wd, self.label_smoothing = wd, label_smoothing
        self.use_cache, self.bf16, self.quiet = use_cache, bf16, quiet
        self.console = console or Console(stderr=True, quiet=quiet)
        self.seed, self.augment, self.spill_dir = seed, augment, spill_dir
        self.diverged = False
        self.bn_stats_frozen = False  # body BatchNorm in eval mode during fine-tuning
        self.bf16_features = False  # bfloat16 autocast for the feature cache's body pass
        self.n_views: int | None = None  # augmented views in the feature cache (cycled); None: one per epoch
        self.feature_backend = "auto"  # feature cache's body pass: "auto" (ONNX Runtime, else torch) or "torch"
        self.recorder = Recorder()
        self.epoch_callbacks: list[Callable[["Learner", dict], None]] = []
        self.feature_cache = None  # ursa.training.features.FeatureCache, built on first cached fit
        self.bn_eval_when_frozen = use_cache  # cached features are computed with body BN in eval mode
        self.model.to(memory_format=torch.channels_last)
        self._epochs_done = 0
        self._header_printed = False
        self.train_size: int | None = None  # None: dls.size; smaller for progressive resizing

    # --- fastai verbs --------------------------------------------------------------------------

    def freeze(self) -> None:
        """Train the head only (and body BatchNorm unless the feature cache needs BN frozen)."""
        self.model.freeze(train_bn=not self.bn_eval_when_frozen)

    def unfreeze(self) -> None:
        """Train every layer (use a slice of learning rates)."""
        self.model.unfreeze()

    def loss_func(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def fit_one_cycle(self, n_epoch: int, max_lr: float | slice = 3e-3, pct_start: float = 0.25,
                      stage: str | None = None) -> None:
        """Train n_epoch epochs with one cycle: LR warms up then anneals, momentum the other way."""
        if n_epoch <= 0:
            return
        stage = stage or ("frozen" if self.model.is_frozen else "unfrozen")
        if self.model.is_frozen and self.use_cache:
            from ursa.training.features import fit_head_cached

            fit_head_cached(self, n_epoch, max_lr, pct_start, stage)
            return
        train_dl = self.dls.loader(self.dls.dataset.train_idx, train=self.augment, size=self.train_size,
                                   shuffle=True, generator=self._generator())
        groups = self._param_groups(max_lr)
        opt = torch.optim.AdamW(groups, weight_decay=self.wd, betas=(0.9, 0.99))
        sched = self._scheduler(opt, [g["lr"] for g in groups], n_epoch * len(train_dl), pct_start)
        self._run_epochs(n_epoch, stage, len(train_dl), lambda: self._train_batches(train_dl, opt, sched))

    # --- internals shared with the cached path ------------------------------------------------

    def _generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed + self._epochs_done)
        return g

    def _param_groups(self, max_lr: float | slice, params: Sequence[list] | None = None) -> list[dict]:
        groups = params if params is not None else self.model.param_groups()
        lrs = lr_groups(max_lr, len(groups))
        out = []
        for ps, lr in zip(groups, lrs):
            ps = [p for p in ps if p.requires_grad]
            if ps:
                out.append({"params": ps, "lr": lr})
        if not out:
            raise UrsaError("nothing to train: every parameter is frozen")
        return out

    @staticmethod
    def _scheduler(opt: torch.optim.Optimizer, max_lrs: list[float], total: int, pct_start: float):
        # OneCycleLR needs at least two steps in each phase; tiny runs get a slightly longer warm-up.
        total = max(total, 4)
        pct_start = min(max(pct_start, 2.0 / total), 0.5)
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=max_lrs, total_steps=total, pct_start=pct_start,
            div_factor=25.0, final_div_factor=1e5, anneal_strategy="cos",
            cycle_momentum=True, base_momentum=0.85, max_momentum=0.95,
        )

    def _record_batch(self, loss: float, lr: float, frac_epoch: float) -> None:
        self.recorder.batch_losses.append(loss)
        self.recorder.batch_lrs.append(lr)
        self.recorder.batch_epochs.append(frac_epoch)
        if not math.isfinite(loss):
            raise DivergedError(
                f"training diverged: the loss became {loss} at epoch {frac_epoch:.2f}. "
                "The learning rate is too high: try 10x lower (--lr)."
            )

    def _train_batches(self, dl, opt, sched) -> Callable:
        """Generator of per-batch losses for one epoch of ordinary training."""
        self.model.train()
        if self.model.is_frozen and self.bn_eval_when_frozen:
            self.model.body.eval()
        elif not self.model.is_frozen and self.bn_stats_frozen:
            # Keep the body's BatchNorm statistics fixed while fine-tuning: the head was trained on
            # features made with them, and small CPU batches give noisy batch statistics.
            for m in self.model.body.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        frozen_feats = []  # frozen body: its features, to recalibrate the head's BatchNorm
        for xb, yb in dl:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                if self.model.is_frozen:
                    f = self.model.features(xb)
                    frozen_feats.append(f.detach().float())
                    out = self.model.head(f)
                else:
                    out = self.model(xb)
            loss = self.loss_func(out.float(), yb)
            lr = opt.param_groups[-1]["lr"]  # the rate this batch used
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            yield float(loss.detach()), lr, len(yb)
        if frozen_feats:
            recalibrate_bn(self.model.head, frozen_feats)

    def _run_epochs(self, n_epoch: int, stage: str, n_batches: int, epoch_iter: Callable,
                    validate: Callable[[], tuple[float, float, float]] | None = None) -> None:
        """Epoch loop shared by both paths: progress bar, recorder, table, divergence, callbacks."""
        validate = validate or self.validate
        self._print_header()
        best_state = None
        best_valid = math.inf
        try:
            for e in range(n_epoch):
                t0 = time.perf_counter()
                losses = []
                with self._progress() as prog:
                    task = prog.add_task(f"{stage} epoch {e + 1}/{n_epoch}", total=n_batches)
                    for i, (loss, lr, bs) in enumerate(epoch_iter()):
                        self._record_batch(loss, lr, self._epochs_done + (i + 1) / n_batches)
                        losses.append(loss)
                        prog.update(task, advance=1, description=f"{stage} epoch {e + 1}/{n_epoch} loss {loss:.3f}")
                valid_loss, err, acc = validate()
                row = {
                    "epoch": self._epochs_done, "stage": stage,
                    "train_loss": _smooth_last(losses), "valid_loss": valid_loss,
                    "error_rate": err, "accuracy": acc, "seconds": time.perf_counter() - t0,
                }
                self._epochs_done += 1
                self.recorder.rows.append(row)
                self._print_row(row)
                if not math.isfinite(valid_loss) or (math.isfinite(best_valid) and valid_loss > 10 * best_valid):
                    raise DivergedError(
                        f"training diverged: valid loss {valid_loss:.3g} (best {best_valid:.3g}) at epoch "
                        f"{row['epoch']}. The learning rate is too high: try 10x lower (--lr)."
                    )
                if valid_loss < best_valid:
                    best_valid = valid_loss
                best_state = copy.deepcopy(self.model.state_dict())
                for cb in self.epoch_callbacks:
                    cb(self, row)
        except DivergedError:
            if best_state is not None:
                self.model.load_state_dict(best_state)  # keep the last good weights
            self.diverged = True
            raise
        except StopTraining as s:
            self.console.print(f"[yellow]stopped early:[/] {s}")

    def _progress(self):
        return progress_bar(self.console, self.quiet)

    def _print_header(self) -> None:
        if not self._header_printed:
            self.console.print(f"{'epoch':>5}  {'stage':<8}  {'train_loss':>10}  {'valid_loss':>10}  "
                               f"{'error_rate':>10}  {'accuracy':>8}  {'time':>6}", highlight=False)
            self._header_printed = True

    def _print_row(self, r: dict) -> None:
        m, s = divmod(int(round(r["seconds"])), 60)
        self.console.print(f"{r['epoch']:>5}  {r['stage']:<8}  {r['train_loss']:>10.4f}  {r['valid_loss']:>10.4f}  "
                           f"{r['error_rate']:>10.4f}  {r['accuracy']:>8.4f}  {m:02d}:{s:02d}", highlight=False)

    def lr_find(self, **kwargs):
        """Sweep learning rates and suggest one (see ursa.training.lr_find); weights are restored after."""
        from ursa.training.lr_find import lr_find

        return lr_find(self, **kwargs)

    # --- evaluation ----------------------------------------------------------------------------

    @torch.inference_mode()
    def get_preds(self, idx: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities and targets for items idx (default: the validation set), eval transform."""
        idx = self.dls.dataset.valid_idx if idx is None else list(idx)
        self.model.eval()
        # 16 at a time: on CPU as fast as larger batches, and a 224 px batch of 64 holds ~1 GB of activations.
        dl = self.dls.loader(idx, train=False, bs=min(self.dls.bs, 16))
        probs, ys = [], []
        for xb, yb in dl:
            probs.append(self.model(xb).float().softmax(1))
            ys.append(yb)
        return torch.cat(probs), torch.cat(ys)

    def validate(self) -> tuple[float, float, float]:
        """valid_loss, error_rate, accuracy on the validation set."""
        probs, y = self.get_preds()
        return metrics_from_probs(probs, y)

    # --- checkpoints and export ----------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Checkpoint the weights (safetensors, atomic) to come back to with load()."""
        from safetensors.torch import save_file

        from ursa.util.files import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous() for k, v in self.model.state_dict().items()}, str(tmp))
        return path

    def load(self, path: str | Path) -> "Learner":
        """Restore weights saved by save()."""
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(path)))
        return self

    def export(self, path: str | Path, metrics: dict | None = None) -> Path:
        """Write the one model file (weights + metadata) that predict and serve load."""
        from dataclasses import asdict

        from ursa.inference.modelfile import ModelMeta, save_model

        if metrics is None and self.recorder.rows:
            last = self.recorder.rows[-1]
            metrics = {k: last[k] for k in ("valid_loss", "error_rate", "accuracy")}
        meta = ModelMeta(
            arch=self.model.arch, classes=list(self.dls.classes), input_size=self.dls.size,
            mean=list(self.dls.mean), std=list(self.dls.std), head=asdict(self.model.head_cfg),
            metrics=metrics or {},
        )
        self.model.eval()
        return save_model(self.model, path, meta)


@torch.no_grad()
def recalibrate_bn(head: torch.nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Re-estimate the head's BatchNorm statistics over the epoch's features ("precise BN").

    With few batches per epoch the running averages lag far behind the weights and validation
    collapses to one class; an equal-weight average over the whole epoch fixes that cheaply.
    """
    bns = [m for m in head.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = head.training
    head.train()
    for xb in batches:
        if len(xb) > 1:
            head(xb)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    head.train(was_training)


def metrics_from_probs(probs: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """valid_loss (cross-entropy), error_rate, accuracy from probabilities."""
    if len(y) == 0:
        return math.nan, math.nan, math.nan
    loss = F.nll_loss(torch.log(probs.clamp_min(1e-12)), y).item()
    acc = (probs.argmax(1) == y).float().mean().item()
    return loss, 1.0 - acc, acc


def _smooth_last(losses: list[float], beta: float = 0.98) -> float:
    """fastai reports the exponentially smoothed train loss at the end of the epoch."""
    if not losses:
        return math.nan
    avg = 0.0
    for i, v in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * v
    return avg / (1 - beta ** len(losses))

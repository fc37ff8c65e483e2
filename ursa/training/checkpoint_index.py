"""checkpoint.json checked whole before anything of it is used: the one place that knows its shape.

``--resume`` reads a file that may have been edited, damaged or put there by someone else; every
field is checked here for its type, its range and how it fits the rest (epochs against the
history, the schedule's position against its length, files inside the checkpoint folder), so a
bad one is one line (``ResumeError``, exit 2) and never a traceback or a silently odd run. What
only the learner knows (the tensors' shapes against the model, the optimiser's groups) is checked
in ``training.checkpoint`` when they are loaded.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ursa.errors import UrsaError
from ursa.training.plan import FineTune, Work

MAX_DEPTH = 10  # the index nests 5 deep; anything deeper was not written by ursa
MAX_EPOCHS = 10_000_000
FILE_NAME = re.compile(r"^e\d{1,9}\.(weights|state|best)\.safetensors$")
ROW_NUMBERS = ("train_loss", "valid_loss", "error_rate", "accuracy", "balanced_error", "seconds")
STAGES = ("frozen", "unfrozen")


class ResumeError(UrsaError):
    """--resume RUN: there is no usable checkpoint there."""


class _Bad(Exception):
    """One field is wrong: the message says which and how."""


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(d: dict, key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if not is_int(v) or not lo <= v <= hi:
        raise _Bad(f"{key}: expected a whole number from {lo} to {hi}, got {_show(v)}")
    return v


def _num(d: dict, key: str, lo: float = -math.inf, hi: float = math.inf, optional: bool = False) -> None:
    v = d.get(key)
    if optional and v is None:
        return
    if not is_number(v) or not lo <= v <= hi:
        raise _Bad(f"{key}: expected a finite number from {lo} to {hi}, got {_show(v)}")


def _dict(d: dict, key: str) -> dict:
    v = d.get(key)
    if not isinstance(v, dict):
        raise _Bad(f"{key}: expected an object, got {_show(v)}")
    return v


def _list(d: dict, key: str) -> list:
    v = d.get(key)
    if not isinstance(v, list):
        raise _Bad(f"{key}: expected a list, got {_show(v)}")
    return v


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def depth(v: Any) -> int:
    """How deep lists and objects nest in v (iteratively: a hostile file cannot exhaust the stack here)."""
    deepest, stack = 0, [(v, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((y, d + 1) for y in (x.values() if isinstance(x, dict) else x))
    return deepest


def check_index(index: Any, folder: Path) -> None:
    """Raise ResumeError (one line naming checkpoint.json and the field) unless the index is one ursa wrote."""
    path = Path(folder) / "checkpoint.json"
    try:
        _check(index, Path(folder))
    except _Bad as e:
        raise ResumeError(f"{path}: not a usable checkpoint ({e}); train again without --resume") from None


def _check(index: Any, folder: Path) -> None:
    if not isinstance(index, dict):
        raise _Bad(f"expected an object, got {_show(index)}")
    if depth(index) > MAX_DEPTH:
        raise _Bad(f"nested more than {MAX_DEPTH} deep")
    if index.get("stage") not in STAGES:
        raise _Bad(f"stage: expected one of {', '.join(STAGES)}, got {_show(index.get('stage'))}")
    fit = _dict(index, "fit")
    n_epoch = _int(fit, "n_epoch", 1, MAX_EPOCHS)
    lr = fit.get("max_lr")
    lrs = lr if isinstance(lr, list) and len(lr) == 2 else [lr]
    if not all(is_number(x) and 0 < x <= 10 for x in lrs):
        raise _Bad(f"fit.max_lr: expected a rate in (0, 10] or two of them, got {_show(lr)}")
    _num(fit, "pct_start", 0.0, 1.0)
    if fit.get("size") is not None:
        _int(fit, "size", 8, 4096)
    if not isinstance(fit.get("bf16"), bool):
        raise _Bad(f"fit.bf16: expected true or false, got {_show(fit.get('bf16'))}")
    epochs_done = _int(index, "epochs_done", 1, MAX_EPOCHS)
    _int(index, "epoch_in_fit", 1, n_epoch)
    total = index.get("total_steps", 0)
    if not is_int(total) or total < 0:
        raise _Bad(f"total_steps: expected a whole number >= 0, got {_show(total)}")
    _int(index, "sched_steps", 0, total if total else 10**12)
    if "world" in index:
        _int(index, "world", 1, 1_000_000)
    _num(index, "elapsed", 0.0, optional=True)
    if not isinstance(index.get("fit_stopped", False), bool):
        raise _Bad(f"fit_stopped: expected true or false, got {_show(index.get('fit_stopped'))}")
    if not isinstance(index.get("split"), (str, type(None))):
        raise _Bad(f"split: expected text, got {_show(index.get('split'))}")
    scaler = index.get("scaler")
    if scaler is not None and not (isinstance(scaler, dict) and all(
            is_number(v) or isinstance(v, bool) for v in scaler.values())):
        raise _Bad(f"scaler: expected an object of numbers, got {_show(scaler)}")
    _param_groups(_list(index, "param_groups"))
    _recorder(_dict(index, "recorder"), epochs_done)
    _best(_dict(index, "best"), "best" in index.get("files", {}) if isinstance(index.get("files"), dict) else False)
    _rng(_dict(index, "rng"))
    if not _dict(index, "config"):
        raise _Bad("config: empty")
    _plan(_dict(index, "plan"))
    _files(_dict(index, "files"), folder)


def _param_groups(groups: list) -> None:
    if not groups or not all(isinstance(g, dict) for g in groups):
        raise _Bad(f"param_groups: expected a list of the optimiser's groups, got {_show(groups)}")
    for g in groups:
        _num(g, "lr", 0.0, 10.0)
        _num(g, "weight_decay", 0.0, 10.0)
        _num(g, "eps", 0.0, 1.0)
        betas = g.get("betas")
        if not (isinstance(betas, list) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
            raise _Bad(f"param_groups.betas: expected two numbers in [0, 1), got {_show(betas)}")
        params = g.get("params")
        if not (isinstance(params, list) and all(is_int(p) and p >= 0 for p in params)):
            raise _Bad(f"param_groups.params: expected parameter numbers, got {_show(params)}")


def _row(row: Any, where: str) -> None:
    if not isinstance(row, dict) or not is_int(row.get("epoch")) or row.get("stage") not in STAGES:
        raise _Bad(f"{where}: expected a history row (epoch, stage, losses), got {_show(row)}")
    for k in ROW_NUMBERS:
        v = row.get(k)
        if not (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))):
            raise _Bad(f"{where}.{k}: expected a number, got {_show(v)}")


def _recorder(rec: dict, epochs_done: int) -> None:
    rows = _list(rec, "rows")
    if len(rows) != epochs_done:
        raise _Bad(f"recorder.rows: {len(rows)} history rows for epochs_done {epochs_done}")
    for i, row in enumerate(rows):
        _row(row, f"recorder.rows[{i}]")
    lists = [_list(rec, k) for k in ("batch_losses", "batch_lrs", "batch_epochs")]
    if len({len(x) for x in lists}) != 1:
        raise _Bad("recorder: batch_losses, batch_lrs and batch_epochs differ in length")
    for x in lists:
        if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in x):
            raise _Bad("recorder: expected numbers in the batch lists")


def _best(best: dict, has_file: bool) -> None:
    if best.get("row") is None and best.get("epoch") is None and not has_file:
        return
    if not is_int(best.get("epoch")):
        raise _Bad(f"best.epoch: expected a whole number, got {_show(best.get('epoch'))}")
    _row(best.get("row"), "best.row")


def _rng(rng: dict) -> None:
    py = rng.get("python")
    if not (isinstance(py, list) and len(py) == 3 and is_int(py[0]) and isinstance(py[1], list) and len(py[1]) == 625
            and all(is_int(v) and 0 <= v < 2**32 for v in py[1]) and py[2] is None):
        raise _Bad("rng.python: not Python's random state")
    npy = rng.get("numpy")
    if not (isinstance(npy, list) and len(npy) == 5 and npy[0] == "MT19937" and isinstance(npy[1], list)
            and len(npy[1]) == 624 and all(is_int(v) and 0 <= v < 2**32 for v in npy[1]) and is_int(npy[2])
            and 0 <= npy[2] <= 624 and is_int(npy[3]) and npy[3] in (0, 1) and is_number(npy[4])):
        raise _Bad("rng.numpy: not NumPy's random state")


def _plan(plan: dict) -> None:
    if "fine_tune_epochs" in plan:
        _int(plan, "fine_tune_epochs", 0, MAX_EPOCHS)
    if not isinstance(plan.get("fine_tune_why", ""), str):
        raise _Bad(f"plan.fine_tune_why: expected text, got {_show(plan.get('fine_tune_why'))}")
    for k in ("epoch_seconds", "spent", "planned_seconds"):
        _num(plan, k, 0.0, optional=True)
    how = plan.get("fine_tune", FineTune.PLANNED.value)
    if how not in {f.value for f in FineTune}:
        raise _Bad(f"plan.fine_tune: expected one of {', '.join(f.value for f in FineTune)}, got {_show(how)}")
    work = plan.get("work") or {}
    if not isinstance(work, dict) or (work and set(Work.__dataclass_fields__) - work.keys()):
        raise _Bad(f"plan.work: expected the counted work of training/plan.py, got {_show(work)}")
    for k in ("gflops", "frozen_gflops", "n_train", "n_valid", "frozen_epochs", "views", "ranks"):
        if work:
            _num(work, k, 0.0)


def _files(files: dict, folder: Path) -> None:
    if not {"weights", "state"} <= files.keys() or not files.keys() <= {"weights", "state", "best"}:
        raise _Bad(f"files: expected weights, state (and best), got {_show(sorted(files))}")
    real = folder.resolve()
    for kind, name in files.items():
        if not isinstance(name, str) or not FILE_NAME.match(name) or not name.endswith(f".{kind}.safetensors"):
            raise _Bad(f"files.{kind}: expected a file name such as e3.{kind}.safetensors in the checkpoint "
                       f"folder, got {_show(name)}")
        path = folder / name
        if path.is_symlink() or path.resolve().parent != real:
            raise _Bad(f"files.{kind}: {name} must be a file inside the checkpoint folder, not a link")

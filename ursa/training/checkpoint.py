"""Checkpoints after every epoch, and going on from the last one after a run was killed.

``CheckpointWriter`` (a callback; rank 0 only) writes ``RUN/checkpoint/`` after each epoch: the
weights, the optimiser's state, the random generators' states and the best epoch's weights as
safetensors, and ``checkpoint.json`` (the fit's settings, the schedule's position, the history so
far, Python's and NumPy's random state, and what the recipe decided). Each file is written
atomically and ``checkpoint.json``, written last, names the files of its epoch, so a kill at any
moment leaves the previous complete checkpoint. No pickle: safetensors and JSON only, on save and
on load. ``ursa train DATA --resume RUN`` reads it back (``read_checkpoint``) and the recipe calls
``restore_learner`` and ``fit_one_cycle(..., resume=ckpt)``, which calls ``restore_fit``.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file

from ursa.errors import WriteError
from ursa.training.callbacks import Callback
from ursa.training.checkpoint_index import ResumeError, check_index
from ursa.training.runfolder import CHECKPOINT, sweep_checkpoint_temps
from ursa.util.files import atomic_write_text, save_tensors
from ursa.util.manifest import Manifest

__all__ = ["Checkpoint", "CheckpointWriter", "ResumeError", "read_checkpoint", "remove_checkpoint",
           "write_checkpoint"]

FOLDER = CHECKPOINT
INDEX = "checkpoint.json"
VERSION = 1


def checkpoint_folder(run: Path) -> Path:
    """RUN/checkpoint, refused when it is a link or not a folder: ursa writes and empties only a folder of its own."""
    folder = Path(run) / FOLDER
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ResumeError(f"{folder}: is a link or not a folder; ursa keeps its checkpoint in a folder of its own "
                          "there: move it aside (or use another --out)")
    return folder


class CheckpointWriter(Callback):
    """After every epoch, rank 0 writes the checkpoint a killed run goes on from (``extra``: the recipe's state)."""

    # After the recorder and the best-epoch keeper (the epoch's row and best weights are in), before
    # BudgetStop (70): an epoch the budget ends the fit after is checkpointed too, its time counted.
    order = 65

    def __init__(self, run: Path, extra: Callable[[], dict]) -> None:
        self.run, self.folder, self.extra = Path(run), Path(run) / FOLDER, extra
        self.warned = False

    def before_fit(self, learn: Any) -> None:
        # a link there: refused before the first epoch, not after it; by every rank (a read), so all of them stop
        # and meet at the error's barrier instead of rank 0 alone leaving the others in a collective
        checkpoint_folder(self.run)

    def after_epoch(self, learn: Any) -> None:
        self.write(learn, stopped=False)

    def after_cancel_fit(self, learn: Any) -> None:
        """The fit was ended early (the budget): a resumed run must not train its remaining epochs."""
        if learn.recorder.rows:
            self.write(learn, stopped=True)

    def write(self, learn: Any, stopped: bool) -> None:
        if not learn.dist.main:
            return
        try:
            write_checkpoint(self.folder, learn, {**self.extra(), "fit_stopped": stopped})
        except (OSError, WriteError) as e:  # a full disk must not end the training itself
            if not self.warned:
                learn.console.print(f"[yellow]warning:[/] could not write the checkpoint in {self.folder} ({e}); "
                                    "the run goes on, but --resume will not be able to use it", highlight=False)
                self.warned = True


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def write_checkpoint(folder: Path, learn: Any, extra: dict) -> Path:
    """This epoch's checkpoint: three safetensors files, then checkpoint.json naming them; older epochs removed.

    Every file is recorded in the folder's manifest as it is written; only recorded files are ever
    removed (the previous epoch's, or this epoch's when writing it failed), never anything else there.
    """
    folder = checkpoint_folder(Path(folder).parent)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(folder)
    if INDEX not in manifest.files:
        manifest.add([INDEX], rewritten=True)  # ursa's index, replaced every epoch
    n = learn.epochs_done
    files = {"weights": f"e{n}.weights.safetensors", "state": f"e{n}.state.safetensors"}
    try:
        index = _write_files(folder, manifest, learn, files, extra)
        atomic_write_text(folder / INDEX, json.dumps(index) + "\n")
    except BaseException:
        named = _named(folder)  # what the last good checkpoint.json names stays; this epoch's orphans go
        manifest.remove([f for f in files.values() if f not in named])
        raise
    # After the index only removals, and no manifest write: a kill here leaves no temp file behind.
    keep = set(files.values()) | {INDEX}
    manifest.remove([name for name in manifest.files if name not in keep], save=False)
    return folder / INDEX


def _named(folder: Path) -> set[str]:
    """The file names the checkpoint.json in folder names (none when it is missing or unreadable)."""
    try:
        files = json.loads((folder / INDEX).read_text(encoding="utf-8")).get("files", {})
        return {v for v in files.values() if isinstance(v, str)}
    except (OSError, ValueError, AttributeError, RecursionError):
        return set()


def _save(tensors: dict[str, torch.Tensor], folder: Path, name: str, manifest: Manifest) -> None:
    save_tensors(folder / name, tensors)
    manifest.add([name])


def _write_files(folder: Path, manifest: Manifest, learn: Any, files: dict[str, str], extra: dict) -> dict:
    """The epoch's tensors written (``files`` gains "best" when there is one); returns the index to write."""
    n = learn.epochs_done
    _save(_cpu(learn.model.state_dict()), folder, files["weights"], manifest)
    opt = learn.opt.state_dict()
    tensors = {f"opt.{i}.{k}": v for i, st in opt["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    tensors["rng.torch"] = torch.get_rng_state()
    if getattr(learn, "fit_generator", None) is not None:
        tensors["rng.fit_generator"] = learn.fit_generator.get_state()
    if learn.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(learn.device)
    _save(_cpu(tensors), folder, files["state"], manifest)
    best = learn.best
    if best.state is not None:
        files["best"] = f"e{n}.best.safetensors"
        _save(_cpu(best.state), folder, files["best"], manifest)
    r = learn.recorder
    np_state = np.random.get_state()
    index = {
        "version": VERSION, "epochs_done": n, "stage": learn.stage, "epoch_in_fit": learn.epoch_in_fit + 1,
        "fit": learn.fit_args, "sched_steps": int(learn.sched.last_epoch) if learn.sched is not None else 0,
        "total_steps": int(getattr(learn.sched, "total_steps", 0) or 0), "world": learn.dist.world,
        "scaler": learn.scaler.state_dict() if learn.scaler is not None else None,
        "param_groups": [{k: _jsonable(v) for k, v in g.items()} for g in opt["param_groups"]],
        "recorder": {"rows": r.rows, "batch_losses": r.batch_losses, "batch_lrs": r.batch_lrs,
                     "batch_epochs": r.batch_epochs},
        "best": {"epoch": best.epoch, "row": best.row},
        "rng": {"python": _jsonable(random.getstate()),
                "numpy": [np_state[0], np_state[1].tolist(), *(_jsonable(v) for v in np_state[2:])]},
        "files": files, **extra,
    }
    return index


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


@dataclass
class Checkpoint:
    """A run's last complete checkpoint, read back (JSON index + the tensors it names)."""

    folder: Path
    index: dict

    @property
    def stage(self) -> str:
        return self.index["stage"]

    @property
    def epoch_in_fit(self) -> int:
        """Epochs of the checkpointed fit already done."""
        return int(self.index["epoch_in_fit"])

    @property
    def fit_done(self) -> bool:
        """The checkpointed fit ran all its epochs, or the budget ended it."""
        return bool(self.index.get("fit_stopped")) or self.epoch_in_fit >= int(self.index["fit"]["n_epoch"])

    def tensors(self, name: str, like: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The tensors of file ``name``; ``like``: they must have exactly these names and shapes (the model's)."""
        path = self.folder / self.index["files"][name]
        try:
            tensors = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - a damaged file is the user's problem to see, not a traceback
            raise ResumeError(f"{path}: checkpoint file is damaged ({type(e).__name__}); train again without --resume") from None
        if like is not None:
            want = {k: tuple(v.shape) for k, v in like.items()}
            got = {k: tuple(v.shape) for k, v in tensors.items()}
            if want != got:
                diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
                raise ResumeError(f"{path}: weights of another model ({diff[0]}: checkpoint {got.get(diff[0])}, "
                                  f"this run {want.get(diff[0])}; another class count or network?); "
                                  "train again without --resume")
        return tensors

    def restore_learner(self, learn: Any) -> None:
        """Weights, history, best epoch and epoch count as they were after the checkpointed epoch."""
        like = learn.model.state_dict()
        learn.model.load_state_dict(self.tensors("weights", like))
        rec = self.index["recorder"]
        learn.recorder.restore([_nan_row(row) for row in rec["rows"]], rec["batch_losses"], rec["batch_lrs"],
                               rec["batch_epochs"])
        if "best" in self.index["files"]:
            b = self.index["best"]
            learn.best.restore({k: v.to(learn.device) for k, v in self.tensors("best", like).items()}, b["epoch"],
                               _nan_row(b["row"]))
        learn.restore_epochs(int(self.index["epochs_done"]))

    def restore_fit(self, learn: Any, opt: torch.optim.Optimizer, sched: Any) -> int:
        """The optimiser, schedule and random state of the checkpointed fit; returns the epoch to start at."""
        total = int(getattr(sched, "total_steps", 0) or 0)
        if self.index.get("total_steps") not in (None, 0, total) or self.index.get("world", 1) != learn.dist.world:
            raise ResumeError(f"--resume {self.folder.parent}: the run was started with {self.index.get('world', 1)} "
                              f"process(es) and {self.index.get('total_steps')} steps in this stage, this one has "
                              f"{learn.dist.world} and {total}: resume it with as many processes as it started with")
        if int(self.index["sched_steps"]) > total:
            raise ResumeError(f"{self.folder / INDEX}: sched_steps {self.index['sched_steps']} is past the end of the "
                              f"schedule ({total} steps); train again without --resume")
        state = self.tensors("state")
        with warnings.catch_warnings():  # stepping a fresh schedule to where it was, without optimiser steps
            warnings.simplefilter("ignore")
            for _ in range(int(self.index["sched_steps"])):
                sched.step()
        try:
            self._load_states(learn, opt, state)
        except (ValueError, TypeError, KeyError, RuntimeError, IndexError) as e:
            # the index checker saw the right types; what is left is how they fit this optimiser and these tensors
            raise ResumeError(f"{self.folder / INDEX}: the optimiser or random state does not fit this run "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
                              "train again without --resume") from None
        return self.epoch_in_fit

    def _load_states(self, learn: Any, opt: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
        params = [p for g in opt.param_groups for p in g["params"]]
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in state.items():
            if key.startswith("opt."):
                _, i, k = key.split(".", 2)
                if not i.isdigit() or int(i) >= len(params) or (k != "step" and v.shape != params[int(i)].shape):
                    raise ValueError(f"optimiser state {key} does not fit the parameters")
                per_param.setdefault(int(i), {})[k] = v.to(learn.device) if k != "step" else v
        groups = [dict(g) for g in self.index["param_groups"]]
        for g in groups:
            g["betas"] = tuple(g["betas"])
        opt.load_state_dict({"state": per_param, "param_groups": groups})
        if self.index.get("scaler") and learn.scaler is not None:
            learn.scaler.load_state_dict(self.index["scaler"])
        torch.set_rng_state(state["rng.torch"])
        if "rng.fit_generator" in state and getattr(learn, "fit_generator", None) is not None:
            learn.fit_generator.set_state(state["rng.fit_generator"])
        if "rng.cuda" in state and learn.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng.cuda"], learn.device)
        rng = self.index["rng"]
        random.setstate(_tuples(rng["python"]))
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _nan_row(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {k: (float("nan") if v is None and k != "stage" else v) for k, v in row.items()}


def read_checkpoint(run: Path) -> Checkpoint:
    """RUN/checkpoint/checkpoint.json, checked; a clear error when there is nothing to resume."""
    run = Path(run)
    path = run / FOLDER / INDEX
    if not path.is_file():
        finished = (run / "model.safetensors").is_file()
        raise ResumeError(f"--resume {run}: " + ("that run finished (model.safetensors is there): nothing to resume"
                                                  if finished else f"no checkpoint there ({path} is missing); "
                                                  "give the run folder of a run that was stopped"))
    checkpoint_folder(run)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ResumeError(f"{path}: not a readable checkpoint ({type(e).__name__}); train again without --resume") from None
    needed = ("files", "stage", "epochs_done", "epoch_in_fit", "fit", "sched_steps", "param_groups", "recorder",
              "best", "rng", "config", "plan")
    if (not isinstance(index, dict) or index.get("version") != VERSION or any(k not in index for k in needed)
            or not isinstance(index["files"], dict)):
        raise ResumeError(f"{path}: not a checkpoint this version of ursa writes; train again without --resume")
    check_index(index, path.parent)
    missing = [f for f in index["files"].values() if not (path.parent / f).is_file()]
    if missing:
        raise ResumeError(f"{path}: checkpoint files missing ({', '.join(missing)}); train again without --resume")
    return Checkpoint(path.parent, index)


def remove_checkpoint(run: Path) -> None:
    """The run finished (its model file is written): ursa's checkpoint files go; anything else there stays.

    Only files in the folder's manifest (written by ursa and unchanged since) are removed, and the
    folder only when that leaves it empty; a link at RUN/checkpoint is left as it is.
    """
    folder = Path(run) / FOLDER
    if folder.is_symlink() or not folder.is_dir():
        return
    manifest = Manifest(folder)
    manifest.remove([INDEX], save=False)  # first: a kill halfway leaves no index naming missing files
    manifest.remove(list(manifest.files), save=False)
    manifest.drop()
    sweep_checkpoint_temps(folder)  # what a killed write left there (ursa's own temp names; the run lock is held)
    try:
        folder.rmdir()
    except OSError:
        pass  # the user's own files are there: the folder stays with them

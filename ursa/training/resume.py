"""Where and how a run runs: the ranks torchrun started, a stopped run picked up again, and what they did.

The glue between ``ursa train``'s options and ``training.dist`` / ``training.checkpoint``: join the
process group, rebuild a stopped run's config from its checkpoint, check it is the same data, and
say in recipe.json on which device, how many ranks and from which epoch the run went.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from rich.console import Console

from ursa.training.checkpoint import Checkpoint, ResumeError, read_checkpoint
from ursa.training.config import TrainConfig
from ursa.training.dist import Dist, env_ranks, rank_device
from ursa.training.plan import Plan
from ursa.vision.data import ImageDataset


def start_ranks(device: str) -> Dist:
    """This process's Dist: torchrun's process group joined (gloo on CPUs, NCCL on GPUs), or one process."""
    local_rank, world = env_ranks()
    return Dist.from_env(rank_device(device, local_rank, world))


def split_digest(ds: ImageDataset) -> str:
    """A fingerprint of the validation split (which images, which labels): a resumed run must have the same."""
    h = hashlib.sha256()
    for i in ds.valid_idx:
        h.update(f"{ds.rel(i)}\t{ds.labels[i]}\n".encode("utf-8", "surrogateescape"))  # a name's bytes on disk
    return f"{len(ds.valid_idx)}:{h.hexdigest()[:16]}"


def resume_config(run: Path, data: Path, world: int = 1, **how: Any) -> tuple[TrainConfig, Checkpoint]:
    """The stopped run's config (its options; out = run) and its checkpoint; ``how``: device, pixels, quiet.

    ``world``: how many processes will go on with it; it must be as many as the run started with
    (docs/scale.md), checked here before anything is loaded.
    """
    ckpt = read_checkpoint(run)
    started = int(ckpt.index.get("world", 1))
    if started != world:
        raise ResumeError(f"--resume {run}: the run was started with {started} process(es), this is {world}: "
                          f"resume it with as many (" + (f"--nproc {started}" if started > 1 else "without --nproc")
                          + ")")
    saved = dict(ckpt.index.get("config") or {})
    if not saved:
        raise ResumeError(f"--resume {run}: the checkpoint has no config; train again without --resume")
    saved.pop("out", None)
    saved.pop("data", None)
    try:
        cfg = TrainConfig.from_json(saved, data=data, out=run, **{k: v for k, v in how.items() if v is not None})
    except (TypeError, ValueError, AttributeError) as e:  # a ConfigError (an UrsaError) says what is wrong itself
        raise ResumeError(f"{ckpt.folder / 'checkpoint.json'}: its config is not one ursa wrote ({type(e).__name__}); "
                          "train again without --resume") from None
    return cfg, ckpt


def resume_line(ckpt: Checkpoint, ds: ImageDataset, plan: Plan, console: Console) -> None:
    """Check the data gives the same split as the stopped run, and say where it goes on from."""
    if ckpt.index.get("split") not in (None, split_digest(ds)):
        raise ResumeError(f"--resume {ckpt.folder.parent}: these images do not give the validation split the run "
                          "was started with (were images added, removed or relabelled?); train again without --resume")
    i = ckpt.index
    what = (f"after epoch {i['epochs_done'] - 1} ({i['stage']} epoch {ckpt.epoch_in_fit} of {i['fit']['n_epoch']})")
    console.print(f"resuming {ckpt.folder.parent}: {what}; history and weights from the checkpoint", highlight=False)


# The packages whose arithmetic makes the weights: the same data, seed and options give bit-identical weights with the
# same versions of these (and the same thread count); a newer release of one may change the last bits, and training
# carries that on (docs/train.md).
NUMERIC_PACKAGES = ("torch", "torchvision", "timm", "onnxruntime", "numpy", "pillow")


def package_versions() -> dict[str, str | None]:
    """The installed version of each of NUMERIC_PACKAGES (None: not installed), for recipe.json's ``run``."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in NUMERIC_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def run_facts(learn: Any, ckpt: Checkpoint | None) -> dict:
    """Where the run ran, for recipe.json: device, ranks, threads, package versions, how the feature cache was shared,
    resume."""
    d = learn.dist
    facts: dict = {"device": str(learn.device), "world_size": d.world, "backend": d.backend or None}
    if str(learn.device) == "cpu":  # the weights are bit-identical at the same thread count (another sums in another order)
        import torch

        facts["threads"] = torch.get_num_threads()
    facts["packages"] = package_versions()
    if learn.feature_counts:
        facts["feature_images_per_rank"] = [int(n) for n in learn.feature_counts]
    if learn.vanished:  # changed or vanished on disk while the run trained: skipped (the run writer says so too)
        facts["skipped_during_training"] = learn.vanished_names()
    if ckpt is not None:
        facts["resumed_after_epoch"] = int(ckpt.index["epochs_done"]) - 1
    return facts

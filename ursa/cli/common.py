"""What every command shares: option types, and the defaults read from the config classes."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ursa.errors import UrsaError
from ursa.training.config import TrainConfig

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Hide progress bars.")]
DataArg = Annotated[Path, typer.Argument(help="Folder with one sub-folder of images per class (or train/ and valid/).")]
CsvOpt = Annotated[Optional[Path], typer.Option("--csv", help="CSV of name,label relative to DATA (fastai's cleaned.csv).")]
# Under `ursa train --nproc N`, rank 0 writes its exit code here (torchrun itself says 1 for any failure).
EXIT_FILE = "URSA_EXIT_CODE_FILE"
BACKEND_HELP = "auto (MODEL.onnx beside MODEL when it is up to date), torch or onnx."


def default(name: str) -> Any:
    """TrainConfig's default for an option: defaults live there only, the CLI shows them."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    return None if f.default is MISSING else f.default


def parse_slice(text: str | None) -> tuple[float, float] | None:
    """--unfreeze-lr LO,HI as two numbers (their range is checked by TrainConfig)."""
    if not text:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UrsaError(f"--unfreeze-lr: expected two numbers LO,HI, got {text!r}") from None
    return lo, hi


def device_option(help_extra: str = "") -> Any:
    """--device, the same on every command that runs a network (checked by ursa.util.device)."""
    from ursa.util.device import DEVICE_HELP

    return typer.Option("--device", help=DEVICE_HELP + help_extra)


DeviceOpt = Annotated[str, device_option()]

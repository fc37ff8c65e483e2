"""Pixels: decode once at reduced size, augment, normalise; training, evaluation and prediction share these."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from ursa.vision import FLIPS
from ursa.vision.images import Source, open_image

# Images are decoded once, to this multiple of the input size on the short side.
DECODE_SCALE = 1.15


def decode_size(size: int) -> int:
    """Short side images are decoded to: a little above the input size, room for crops."""
    return int(round(size * DECODE_SCALE))


def load_pixels(source: Source, short_side: int) -> torch.Tensor:
    """Decode (JPEG draft at reduced size), resize so the short side is short_side, as uint8 CHW.

    Training, evaluation and prediction all decode through here, so they see identical pixels.
    """
    im = open_image(source, min_size=short_side)
    return pil_to_tensor(resize_short(im, short_side))


def resize_short(im: Image.Image, short_side: int) -> Image.Image:
    """Resize keeping the aspect ratio so the short side is short_side (only ever shrinking a lot is cheap)."""
    w, h = im.size
    s = short_side / min(w, h)
    if abs(s - 1) < 1e-3:
        return im
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    return im.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None if s > 0.5 else 2.0)


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """uint8 CHW tensor sharing nothing with PIL."""
    a = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()


def train_transform(size: int, mean: Sequence[float], std: Sequence[float], flips: str = "horizontal") -> Callable:
    """fastai's get_transforms in spirit: random resized crop, flips as the data allows, small rotation and warp, lighting."""
    if flips not in FLIPS:
        raise ValueError(f"flips must be one of {', '.join(FLIPS)}, not {flips!r}")
    mirror: list[Callable] = []
    if flips != "none":
        mirror.append(v2.RandomHorizontalFlip())
    if flips == "all":
        mirror += [v2.RandomVerticalFlip(), v2.RandomApply([QuarterTurn()], p=0.5)]
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        *mirror,
        v2.RandomApply([v2.RandomAffine(degrees=10, scale=(1.0, 1.1))], p=0.75),
        v2.RandomPerspective(distortion_scale=0.2, p=0.5),
        v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2)], p=0.75),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


class QuarterTurn(torch.nn.Module):
    """Rotate a square crop by 90 degrees: with both flips, all eight symmetries of a square."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x, 1, dims=(-2, -1))


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Deterministic: short side to size, centre crop, normalise. Predict uses this too."""
    return v2.Compose([
        v2.Resize(size, antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])



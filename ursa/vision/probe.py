"""What the images are like, read cheaply before training: typical size and whether they are grayscale.

The default recipe decides its input size and its flips from this (``ursa.training.plan``): 64 px
satellite tiles need not be upsampled to 224 (12x the compute), and a mirrored digit can be
another digit. Headers give the size; a 32 px thumbnail of a sample gives the colour, so the
probe costs well under a second on thousands of files.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageChops

# Headers read for the median size; thumbnails decoded for the colour test.
SIZE_SAMPLE = 400
COLOUR_SAMPLE = 48
# A pixel whose channels differ by at most this much is grey (JPEG noise on grey images is ~2-6).
GREY_TOLERANCE = 12


@dataclass(frozen=True)
class ImageProbe:
    """Median short and long side in pixels, and the share of sampled images that are grayscale."""

    n: int  # images whose header could be read
    median_short: int
    median_long: int
    grayscale: float  # 0..1

    def to_json(self) -> dict:
        return asdict(self)


def probe_images(files: Sequence[Path], seed: int = 0) -> ImageProbe:
    """Sizes from the headers of a sample, colour from thumbnails of a smaller one; unreadable files are skipped."""
    rng = random.Random(seed)
    files = list(files)
    sample = files if len(files) <= SIZE_SAMPLE else rng.sample(files, SIZE_SAMPLE)
    shorts, longs, grey, looked = [], [], 0, 0
    for i, f in enumerate(sample):
        try:
            with Image.open(f) as im:
                w, h = im.size
                shorts.append(min(w, h))
                longs.append(max(w, h))
                if looked < COLOUR_SAMPLE:
                    looked += 1
                    grey += _is_grey(im)
        except Exception:  # noqa: BLE001 - a probe: the loader names bad files later
            continue
    if not shorts:
        return ImageProbe(0, 0, 0, 0.0)
    return ImageProbe(len(shorts), int(statistics.median(shorts)), int(statistics.median(longs)),
                      grey / looked if looked else 0.0)


def _is_grey(im: Image.Image) -> bool:
    """Grayscale by mode, or an RGB image whose channels agree (a scan saved as colour)."""
    if im.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return True
    if im.format == "JPEG":
        im.draft("RGB", (64, 64))
    small = im.convert("RGB")
    small.thumbnail((32, 32))
    r, g, b = small.split()
    spread = max(ImageChops.difference(r, g).getextrema()[1], ImageChops.difference(g, b).getextrema()[1])
    return spread <= GREY_TOLERANCE

"""The evaluation transform in numpy and Pillow only, reproduced from the model's metadata (no torch).

Training scores a model on: decode (JPEG draft) and resize the short side to ``decode`` pixels with
Pillow (``vision.transforms.load_pixels``), then torchvision's ``Resize(size, antialias=True)`` on
the uint8 tensor, ``CenterCrop(size)``, scale to [0, 1] and normalise. The second resize is
torch's antialiased bilinear filter in 16-bit fixed point; ``resize_crop`` below is the same
arithmetic (weights, their precision, rounding, horizontal pass first), so the pixels are
bit-identical and an ONNX model with this preprocessing gives the training pipeline's numbers.
The rule travels inside the ONNX file as its ``preprocess`` metadata (``preprocess_spec``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from ursa.errors import ModelFileError
from ursa.vision.images import Source, open_image

PREPROCESS_KEY = "preprocess"  # the ONNX metadata key holding preprocess_spec's JSON
DECODE_SCALE = 1.15  # as vision.transforms.DECODE_SCALE (checked equal by a test)


def preprocess_spec(size: int, mean: list[float], std: list[float]) -> dict[str, Any]:
    """Everything needed to reproduce the evaluation transform, as plain JSON."""
    return {
        "version": 1,
        "decode": {"short_side": int(round(size * DECODE_SCALE)), "jpeg_draft": True,
                   "interpolation": "pil_bilinear", "mode": "RGB", "exif_transpose": True},
        "resize": {"short_side": size, "long_side": "floor", "interpolation": "bilinear_antialias_uint8"},
        "crop": {"kind": "center", "size": [size, size], "offset": "round_half_even"},
        "scale": 1 / 255, "mean": list(mean), "std": list(std), "layout": "NCHW", "dtype": "float32",
    }


def check_spec(spec: Any, path: object) -> dict[str, Any]:
    """A preprocess entry this version can reproduce, or one clear line."""
    try:
        ok = (spec["version"] == 1 and spec["crop"]["kind"] == "center" and spec["layout"] == "NCHW"
              and int(spec["decode"]["short_side"]) >= int(spec["resize"]["short_side"]) > 0
              and len(spec["mean"]) in (1, 3) and len(spec["std"]) in (1, 3) and min(spec["std"]) > 0)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ModelFileError(f"{path}: its preprocess metadata is not one this ursa can reproduce; "
                             "export it again with `ursa export MODEL --onnx`")
    return spec


@lru_cache(maxsize=64)
def _aa_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """torch's antialiased bilinear weights for one axis, as int16-range integers, and their precision in bits."""
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    starts, rows = [], []
    for i in range(n_out):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xsize = min(int(center + support + 0.5), n_in) - xmin
        w = np.maximum(0.0, 1.0 - np.abs((np.arange(xsize) + xmin - center + 0.5) * invscale))
        total = w.sum()
        starts.append(xmin)
        rows.append(w / total if total != 0 else w)
    k = max(len(w) for w in rows)
    weights = np.zeros((n_out, k))
    index = np.zeros((n_out, k), dtype=np.intp)
    for i, (x, w) in enumerate(zip(starts, rows)):
        weights[i, :len(w)] = w
        index[i] = np.minimum(x + np.arange(k), n_in - 1)
    top, bits = weights.max(), 0
    while bits < 15 and int(0.5 + top * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    scaled = weights * (1 << bits)
    ints = np.where(weights < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    return index, ints, bits


def _resize_rows(a: np.ndarray, n_out: int, first: int, count: int) -> np.ndarray:
    """Output rows first..first+count of torch's antialiased uint8 resize of a's rows (axis 0) to n_out, as float32.

    Every partial sum is an integer below 2**24 (255 * 2**15 at most), so float32 arithmetic is exact.
    """
    n_in = a.shape[0]
    if n_in == n_out:
        return a[first:first + count].astype(np.float32)
    index, w, bits = _aa_weights(n_in, n_out)
    index, w = index[first:first + count], w[first:first + count].astype(np.float32)
    shape = (-1,) + (1,) * (a.ndim - 1)
    acc = np.full((count,) + a.shape[1:], float(1 << (bits - 1)), dtype=np.float32)
    tmp = np.empty_like(acc)
    for k in range(index.shape[1]):
        np.multiply(a[index[:, k]], w[:, k].reshape(shape), out=tmp)
        acc += tmp
    acc *= np.float32(1.0 / (1 << bits))
    np.floor(acc, out=acc)
    return np.clip(acc, 0, 255, out=acc)


def resize_crop(a: np.ndarray, out_h: int, out_w: int, top: int, left: int, crop_h: int, crop_w: int) -> np.ndarray:
    """torch's antialiased bilinear uint8 resize of HWC pixels to out_h x out_w (horizontal pass first, as torch
    does), computing only the crop [top:top+crop_h, left:left+crop_w]; float32 values 0..255."""
    h, w = a.shape[:2]
    if w == out_w:
        across = a[:, left:left + crop_w]
    else:  # rows of the transposed image are the columns
        across = _resize_rows(np.ascontiguousarray(a.transpose(1, 0, 2)), out_w, left, crop_w).transpose(1, 0, 2)
        across = np.ascontiguousarray(across)
    return _resize_rows(across, out_h, top, crop_h)


class Preprocess:
    """Source -> normalised float32 CHW array, by the spec a model carries."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.decode = int(spec["decode"]["short_side"])
        self.size = int(spec["resize"]["short_side"])
        self.crop = [int(v) for v in spec["crop"]["size"]]
        scale = float(spec["scale"])
        std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
        # x * scale - mean) / std as one multiply-add per pixel
        self._mul = (np.float32(scale) / std).astype(np.float32)
        self._add = (-np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1) / std).astype(np.float32)

    def pixels(self, source: Source) -> np.ndarray:
        """Decoded, resized and cropped HWC pixels (float32, whole values 0..255); raises ImageError for unusable input."""
        im = open_image(source, min_size=self.decode)
        w, h = im.size
        s = self.decode / min(w, h)
        if abs(s - 1) >= 1e-3:  # vision.transforms.resize_short
            nw, nh = max(1, round(w * s)), max(1, round(h * s))
            im = im.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None if s > 0.5 else 2.0)
        a = np.asarray(im, dtype=np.uint8)
        h, w = a.shape[:2]
        short, long_ = (w, h) if w <= h else (h, w)
        new_long = int(self.size * long_ / short)  # torchvision's Resize(int): the long side truncated
        nh, nw = (new_long, self.size) if w <= h else (self.size, new_long)
        ch, cw = self.crop
        top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))  # CenterCrop's rounding
        return resize_crop(a, nh, nw, top, left, ch, cw)

    def __call__(self, source: Source) -> np.ndarray:
        """The model's input for one image: float32 [3, H, W]."""
        a = self.pixels(source).transpose(2, 0, 1)
        out = np.multiply(a, self._mul)
        out += self._add
        return out

"""The evaluation transform in numpy and Pillow only, reproduced from the model's metadata (no torch).

Training scores a model on: decode (JPEG draft) and resize the short side to ``decode`` pixels with
Pillow (``vision.transforms.load_pixels``), then torchvision's ``Resize(size, antialias=True)`` on
the uint8 tensor, ``CenterCrop(size)``, scale to [0, 1] and normalise. Both resizes are separable
fixed-point filters (Pillow's bilinear in 22 bits, torch's antialiased bilinear in up to 15 bits),
horizontal pass first, rounded to whole values after every pass. Here each pass is a few banded
matrix products (``resample``), computed only for the pixels the centre crop keeps: the weights are
the libraries' own integers scaled by a power of two, so every product and partial sum is exact
(float64 for Pillow's, float32 for torch's) and the pixels are bit-identical to the training
pipeline's. The rule travels inside the ONNX file as its ``preprocess`` metadata (``preprocess_spec``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from ursa.inference.metaschema import check_preprocess
from ursa.vision.images import Source, open_image

PREPROCESS_KEY = "preprocess"  # the ONNX metadata key holding preprocess_spec's JSON
DECODE_SCALE = 1.15  # as vision.transforms.DECODE_SCALE (checked equal by a test)
PIL_BITS = 22  # Pillow's PRECISION_BITS for 8-bit images (32 - 8 - 2)
# output pixels per matrix product, so the band of inputs each product reads stays narrow (measured best)
BLOCK = {"pil": 16, "torch": 32}


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


def check_spec(spec: Any, path: object, size: int | None = None) -> dict[str, Any]:
    """A preprocess entry this version can reproduce (for a model of input ``size``, when given), or one clear line.

    The schema lives with the rest of the metadata's (``metaschema.check_preprocess``): every field
    typed and bounded, so a crafted file cannot ask for an 8000 px decode or a 1e308 scale.
    """
    return check_preprocess(spec, path, size)


def _triangle(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bilinear (triangle) filter both libraries use: first input, tap count and normalised weights per output.

    Same expressions, in the same order, as Pillow's ``precompute_coeffs`` and torch's
    ``_compute_indices_min_size_weights_aa`` (they agree), the row sum taken left to right as in C.
    """
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(n_out) + 0.5)
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int): truncation
    xsize = np.minimum((center + support + 0.5).astype(np.int64), n_in) - xmin
    taps = np.arange(int(xsize.max()))
    w = np.maximum(0.0, 1.0 - np.abs(((taps + xmin[:, None]) - center[:, None] + 0.5) * invscale))
    w[taps >= xsize[:, None]] = 0.0
    total = np.zeros(n_out)
    for k in taps:
        total += w[:, k]
    return xmin, xsize, np.divide(w, total[:, None], out=w, where=total[:, None] != 0)


@lru_cache(maxsize=256)
def filter_taps(kind: str, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One library's resize along one axis: first input and end per output, and the weights as integers divided
    by 2**bits (exact), with whether a row's weights sum past 256/255 of full scale (then the result is clamped)."""
    xmin, xsize, w = _triangle(n_in, n_out)
    if kind == "pil":
        bits = PIL_BITS
    else:  # torch: as many bits as keep the largest weight in int16
        top, bits = float(w.max()), 0
        while bits < 15 and int(0.5 + top * (1 << (bits + 1))) < (1 << 15):
            bits += 1
    scaled = w * float(1 << bits)
    ints = np.where(w < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5))
    over = 255 * ints.sum(axis=1) + (1 << (bits - 1)) >= (256 << bits)
    return xmin, xmin + xsize, ints * (1.0 / (1 << bits)), over


@dataclass(frozen=True)
class Band:
    """One resize pass restricted to outputs first..first+count: needs inputs lo..hi, done as banded products."""

    lo: int
    hi: int
    identity: bool
    blocks: tuple[tuple[int, int, int, int, np.ndarray, np.ndarray], ...]  # (in start, in end, out start, out end,
    # weights [out, in], the same transposed and C-ordered: BLAS runs the horizontal pass twice as fast on that)
    clip: bool  # a row's weights may carry past 255: clamp as the libraries do


@lru_cache(maxsize=512)
def band(kind: str, n_in: int, n_out: int, first: int, count: int, dtype: str) -> Band:
    """The pass plan for one (library, in size, out size, crop), built once and cached."""
    if n_in == n_out:  # both libraries skip an axis whose size does not change
        return Band(first, first + count, True, (), False)
    xmin, xend, q, over = (v[first:first + count] for v in filter_taps(kind, n_in, n_out))
    lo, hi = int(xmin[0]), int(xend[-1])  # both are non-decreasing
    taps = np.arange(q.shape[1])
    keep = taps < (xend - xmin)[:, None]
    dense = np.zeros((count, hi - lo), dtype=dtype)
    dense[np.nonzero(keep)[0], (xmin[:, None] - lo + taps)[keep]] = q[keep]
    blocks = []
    for o in range(0, count, BLOCK[kind]):
        oe = min(o + BLOCK[kind], count)
        s, e = int(xmin[o]) - lo, int(xend[oe - 1]) - lo
        w = dense[o:oe, s:e].copy()
        blocks.append((s, e, o, oe, w, w.T.copy()))
    return Band(lo, hi, False, tuple(blocks), bool(over.any()))


def _round(x: np.ndarray, clip: bool, out: np.ndarray | None = None) -> np.ndarray:
    """The libraries' fixed-point rounding (add half, shift) on values already scaled back: x + 0.5, floored."""
    x += 0.5
    out = np.floor(x, out=x if out is None else out)
    return np.minimum(out, 255.0, out=out) if clip else out


def across(x: np.ndarray, b: Band) -> np.ndarray:
    """One horizontal pass on [H, C, W] pixels (W holding inputs b.lo..b.hi), unrounded: one product per block."""
    h, c, _ = x.shape
    x2 = x.reshape(h * c, -1)
    out = np.empty((h * c, b.blocks[-1][3]), x.dtype)
    for s, e, o, oe, _, wt in b.blocks:
        np.matmul(x2[:, s:e], wt, out=out[:, o:oe])
    return out.reshape(h, c, -1)


def down(x: np.ndarray, b: Band) -> np.ndarray:
    """One vertical pass on [H, C, W] pixels (H holding inputs b.lo..b.hi), unrounded: one product per block."""
    _, c, w_ = x.shape
    x2 = x.reshape(x.shape[0], c * w_)
    out = np.empty((b.blocks[-1][3], c * w_), x.dtype)
    for s, e, o, oe, w, _ in b.blocks:
        np.matmul(w, x2[s:e], out=out[o:oe])
    return out.reshape(-1, c, w_)


def geometry(w: int, h: int, decode: int, size: int, crop: tuple[int, int]) -> tuple[int, int, int, int, int, int]:
    """Pillow's size (decode step), torch's resized size and the centre crop's corner, as the training pipeline computes them."""
    s = decode / min(w, h)
    pw, ph = (max(1, round(w * s)), max(1, round(h * s))) if abs(s - 1) >= 1e-3 else (w, h)  # resize_short
    short, long_ = (pw, ph) if pw <= ph else (ph, pw)
    new_long = int(size * long_ / short)  # torchvision's Resize(int): the long side truncated
    nh, nw = (new_long, size) if pw <= ph else (size, new_long)
    top, left = int(round((nh - crop[0]) / 2.0)), int(round((nw - crop[1]) / 2.0))  # CenterCrop's rounding
    return pw, ph, nw, nh, top, left


class Preprocess:
    """Source -> normalised float32 CHW array, by the spec a model carries."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.decode = int(spec["decode"]["short_side"])
        self.size = int(spec["resize"]["short_side"])
        ch, cw = (int(v) for v in spec["crop"]["size"])
        self.crop = [ch, cw]
        scale = float(spec["scale"])
        std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
        # (x * scale - mean) / std as one multiply-add per pixel
        self._mul = (np.float32(scale) / std).astype(np.float32)
        self._add = (-np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1) / std).astype(np.float32)

    def _hcw(self, source: Source) -> np.ndarray:
        """Decoded, resized and cropped pixels as [H, C, W] float32 whole values 0..255 (the layout in which every
        pass is one matrix product per block); raises ImageError for unusable input."""
        im = open_image(source, min_size=self.decode)
        w, h = im.size
        ch, cw = self.crop
        pw, ph, nw, nh, top, left = geometry(w, h, self.decode, self.size, (ch, cw))
        if pw < w / 2 or ph < h / 2:  # Pillow's reducing_gap path (large non-JPEG images): let Pillow do it
            im = im.resize((pw, ph), Image.Resampling.BILINEAR, reducing_gap=2.0)
            w, h = pw, ph
        tv = band("torch", ph, nh, top, ch, "float32")
        th = band("torch", pw, nw, left, cw, "float32")
        pv = band("pil", h, ph, tv.lo, tv.hi - tv.lo, "float64")
        phz = band("pil", w, pw, th.lo, th.hi - th.lo, "float64")
        # each pass reads exactly the band of inputs the next one needs (an identity pass is that slice)
        a = np.asarray(im, dtype=np.uint8)[pv.lo:pv.hi, phz.lo:phz.hi]
        pil_exact = np.float32 if phz.identity and pv.identity else np.float64  # Pillow's sums need 30 bits
        x = a.transpose(0, 2, 1).astype(pil_exact, order="C")
        if not phz.identity:
            x = _round(across(x, phz), phz.clip)
        if not pv.identity:
            y = down(x, pv)
            x = _round(y, pv.clip, np.empty(y.shape, np.float32))
        x = x.astype(np.float32, copy=False)  # whole values 0..255; torch's sums need 23 bits
        if not th.identity:
            x = _round(across(x, th), th.clip)
        if not tv.identity:
            x = _round(down(x, tv), tv.clip)
        return x

    def resized(self, source: Source) -> np.ndarray:
        """Decoded, resized and cropped CHW pixels (float32, whole values 0..255); raises ImageError for unusable input."""
        return np.ascontiguousarray(self._hcw(source).transpose(1, 0, 2))

    def pixels(self, source: Source) -> np.ndarray:
        """Decoded, resized and cropped HWC pixels (float32, whole values 0..255); raises ImageError for unusable input."""
        return self._hcw(source).transpose(0, 2, 1)

    def __call__(self, source: Source) -> np.ndarray:
        """The model's input for one image: float32 [3, H, W], normalised in one multiply-add into a fresh array."""
        x = self._hcw(source).transpose(1, 0, 2)
        out = np.multiply(x, self._mul, out=np.empty(x.shape, np.float32))
        out += self._add
        return out

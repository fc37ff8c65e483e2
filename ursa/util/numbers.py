"""Numbers: loss smoothing, byte sizes, the softmax and an error rate's confidence bound, one definition each."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np

from ursa.errors import UrsaError

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def smooth(values: Sequence[float], beta: float = 0.98) -> list[float]:
    """fastai's debiased exponential moving average, so noisy batch losses read as a curve.

    NaN and inf pass through unchanged and do not enter the average.
    """
    out, avg, n = [], 0.0, 0
    for v in values:
        if not (isinstance(v, (int, float)) and math.isfinite(v)):
            out.append(v)
            continue
        n += 1
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**n))
    return out


def smooth_last(values: Sequence[float], beta: float = 0.98) -> float:
    """The smoothed value at the end (fastai's train_loss of an epoch); NaN when there is none."""
    s = smooth(values, beta)
    return float(s[-1]) if s else math.nan


def parse_bytes(text: str | int, option: str = "--max-bytes") -> int:
    """Read a size like 20MB, 512KB, 1.5GB, 2MiB or 1000000 (K/M/G are powers of 1024); at least 1 byte."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise UrsaError(f"{option} {text!r}: expected a size such as 20MB, 500KB or 1000000")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 1:
        raise UrsaError(f"{option} {text!r}: expected at least 1 byte")
    return n


def human_bytes(n: float) -> str:
    """1.5 MB, 300 KB, 12 bytes (powers of 1024, as parse_bytes reads them)."""
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} bytes"


def softmax(logits: Any, temperature: float = 1.0, dtype: Any = np.float64) -> np.ndarray:
    """Row-wise probabilities of logits / temperature, computed stably in float64 (the row maximum subtracted).

    The one softmax of numpy code: calibration (float64), the ONNX runtime and TTA (``dtype=np.float32``).
    """
    z = np.asarray(logits).astype(np.float64)
    if temperature != 1.0:
        z /= float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(dtype, copy=False)


def error_upper_bound(errors: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of an error rate seen as ``errors`` of ``n``: the beta quantile
    (scipy's, which scikit-learn already brings; imported here so the serving runtime never needs it)."""
    if n <= 0 or errors >= n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, errors + 1, n - errors))

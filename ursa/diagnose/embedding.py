"""A map of the validation set: its body features projected to 2-D, to see which classes overlap.

PCA (numpy's SVD of the centred, L2-normalised features): linear, deterministic and instant on
a few thousand images, and its axes mean something ("the direction the features vary most"),
where t-SNE or UMAP would need a new dependency and a minute, and move clusters around from run
to run. Classes that sit apart on the map are easy for the head; classes that overlap are where
its mistakes come from.
"""

from __future__ import annotations

import numpy as np


def pca_2d(features: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """(coordinates [n, 2] scaled into [0, 1] with the aspect kept, share of the variance each axis explains)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        return np.zeros((0, 2)), [0.0, 0.0]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x = x - x.mean(0)
    if len(x) < 2:
        return np.full((len(x), 2), 0.5), [0.0, 0.0]
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, vt.shape[0])
    coords = x @ vt[:k].T
    for j in range(k):  # a sign convention, so the same features always give the same picture
        if coords[np.argmax(np.abs(coords[:, j])), j] < 0:
            coords[:, j] = -coords[:, j]
    if k < 2:
        coords = np.concatenate([coords, np.zeros((len(x), 2 - k))], 1)
    var = s ** 2
    explained = [float(v / var.sum()) if var.sum() > 0 else 0.0 for v in list(var[:2]) + [0.0] * (2 - k)]
    lo, ptp = coords.min(0), np.ptp(coords, 0)
    span = float(ptp.max())
    # the same scale on both axes (distances mean the same across and up), the shorter one centred
    coords = (coords - lo) / span + (1 - ptp / span) / 2 if span > 0 else np.full_like(coords, 0.5)
    return coords, explained

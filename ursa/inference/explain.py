"""Why it answered that: heat maps of the evidence for the predicted class, drawn without torch (numpy + Pillow).

Both predictors give ``logits_and_evidence(x)``: the logits and per-class evidence maps [N, K, h, w]
(``inference.evidence`` in torch; the ONNX export's ``evidence`` output in the runtime), where the
map of class c sums over its places to c's logit margin over the other classes (less the head's
bias). Here the map of the predicted class becomes a picture: its positive part (evidence *for*
the class) divided by its largest value, stretched over the picture the model saw (the centre
crop at the input size) and blended in a heat colour where the evidence is, the picture left as
it is elsewhere; the label and probability are drawn in a strip below. docs/explain.md says
how the maps are computed and why this method.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ursa.errors import ImageError, UrsaError
from ursa.inference.results import Prediction, softmax
from ursa.inference.runtime import cores, stream_batches
from ursa.util.files import check_outside, write_new
from ursa.vision.images import Source

# (position, r, g, b): dark red through red, orange and yellow: bright where the evidence is strongest
HEAT_STOPS = np.array([[0.0, 0.35, 0.0, 0.0], [0.35, 0.85, 0.05, 0.0], [0.7, 1.0, 0.55, 0.0], [1.0, 1.0, 1.0, 0.35]])
ALPHA = 0.65  # how opaque the heat colour is where the evidence is strongest
STRIP = 22  # pixels of the caption strip under the picture


@dataclass
class Explanation:
    """One picture's answer with its evidence map and the pixels the model saw."""

    prediction: Prediction
    heat: np.ndarray  # [h, w] float32: the predicted class's evidence per place (logit-margin units, signed)
    pixels: np.ndarray  # [H, W, 3] uint8: the picture as the model saw it (resized, centre-cropped)

    def weights(self) -> np.ndarray:
        """The map as shown: the positive evidence divided by its largest value (all zeros when there is none)."""
        return normalised(self.heat)

    def overlay(self) -> Image.Image:
        """The picture with the map blended over it and a caption strip: "label 0.93"."""
        return overlay(self.pixels, self.heat, caption(self.prediction))

    def png(self) -> bytes:
        """The overlay as PNG bytes."""
        buf = io.BytesIO()
        self.overlay().save(buf, "PNG")
        return buf.getvalue()

    def to_json(self) -> dict[str, Any]:
        """What serve's /explain and `predict --json --explain` add beside the answer: the map as shown, rounded."""
        h, w = self.heat.shape
        return {"evidence": {"class": self.prediction.label, "shape": [h, w],
                             "map": np.round(self.weights(), 3).tolist()}}


def normalised(heat: np.ndarray) -> np.ndarray:
    """Positive part over its maximum, float32 in [0, 1]; zeros when nothing is positive (or the map is not finite)."""
    pos = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0), 0, None)
    top = float(pos.max()) if pos.size else 0.0
    return pos / top if top > 0 else np.zeros_like(pos)


def heat_colours(w: np.ndarray) -> np.ndarray:
    """[..., 3] float colours in 0..1 for weights in 0..1, linear between HEAT_STOPS."""
    return np.stack([np.interp(w, HEAT_STOPS[:, 0], HEAT_STOPS[:, i]) for i in (1, 2, 3)], axis=-1)


def stretched(heat: np.ndarray, width: int, height: int) -> np.ndarray:
    """The normalised map resized to the picture (Pillow bilinear on floats: each place covers its share of pixels)."""
    im = Image.fromarray(normalised(heat)).resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)


def overlay(pixels: np.ndarray, heat: np.ndarray, text: str = "") -> Image.Image:
    """pixels [H, W, 3] uint8 with the map blended over it (opacity grows with the evidence); a caption strip when text."""
    h, w = pixels.shape[:2]
    a = stretched(heat, w, h)[..., None] * ALPHA
    blend = pixels.astype(np.float32) * (1 - a) + heat_colours(a[..., 0] / ALPHA) * 255.0 * a
    im = Image.fromarray(np.clip(np.rint(blend), 0, 255).astype(np.uint8))
    if not text:
        return im
    out = Image.new("RGB", (w, h + STRIP), (20, 20, 20))
    out.paste(im, (0, 0))
    ImageDraw.Draw(out).text((4, h + 5), text, fill=(255, 255, 255))
    return out


def caption(p: Prediction) -> str:
    """The strip's text: "teddy 0.959" (and "unsure" below the threshold)."""
    return f"{p.label} {p.confidence:.3f}" + (" (unsure)" if p.unsure else "")


def unnormalised(x: Any, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The model's input [3, H, W] (normalised) back to pixels [H, W, 3] uint8."""
    arr = np.asarray(x, dtype=np.float32)
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return np.clip(np.rint((arr * s + m) * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def explain_arrays(pred: Any, xs: Sequence[Any], threshold: Any = "model") -> list[Explanation]:
    """Preprocessed images (either backend's) as Explanations: the answer and the predicted class's map.

    The map comes from the plain view; with TTA the answer is the usual averaged one (one more pass).
    """
    batch = np.stack([np.asarray(x, dtype=np.float32) for x in xs])
    logits, maps = pred.logits_and_evidence(_as_input(pred, batch))
    if len(pred.views) > 1:
        answers = pred.predict_tensors(list(xs), threshold)
    else:
        task = getattr(pred, "task", None)  # the predictor's activation: softmax, or a sigmoid per label (inference.task)
        z = np.asarray(logits) / np.float32(pred.temperature)
        answers = [pred.result(p, threshold) for p in (softmax(z) if task is None else task.activate(z))]
    return [Explanation(a, np.asarray(maps[i, a.index], dtype=np.float32),
                        unnormalised(batch[i], pred.meta.mean, pred.meta.std)) for i, a in enumerate(answers)]


def _as_input(pred: Any, batch: np.ndarray) -> Any:
    """The batch as the predictor takes it: numpy for ONNX Runtime, a tensor for torch (imported only then)."""
    if pred.backend == "onnx":
        return batch
    import torch

    return torch.from_numpy(batch)


def explainable(pred: Any, out_dir: Path | None = None, data_dirs: Sequence[Path] = ()) -> None:
    """Refuse now, in one line, what would fail later: an ONNX export without the evidence output (or a head
    with no exact map), an output folder inside a folder of pictures. One forward pass of a blank image."""
    if out_dir is not None:
        for d in data_dirs:
            check_outside(out_dir, d, "--explain folder")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            writable = os.access(out_dir, os.W_OK | os.X_OK)
        except OSError as e:
            raise UrsaError(f"{out_dir}: cannot make this folder for the overlays ({e.strerror}); "
                            "give --explain a folder you can write to") from None
        if not writable:
            raise UrsaError(f"{out_dir}: cannot write overlays into this folder; give --explain a folder you can write to")
    pred.logits_and_evidence(_as_input(pred, np.zeros((1, 3, pred.size, pred.size), np.float32)))


def explain_stream(pred: Any, sources: Iterable[Source], bs: int = 32,
                   threshold: Any = "model") -> Iterator[tuple[Source, Explanation | ImageError]]:
    """(source, Explanation or the ImageError that made it unreadable) in input order, as the predictors' stream."""
    workers = max(1, cores()) if pred.backend == "onnx" else 0
    yield from stream_batches(sources, bs, pred.preprocess, lambda xs: explain_arrays(pred, xs, threshold), workers)


def overlay_name(source: Source, p: Prediction) -> str:
    """File name of an overlay: the picture's stem, the label and the probability ("img_3.teddy-0.959.png")."""
    stem = Path(str(source)).stem if isinstance(source, (str, Path)) else "image"
    return f"{safe(stem)}.{safe(p.label)}-{p.confidence:.3f}.png"


def safe(text: str) -> str:
    """A name part with only letters, digits, '-', '_' and '.' (others become '_'); never empty or hidden."""
    out = re.sub(r"[^\w.-]", "_", text).lstrip(".")
    return out[:80] or "_"


def write_overlay(out_dir: Path, source: Source, e: Explanation) -> Path:
    """The overlay PNG in out_dir under overlay_name (a free variant when the name is taken: nothing is replaced)."""
    try:
        return write_new(out_dir / overlay_name(source, e.prediction), e.png())
    except OSError as err:  # the disk filled up, the folder went away: one line, not a traceback
        raise UrsaError(f"{out_dir}: could not write an overlay ({err.strerror or err}); the answers so far are above") from None

"""INT8: ONNX Runtime's quantization of an ursa ONNX file, checked against fp32 on the run's validation images.

Two methods are tried (``method="auto"``): static QDQ (per-channel int8 weights, uint8
activations calibrated on training images of the run, MinMax) and dynamic (weights only; activations
quantized per batch at run time). Each is scored against the fp32 file on the run's validation
images (``split.csv`` beside the model file): top-1 agreement with fp32 (a multi-label model: the same
label set) and the error-rate change (multi-label: images whose set is not exactly right).
The fastest one whose error rate rises by at most ``max_rise`` points is written, with its
numbers in the file's ``int8`` metadata; when none qualifies the export refuses (exit 1) and the
fp32 file stays as it was. The data folder comes from the model's ``config`` (``data``) or ``--data``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ursa.errors import DataError, ImageError, UrsaError
from ursa.inference.runtime import OnnxPredictor, load_onnx
from ursa.util.files import atomic_path
from ursa.vision.data import read_split as read_split_csv

METHODS = ("auto", "static", "dynamic")


class Int8Refused(UrsaError):
    """The quantized model lost too much accuracy: the job ran, its result is refused (exit 1)."""

    exit_code = 1


def run_images(model_path: Path, data: Path | None, config: dict[str, Any]) -> tuple[Path, list[tuple[Path, str]], list[tuple[Path, str]]]:
    """The run's data folder, training and validation images with labels, from split.csv beside the model."""
    split = model_path.parent / "split.csv"
    if not split.is_file():
        raise DataError(f"{split}: not found; --int8 needs the run folder `ursa train` wrote (its split.csv holds the "
                        "validation images the INT8 model is checked on)")
    folder = Path(data) if data is not None else Path(str(config.get("data") or ""))
    if not str(folder) or not folder.is_dir():
        raise DataError(f"{folder or '(none)'}: data folder not found; pass the training data with --data DIR")
    train, valid = [], []
    for name, label, is_valid in read_split_csv(split):
        (valid if is_valid else train).append((folder / name, label))
    if not valid:
        raise DataError(f"{split}: no validation images; the INT8 check needs some")
    return folder, train, valid


def answer_key(pred: OnnxPredictor, ans: Any) -> int:
    """An answer as one number: the class index, or (multi-label) its label set as bits (``vision.labelsets.encode``)."""
    return ans.index if ans.chosen is None else sum(1 << pred.classes.index(c) for c in ans.chosen)


def label_key(pred: OnnxPredictor, label: str) -> int:
    """split.csv's label as ``answer_key`` gives it (-2: a label the model does not know)."""
    index = {c: i for i, c in enumerate(pred.classes)}
    if not pred.task.multi:
        return index.get(label, -2)
    parts = label.split(pred.meta.config.get("label_delim") or " ")
    known = [p.strip() for p in parts if p.strip()]
    return sum(1 << index[c] for c in set(known)) if all(c in index for c in known) else -2


def score(pred: OnnxPredictor, items: Sequence[tuple[Path, str]], bs: int = 32) -> tuple[list[int], float, float]:
    """The answer per item (top-1 class index, or a multi-label model's whole label set: ``answer_key``; -1:
    unreadable), the error rate on the readable ones (multi-label: sets not exactly right), and images/s."""
    top: list[int] = []
    t = time.perf_counter()
    for _, ans in pred.stream([p for p, _ in items], bs):
        top.append(-1 if isinstance(ans, ImageError) else answer_key(pred, ans))
    rate = len(items) / max(time.perf_counter() - t, 1e-9)
    ok = [(t_, label_key(pred, label)) for t_, (_, label) in zip(top, items) if t_ >= 0]
    return top, (sum(a != b for a, b in ok) / len(ok) if ok else 1.0), rate


class _Calibration:
    """onnxruntime's CalibrationDataReader over training images, preprocessed like at inference."""

    def __init__(self, pred: OnnxPredictor, files: Sequence[Path], bs: int = 8) -> None:
        self.pred, self.files, self.bs, self.i = pred, list(files), bs, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        while self.i < len(self.files):
            chunk, self.i = self.files[self.i:self.i + self.bs], self.i + self.bs
            arrays = [a for a in (self._one(f) for f in chunk) if a is not None]
            if arrays:
                return {self.pred.session.get_inputs()[0].name: np.stack(arrays)}
        return None

    def _one(self, f: Path) -> np.ndarray | None:
        try:
            return self.pred.preprocess(f)
        except ImageError:
            return None


def quantize_file(fp32: Path, out: Path, method: str, calib: Sequence[Path]) -> None:
    """Write one INT8 variant of `fp32` to `out` with ONNX Runtime's tools."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        if method == "dynamic":
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QUInt8, per_channel=False)
            return
        reader = _Calibration(load_onnx(fp32), calib)
        quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def export_int8(fp32: Path, model_path: Path, data: Path | None = None, out: Path | None = None, *,
                method: str = "auto", max_rise: float = 1.0, n_calib: int = 128,
                say: Callable[[str], None] = lambda s: None) -> tuple[Path, dict[str, Any]]:
    """Quantize the fp32 ONNX file, check each method on the validation images, write the best; its report.

    Raises Int8Refused (exit 1) when every method raises the error rate by more than max_rise points.
    """
    import onnx

    from ursa.inference.export import set_props

    if method not in METHODS:
        raise UrsaError(f"--int8-method must be one of {', '.join(METHODS)} (got {method!r})")
    out = out or fp32.with_name(fp32.stem + ".int8.onnx")
    base = load_onnx(fp32)
    _, train, valid = run_images(model_path, data, base.meta.config)
    rng = np.random.default_rng(0)
    calib = [train[i][0] for i in rng.permutation(len(train))[:n_calib]] if train else [p for p, _ in valid]
    ref, err32, rate32 = score(base, valid)
    say(f"fp32: error {100 * err32:.2f}% on {len(valid)} validation images ({rate32:.0f} images/s)")
    tried: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in (("static", "dynamic") if method == "auto" else (method,)):
            path = Path(tmp) / f"{m}.onnx"
            try:
                quantize_file(fp32, path, m, calib)
                top, err, rate = score(load_onnx(path), valid)
            except Exception as e:  # noqa: BLE001 - one method failing leaves the other
                say(f"int8 {m}: failed ({type(e).__name__}: {str(e)[:120]})")
                continue
            both = [(a, b) for a, b in zip(ref, top) if a >= 0 and b >= 0]
            agree = sum(a == b for a, b in both) / max(1, len(both))
            tried[m] = {"method": m, "agreement": round(agree, 4), "error_fp32": round(err32, 4),
                        "error_int8": round(err, 4), "error_change_points": round(100 * (err - err32), 2),
                        "images_per_s": round(rate, 1), "images_per_s_fp32": round(rate32, 1),
                        "n_valid": len(valid), "n_calibration": len(calib) if m == "static" else 0,
                        "bytes": path.stat().st_size, "_path": str(path)}
            say(f"int8 {m}: {'label-set' if base.task.multi else 'top-1'} agreement {100 * agree:.1f}%, error {100 * err:.2f}% "
                f"({100 * (err - err32):+.2f} points), {rate:.0f} images/s, {path.stat().st_size / 1e6:.1f} MB")
        good = [r for r in tried.values() if r["error_change_points"] <= max_rise]
        if not good:
            worst = ", ".join(f"{r['method']} {r['error_change_points']:+.2f}" for r in tried.values()) or "every method failed"
            raise Int8Refused(f"{out}: not written: the INT8 error rate rises more than {max_rise:g} point(s) over fp32 "
                              f"({worst}); {fp32} is unchanged")
        best = max(good, key=lambda r: r["images_per_s"])
        report = {k: v for k, v in best.items() if not k.startswith("_")}
        report["tried"] = {m: {k: v for k, v in r.items() if not k.startswith("_")} for m, r in tried.items()}
        proto = onnx.load(best["_path"])
        props = dict(base.session.get_modelmeta().custom_metadata_map)  # the quantizer may drop them
        set_props(proto, {**props, "int8": json.dumps(report)})
        with atomic_path(out) as tmp_out:
            onnx.save(proto, str(tmp_out))
    return out, report

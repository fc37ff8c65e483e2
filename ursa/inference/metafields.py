"""The model metadata's fields: each one's type and range, as small checks (``metaschema`` applies them).

Each check takes the field's dotted name and its value and returns the value, or raises ``Bad``
(name, what was expected, what was found), which ``metaschema.checked_fields`` turns into the
one-line ``ModelFileError``. ``FIELDS`` lists them in the order they run: cheap checks first.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

from ursa.errors import ArchError, ModelFileError

INPUT_SIZES = (16, 2048)  # pixels; ursa trains at 32..1024
MAX_CLASSES = 100_000
MAX_WIDTH = 65_536  # n_features / hidden of a head
HEAD_POOLS = ("concat", "avg")
REDO_ONNX = "; export it again with `ursa export MODEL --onnx`"


class Bad(Exception):
    """One field that does not fit the schema: turned into the one-line ModelFileError."""

    def __init__(self, name: str, expected: str, value: Any) -> None:
        super().__init__(name)
        self.name, self.expected, self.value = name, expected, value


MISSING = object()  # a required field that is absent


def given(value: Any) -> str:
    """A short, one-line description of what a field holds, for the error message (repr escapes newlines)."""
    if value is MISSING:
        return "nothing"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    try:  # a huge JSON integer (10**400) overflows a float: not a number this file can mean
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:
        return False


def _int_in(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(name: str, v: Any) -> int:
        if not _is_int(v) or not lo <= v <= hi:
            raise Bad(name, f"an integer from {lo} to {hi}", v)
        return v
    return check


def _object(name: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise Bad(name, "an object", v)
    try:  # shown as JSON by serve's /model and predict --json: NaN and Infinity are not JSON
        json.dumps(v, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        raise Bad(name, "an object of JSON values (finite numbers, strings, lists, objects)", v) from None
    return v


def _text(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise Bad(name, "a string", v)
    return v


def _fingerprint(name: str, v: Any) -> str:
    """The weights' SHA-256 (64 hex digits) written by ``save_model``, or "" for files from before it existed."""
    if not isinstance(v, str) or (v and (len(v) != 64 or v.strip("0123456789abcdef"))):
        raise Bad(name, "64 lowercase hex digits (the weights' SHA-256) or an empty string", v)
    return v


def _arch_name(name: str, v: Any) -> str:
    """An ONNX export carries its network in the graph: the arch only has to be a name (no torch needed)."""
    if not isinstance(v, str) or not v.strip():
        raise Bad(name, "an architecture name (e.g. efficientnet_lite0)", v)
    return v


def arch_buildable(name: str, v: Any) -> str:
    """A safetensors file is rebuilt from its arch: it must be one this ursa can build (imports torch)."""
    from ursa.vision.models import get_spec, list_archs

    known = f"one of {', '.join(list_archs())} or a timm model name"
    if not isinstance(v, str) or not v.strip():
        raise Bad(name, f"an architecture name ({known})", v)
    try:
        get_spec(v)  # the registry first; timm's list only for other names
    except ArchError:
        raise Bad(name, f"an architecture this ursa can build ({known})", v) from None
    return v


def _classes(name: str, v: Any) -> list[str]:
    what = f"a non-empty list (at most {MAX_CLASSES}) of unique non-empty strings"
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_CLASSES:
        raise Bad(name, what, v)
    for i, c in enumerate(v):
        if not isinstance(c, str) or not c.strip():
            raise Bad(f"{name}[{i}]", "a non-empty string (a class name)", c)
    if len(set(v)) != len(v):
        twice = next(c for c in v if v.count(c) > 1)
        raise Bad(name, f"{what} ({twice!r} appears twice)", v)
    return v


MEAN_BOUNDS = (-10.0, 10.0)  # normalisation of pixels scaled to [0, 1]: ImageNet's is 0.4-0.5
STD_BOUNDS = (1e-3, 100.0)  # ImageNet's is 0.22-0.23; outside these float32 inputs blow up to inf and NaN
SCALE_BOUNDS = (1e-6, 1.0)  # pixels 0..255 times scale: ursa writes 1/255


def _number_in(lo: float, hi: float) -> Callable[[str, Any], float]:
    """A number within [lo, hi]: finite in float32 too (1e308 is a finite float64 and inf in float32)."""
    def check(name: str, v: Any) -> float:
        if not _is_number(v) or not lo <= v <= hi:
            raise Bad(name, f"a number from {lo:g} to {hi:g}", v)
        return float(v)
    return check


def _stats(positive: bool) -> Callable[[str, Any], list[float]]:
    lo, hi = STD_BOUNDS if positive else MEAN_BOUNDS
    each = _number_in(lo, hi)

    def check(name: str, v: Any) -> list[float]:
        if not isinstance(v, list) or len(v) not in (1, 3):
            raise Bad(name, f"a list of 1 or 3 numbers from {lo:g} to {hi:g}", v)
        return [each(f"{name}[{i}]", x) for i, x in enumerate(v)]
    return check


def _dropout(name: str, v: Any) -> float:
    if not _is_number(v) or not 0 <= v < 1:
        raise Bad(name, "a number from 0 to below 1", v)
    return float(v)


def _pool(name: str, v: Any) -> str:
    if v not in HEAD_POOLS:
        raise Bad(name, f"one of {', '.join(HEAD_POOLS)}", v)
    return v


HEAD_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "n_features": _int_in(1, MAX_WIDTH),
    "n_classes": _int_in(1, MAX_CLASSES),
    "hidden": _int_in(0, MAX_WIDTH),  # 0: no hidden layer
    "dropout": _dropout,
    "pool": _pool,
    "extra": _object,
}
HEAD_REQUIRED = ("n_features", "n_classes")


def _head(name: str, v: Any) -> dict[str, Any]:
    _object(name, v)
    unknown = sorted(k for k in v if k not in HEAD_FIELDS)
    if unknown:
        raise Bad(f"{name}.{unknown[0]}", f"absent (a head has {', '.join(HEAD_FIELDS)})", v[unknown[0]])
    for k in HEAD_REQUIRED:
        if k not in v:
            raise Bad(name, f"an object with {', '.join(HEAD_REQUIRED)}", v)
    return {k: HEAD_FIELDS[k](f"{name}.{k}", x) for k, x in v.items()}


def _unit_or_null(lo_open: bool) -> Callable[[str, Any], float | None]:
    def check(name: str, v: Any) -> float | None:
        if v is None:
            return None
        if not _is_number(v) or not (0 < v <= 1 if lo_open else 0 <= v <= 1):
            raise Bad(name, "null or a number in " + ("(0, 1]" if lo_open else "[0, 1]"), v)
        return float(v)
    return check


T_BOUNDS = (0.01, 100.0)  # calibration fits T in [0.25, 20]; outside this a float32 softmax turns to NaN or mush


def _temperature(name: str, v: Any) -> float:
    if not _is_number(v) or not T_BOUNDS[0] <= v <= T_BOUNDS[1]:
        raise Bad(name, f"a number from {T_BOUNDS[0]} to {T_BOUNDS[1]:g}", v)
    return float(v)


CALIBRATION_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "temperature": _temperature,
    "threshold": _unit_or_null(False),
    "target_precision": _unit_or_null(True),
    "ece_before": _unit_or_null(False),
    "ece_after": _unit_or_null(False),
}


def _calibration(name: str, v: Any) -> dict[str, Any]:
    _object(name, v)
    return {k: CALIBRATION_FIELDS[k](f"{name}.{k}", x) if k in CALIBRATION_FIELDS else x for k, x in v.items()}


DECODE_MAX = 2.0  # decode.short_side at most this times resize.short_side (ursa writes 1.15): 8000 px for a 28 px model
# would allocate gigabytes per picture


def _is_value(want: Any) -> Callable[[str, Any], Any]:
    def check(name: str, v: Any) -> Any:
        if v != want or type(v) is not type(want):
            raise Bad(name, repr(want), v)
        return v
    return check


def _preprocess(spec: Any, size: int | None) -> dict[str, Any]:
    """Every field of an ONNX export's preprocess entry (``preprocess.preprocess_spec``), type and range; Bad names the field."""
    _object("preprocess", spec)
    _is_value(1)("preprocess.version", spec.get("version", MISSING))
    for part in ("decode", "resize", "crop"):
        _object(f"preprocess.{part}", spec.get(part, MISSING))
    lo, hi = size or INPUT_SIZES[0], size or INPUT_SIZES[1]
    short = _int_in(lo, hi)("preprocess.resize.short_side", spec["resize"].get("short_side", MISSING))
    _int_in(short, int(short * DECODE_MAX))("preprocess.decode.short_side", spec["decode"].get("short_side", MISSING))
    _is_value("center")("preprocess.crop.kind", spec["crop"].get("kind", MISSING))
    crop = spec["crop"].get("size", MISSING)
    if crop != [short, short] or not all(_is_int(c) for c in crop):
        raise Bad("preprocess.crop.size", f"[{short}, {short}] (the resized short side, twice)", crop)
    _is_value("NCHW")("preprocess.layout", spec.get("layout", MISSING))
    for key, want in (("mode", "RGB"), ("interpolation", "pil_bilinear")):
        if key in spec["decode"]:
            _is_value(want)(f"preprocess.decode.{key}", spec["decode"][key])
    if "dtype" in spec:
        _is_value("float32")("preprocess.dtype", spec["dtype"])
    _number_in(*SCALE_BOUNDS)("preprocess.scale", spec.get("scale", MISSING))
    _stats(False)("preprocess.mean", spec.get("mean", MISSING))
    _stats(True)("preprocess.std", spec.get("std", MISSING))
    return spec


def check_preprocess(spec: Any, path: object, size: int | None = None) -> dict[str, Any]:
    """An ONNX export's preprocess entry this ursa can reproduce safely, or one line naming the field (ModelFileError)."""
    try:
        return _preprocess(spec, size)
    except Bad as e:
        raise ModelFileError(f"{path}: ONNX file's preprocess metadata is damaged: field {e.name!r} must be "
                             f"{e.expected}, got {given(e.value)}{REDO_ONNX}") from None


def _scores(name: str, v: Any) -> list[float]:
    if not isinstance(v, list) or not all(_is_number(x) for x in v):
        raise Bad(name, "a list of finite numbers", v)
    return v


def _openset(name: str, v: Any) -> dict[str, Any]:  # inference.openset: empty, or method, k, keep, scores, arrays
    if _object(name, v) and v.get("method") != "knn":
        raise Bad(f"{name}.method", "'knn'", v.get("method", MISSING))
    if v and (not _is_number(keep := v.get("keep", MISSING)) or not 0 < keep <= 1):
        raise Bad(f"{name}.keep", "a share of validation images in (0, 1]", keep)
    for key in ("k", "valid_scores", "figures", "center", "basis", "reference") if v else ():  # arrays: openset.decode_array
        check = {"k": _int_in(1, 1000), "valid_scores": _scores}.get(key, _object)
        check(f"{name}.{key}", v.get(key, {} if key == "figures" else MISSING))
    return v


def _conformal(name: str, v: Any) -> dict[str, Any]:  # inference.openset.ConformalSets: empty, or the scores
    if _object(name, v):
        _scores(f"{name}.scores", v.get("scores", MISSING))
    return v


TASKS = ("single_label", "multi_label")  # inference.task: what the outputs mean


def _task(name: str, v: Any) -> str:
    if v not in TASKS or not isinstance(v, str):
        raise Bad(name, " or ".join(repr(t) for t in TASKS), v)
    return v


def _thresholds(name: str, v: Any) -> list[float]:  # a multi-label model's per-label thresholds (or none)
    if not isinstance(v, list) or not all(_is_number(x) and 0 <= x <= 1 for x in v):
        raise Bad(name, "a list of probabilities from 0 to 1, one per class", v)
    return [float(x) for x in v]


def _count(name: str, v: Any) -> int:
    if not _is_int(v) or v < 0:
        raise Bad(name, "a count (an integer of 0 or more)", v)
    return v


def _licenses(name: str, v: Any) -> dict[str, Any]:  # acquire.licenses.license_summary: empty, or images/unknown/by_license
    if _object(name, v):
        for key in ("images", "unknown"):
            _count(f"{name}.{key}", v.get(key, MISSING))
        by = v.get("by_license", MISSING)
        if not isinstance(by, dict):
            raise Bad(f"{name}.by_license", "an object of licence -> number of images", by)
        for lic, n in by.items():
            _count(f"{name}.by_license[{lic!r}]", n)
    return v


# name -> (check, required, JSON-encoded in a safetensors header). Order: cheap checks first, arch last.
FIELDS: dict[str, tuple[Callable[[str, Any], Any], bool, bool]] = {
    "classes": (_classes, True, True),
    "input_size": (_int_in(*INPUT_SIZES), True, True),
    "mean": (_stats(False), True, True),
    "std": (_stats(True), True, True),
    "head": (_head, True, True),
    "metrics": (_object, False, True),
    "config": (_object, False, True),
    "calibration": (_calibration, False, True),
    "openset": (_openset, False, True),
    "conformal": (_conformal, False, True),
    "task": (_task, False, False),
    "thresholds": (_thresholds, False, True),
    "licenses": (_licenses, False, True),
    "ursa_version": (_text, False, False),
    "created": (_text, False, False),
    "fingerprint": (_fingerprint, False, False),
    "arch": (_arch_name, True, False),  # header files: `_arch` as well, once the cheap checks passed
}
DEFAULTS: dict[str, Any] = {"metrics": {}, "config": {}, "calibration": {}, "openset": {}, "conformal": {}, "licenses": {},
            "task": "single_label", "thresholds": [],
            "ursa_version": "?", "created": "", "fingerprint": ""}

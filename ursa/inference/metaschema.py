"""The model metadata's schema: every field's type and range, checked once on load for both file kinds.

A model file comes from anywhere (a colleague, a download), so its metadata is input like any
other: a damaged or crafted header must give one line naming the file, the field, what was
expected and what was found (``ModelFileError``, exit 2), never a traceback or a server that
starts and then answers 500 to every request. The safetensors header holds strings (structured
values JSON-encoded); an ONNX export holds the same fields as one JSON object. Both pass here.

Optional fields (``metrics``, ``config``, ``calibration``) default to empty objects, so files
written before they existed still load and the format version stays "1". Top-level keys this
version does not know are ignored (a newer ursa may add some).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ursa import __version__
from ursa.errors import ArchError, ModelFileError

FORMAT = "ursa.model"
FORMAT_VERSION = "1"
INPUT_SIZES = (16, 2048)  # pixels; ursa trains at 32..1024
MAX_CLASSES = 100_000
MAX_WIDTH = 65_536  # n_features / hidden of a head
HEAD_POOLS = ("concat", "avg")
REDO = "; give a model file written by `ursa train` (or train the model again)"
REDO_ONNX = "; export it again with `ursa export MODEL --onnx`"


class _Bad(Exception):
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
            raise _Bad(name, f"an integer from {lo} to {hi}", v)
        return v
    return check


def _object(name: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _Bad(name, "an object", v)
    try:  # shown as JSON by serve's /model and predict --json: NaN and Infinity are not JSON
        json.dumps(v, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        raise _Bad(name, "an object of JSON values (finite numbers, strings, lists, objects)", v) from None
    return v


def _text(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad(name, "a string", v)
    return v


def _fingerprint(name: str, v: Any) -> str:
    """The weights' SHA-256 (64 hex digits) written by ``save_model``, or "" for files from before it existed."""
    if not isinstance(v, str) or (v and (len(v) != 64 or v.strip("0123456789abcdef"))):
        raise _Bad(name, "64 lowercase hex digits (the weights' SHA-256) or an empty string", v)
    return v


def _arch_name(name: str, v: Any) -> str:
    """An ONNX export carries its network in the graph: the arch only has to be a name (no torch needed)."""
    if not isinstance(v, str) or not v.strip():
        raise _Bad(name, "an architecture name (e.g. efficientnet_lite0)", v)
    return v


def _arch(name: str, v: Any) -> str:
    """A safetensors file is rebuilt from its arch: it must be one this ursa can build (imports torch)."""
    from ursa.vision.models import get_spec, list_archs

    known = f"one of {', '.join(list_archs())} or a timm model name"
    if not isinstance(v, str) or not v.strip():
        raise _Bad(name, f"an architecture name ({known})", v)
    try:
        get_spec(v)  # the registry first; timm's list only for other names
    except ArchError:
        raise _Bad(name, f"an architecture this ursa can build ({known})", v) from None
    return v


def _classes(name: str, v: Any) -> list[str]:
    what = f"a non-empty list (at most {MAX_CLASSES}) of unique non-empty strings"
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_CLASSES:
        raise _Bad(name, what, v)
    for i, c in enumerate(v):
        if not isinstance(c, str) or not c.strip():
            raise _Bad(f"{name}[{i}]", "a non-empty string (a class name)", c)
    if len(set(v)) != len(v):
        twice = next(c for c in v if v.count(c) > 1)
        raise _Bad(name, f"{what} ({twice!r} appears twice)", v)
    return v


MEAN_BOUNDS = (-10.0, 10.0)  # normalisation of pixels scaled to [0, 1]: ImageNet's is 0.4-0.5
STD_BOUNDS = (1e-3, 100.0)  # ImageNet's is 0.22-0.23; outside these float32 inputs blow up to inf and NaN
SCALE_BOUNDS = (1e-6, 1.0)  # pixels 0..255 times scale: ursa writes 1/255


def _number_in(lo: float, hi: float) -> Callable[[str, Any], float]:
    """A number within [lo, hi]: finite in float32 too (1e308 is a finite float64 and inf in float32)."""
    def check(name: str, v: Any) -> float:
        if not _is_number(v) or not lo <= v <= hi:
            raise _Bad(name, f"a number from {lo:g} to {hi:g}", v)
        return float(v)
    return check


def _stats(positive: bool) -> Callable[[str, Any], list[float]]:
    lo, hi = STD_BOUNDS if positive else MEAN_BOUNDS
    each = _number_in(lo, hi)

    def check(name: str, v: Any) -> list[float]:
        if not isinstance(v, list) or len(v) not in (1, 3):
            raise _Bad(name, f"a list of 1 or 3 numbers from {lo:g} to {hi:g}", v)
        return [each(f"{name}[{i}]", x) for i, x in enumerate(v)]
    return check


def _dropout(name: str, v: Any) -> float:
    if not _is_number(v) or not 0 <= v < 1:
        raise _Bad(name, "a number from 0 to below 1", v)
    return float(v)


def _pool(name: str, v: Any) -> str:
    if v not in HEAD_POOLS:
        raise _Bad(name, f"one of {', '.join(HEAD_POOLS)}", v)
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
        raise _Bad(f"{name}.{unknown[0]}", f"absent (a head has {', '.join(HEAD_FIELDS)})", v[unknown[0]])
    for k in HEAD_REQUIRED:
        if k not in v:
            raise _Bad(name, f"an object with {', '.join(HEAD_REQUIRED)}", v)
    return {k: HEAD_FIELDS[k](f"{name}.{k}", x) for k, x in v.items()}


def _unit_or_null(lo_open: bool) -> Callable[[str, Any], float | None]:
    def check(name: str, v: Any) -> float | None:
        if v is None:
            return None
        if not _is_number(v) or not (0 < v <= 1 if lo_open else 0 <= v <= 1):
            raise _Bad(name, "null or a number in " + ("(0, 1]" if lo_open else "[0, 1]"), v)
        return float(v)
    return check


T_BOUNDS = (0.01, 100.0)  # calibration fits T in [0.25, 20]; outside this a float32 softmax turns to NaN or mush


def _temperature(name: str, v: Any) -> float:
    if not _is_number(v) or not T_BOUNDS[0] <= v <= T_BOUNDS[1]:
        raise _Bad(name, f"a number from {T_BOUNDS[0]} to {T_BOUNDS[1]:g}", v)
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
            raise _Bad(name, repr(want), v)
        return v
    return check


def _preprocess(spec: Any, size: int | None) -> dict[str, Any]:
    """Every field of an ONNX export's preprocess entry (``preprocess.preprocess_spec``), type and range; _Bad names the field."""
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
        raise _Bad("preprocess.crop.size", f"[{short}, {short}] (the resized short side, twice)", crop)
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
    except _Bad as e:
        raise ModelFileError(f"{path}: ONNX file's preprocess metadata is damaged: field {e.name!r} must be "
                             f"{e.expected}, got {given(e.value)}{REDO_ONNX}") from None


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
    "ursa_version": (_text, False, False),
    "created": (_text, False, False),
    "fingerprint": (_fingerprint, False, False),
    "arch": (_arch_name, True, False),  # header files: `_arch` as well, once the cheap checks passed
}
DEFAULTS: dict[str, Any] = {"metrics": {}, "config": {}, "calibration": {}, "ursa_version": "?", "created": "",
                           "fingerprint": ""}


ONNX_META_KEY = "ursa"  # an ONNX export's custom metadata key holding the full ModelMeta as JSON


@dataclass
class ModelMeta:
    """What the header says about a model: enough to rebuild it and preprocess its inputs (torch-free, for the runtime)."""

    arch: str
    classes: list[str]
    input_size: int
    mean: list[float]
    std: list[float]
    head: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the training run's configuration (optional)
    calibration: dict[str, Any] = field(default_factory=dict)  # temperature scaling and threshold (optional)
    ursa_version: str = __version__
    created: str = ""
    fingerprint: str = ""  # SHA-256 of the weights (``modelfile.weights_fingerprint``): an export belongs to it
    format: str = FORMAT
    format_version: str = FORMAT_VERSION

    def to_header(self) -> dict[str, str]:
        """safetensors metadata is str -> str: structured values are JSON."""
        d = asdict(self)
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in d.items()}

    def to_json(self) -> str:
        """The whole metadata as one JSON object: what an ONNX export carries under ONNX_META_KEY."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, path: Path) -> "ModelMeta":
        """Parse `to_json`'s form with the same schema as a header; keys this version does not know are ignored."""
        where = "ONNX file's ursa metadata"
        try:
            raw = json.loads(text)
        except (ValueError, TypeError, RecursionError) as e:
            raise ModelFileError(f"{path}: {where} is not valid JSON ({type(e).__name__}){REDO_ONNX}") from None
        return cls(**checked_fields(raw, path, where, encoded=False))

    @classmethod
    def from_header(cls, h: dict[str, str], path: Path, buildable: bool = True) -> "ModelMeta":
        """Parse and check a safetensors header's metadata (structured values are JSON strings) against the schema.

        buildable=False skips the check that this ursa can build the arch (it imports torch): for
        readers that only compare metadata, such as the torch-free runtime.
        """
        return cls(**checked_fields(h, path, "model header", encoded=True, buildable=buildable))


def checked_fields(raw: Any, path: object, where: str, encoded: bool, buildable: bool = True) -> dict[str, Any]:
    """ModelMeta's keyword arguments from a header (encoded: JSON strings) or an ONNX export's object, all checked."""
    redo = REDO if encoded else REDO_ONNX
    if not isinstance(raw, dict):
        raise ModelFileError(f"{path}: {where} is a {type(raw).__name__}, not an object; not an ursa model file{redo}")
    if raw.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an ursa model file (no format={FORMAT} in its {where}); export one with `ursa train`")
    if raw.get("format_version") != FORMAT_VERSION:
        shown = raw.get("format_version")
        shown = shown if isinstance(shown, str) and len(shown) <= 20 else given(shown)
        raise ModelFileError(
            f"{path}: model file format version {shown!r}, this ursa ({__version__}) reads "
            f"version {FORMAT_VERSION}; upgrade ursa or re-export the model"
        )
    out: dict[str, Any] = {}
    try:
        for name, (check, required, json_encoded) in FIELDS.items():
            if name not in raw:
                if required:
                    raise _Bad(name, "present", MISSING)
                out[name] = DEFAULTS[name]
                continue
            value = raw[name]
            if encoded and json_encoded:
                value = _decode(name, value)
            out[name] = check(name, value)
        if encoded and buildable:
            _arch("arch", out["arch"])
        if out["head"]["n_classes"] != len(out["classes"]):
            raise _Bad("head.n_classes", f"the number of classes ({len(out['classes'])})", out["head"]["n_classes"])
    except _Bad as e:
        raise ModelFileError(f"{path}: {where} is damaged: field {e.name!r} must be {e.expected}, got {given(e.value)}{redo}") from None
    out["format"], out["format_version"] = FORMAT, FORMAT_VERSION
    return out


def _no_constant(name: str) -> Any:
    """json.loads' hook for NaN, Infinity and -Infinity: Python accepts them, JSON and float32 arithmetic do not."""
    raise ValueError(f"{name} is not JSON")


def loads(text: str | bytes) -> Any:
    """Strict JSON: NaN and Infinity are refused (ValueError) as the standard says."""
    return json.loads(text, parse_constant=_no_constant)


def _decode(name: str, value: Any) -> Any:
    """A header value is a JSON string; a value that is not one is checked as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)  # NaN parses here and is refused by the field's check, which names it
    except RecursionError:
        raise _Bad(name, "JSON nested at most a few hundred levels deep", value[:40]) from None
    except ValueError:
        raise _Bad(name, "valid JSON", value) from None


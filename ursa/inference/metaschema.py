"""The model metadata's schema: every field's type and range, checked once on load for both file kinds.

A model file comes from anywhere (a colleague, a download), so its metadata is input like any
other: a damaged or crafted header must give one line naming the file, the field, what was
expected and what was found (``ModelFileError``, exit 2), never a traceback or a server that
starts and then answers 500 to every request. The safetensors header holds strings (structured
values JSON-encoded); an ONNX export holds the same fields as one JSON object. Both pass here.

Optional fields (``metrics``, ``config``, ``calibration``, ``openset``, ``conformal``, ``licenses``, ``task``,
``thresholds``) default to empty objects (``task``: "single_label"), so files
written before they existed still load and the format version stays "1". Top-level keys this
version does not know are ignored (a newer ursa may add some).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ursa import __version__
from ursa.errors import ModelFileError
from ursa.inference.metafields import (  # noqa: F401  (check_preprocess, HEAD_FIELDS: the names users of this module know)
    DEFAULTS, FIELDS, HEAD_FIELDS, MISSING, REDO_ONNX, Bad, arch_buildable, check_preprocess, given,
)

FORMAT = "ursa.model"
FORMAT_VERSION = "1"
REDO = "; give a model file written by `ursa train` (or train the model again)"

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
    openset: dict[str, Any] = field(default_factory=dict)  # unknown detection: inference.openset (optional)
    conformal: dict[str, Any] = field(default_factory=dict)  # prediction sets: inference.openset (optional)
    licenses: dict[str, Any] = field(default_factory=dict)  # the training images' licences: acquire.licenses (optional)
    task: str = "single_label"  # what the outputs mean: inference.task (files before multi-label: single_label)
    thresholds: list[float] = field(default_factory=list)  # multi_label: each label's threshold (empty: 0.5 each)
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
                    raise Bad(name, "present", MISSING)
                out[name] = DEFAULTS[name]
                continue
            value = raw[name]
            if encoded and json_encoded:
                value = _decode(name, value)
            out[name] = check(name, value)
        if encoded and buildable:
            arch_buildable("arch", out["arch"])
        if out["head"]["n_classes"] != len(out["classes"]):
            raise Bad("head.n_classes", f"the number of classes ({len(out['classes'])})", out["head"]["n_classes"])
        if out["thresholds"] and len(out["thresholds"]) != len(out["classes"]):
            raise Bad("thresholds", f"one per class ({len(out['classes'])}) or none", out["thresholds"])
    except Bad as e:
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
        raise Bad(name, "JSON nested at most a few hundred levels deep", value[:40]) from None
    except ValueError:
        raise Bad(name, "valid JSON", value) from None


"""The report's "Why it answered that": heat-map overlays of the top losses (``inference.explain``).

Computed from the model file (ONNX Runtime when a current export is beside it, else torch; on the
CPU: a dozen pictures) after it is written; never fails the report: a model that cannot draw maps
(an old export, a head without an exact map) leaves a note instead of the pictures.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ursa.errors import ImageError, UrsaError

if TYPE_CHECKING:
    from ursa.diagnose.interpret import Interpretation


def top_loss_overlays(model: str | Path, interp: "Interpretation", k: int) -> dict[str, Any]:
    """{"items": [(index, base64 PNG, the class its map is for)], "note": why there are none, or None} for the k top
    losses. The map is for what the plain picture gets (the report's answer may average TTA views)."""
    from ursa.inference.explain import explain_arrays, explainable
    from ursa.inference.runtime import current_onnx

    try:  # the torch-free path first; an export without the maps (or none): torch
        pred: Any = current_onnx(model, "auto", threads=1, device=None)[0]
        if pred is not None:
            explainable(pred)
    except UrsaError:
        pred = None
    try:
        if pred is None:
            from ursa.inference.predictor import load_predictor

            pred = load_predictor(model, backend="torch", threads=1, device="cpu")
            explainable(pred)
    except (UrsaError, ImportError) as e:
        return {"items": [], "note": f"no heat maps: {e}"}
    items = []
    for i in interp.top_loss_indices(k):
        try:
            e = explain_arrays(pred, [pred.preprocess(interp.paths[i])])[0]
        except ImageError:
            continue  # shown as unreadable in the top losses already
        items.append((i, base64.b64encode(e.png()).decode("ascii"), e.prediction.label))
    return {"items": items, "note": None}


def overlays_html(interp: "Interpretation", overlays: dict[str, Any] | None) -> str:
    """The section: each top loss as the model saw it, with the evidence for what it answered drawn over it."""
    if not overlays:
        return ""
    e = html.escape
    parts = ["<section id='why-top-losses'><h2>Why it answered that</h2><p class='note'>The top losses again, "
             "as the model saw them (the centre crop), with the evidence for the class it predicted drawn over "
             "them: brighter, more evidence. Evidence on the background, a watermark or a caption is a reason "
             "to clean the data (see docs/explain.md).</p>"]
    if overlays.get("note"):
        parts.append(f"<p class='note'>{e(overlays['note'])}</p>")
    parts.append("<div class='grid'>")
    for i, png, mapped in overlays.get("items", []):
        actual, pred = interp.classes[interp.targets[i]], interp.classes[interp.preds[i]]
        fix = "" if actual == pred else f" (actually {e(actual)})"
        if mapped != pred:  # TTA changed the answer: say whose evidence is drawn
            fix += f"<div class='note'>map: evidence for {e(mapped)}, the answer without TTA</div>"
        parts.append(f"<figure class='card{'' if actual == pred else ' miss'}' style='margin:0'><div class='img'>"
                     f"<img alt='{e(interp.files[i])}: evidence for {e(mapped)}' src='data:image/png;base64,{png}'>"
                     f"</div><div class='txt'><div class='pred'>{e(pred)}{fix}</div>"
                     f"<div class='file' title='{e(interp.files[i])}'>{e(interp.files[i])}</div></div></figure>")
    parts.append("</div></section>")
    return "".join(parts)

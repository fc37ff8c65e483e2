"""A multi-label run's report: the common report (history, advice, plots) plus the label-set figures.

Per label: threshold, precision, recall, F1, average precision and support; the averages (macro
and sample-averaged F1, mAP, exact sets); the most confused pairs of labels (a label missed while
another, absent, was given: ``diagnose.multilabel.confused_pairs``); and each label's worst errors,
the images it missed (lowest probability among those that carry it) and the images it was given
wrongly (highest probability among those that do not), with thumbnails. ``ursa interpret`` on a
multi-label model writes the same section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ursa.diagnose.advice import History
from ursa.diagnose.multilabel import confused_pairs, label_figures
from ursa.diagnose.report import jpeg_b64, thumbnail, write_report
from ursa.util.files import atomic_write_text
from ursa.util.names import html_text

ERRORS_PER_LABEL = 4


def label_errors(names: Sequence[str], probs: np.ndarray, targets: np.ndarray, classes: Sequence[str],
                 thresholds: Sequence[float], k: int = ERRORS_PER_LABEL) -> dict[str, dict[str, list]]:
    """Each label's worst misses and wrong additions: {label: {"missed": [[name, p]], "added": [[name, p]]}}."""
    probs, t = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=bool)
    out: dict[str, dict[str, list]] = {}
    for j, c in enumerate(classes):
        p, y = probs[:, j], t[:, j]
        missed = [i for i in np.argsort(p, kind="stable") if y[i] and p[i] < thresholds[j]][:k]
        added = [i for i in np.argsort(-p, kind="stable") if not y[i] and p[i] >= thresholds[j]][:k]
        if missed or added:
            out[c] = {"missed": [[names[i], round(float(p[i]), 4)] for i in missed],
                      "added": [[names[i], round(float(p[i]), 4)] for i in added]}
    return out


def label_json(names: Sequence[str], probs: np.ndarray, targets: np.ndarray, classes: Sequence[str],
               thresholds: Sequence[float]) -> dict[str, Any]:
    """report.json's ``multilabel``: the figures, the confused pairs and the per-label errors."""
    fig = label_figures(probs, targets, classes, thresholds)
    return {**fig.to_json(), "n_images": len(names),
            "confused_pairs": [{"missed": a, "given": b, "images": n} for a, b, n in
                               confused_pairs(probs, targets, classes, thresholds)],
            "errors": label_errors(names, probs, targets, classes, thresholds)}


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def label_html(data: dict[str, Any], root: Path | None) -> str:
    """The report's "Labels" section from ``label_json``'s dict (thumbnails read from ``root``/name when given)."""
    rows = "".join(f"<tr><td>{html_text(r['label'])}</td><td>{_num(r['threshold'])}</td><td>{_num(r['precision'])}</td>"
                   f"<td>{_num(r['recall'])}</td><td>{_num(r['f1'])}</td><td>{_num(r['ap'])}</td>"
                   f"<td>{r['support']}</td></tr>" for r in data["labels"])
    pairs = "".join(f"<tr><td>{html_text(p['missed'])}</td><td>{html_text(p['given'])}</td><td>{p['images']}</td></tr>"
                    for p in data["confused_pairs"]) or "<tr><td colspan=3>none</td></tr>"
    errs = []
    for label, e in data["errors"].items():
        cells = []
        for kind, words in (("missed", "missed (carries it, not given)"), ("added", "given, does not carry it")):
            for name, p in e[kind]:
                im = thumbnail(root / name) if root is not None else None
                img = f"<img src='data:image/jpeg;base64,{jpeg_b64(im)}' width=96><br>" if im is not None else ""
                cells.append(f"<figure style='display:inline-block;margin:4px'>{img}<figcaption>{html_text(name)}<br>"
                             f"{words}: p={p:.2f}</figcaption></figure>")
        errs.append(f"<h4>{html_text(label)}</h4><div>{''.join(cells)}</div>")
    return (f"<section id='labels'><h2>Labels (multi-label)</h2><p>macro F1 <b>{_num(data['macro_f1'])}</b>, "
            f"sample-averaged F1 <b>{_num(data['samples_f1'])}</b>, mAP <b>{_num(data['map'])}</b>, whole set right "
            f"on {100 * (data['exact_match'] or 0):.1f}% of {data['n_images']} images, at each label's threshold.</p>"
            "<table><tr><th>label</th><th>threshold</th><th>precision</th><th>recall</th><th>F1</th><th>AP</th>"
            f"<th>images</th></tr>{rows}</table><h3>Most confused pairs</h3><table><tr><th>label missed</th>"
            f"<th>label given instead</th><th>images</th></tr>{pairs}</table><h3>Errors per label</h3>"
            f"{''.join(errs) or '<p>none</p>'}</section>")


def write_label_report(out: Path, names: Sequence[str], probs: np.ndarray, targets: np.ndarray,
                       classes: Sequence[str], thresholds: Sequence[float], history: History | None,
                       plots: dict[str, Path], info: dict, notes: Sequence[str] = (), insight: dict | None = None,
                       root: Path | None = None) -> dict[str, Path]:
    """report.html/json: ``diagnose.report``'s (no one-class sections), with the labels section added."""
    written = write_report(out, None, history, plots, info, notes, insight=insight)
    data = label_json(names, probs, targets, classes, thresholds)
    page = written["html"].read_text(encoding="utf-8")
    at = page.rfind("</body>")
    section = label_html(data, root)
    page = page[:at] + section + page[at:] if at >= 0 else page + section
    atomic_write_text(written["html"], page)
    report = json.loads(written["json"].read_text(encoding="utf-8"))
    report["multilabel"] = data
    atomic_write_text(written["json"], json.dumps(report, indent=1, allow_nan=False) + "\n")
    return written


def multi_hot(sets: Sequence[int], n_labels: int) -> np.ndarray:
    """Encoded label sets (``vision.labelsets.encode``) -> 0/1 [N, K], numpy."""
    y = np.asarray(sets, dtype=np.int64).reshape(-1, 1)
    return (np.maximum(y, 0) >> np.arange(n_labels) & 1).astype(np.float64)


def write_interpretation(out: Path, interp: Any, history: History | None, plots: dict[str, Path], info: dict,
                         root: Path | None = None) -> tuple[dict[str, Path], dict[str, Any]]:
    """``ursa interpret`` on a multi-label model: the report and ``label_json``'s figures."""
    targets = multi_hot(interp.targets, len(interp.classes))
    written = write_label_report(out, interp.files, interp.probs, targets, interp.classes, interp.thresholds, history,
                                 plots, info, insight={"open_world": interp.open_world}, root=root)
    return written, label_json(interp.files, interp.probs, targets, interp.classes, interp.thresholds)


def label_lines(data: dict[str, Any]) -> list[str]:
    """The console's summary of ``label_json``'s figures."""
    out = [f"macro F1 {_num(data['macro_f1'])}, sample-averaged F1 {_num(data['samples_f1'])}, mAP {_num(data['map'])}, "
           f"whole set right {100 * (data['exact_match'] or 0):.1f}% on {data['n_images']} images"]
    out += [f"  {r['label']}: threshold {_num(r['threshold'])}, precision {_num(r['precision'])}, recall "
            f"{_num(r['recall'])}, F1 {_num(r['f1'])}, AP {_num(r['ap'])} ({r['support']} images)" for r in data["labels"]]
    pairs = ", ".join(f"{p['missed']} -> {p['given']} ({p['images']})" for p in data["confused_pairs"]) or "none"
    out.append(f"most confused (label missed -> label given instead): {pairs}")
    for label, e in data["errors"].items():
        out.append(f"  {label}: missed {', '.join(n for n, _ in e['missed']) or '-'}; "
                   f"given wrongly {', '.join(n for n, _ in e['added']) or '-'}")
    return out

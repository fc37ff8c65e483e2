"""The report's insight sections: the data as the model sees it, calibration, the learning curve, leakage.

Each takes what the training run measured (plain dicts, as report.json stores them) and the
run folder's pictures, and returns a self-contained HTML section (pictures inlined as base64).
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any, Callable

from ursa.util.names import html_text as _e  # the one HTML escape: names on one line, visible

MAX_PAIRS_SHOWN = 24
PAIR_THUMB = 140


def _png(path: Path, alt: str, caption: str, wide: bool = False) -> str:
    b64 = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    cls = " class='wide'" if wide else ""
    return (f"<figure{cls}><img alt='{_e(alt)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _pct(v: Any) -> str:
    return "n/a" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{100 * v:.1f}%"


def batch_html(batch_png: Path | None, counts: dict[str, Any] | None) -> str:
    """A batch of training images as the model sees them (batch.png), and the class counts of the split."""
    if batch_png is None or not Path(batch_png).is_file():
        return ""
    parts = ["<section id='data'><h2>The data, as the model sees it</h2><div class='two'>",
             _png(batch_png, "a batch of augmented training images",
                  "Training images with the augmentation the model trains on, labelled (batch.png).")]
    if counts:
        parts.append("<div><table><tr><th>class</th><th class='num'>train</th><th class='num'>valid</th></tr>")
        for c, (t, v) in counts.get("per_class", {}).items():
            parts.append(f"<tr><td>{_e(c)}</td><td class='num'>{t}</td><td class='num'>{v}</td></tr>")
        parts.append("</table>")
        if counts.get("warning"):
            parts.append(f"<div class='advice warning'><strong>Imbalanced classes</strong>{_e(counts['warning'])}</div>")
        parts.append("</div>")
    parts.append("</div></section>")
    return "".join(parts)


def calibration_html(cal: dict[str, Any] | None, reliability_png: Path | None) -> str:
    """Temperature, calibration error before and after, the unsure threshold, and the reliability diagram."""
    if not cal:
        return ""
    thr = cal.get("threshold")
    rows = [("temperature", f"{cal['temperature']:.2f}"),
            ("expected calibration error, raw", _pct(cal.get("ece_before"))),
            ("expected calibration error, scaled", _pct(cal.get("ece_after"))),
            ("'unsure' below", "never (target not reached)" if thr is None else f"{thr:.3f}"),
            ("answers kept at that threshold", _pct(cal.get("kept"))),
            ("precision of the answers kept", f"{_pct(cal.get('kept_precision'))} (target {_pct(cal.get('target_precision'))})")]
    parts = ["<section id='calibration'><h2>How far to trust a probability</h2><div class='two'><div>",
             "<p class='note'>Temperature scaling divides the logits by one number fitted on the validation set, so "
             "that of the answers given with probability 0.9 about 90% are right; it never changes which class is "
             "predicted. The model file stores the temperature (predict and serve apply it) and the 'unsure' "
             "threshold: the lowest top probability at which the answers kept reach the target precision on the "
             "validation set.</p><table>"]
    parts += [f"<tr><td>{_e(k)}</td><td class='num'>{_e(v)}</td></tr>" for k, v in rows]
    parts.append("</table><p class='note'>Measured on the same validation images the temperature was fitted on: "
                 "a fresh set would show a slightly larger error.</p></div>")
    if reliability_png is not None and Path(reliability_png).is_file():
        parts.append(_png(reliability_png, "reliability diagram",
                          "Reliability diagram: accuracy against confidence per bin, raw and scaled (reliability.png)."))
    parts.append("</div></section>")
    return "".join(parts)


def curve_html(curve: dict[str, Any] | None, curve_png: Path | None) -> str:
    """The learning curve: its words and its picture."""
    if not curve:
        return ""
    parts = ["<section id='curve'><h2>How many images are enough</h2>",
             f"<div class='advice {'warning' if curve['verdict']['falling'] else 'ok'}'><strong>Learning curve</strong>"
             f"{_e(curve['words'])}</div>",
             "<p class='note'>The head was retrained on the cached body features of "
             + ", ".join(f"{100 * f:.0f}%" for f in curve["fractions"])
             + f" of the training set ({len(curve['errors'][0])} draws each, stratified per class) and scored on the "
             "same validation set; the dashed lines are power laws err(n) = a&middot;n<sup>-b</sup> + c fitted to the "
             f"means. It describes the frozen-body model ({curve.get('seconds', 0):.0f} s).</p>"]
    if curve_png is not None and Path(curve_png).is_file():
        parts.append("<div class='plots'>" + _png(curve_png, "learning curve", "Learning curve (curve.png).", wide=True)
                     + "</div>")
    parts.append("</section>")
    return "".join(parts)


def leakage_html(leak: dict[str, Any] | None, thumb: Callable[[Path, int], Any]) -> str:
    """Near-duplicate pairs that straddle the split, with their thumbnails side by side."""
    if not leak:
        return ""
    n = int(leak.get("n_pairs", 0))
    root = Path(leak.get("root", "."))
    parts = ["<section id='leakage'><h2>Is the validation score honest?</h2>"]
    if n == 0:
        parts.append("<div class='advice ok'><strong>No leakage found</strong>No training image has an exact or near "
                     "copy in the validation set" + (" (--dedupe-split kept each group of copies on one side)."
                                                      if leak.get("dedupe_split") else ".") + "</div>")
    else:
        parts.append(f"<div class='advice warning'><strong>{n} near-duplicate pair(s) straddle the split</strong>"
                     "Each validation image below has a copy (resized, re-encoded or lightly cropped) in the training "
                     "set, so the model may recognise it rather than classify it: the validation score is a little "
                     "better than it will be on new pictures. Train with --dedupe-split to keep each group of "
                     "copies on one side, or remove the copies.</div><div class='pairs'>")
        for p in leak.get("pairs", [])[:MAX_PAIRS_SHOWN]:
            cells = []
            for side in ("train", "valid"):
                im = thumb(root / p[side], PAIR_THUMB)
                if im is None:
                    cells.append("<div><span class='note'>unreadable</span></div>")
                else:
                    buf = io.BytesIO()
                    im.save(buf, format="JPEG", quality=80)
                    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
                    cells.append(f"<div><img alt='{_e(p[side])}' src='data:image/jpeg;base64,{b64}'></div>")
            kind = "exact copy" if p.get("exact") else f"hash distance {p.get('distance')}"
            parts.append(f"<div class='pair'><div class='two-img'>{''.join(cells)}</div><div class='file'>train: "
                         f"{_e(p['train'])}</div><div class='file'>valid: {_e(p['valid'])}</div>"
                         f"<div class='note'>{_e(kind)}</div></div>")
        parts.append("</div>")
        if n > MAX_PAIRS_SHOWN:
            parts.append(f"<p class='note'>{n - MAX_PAIRS_SHOWN} more in report.json.</p>")
    parts.append(f"<p class='note'>{_e(leak.get('method', ''))}</p></section>")
    return "".join(parts)


def recipe_html(recipe: dict[str, Any] | None, rows: list[dict] | None) -> str:
    """What the default recipe decided (size, flips, fine-tuning) and why, and what each stage did."""
    if not recipe:
        return ""
    decisions = [("input size", f"{recipe.get('size')} px", recipe.get("size_why", "")),
                 ("flips", str(recipe.get("flips")), recipe.get("flips_why", "")),
                 ("budget", f"{recipe.get('budget', 0):.0f} s counted", recipe.get("budget_why", "")),
                 ("balance", str(recipe.get("balance", "none")), recipe.get("balance_why", "")),
                 ("fine-tuning", f"{recipe.get('fine_tune_epochs', 0)} epoch(s)", recipe.get("fine_tune_why", ""))]
    parts = ["<section id='recipe'><h2>The recipe</h2><table><tr><th>decision</th><th>chosen</th><th>why</th></tr>"]
    parts += [f"<tr><td>{_e(a)}</td><td>{_e(b)}</td><td>{_e(c)}</td></tr>" for a, b, c in decisions]
    parts.append("</table>")
    parts.append(_recipe_figures(recipe))
    stages: dict[str, list[dict]] = {}
    for r in rows or []:
        stages.setdefault(str(r.get("stage")), []).append(r)
    if stages:
        parts.append("<table><tr><th>stage</th><th>epochs</th><th>best error</th><th>last error</th><th>seconds</th></tr>")
        for name, rs in stages.items():
            errs = [r["error_rate"] for r in rs]
            parts.append(f"<tr><td>{_e(name)}</td><td>{len(rs)}</td><td>{_pct(min(errs))}</td><td>{_pct(errs[-1])}</td>"
                         f"<td>{sum(r.get('seconds', 0) for r in rs):.0f}</td></tr>")
        parts.append("</table>")
    return "".join(parts) + "</section>"


def _recipe_figures(recipe: dict[str, Any]) -> str:
    """The counted work, the one time figure, whether a wall-clock cap cut the run, the honest and cleaning figures."""
    lines = []
    work = recipe.get("work") or {}
    if work:
        lines.append(f"Counted, not timed: {work.get('n_train')} training images, {work.get('gflops', 0):.2f} GFLOPs "
                     f"each; one fine-tuning epoch counts {work.get('epoch_seconds', 0):.1f} s of the reference machine, "
                     f"the plan {recipe.get('planned_seconds') or 0:.0f} of --budget {recipe.get('budget', 0):.0f} s.")
    if recipe.get("seconds") is not None:
        lines.append(f"Time: {recipe['seconds']:.0f} s, start to the end of training (the same figure as the "
                     "console's and recipe.json's).")
    if recipe.get("cut"):
        lines.append(f"<b>Cut</b>: the wall-clock limit ({recipe.get('time_limit', 0):.0f} s) stopped fine-tuning "
                     f"after {recipe.get('epochs_done')} of {recipe.get('fine_tune_epochs')} epochs: this model is "
                     "not the one the data and options decide.")
    honest = recipe.get("honest") or {}
    if honest.get("selection_corrected") is not None:
        lines.append((f"Honest figure: error {_pct(honest['error_rate'])} on the epoch kept; "
                      f"{_pct(honest['selection_corrected'])} corrected for choosing that epoch on the same validation "
                      f"pictures ({_e(honest.get('method', ''))})." if honest.get("chosen", True) else
                      f"Honest figure: error {_pct(honest['error_rate'])} on the last epoch, which was not chosen on "
                      "the validation pictures, so it needs no correction (--epoch-kept last).")
                     + (f" On {honest.get('pictures')} validation pictures, at {honest.get('confidence', 0.95):.0%} "
                        f"confidence the error is at most {_pct(honest['upper_bound'])}."
                        if honest.get("upper_bound") is not None else ""))
    c = recipe.get("compare") or {}
    if c:
        what = ", ".join(f"{len(c[k])} {k}" for k in ("excluded", "relabelled", "added") if c.get(k)) or "none changed"
        same = _pct(c["error_rate_unchanged"]) if c.get("error_rate_unchanged") is not None else "n/a"
        was = c.get("earlier_error_rate_unchanged")
        then = f" (the earlier model: {_pct(was)})" if was is not None else " (compare it with the earlier run)"
        lines.append(f"Against {_e(c.get('earlier', ''))}: validation pictures {_e(what)}; error {same} on the "
                     f"{c.get('unchanged')} unchanged pictures{then}, {_pct(c.get('error_rate') or 0)} on all "
                     f"{c.get('valid_now')}.")
    return "".join(f"<p class='note'>{line}</p>" for line in lines)

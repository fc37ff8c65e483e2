"""One page to read a model by: advice, training curves, confusion matrix, per-class scores, top losses.

``write_report`` gathers an ``Interpretation`` (predictions on a set of images), a training
``History`` (and the advice the rules draw from it) and the run's plots into two files:

- ``report.html``: self-contained (plots and thumbnails inlined as base64, CSS and script inline,
  no external URL), to open in any browser or attach to an email; its confusion matrix can be
  clicked (``explore``), and a training run adds the insight sections (``insight_html``): the
  data as the model sees it, calibration, the learning curve and leakage;
- ``report.json``: the same numbers for scripts (``classes``, ``confusion_matrix`` with rows =
  actual and columns = predicted, ``most_confused`` as [actual, predicted, count],
  ``per_class`` precision/recall/support, ``error_rate``, ``top_losses`` as [file, actual,
  predicted, loss, probability], plus ``advice``, ``rules`` and ``history``, and when measured
  ``calibration``, ``curve``, ``leakage``, ``data``, ``embedding`` and ``open_world`` (``openset_html``)).

``finish_run`` is what ``ursa train`` calls once the model file is written.
"""

from __future__ import annotations

import base64
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ursa.diagnose import explain_html, explore, insight_html
from ursa.diagnose.advice import RULE_DESCRIPTIONS, RULES, Advice, History, advise, check
from ursa.util.names import html_text as _e  # the one HTML escape: names on one line, visible
from ursa.diagnose.openset_html import open_world_html

if TYPE_CHECKING:
    from ursa.diagnose.interpret import Interpretation

TOP_K = 12  # top losses shown as thumbnails (report.json lists every item)
THUMB = 200  # thumbnail long side, pixels
PLOT_TITLES = {  # in reading order
    "losses": "Loss: training (per batch) and validation (per epoch)",
    "lr": "Learning rate schedule",
    "metrics": "Error rate and loss per epoch",
    "lr_find": "Learning rate finder",
}
WIDE_PLOTS = ("metrics",)  # two panels: a full row


# --- pieces --------------------------------------------------------------------------------------


def thumbnail(path: str | Path, size: int = THUMB):
    """A small RGB copy of an image, or None when it cannot be read (it was skipped or changed)."""
    from ursa.errors import ImageError
    from ursa.vision.images import open_image

    try:
        im = open_image(path, min_size=size)
    except ImageError:
        return None
    im.thumbnail((size, size))
    return im


def jpeg_b64(im, quality: int = 82) -> str:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _png_b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _clean(v):
    """JSON cannot say NaN: non-finite floats become null, numpy scalars plain numbers."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _verdicts(h: History | None, advice: Sequence[Advice]) -> list[dict]:
    """Each rule: fired, not fired, or not checked (a diverged run makes the others meaningless)."""
    if h is None:
        return [{"name": n, "description": RULE_DESCRIPTIONS[n], "fired": None} for n, _ in RULES]
    diverged = any(a.rule == "diverged" for a in advice)
    out = []
    for name, found in check(h):
        fired = found is not None if (name == "diverged" or not diverged) else None
        out.append({"name": name, "description": RULE_DESCRIPTIONS[name], "fired": fired})
    return out


INSIGHT_KEYS = ("calibration", "curve", "leakage", "data", "embedding", "recipe", "open_world")


def build_json(interp: "Interpretation | None", h: History | None, advice: Sequence[Advice],
               plots: dict[str, Path], info: dict, notes: Sequence[str], insight: dict | None = None) -> dict:
    """report.json: the interpretation's numbers plus advice, rule verdicts, history and the insight measured."""
    keys = ("classes", "split", "n_items", "error_rate", "confusion_matrix", "most_confused", "per_class",
            "top_losses", "skipped")
    d: dict = {k: None for k in keys}
    if interp is not None:
        d.update(interp.to_json())
    elif info.get("classes"):
        d["classes"] = list(info["classes"])
    from ursa import __version__

    d.update({
        "advice": [a.to_dict() for a in advice],
        "rules": _verdicts(h, advice),
        "history": h.rows if h is not None else [],
        "plots": {k: Path(p).name for k, p in plots.items()},
        "notes": list(notes),
        "info": {k: v for k, v in info.items() if k != "classes"},
        "ursa_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    d.update({k: (insight or {}).get(k) for k in INSIGHT_KEYS if (insight or {}).get(k) is not None})
    return _clean(d)


# --- HTML ----------------------------------------------------------------------------------------

CSS = """
:root { --fg:#1d2433; --muted:#5b6478; --line:#e3e7ef; --bg:#f6f7fb; --card:#fff; --accent:#2f6fde;
        --bad:#c0392b; --badbg:#fdecea; --warn:#a86400; --warnbg:#fff4e0; --ok:#1e7b45; --okbg:#e7f6ed; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--fg); background:var(--bg); }
main { max-width: 1120px; margin: 0 auto; padding: 28px 24px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 0 0 14px; }
h3 { font-size: 15px; margin: 18px 0 8px; color: var(--muted); font-weight: 600; }
.sub { color: var(--muted); margin: 0 0 18px; display:flex; flex-wrap:wrap; gap: 4px 18px; font-size: 14px; }
.sub span { overflow-wrap: anywhere; }
.sub b { color: var(--fg); font-weight: 600; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 20px 22px;
          margin: 0 0 20px; }
.stats { display:flex; flex-wrap:wrap; gap:12px; margin: 0 0 20px; }
.stat { background: var(--card); border:1px solid var(--line); border-radius:10px; padding: 12px 16px; min-width: 130px; }
.stat b { display:block; font-size: 24px; line-height:1.2; }
.stat span { color: var(--muted); font-size: 13px; }
.advice { border-radius: 8px; padding: 12px 14px; margin: 0 0 10px; border-left: 5px solid; }
.advice strong { display:block; margin-bottom: 2px; }
.advice strong::first-letter { text-transform: uppercase; }
.advice.error { background: var(--badbg); border-color: var(--bad); }
.advice.warning { background: var(--warnbg); border-color: var(--warn); }
.advice.ok { background: var(--okbg); border-color: var(--ok); }
.note { color: var(--muted); margin: 6px 0 0; }
ul.rules { list-style:none; padding:0; margin: 8px 0 0; display:grid; gap:4px; }
ul.rules li { color: var(--muted); font-size: 14px; }
.chip { display:inline-block; min-width: 74px; text-align:center; font-size: 12px; font-weight:600;
        border-radius: 10px; padding: 1px 8px; margin-right: 8px; }
.chip.fired { background: var(--warnbg); color: var(--warn); }
.chip.clear { background: var(--okbg); color: var(--ok); }
.chip.skip { background: var(--bg); color: var(--muted); }
.plots { display:grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 16px; }
figure { margin:0; }
figure.wide { grid-column: 1 / -1; }
figure img { width:100%; height:auto; border:1px solid var(--line); border-radius:6px; background:#fff; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.two { display:grid; grid-template-columns: minmax(280px, 420px) 1fr; gap: 24px; align-items:start; }
@media (max-width: 800px) { .two { grid-template-columns: 1fr; } .plots { grid-template-columns: 1fr; } }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align:left; padding: 6px 10px; border-bottom: 1px solid var(--line); }
th { color: var(--muted); font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric: tabular-nums; }
.bar { display:inline-block; height:8px; border-radius:4px; background: var(--accent); vertical-align: middle;
       margin-left: 8px; }
.grid { display:grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 14px; }
.card { border:1px solid var(--line); border-top: 4px solid var(--ok); border-radius: 8px; overflow:hidden;
        background:#fff; }
.card.miss { border-top-color: var(--bad); }
.card .img { height: 170px; display:flex; align-items:center; justify-content:center; background:#eef0f5; }
.card img { max-width:100%; max-height:170px; display:block; }
.card .txt { padding: 8px 10px; font-size: 13px; }
.card .pred { font-weight: 600; }
.card .wrong { color: var(--bad); }
.card .right { color: var(--ok); }
.card .file { color: var(--muted); font-size: 12px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.card .nums { font-variant-numeric: tabular-nums; }
details summary { cursor: pointer; color: var(--accent); margin-top: 10px; }
footer { color: var(--muted); font-size: 12px; text-align:center; }
""" + explore.CSS


def _pct(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


def _advice_html(advice: Sequence[Advice], verdicts: list[dict], notes: Sequence[str], have_history: bool) -> str:
    parts = ["<section id='advice'><h2>Advice</h2>"]
    if advice:
        for a in advice:
            parts.append(f"<div class='advice {_e(a.severity)}'><strong>{_e(a.title)}</strong>{_e(a.message)}</div>")
    elif have_history:
        parts.append("<div class='advice ok'><strong>No failure mode detected</strong>The loss fell and the error "
                     "rate did not get worse at the end: nothing to change in the training recipe.</div>")
    else:
        parts.append("<p class='note'>No training history beside this model: the training rules were not checked.</p>")
    for n in notes:
        parts.append(f"<p class='note'>{_e(n)}</p>")
    if have_history:
        parts.append("<h3>Rules checked (the four failure modes)</h3><ul class='rules'>")
        for v in verdicts:
            chip = ("<span class='chip fired'>fired</span>" if v["fired"] else
                    "<span class='chip clear'>clear</span>" if v["fired"] is False else
                    "<span class='chip skip'>skipped</span>")
            parts.append(f"<li>{chip}{_e(v['description'])}</li>")
        parts.append("</ul>")
    parts.append("</section>")
    return "".join(parts)


def _plots_html(plots: dict[str, Path], h: History | None) -> str:
    if not plots:
        return ""
    parts = ["<section id='training'><h2>Training</h2><div class='plots'>"]
    for name, path in plots.items():
        title = PLOT_TITLES.get(name, name)
        wide = " class='wide'" if name in WIDE_PLOTS else ""
        parts.append(f"<figure{wide}><img alt='{_e(title)}' src='data:image/png;base64,{_png_b64(path)}'>"
                     f"<figcaption>{_e(title)} ({_e(Path(path).name)})</figcaption></figure>")
    parts.append("</div>")
    if h is not None and h.rows:
        parts.append("<details><summary>Epoch table</summary><table><tr><th class='num'>epoch</th><th>stage</th>"
                     "<th class='num'>train loss</th><th class='num'>valid loss</th><th class='num'>error rate</th>"
                     "<th class='num'>seconds</th></tr>")
        for r in h.rows:
            parts.append(f"<tr><td class='num'>{_e(r['epoch'])}</td><td>{_e(r['stage'])}</td>"
                         f"<td class='num'>{_fmt(r['train_loss'])}</td><td class='num'>{_fmt(r['valid_loss'])}</td>"
                         f"<td class='num'>{_fmt(r['error_rate'])}</td><td class='num'>{_fmt(r.get('seconds'), 1)}</td></tr>")
        parts.append("</table></details>")
    parts.append("</section>")
    return "".join(parts)


def _fmt(v: object, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(v) else _e(v)


def _confusion_html(interp: "Interpretation") -> str:
    mc = interp.most_confused()
    parts = ["<section id='confusion'><h2>Where the model goes wrong</h2><div class='two'><div>",
             explore.matrix_html(interp),
             "<p class='note'>Confusion matrix: rows are the actual class, columns the predicted one; the diagonal "
             "is right. Click a cell to see its images (confusion_matrix.png has the same numbers).</p></div><div>",
             "<h3>Most confused (actual &rarr; predicted)</h3>"]
    if mc:
        parts.append("<table><tr><th>actual</th><th>predicted as</th><th class='num'>images</th></tr>")
        parts += [f"<tr><td>{_e(a)}</td><td>{_e(p)}</td><td class='num'>{n}</td></tr>" for a, p, n in mc]
        parts.append("</table>")
    else:
        parts.append("<p class='note'>No mistakes on this set.</p>")
    parts.append("<h3>Per class</h3>" + explore.per_class_html(interp))
    parts.append("<p class='note'>Precision: of the images predicted as this class, the share that are. "
                 "Recall: of this class's images, the share found.</p></div></div>" + explore.panel_html()
                 + "</section>")
    return "".join(parts)


def _top_losses_html(interp: "Interpretation", thumbs: dict[int, str], k: int) -> str:
    idx = interp.top_loss_indices(k)
    preds, losses = interp.preds, interp.losses
    parts = ["<section id='top-losses'><h2>Top losses</h2><p class='note'>The images the model is most wrong, or "
             "least sure, about: often mislabelled or not a picture of any class. Each card shows the prediction "
             "(red: wrong, with the actual label), the loss and the probability the model gave its prediction. Check "
             "them, then clean the data (<code>ursa clean</code>).</p><div class='grid'>"]
    for i in idx:
        actual, pred = interp.classes[interp.targets[i]], interp.classes[preds[i]]
        right = actual == pred
        fix = "" if right else f" <span class='note'>(actually {_e(actual)})</span>"
        img = (f"<img alt='{_e(interp.files[i])}' src='data:image/jpeg;base64,{thumbs[i]}'>" if i in thumbs
               else "<span class='note'>unreadable</span>")
        parts.append(
            f"<div class='card{'' if right else ' miss'}'><div class='img'>{img}</div><div class='txt'>"
            f"<div class='pred {'right' if right else 'wrong'}'>{_e(pred)}"
            f"{fix}</div>"
            f"<div class='nums'>loss {losses[i]:.2f} &middot; prob. {interp.probs[i, preds[i]]:.2f}</div>"
            f"<div class='file' title='{_e(interp.files[i])}'>{_e(interp.files[i])}</div></div></div>")
    parts.append("</div></section>")
    return "".join(parts)


def build_html(interp: "Interpretation | None", h: History | None, advice: Sequence[Advice], plots: dict[str, Path],
               info: dict, notes: Sequence[str], cm_png: Path | None, thumbs: dict[int, str], k: int,
               insight: dict | None = None, small: dict[int, str] | None = None, out: Path | None = None) -> str:
    """The whole page as one string: nothing outside it is fetched (``small``: the explorer's thumbnails)."""
    insight = insight or {}
    pics = {n: (out / f"{n}.png") if out is not None else None for n in ("batch", "reliability", "curve")}
    title = info.get("title", "ursa report")
    sub = "".join(f"<span><b>{_e(k)}</b> {_e(v)}</span>" for k, v in info.items()
                  if k not in ("title", "classes") and v not in (None, ""))
    stats = []
    if interp is not None:
        stats += [("error rate", _pct(interp.error_rate)), ("accuracy", _pct(1 - interp.error_rate)),
                  ("validation images" if interp.split == "valid" else "images", str(len(interp))),
                  ("classes", str(len(interp.classes))), ("skipped (unreadable)", str(len(interp.skipped)))]
    elif h is not None and h.rows:
        last = h.rows[-1]
        stats += [("last error rate", _pct(last["error_rate"])), ("epochs", str(len(h.rows)))]
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>",
             f"<h1>{_e(title)}</h1><div class='sub'>{sub}</div>"]
    if stats:
        parts.append("<div class='stats'>" + "".join(f"<div class='stat'><b>{_e(v)}</b><span>{_e(n)}</span></div>"
                                                    for n, v in stats) + "</div>")
    verdicts = _verdicts(h, advice)
    parts.append(_advice_html(advice, verdicts, notes, h is not None))
    parts.append(insight_html.recipe_html(insight.get("recipe"), h.rows if h is not None else None))
    parts.append(insight_html.batch_html(pics["batch"], insight.get("data")))
    parts.append(_plots_html(plots, h))
    if interp is not None and cm_png is not None:
        parts.append(_confusion_html(interp))
        parts.append(explore.embedding_section(interp, insight.get("embedding")))
        parts.append(_top_losses_html(interp, thumbs, k) + explain_html.overlays_html(interp, insight.get("overlays")))
    parts.append(insight_html.calibration_html(insight.get("calibration"), pics["reliability"]))
    parts.append(open_world_html(insight.get("open_world")))
    parts.append(insight_html.curve_html(insight.get("curve"), pics["curve"]))
    parts.append(insight_html.leakage_html(insight.get("leakage"), thumbnail))
    if interp is not None and interp.skipped:
        parts.append(f"<section id='skipped'><h2>Skipped files ({len(interp.skipped)})</h2><table>"
                     "<tr><th>file</th><th>why</th></tr>")
        parts += [f"<tr><td>{_e(f)}</td><td>{_e(w)}</td></tr>" for f, w in interp.skipped]
        parts.append("</table></section>")
    from ursa import __version__

    parts.append(f"<footer>ursa {_e(__version__)} · {_e(datetime.now().strftime('%Y-%m-%d %H:%M'))}</footer>")
    if interp is not None and cm_png is not None:
        parts.append(explore.scripts(interp, small or {}, insight.get("embedding")))
    parts.append("</main></body></html>")
    return "".join(parts)


# --- writing -------------------------------------------------------------------------------------


def write_report(out: str | Path, interp: "Interpretation | None" = None, history: History | None = None,
                 plots: dict[str, Path] | None = None, info: dict | None = None, notes: Sequence[str] = (),
                 k: int = TOP_K, insight: dict | None = None, model: str | Path | None = None) -> dict[str, Path]:
    """report.html + report.json (and confusion_matrix.png, top_losses.png) into out; name -> path.

    ``insight``: what a training run measured (``calibration``, ``curve``, ``leakage``, ``data``;
    batch.png, reliability.png and curve.png are read from out); the embedding map is computed
    here from ``interp.features`` when the interpretation has them; ``model`` (its file): the top losses' heat maps.
    """
    from ursa.diagnose.plots import plot_confusion_matrix, plot_top_losses
    from ursa.util.files import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {n: Path(p) for n, p in (plots or {}).items() if Path(p).is_file()}
    info = dict(info or {})
    advice = advise(history) if history is not None else []
    insight = dict(insight or {})
    written: dict[str, Path] = {}
    cm_png, thumbs, small = None, {}, {}
    if interp is not None:
        emb = explore.embedding(interp)
        if emb is not None:
            insight["embedding"] = emb
        insight.setdefault("open_world", interp.open_world)  # interpret's own figures (a training run gives its own)
        for i in explore.thumb_order(interp):
            im = thumbnail(interp.paths[i], explore.THUMB_SMALL)
            if im is not None:
                small[i] = jpeg_b64(im, 75)
        cm_png = written["confusion_matrix"] = plot_confusion_matrix(interp.confusion_matrix(), interp.classes,
                                                                     out / "confusion_matrix.png")
        images, titles = [], []
        for i in interp.top_loss_indices(k):
            im = thumbnail(interp.paths[i])
            if im is None:
                continue
            thumbs[i] = jpeg_b64(im)
            images.append(im)
            p = int(interp.preds[i])
            titles.append(f"{interp.classes[p]}/{interp.classes[interp.targets[i]]}\n"
                          f"{interp.losses[i]:.2f} / {interp.probs[i, p]:.2f}")
        if images:
            written["top_losses"] = plot_top_losses(images, titles, out / "top_losses.png")
        if model is not None and k:
            insight["overlays"] = explain_html.top_loss_overlays(model, interp, k)
    page = build_html(interp, history, advice, plots, info, notes, cm_png, thumbs, k, insight, small, out)
    data = build_json(interp, history, advice, plots, info, notes, insight)
    atomic_write_text(out / "report.html", page)
    atomic_write_text(out / "report.json", json.dumps(data, indent=1, allow_nan=False) + "\n")
    written["html"], written["json"] = out / "report.html", out / "report.json"
    return written


def run_plots(out: Path) -> dict[str, Path]:
    """The run folder's plots that exist, in reading order."""
    return {n: out / f"{n}.png" for n in PLOT_TITLES if (out / f"{n}.png").is_file()}

"""The report's interactive parts: a confusion matrix you can click, each class's worst images, an embedding map.

All in the page itself (vanilla JS, inline, no external resource): the validation items with
small thumbnails are one JSON block; clicking a cell of the matrix lists the images behind it
(thumbnails with their probabilities), a class's "worst images" button lists its highest-loss
images, and the map (2-D PCA of the body features, ``embedding.pca_2d``) is an inline SVG where
each dot is an image, coloured by its label, mistakes ringed in red; hovering shows the image.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ursa.util.names import html_text as _e  # the one HTML escape: names on one line, visible

if TYPE_CHECKING:
    from ursa.diagnose.interpret import Interpretation

THUMB_SMALL = 96  # long side of the thumbnails in the page's panels and map
MAX_THUMBS = 1500  # beyond this many items, only the highest losses get a thumbnail (keeps the page < ~5 MB)
PALETTE = ["#2f6fde", "#e07b00", "#1e9e55", "#8e44ad", "#c0392b", "#16a0a8", "#b8860b", "#d35d9c", "#6b7a8f",
           "#4c9a2a"]
MAP_SIZE = 520


def color(i: int) -> str:
    """The colour of class i on the map and its legend."""
    return PALETTE[i % len(PALETTE)]


def thumb_order(interp: "Interpretation", limit: int = MAX_THUMBS) -> list[int]:
    """Which items get a small thumbnail: every one, or the highest losses first when there are too many."""
    return [int(i) for i in np.argsort(-interp.losses, kind="stable")[:limit]]


def page_data(interp: "Interpretation", thumbs: dict[int, str], coords: np.ndarray | None) -> dict:
    """What the page's script reads: classes and, per item, file, labels, probabilities, loss, thumbnail, map position."""
    preds, losses = interp.preds, interp.losses
    items = []
    for i in range(len(interp)):
        t, p = int(interp.targets[i]), int(preds[i])
        it = {"f": interp.files[i], "t": t, "p": p, "pp": round(float(interp.probs[i, p]), 4),
              "pt": round(float(interp.probs[i, t]), 4), "l": round(float(losses[i]), 4), "th": thumbs.get(i, "")}
        if coords is not None and len(coords) == len(interp):
            it["x"], it["y"] = round(float(coords[i, 0]), 4), round(float(coords[i, 1]), 4)
        items.append(it)
    return {"classes": list(interp.classes), "colors": [color(i) for i in range(len(interp.classes))], "items": items}


def data_script(data: dict) -> str:
    """The JSON block, safe inside <script> (no '<' can close it early)."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return f"<script type='application/json' id='ursa-data'>{text}</script>"


def matrix_html(interp: "Interpretation") -> str:
    """The confusion matrix as a table of buttons: a cell opens the images behind it."""
    cm = interp.confusion_matrix()
    rows = cm.sum(1)
    parts = ["<table class='cm' aria-label='confusion matrix'><tr><th class='corner'>actual &darr; / predicted &rarr;</th>"]
    parts += [f"<th class='num'>{_e(c)}</th>" for c in interp.classes]
    parts.append("</tr>")
    for a, ca in enumerate(interp.classes):
        parts.append(f"<tr><th>{_e(ca)}</th>")
        for p, cp in enumerate(interp.classes):
            n = int(cm[a, p])
            share = n / rows[a] if rows[a] else 0.0
            kind = "diag" if a == p else "off"
            alpha = 0.08 + 0.72 * share if n else 0.0
            rgb = "30,123,69" if a == p else "192,57,43"
            style = f" style='background:rgba({rgb},{alpha:.2f})'" if n else ""
            title = f"{n} image(s) of {ca} predicted as {cp}"
            dis = "" if n else " disabled"
            parts.append(f"<td><button type='button' class='cell {kind}' data-a='{a}' data-p='{p}' title='{_e(title)}'"
                         f"{style}{dis}>{n}</button></td>")
        parts.append("</tr>")
    parts.append("</table>")
    return "".join(parts)


def per_class_html(interp: "Interpretation") -> str:
    """Precision and recall per class, each row with a button that lists the class's worst images."""
    parts = ["<table class='per-class'><tr><th>class</th><th class='num'>images</th><th>precision</th><th>recall</th>"
             "<th></th></tr>"]
    for i, (c, m) in enumerate(interp.per_class().items()):
        parts.append(f"<tr><td><span class='dot' style='background:{color(i)}'></span>{_e(c)}</td>"
                     f"<td class='num'>{m['support']}</td>"
                     f"<td>{m['precision']:.3f}<span class='bar' style='width:{60 * m['precision']:.0f}px'></span></td>"
                     f"<td>{m['recall']:.3f}<span class='bar' style='width:{60 * m['recall']:.0f}px'></span></td>"
                     f"<td><button type='button' class='worst' data-c='{i}'>worst images</button></td></tr>")
    parts.append("</table>")
    if len(interp):
        parts.append(f"<p class='balanced'>Balanced error <strong>{interp.balanced_error:.1%}</strong> (one minus the "
                     f"mean recall of the classes), error rate {interp.error_rate:.1%}: when they differ, the model "
                     "serves some classes worse than the error rate says (lopsided classes; see --balance).</p>")
    return "".join(parts)


def panel_html() -> str:
    """Where the images of a clicked cell or class appear."""
    return ("<div id='explore-panel' class='panel' hidden><div class='panel-head'><h3 id='explore-title'></h3>"
            "<button type='button' id='explore-close' aria-label='close'>close</button></div>"
            "<div id='explore-grid' class='grid small'></div></div>")


def embedding(interp: "Interpretation") -> dict | None:
    """report.json's ``embedding`` (2-D PCA of the items' body features), or None when the interpretation has none."""
    from ursa.diagnose.embedding import pca_2d

    if interp.features is None or len(interp.features) != len(interp) or len(interp) < 2:
        return None
    coords, explained = pca_2d(interp.features)
    return {"method": "PCA of L2-normalised body features", "explained": explained, "coords": coords.round(4).tolist()}


def _coords(interp: "Interpretation", emb: dict | None) -> np.ndarray | None:
    return np.asarray(emb["coords"], dtype=np.float64) if emb and len(emb.get("coords", [])) == len(interp) else None


def embedding_section(interp: "Interpretation", emb: dict | None) -> str:
    """The map's section, or nothing when there are no features to place the images by."""
    coords = _coords(interp, emb)
    return "" if coords is None or emb is None else embedding_html(interp, coords, emb["explained"])


def scripts(interp: "Interpretation", thumbs: dict[int, str], emb: dict | None) -> str:
    """The page's data block and the script that makes the matrix, the class buttons and the map work."""
    return data_script(page_data(interp, thumbs, _coords(interp, emb))) + f"<script>{JS}</script>"


def embedding_html(interp: "Interpretation", coords: np.ndarray, explained: Sequence[float]) -> str:
    """The map as inline SVG: one dot per image, coloured by label, mistakes ringed; hover shows the image."""
    pad, size = 14, MAP_SIZE
    preds = interp.preds
    dots, rings = [], []
    for i in range(len(interp)):
        x = pad + float(coords[i, 0]) * (size - 2 * pad)
        y = pad + (1 - float(coords[i, 1])) * (size - 2 * pad)
        t = int(interp.targets[i])
        wrong = int(preds[i]) != t
        dots.append(f"<circle class='pt{' wrong' if wrong else ''}' data-i='{i}' cx='{x:.1f}' cy='{y:.1f}' r='{5 if wrong else 4}'"
                    f" fill='{color(t)}'></circle>")
        if wrong:
            rings.append(f"<circle class='ring' cx='{x:.1f}' cy='{y:.1f}' r='8'></circle>")
    legend = "".join(f"<span><span class='dot' style='background:{color(i)}'></span>{_e(c)}</span>"
                     for i, c in enumerate(interp.classes))
    ex = f"{100 * explained[0]:.0f}% and {100 * explained[1]:.0f}%"
    return ("<section id='embedding'><h2>Embedding map</h2><p class='note'>Each dot is a validation image, placed by "
            f"its body features (2-D PCA; the two axes carry {ex} of their variance) and coloured by its label; a red "
            "ring marks a mistake. Classes that overlap are the ones the model confuses. Hover a dot to see the image, "
            "click it to keep it below.</p>"
            f"<div class='legend'>{legend}<span><span class='ring-key'></span>mistake</span></div>"
            f"<div class='map-wrap'><svg id='embedding-map' viewBox='0 0 {size} {size}' width='{size}' height='{size}' "
            f"role='img' aria-label='embedding map'><rect class='frame' x='0.5' y='0.5' width='{size - 1}' height='{size - 1}'>"
            f"</rect>{''.join(rings)}{''.join(dots)}</svg><div id='map-tip' class='tip' hidden></div></div></section>")


CSS = """
table.cm { width:auto; border-collapse: separate; border-spacing: 3px; }
table.cm th { font-size: 13px; border: 0; }
table.cm th.corner { color: var(--muted); font-weight: 400; font-size: 12px; }
table.cm td { padding: 0; border: 0; }
button.cell { min-width: 58px; height: 42px; border: 1px solid var(--line); border-radius: 6px; background: #fff;
              font: 600 15px/1 system-ui, sans-serif; color: var(--fg); cursor: pointer; }
button.cell:disabled { color: #b5bccb; cursor: default; }
button.cell:not(:disabled):hover, button.cell.active { outline: 3px solid var(--accent); }
button.worst { font-size: 12px; color: var(--accent); background: none; border: 1px solid var(--line);
               border-radius: 12px; padding: 2px 10px; cursor: pointer; }
button.worst:hover, button.worst.active { background: var(--accent); color: #fff; }
.dot { display:inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 6px; }
.panel { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; margin-top: 16px; background: var(--bg); }
.panel-head { display:flex; justify-content: space-between; align-items: center; }
.panel-head h3 { margin: 0 0 10px; color: var(--fg); }
.panel-head button { background:none; border: 1px solid var(--line); border-radius: 6px; cursor:pointer; }
.grid.small { grid-template-columns: repeat(auto-fill, minmax(130px, 1fr)); gap: 10px; }
.grid.small .card .img { height: 100px; }
.grid.small .card img { max-height: 100px; }
.legend { display:flex; flex-wrap: wrap; gap: 6px 16px; font-size: 13px; margin: 6px 0 10px; }
.ring-key { display:inline-block; width: 12px; height: 12px; border-radius: 50%; border: 2px solid var(--bad);
            margin-right: 6px; vertical-align: middle; }
.map-wrap { position: relative; display: inline-block; max-width: 100%; }
svg#embedding-map { background: #fff; max-width: 100%; height: auto; }
svg#embedding-map .frame { fill: none; stroke: var(--line); }
svg#embedding-map .pt { stroke: #fff; stroke-width: 0.8; cursor: pointer; }
svg#embedding-map .pt:hover { stroke: var(--fg); stroke-width: 2; }
svg#embedding-map .ring { fill: none; stroke: var(--bad); stroke-width: 1.6; pointer-events: none; }
.tip { position: absolute; z-index: 5; background: #fff; border: 1px solid var(--line); border-radius: 8px;
       box-shadow: 0 4px 16px rgba(0,0,0,.15); padding: 6px; font-size: 12px; pointer-events: none; width: 150px; }
.tip img { display:block; max-width: 138px; max-height: 110px; margin: 0 auto 4px; }
.pairs { display:grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 12px; }
.pair { border: 1px solid var(--line); border-radius: 8px; padding: 8px; background: #fff; font-size: 12px; }
.pair .two-img { display:flex; gap: 6px; }
.pair .two-img div { flex: 1; text-align: center; background: #eef0f5; border-radius: 4px; }
.pair img { max-width: 100%; max-height: 110px; }
"""

# No line comments in this script: the report's self-containment test reads "//x" as a URL.
JS = """
(function () {
  var el = document.getElementById("ursa-data");
  if (!el) { return; }
  var data = JSON.parse(el.textContent);
  var items = data.items, classes = data.classes;
  var panel = document.getElementById("explore-panel");
  var grid = document.getElementById("explore-grid");
  var title = document.getElementById("explore-title");
  function card(it) {
    var c = document.createElement("div");
    var right = it.t === it.p;
    c.className = right ? "card" : "card miss";
    var box = document.createElement("div");
    box.className = "img";
    if (it.th) {
      var img = document.createElement("img");
      img.alt = it.f;
      img.src = "data:image/jpeg;base64," + it.th;
      box.appendChild(img);
    } else {
      box.textContent = "no thumbnail";
    }
    c.appendChild(box);
    var txt = document.createElement("div");
    txt.className = "txt";
    var p = document.createElement("div");
    p.className = "pred " + (right ? "right" : "wrong");
    p.textContent = classes[it.p] + " " + it.pp.toFixed(2) + (right ? "" : " (actually " + classes[it.t] + " " + it.pt.toFixed(2) + ")");
    var n = document.createElement("div");
    n.className = "nums";
    n.textContent = "loss " + it.l.toFixed(2);
    var f = document.createElement("div");
    f.className = "file";
    f.title = it.f;
    f.textContent = it.f;
    txt.appendChild(p); txt.appendChild(n); txt.appendChild(f);
    c.appendChild(txt);
    return c;
  }
  function show(text, list) {
    title.textContent = text;
    grid.replaceChildren();
    list.forEach(function (it) { grid.appendChild(card(it)); });
    panel.hidden = false;
    panel.scrollIntoView({block: "nearest"});
  }
  function clearActive() {
    document.querySelectorAll("button.active").forEach(function (b) { b.classList.remove("active"); });
  }
  function byLoss(a, b) { return b.l - a.l; }
  document.querySelectorAll("button.cell").forEach(function (b) {
    b.addEventListener("click", function () {
      var a = +b.dataset.a, p = +b.dataset.p;
      var list = items.filter(function (it) { return it.t === a && it.p === p; }).sort(byLoss);
      clearActive(); b.classList.add("active");
      show(list.length + " image(s) of " + classes[a] + " predicted as " + classes[p], list);
    });
  });
  document.querySelectorAll("button.worst").forEach(function (b) {
    b.addEventListener("click", function () {
      var c = +b.dataset.c;
      var list = items.filter(function (it) { return it.t === c; }).sort(byLoss).slice(0, 12);
      clearActive(); b.classList.add("active");
      show("Worst images of " + classes[c] + " (highest loss first)", list);
    });
  });
  document.getElementById("explore-close").addEventListener("click", function () {
    panel.hidden = true; clearActive();
  });
  var map = document.getElementById("embedding-map");
  var tip = document.getElementById("map-tip");
  if (map && tip) {
    map.addEventListener("mouseover", function (ev) {
      var t = ev.target;
      if (!t.classList || !t.classList.contains("pt")) { return; }
      var it = items[+t.dataset.i];
      tip.replaceChildren();
      if (it.th) {
        var img = document.createElement("img");
        img.alt = it.f;
        img.src = "data:image/jpeg;base64," + it.th;
        tip.appendChild(img);
      }
      var s = document.createElement("div");
      s.textContent = classes[it.t] + (it.t === it.p ? "" : " predicted as " + classes[it.p]) + " (" + it.pp.toFixed(2) + ")";
      var f = document.createElement("div");
      f.className = "file";
      f.textContent = it.f;
      tip.appendChild(s); tip.appendChild(f);
      var box = map.getBoundingClientRect(), wrap = map.parentNode.getBoundingClientRect();
      var x = ev.clientX - wrap.left + 12, y = ev.clientY - wrap.top + 12;
      if (x + 160 > box.right - wrap.left) { x -= 180; }
      if (y + 170 > box.bottom - wrap.top) { y -= 190; }
      tip.style.left = x + "px"; tip.style.top = y + "px";
      tip.hidden = false;
    });
    map.addEventListener("mouseout", function (ev) {
      if (ev.target.classList && ev.target.classList.contains("pt")) { tip.hidden = true; }
    });
    map.addEventListener("click", function (ev) {
      var t = ev.target;
      if (!t.classList || !t.classList.contains("pt")) { return; }
      clearActive();
      show("One image from the map", [items[+t.dataset.i]]);
    });
  }
})();
"""

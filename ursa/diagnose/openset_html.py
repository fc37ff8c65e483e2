"""The report's "Open world" section (``diagnose.openset.open_world_insight``'s figures as HTML)."""

from __future__ import annotations

import html
from typing import Any


def _e(v: object) -> str:
    return html.escape(str(v), quote=True)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def open_world_html(ow: dict[str, Any] | None) -> str:
    """Unknown detection (threshold, share of these images turned away) and prediction sets per class."""
    if not ow:
        return ""
    u = ow.get("unknown") or {}
    parts = ["<section id='open-world'><h2>Open world: \"none of these\" and prediction sets</h2>"]
    if u.get("fitted"):
        parts.append(f"<p>{_e(u.get('line', ''))}. Of these {_e(u.get('n'))} images, {_pct(u.get('turned_away'))} "
                     "score above the threshold and would be answered \"none of these (closest: ...)\"; "
                     "<code>ursa predict --keep</code> and serve's <code>?keep=</code> change the share kept for one call.</p>")
    else:
        parts.append(f"<p>Unknown detection: not available ({_e(u.get('note') or 'not fitted')}).</p>")
    sets = ow.get("sets")
    if sets:
        parts.append(f"<p>Prediction sets at {_pct(sets['level'])} (<code>ursa predict --set {sets['level']:g}</code>): "
                     f"coverage {_pct(sets['coverage'])}, average size {sets['mean_size']:.2f} labels over "
                     f"{sets['n']} images ({_e(sets['how'])}).</p><table><tr><th>class</th><th>images</th>"
                     "<th>coverage</th><th>average set size</th></tr>")
        for c, r in sets["per_class"].items():
            size = "-" if r["mean_size"] is None else f"{r['mean_size']:.2f}"
            parts.append(f"<tr><td>{_e(c)}</td><td>{r['n']}</td><td>{_pct(r['coverage'])}</td><td>{size}</td></tr>")
        parts.append("</table>")
    parts.append("</section>")
    return "".join(parts)

"""Cleaning scored fairly: a retrain on cleaned labels scored on the validation pictures that did not change.

``ursa train DATA --csv cleaned.csv --config RUN`` keeps RUN's validation split, but the cleaner
may have excluded or relabelled validation pictures: 3.19% on 188 pictures against 3.70% on 189
can be the same mistakes over a smaller denominator. This compares the run's validation pictures
with RUN's ``split.csv`` and gives the error on the pictures both runs validate on with the same
label, beside the error on all of this run's (both are printed, saved in recipe.json, shown in
the report), and says what changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ursa.vision.data import read_split


def compare_valid(earlier_split: Path, names: Sequence[str], labels: Sequence[str],
                  correct: Sequence[bool], earlier_wrong: Sequence[str] | None = None) -> dict | None:
    """What changed among the validation pictures since ``earlier_split``, and the error on the unchanged ones.

    ``names``/``labels``/``correct``: this run's validation pictures, their labels and whether the
    kept model gets each right; ``earlier_wrong``: the validation pictures the earlier run's model got
    wrong (its recipe.json ``wrong``), for its error on the same unchanged pictures. None when there
    is no readable earlier split.
    """
    try:
        before = {name: label for name, label, is_valid in read_split(earlier_split) if is_valid}
    except (OSError, ValueError, KeyError):
        return None
    now = dict(zip(names, labels))
    unchanged = [ok for name, label, ok in zip(names, labels, correct) if before.get(name) == label]
    excluded = sorted(set(before) - set(now))
    relabelled = sorted(n for n in now if n in before and before[n] != now[n])
    added = sorted(set(now) - set(before))
    wrong_all = sum(not ok for ok in correct)
    wrong_same = sum(not ok for ok in unchanged)
    same_names = [name for name, label in zip(names, labels) if before.get(name) == label]
    before_wrong = None if earlier_wrong is None else len(set(earlier_wrong) & set(same_names))
    return {
        "earlier": str(earlier_split), "valid_before": len(before), "valid_now": len(now),
        "unchanged": len(unchanged), "excluded": excluded, "relabelled": relabelled, "added": added,
        "changed": bool(excluded or relabelled or added),
        "error_rate": wrong_all / len(now) if now else None, "errors": wrong_all,
        "error_rate_unchanged": wrong_same / len(unchanged) if unchanged else None, "errors_unchanged": wrong_same,
        "earlier_errors_unchanged": before_wrong,
        "earlier_error_rate_unchanged": before_wrong / len(unchanged) if unchanged and before_wrong is not None else None,
    }


def compare_line(c: dict) -> str:
    """One line for the console and the report: what changed and both errors."""
    what = ", ".join(f"{len(c[k])} {k}" for k in ("excluded", "relabelled", "added") if c[k]) or "none changed"
    same = (f"{c['error_rate_unchanged']:.2%} ({c['errors_unchanged']} of {c['unchanged']})"
            if c["error_rate_unchanged"] is not None else "n/a (none unchanged)")
    was = c.get("earlier_error_rate_unchanged")
    then = (f" (the earlier model: {was:.2%}, {c['earlier_errors_unchanged']} of {c['unchanged']})" if was is not None
            else " (compare it with the earlier run's error)")
    return (f"validation pictures against {c['earlier']}: {what}; error on the {c['unchanged']} unchanged pictures "
            f"{same}{then}; on all {c['valid_now']} {c['error_rate']:.2%} ({c['errors']})")


def earlier_wrong(run: Path) -> list[str] | None:
    """The validation pictures an earlier run's model got wrong (its recipe.json ``wrong``); None when not recorded."""
    try:
        wrong = json.loads((run / "recipe.json").read_text(encoding="utf-8")).get("wrong")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(n) for n in wrong] if isinstance(wrong, list) else None

"""fastai's lesson recipe beside ursa's (benchmarks/recipes.py): the anchor's command, its stored results, per set.

The anchor is ../shared/anchors/fastai_lesson2.py run in its own venv (FASTAI_VENV; ../shared/anchors/README.md);
each seed's result is kept as results/fastai/<set>.seed<S>.json and reused, unless it was measured on another
split. Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Callable

from recipes_report import summarize

ANCHOR = Path(__file__).resolve().parents[2] / "shared" / "anchors" / "fastai_lesson2.py"


def fastai_command(venv: Path, set_dir: Path, split: Path, out: Path, seed: int) -> list[str]:
    """One run of fastai's lesson recipe (the anchor) on the same split."""
    return [str(venv / "bin" / "python"), str(ANCHOR), str(set_dir), "--split", str(split), "--out", str(out),
            "--seed", str(seed)]


def read_fastai(path: Path, split_sha: str | None) -> dict | str:
    """An anchor result as {error_rate, wall_s, rss_mb}, or why it is not used (a str)."""
    try:
        d = json.loads(path.read_text())
        if split_sha is not None and (got := d.get("counts", {}).get("split_sha256")) != split_sha:
            return f"{path}: measured on another split (sha256 {str(got)[:12]}...); delete it to measure again"
        return {"error_rate": float(d["final"]["error_rate"]), "wall_s": float(d["stages_s"]["total_s"]),
                "fit_s": float(d["stages_s"].get("fit_frozen_s", 0)) + float(d["stages_s"].get("fit_unfrozen_s", 0)),
                "rss_mb": max(float(d.get("peak_rss_mib") or 0), float(d.get("peak_rss_children_mib") or 0))}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path}: unreadable anchor result ({e}); delete it to measure again"


def fastai_for_set(set_dir: Path, split: Path, results: Path, k: int, venv: Path | None, dry: bool,
                   run_measured: Callable[[list[str], Path], dict]) -> tuple[dict | None, str, list]:
    """fastai's summary on one set (reused JSONs, measured when FASTAI_VENV is set), a note, its per-seed figures."""
    got, notes = [], []
    sha = hashlib.sha256(split.read_bytes()).hexdigest() if split.is_file() else None  # the anchor records it
    for seed in range(k):
        out = results / "fastai" / f"{set_dir.name}.seed{seed}.json"
        if not out.is_file() and venv is not None:
            cmd = fastai_command(venv, set_dir, split, out, seed)
            print(("  " if dry else f"  {set_dir.name} fastai seed {seed}: ") + " ".join(cmd), flush=True)
            if dry:
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="ursa_recipes_fastai_") as tmp:
                r = run_measured(cmd, Path(tmp))
            if r["rc"] != 0:
                notes.append(f"seed {seed} failed (exit {r['rc']}): " + (r["stderr"].strip().splitlines() or ["no output"])[-1])
                continue
        if out.is_file():
            f = read_fastai(out, sha)
            if isinstance(f, str):
                print(f"  warning: {f}", flush=True)
                notes.append(f)
            else:
                got.append({"seed": seed, **f})
    if not got:
        why = notes[-1] if notes else "set FASTAI_VENV" if venv is None else "dry run: the command(s) above" if dry and k else ""
        return None, f"not measured ({why})" if why else "not measured", notes
    return summarize(got), "", got

"""Issue 15: which training recipe to default to, on four kinds of data, against fastai's lesson recipe.

One `ursa train` process per set x recipe x seed, all on one committed split: frozen (cached frozen
stage only, 224 px: ursa before issue 15), lesson (4 frozen + 2 unfrozen epochs, 224 px), default
(the data-aware recipe, default --budget), double (twice that budget). One table, set x recipe (+
fastai's row): error mean ± sd and each seed's error, wall s (the whole command, as a user waits),
peak RSS (the child's own, wait4); then issue 15's aims for the default, each held or missed; all
of it also in benchmarks/results/recipes.json. About an hour: run it on an idle machine.

    .venv/bin/python benchmarks/recipes.py [--sets bears,eurosat_dev,mnist_dev,cub_grebes] [--seeds 3]
    .venv/bin/python benchmarks/recipes.py --sets mnist_dev --seeds 1 --recipes frozen     # smoke check, ~1 min
    FASTAI_VENV=... .venv/bin/python benchmarks/recipes.py --fastai-seeds 1    # also measure fastai (~5 min a run)

Each set's split (sorted image files, random.Random(42), 20% valid) is made once, as results/splits/
<set>.csv (path,label,is_valid: the anchor's) and <set>.ursa.csv (name,label,is_valid: --csv), and
only read after that. fastai's figures: ../shared/anchors/fastai_lesson2.py (its README makes
FASTAI_VENV) on that split, kept in results/fastai/<set>.seed<S>.json and reused. Stdlib only here.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results"
ANCHOR = ROOT.parent / "shared" / "anchors" / "fastai_lesson2.py"
SETS = ("bears", "eurosat_dev", "mnist_dev", "cub_grebes")
SPLIT_SEED, VALID_PCT = 42, 0.2
IMG_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}  # the anchor's list

RECIPES = {
    "frozen": ("cached frozen stage only, 224 px (ursa before issue 15)", ["--size", "224", "--unfreeze-epochs", "0"]),
    "lesson": ("the lesson: 4 frozen + 2 unfrozen epochs, 224 px", ["--size", "224", "--unfreeze-epochs", "2"]),
    "default": ("the new data-aware default (default --budget)", []),
    "double": ("the default with twice the budget", None),  # --budget 2*B, B read from TrainConfig
}
ERROR_LINE = re.compile(r"^error_rate\s+([0-9.eE+-]+)\s+\(accuracy", re.M)
BUDGET_PROBE = (
    "import json\nfrom dataclasses import MISSING, fields\nfrom ursa.training.config import TrainConfig\n"
    "f = {x.name: x for x in fields(TrainConfig)}.get('budget')\n"
    "print(json.dumps({'has': f is not None, 'default': None if f is None or f.default is MISSING else f.default}))\n"
)


class InputError(Exception):
    """Bad input or usage: one line on stderr, exit 2."""


def write_atomic(path: Path, text: str) -> None:
    """Write text so a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def csv_text(header: list[str], rows: list[tuple[str, str, bool]]) -> str:
    """CSV of (path, label, is_valid) rows, is_valid as True/False (what pandas writes and both readers take)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *((p, label, str(v)) for p, label, v in rows)])
    return buf.getvalue()


def make_split(set_dir: Path) -> list[tuple[str, str, bool]]:
    """The one split of a set: sorted image files (relative path, class folder), 20% valid by random.Random(42)."""
    rows = []
    for c in sorted(d.name for d in set_dir.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))):
        for f in sorted((set_dir / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMG_EXTS and not f.name.startswith("."):
                rows.append((f.relative_to(set_dir).as_posix(), c))
    rows.sort()
    if not rows:
        raise InputError(f"{set_dir}: no images in class folders; expected {set_dir}/<class>/<image>")
    order = list(range(len(rows)))
    random.Random(SPLIT_SEED).shuffle(order)
    valid = set(order[: int(round(VALID_PCT * len(rows)))])
    return [(p, c, i in valid) for i, (p, c) in enumerate(rows)]


def read_split(path: Path, cols: tuple[str, str, str]) -> list[tuple[str, str, bool]]:
    """A split file back as (path, label, is_valid) rows."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not set(cols) <= set(reader.fieldnames):
            raise InputError(f"{path}: expected columns {','.join(cols)}; delete it to make it again")
        return [(r[cols[0]], r[cols[1]], r[cols[2]].strip().lower() in ("true", "1", "yes")) for r in reader]


def split_paths(results: Path, name: str) -> tuple[Path, Path]:
    """(anchor's path,label,is_valid file, ursa's name,label,is_valid file) of a set."""
    return results / "splits" / f"{name}.csv", results / "splits" / f"{name}.ursa.csv"


def ensure_split(set_dir: Path, results: Path, write: bool = True) -> list[tuple[str, str, bool]]:
    """Read the set's two split files, or make them once; refuse two files that disagree."""
    anchor_csv, ursa_csv = split_paths(results, set_dir.name)
    rows = read_split(anchor_csv, ("path", "label", "is_valid")) if anchor_csv.is_file() else make_split(set_dir)
    if ursa_csv.is_file() and read_split(ursa_csv, ("name", "label", "is_valid")) != rows:
        raise InputError(f"{ursa_csv} and {anchor_csv} assign different images; delete both to make them again")
    for path, first in ((anchor_csv, "path"), (ursa_csv, "name")):
        if write and not path.is_file():
            write_atomic(path, csv_text([first, "label", "is_valid"], rows))
    return rows


def read_default_budget() -> tuple[bool, float | None]:
    """(TrainConfig has a budget field, its default in seconds), from a tiny subprocess (the parent stays stdlib-only)."""
    out = subprocess.run([sys.executable, "-c", BUDGET_PROBE], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"cannot read TrainConfig from {ROOT}/ursa ({tail}); run from a working checkout")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return bool(got["has"]), got["default"]


def recipe_flags(recipe: str, has_budget: bool, budget: float | None) -> list[str] | str:
    """The recipe's `ursa train` flags, or why it is skipped (a str)."""
    if recipe in ("default", "double") and not has_budget:
        return "skipped: TrainConfig has no `budget` field yet (the data-aware default is not in this checkout)"
    if recipe == "double":
        if not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget <= 0:
            return f"skipped: the default budget is {budget!r}, not a number of seconds to double"
        b = 2 * budget
        return ["--budget", str(int(b)) if float(b).is_integer() else repr(float(b))]
    return list(RECIPES[recipe][1])


def ursa_command(data: Path, split: Path, out: Path, seed: int, flags: list[str]) -> list[str]:
    """One `ursa train` run of a recipe, as a user would type it."""
    return [sys.executable, "-m", "ursa", "train", str(data), "--csv", str(split), "--out", str(out),
            "--seed", str(seed), "--quiet", *flags]


def run_measured(cmd: list[str], log_dir: Path) -> dict:
    """Run cmd; wall seconds around it and the child's own peak RSS (wait4, not RUSAGE_CHILDREN)."""
    with open(log_dir / "stdout.txt", "w+b") as so, open(log_dir / "stderr.txt", "w+b") as se:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=so, stderr=se, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        so.seek(0), se.seek(0)
        return {"rc": p.returncode, "wall_s": wall, "rss_mb": usage.ru_maxrss / 1024,
                "stdout": so.read().decode(errors="replace"), "stderr": se.read().decode(errors="replace")}


def parse_error_rate(stdout: str, run_dir: Path) -> float | None:
    """The final error rate: the `error_rate X (accuracy ...)` line, else report.json's."""
    if m := ERROR_LINE.search(stdout):
        return float(m.group(1))
    try:
        return float(json.loads((run_dir / "report.json").read_text())["error_rate"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_ursa(set_dir: Path, split: Path, recipe: str, seed: int, flags: list[str]) -> dict:
    """One recipe on one set with one seed, in its own process and temp run folder (removed after)."""
    with tempfile.TemporaryDirectory(prefix=f"ursa_recipes_{set_dir.name}_{recipe}_{seed}_") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = ursa_command(set_dir, split, run_dir, seed, flags)
        r = run_measured(cmd, Path(tmp))
        rec = {"set": set_dir.name, "recipe": recipe, "seed": seed, "command": " ".join(cmd), "rc": r["rc"],
               "wall_s": r["wall_s"], "rss_mb": r["rss_mb"],
               "error_rate": parse_error_rate(r["stdout"], run_dir) if r["rc"] == 0 else None}
        if (run_dir / "recipe.json").is_file():  # what the default recipe decided, and why
            try:
                rec["recipe_json"] = json.loads((run_dir / "recipe.json").read_text())
            except ValueError as e:
                rec["recipe_json"] = {"unreadable": str(e)}
        if recipe == "default" and r["rc"] == 0 and (run_dir / "model.safetensors").is_file():
            rec["tta"] = tta_errors(run_dir / "model.safetensors", set_dir, Path(tmp))
        if rec["error_rate"] is None:
            rec["failure"] = (r["stderr"].strip().splitlines() or r["stdout"].strip().splitlines() or ["no output"])[-1]
        return rec


def tta_errors(model: Path, set_dir: Path, tmp: Path) -> dict:
    """The model's validation error from `ursa interpret` without and with --tta (the test-time augmentation question)."""
    out = {}
    for key, flag in (("plain", "--no-tta"), ("tta", "--tta")):
        cmd = [sys.executable, "-m", "ursa", "interpret", str(model), str(set_dir), "--out", str(tmp / f"interp_{key}"),
               "--json", "-q", flag]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        try:
            out[key] = float(json.loads(p.stdout)["error_rate"])
        except (ValueError, KeyError, TypeError):
            out[key] = None
    return out


def print_tta(sets: list[str], records: list[dict]) -> None:
    """Per set: the default recipe's models, validation error without and with --tta (mean over seeds)."""
    print("\ntest-time augmentation (`ursa interpret --tta`) on the default recipe's models:")
    for s in sets:
        pairs = [r["tta"] for r in records if r["set"] == s and r.get("tta") and None not in r["tta"].values()]
        if pairs:
            plain = statistics.mean(t["plain"] for t in pairs)
            tta = statistics.mean(t["tta"] for t in pairs)
            print(f"  {s:<12} without {plain:.4f}, with --tta {tta:.4f} ({len(pairs)} model(s); "
                  + ", ".join(f"{t['plain']:.4f}->{t['tta']:.4f}" for t in pairs) + ")")


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


def summarize(records: list[dict]) -> dict:
    """n, error mean ± sd (0 with one seed), each seed's error, wall mean, peak RSS max over the good runs."""
    ok = [r for r in records if r.get("error_rate") is not None]
    errs = [r["error_rate"] for r in ok]
    return {"n": len(ok), "failed": len(records) - len(ok),
            "err_mean": statistics.mean(errs) if errs else None,
            "err_sd": statistics.stdev(errs) if len(errs) > 1 else (0.0 if errs else None),
            "errs": errs, "wall_mean": statistics.mean(r["wall_s"] for r in ok) if ok else None,
            "rss_max": max(r["rss_mb"] for r in ok) if ok else None}


def _aim(name: str, value: str, aim: str, ok: bool | None) -> dict:
    return {"aim": name, "value": value, "target": aim, "verdict": "not measured" if ok is None else ("held" if ok else "missed")}


def evaluate_aims(set_name: str, default: dict | None, frozen: dict | None, fastai: dict | None) -> list[dict]:
    """Issue 15's aims for the default recipe on one set (summaries as from `summarize`), each held/missed/not measured."""
    err, wall = (default or {}).get("err_mean"), (default or {}).get("wall_mean")
    f_err, f_wall, fr_err = (fastai or {}).get("err_mean"), (fastai or {}).get("wall_mean"), (frozen or {}).get("err_mean")
    e_f, e_fr = err is not None and f_err is not None, err is not None and fr_err is not None
    w_f = wall is not None and f_wall is not None
    wall_ratio = f"{wall / f_wall:.2f}" if w_f and f_wall else "-"
    aims = [_aim("error / fastai error", (f"{err / f_err:.2f}" if f_err else f"{err:.4f} vs 0") if e_f else "-",
                 "<= 0.5", err <= 0.5 * f_err if e_f else None),
            _aim("error vs frozen", f"{err:.4f} vs {fr_err:.4f}" if e_fr else "-", "<= frozen", err <= fr_err if e_fr else None),
            _aim("wall / fastai wall", wall_ratio, "<= 1", wall <= f_wall if w_f else None)]
    if set_name == "bears":
        aims += [_aim("error", f"{err:.4f}" if err is not None else "-", "<= 0.03", err <= 0.03 if err is not None else None),
                 _aim("wall / fastai wall", wall_ratio, "<= 0.2", wall <= f_wall / 5 if w_f else None)]
    return aims


def condense(recipe_json: object, width: int = 150) -> str:
    """One line of what the default recipe decided (recipe.json's scalar fields first)."""
    if not isinstance(recipe_json, dict):
        return json.dumps(recipe_json)[:width]
    scalar = {k: not isinstance(v, (dict, list)) for k, v in recipe_json.items()}
    line = ", ".join([f"{k}={v}" for k, v in recipe_json.items() if scalar[k]]
                     + [f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in recipe_json.items() if not scalar[k]])
    return line if len(line) <= width else line[: width - 3] + "..."


def fmt(v: float | None, spec: str) -> str:
    """A figure, or '-' when there is none."""
    return "-" if v is None else format(v, spec)


def print_table(sets: list[str], recipes: list[str], summaries: dict, fastai: dict, fastai_notes: dict) -> None:
    """The one table: set x recipe (+ fastai's row per set)."""
    print(f"\n{'set':<12} {'recipe':<8} {'n':>2} {'error mean ± sd':>17}  {'wall s':>7} {'peak RSS MB':>11}  per seed")
    for s in sets:
        rows = [(r, summaries[s].get(r)) for r in recipes] + [("fastai", fastai.get(s))]
        for name, sm in rows:
            if sm is None:
                why = fastai_notes.get(s, "not measured") if name == "fastai" else "skipped"
                print(f"{s:<12} {name:<8} {'-':>2} {why}")
                continue
            err = f"{fmt(sm['err_mean'], '.4f')} ± {fmt(sm['err_sd'], '.4f')}"
            extra = f" ({sm['failed']} failed)" if sm.get("failed") else ""
            print(f"{s:<12} {name:<8} {sm['n']:>2} {err:>17}  {fmt(sm['wall_mean'], '.1f'):>7} {fmt(sm['rss_max'], '.0f'):>11}  "
                  + ", ".join(f"{e:.4f}" for e in sm["errs"]) + extra)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated set folders under --root")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder holding the sets")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 per recipe")
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    ap.add_argument("--fastai-seeds", type=int, default=1, help="fastai anchor seeds 0..K-1 (needs FASTAI_VENV unless measured)")
    ap.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    ap.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[list[str], list[str], Path | None]:
    """Sets, recipes and the fastai venv, or InputError naming what is wrong."""
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    bad = [r for r in recipes if r not in RECIPES]
    if bad or not recipes:
        raise InputError(f"--recipes: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(RECIPES)}")
    if args.seeds < 1 or args.fastai_seeds < 0:
        raise InputError(f"--seeds must be >= 1 and --fastai-seeds >= 0, got {args.seeds} and {args.fastai_seeds}")
    for s in sets:
        if not (args.root / s).is_dir():
            raise InputError(f"set folder {args.root / s} not found; give --root (default ../shared/datasets) or --sets")
    venv = Path(os.environ["FASTAI_VENV"]) if os.environ.get("FASTAI_VENV") else None
    if venv is not None and not args.dry_run and not (venv / "bin" / "python").is_file():
        raise InputError(f"FASTAI_VENV={venv}: no bin/python there; make it as ../shared/anchors/README.md says")
    return sets, recipes, venv


def fastai_for_set(set_dir: Path, split: Path, results: Path, k: int, venv: Path | None, dry: bool) -> tuple[dict | None, str, list]:
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


def main(argv: list[str] | None = None) -> int:
    """Run (or with --dry-run print) every set x recipe x seed and the fastai anchor; 0 ok, 1 a run failed, 2 bad input."""
    args = parse_args(argv)
    try:  # every input checked (and every split made) before the first hour-long run
        sets, recipes, venv = check_args(args)
        has_budget, budget = read_default_budget() if {"default", "double"} & set(recipes) else (True, None)
        splits = {s: ensure_split(args.root / s, args.results, write=not args.dry_run) for s in sets}
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    flags = {r: recipe_flags(r, has_budget, budget) for r in recipes}
    for r, f in flags.items():
        if isinstance(f, str):
            print(f"{r}: {f}", flush=True)
    summaries, records = {}, []
    fastai, fastai_notes, fastai_runs = {}, {}, {}
    report = {"machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
              "budget_default_s": budget, "sets": sets, "recipes": {r: RECIPES[r][0] for r in recipes},
              "flags": flags, "seeds": args.seeds}
    for s in sets:
        set_dir = args.root / s
        anchor_csv, ursa_csv = split_paths(args.results, s)
        print(f"{s}: {len(splits[s])} images, {sum(v for _, _, v in splits[s])} valid; split {ursa_csv}"
              + ("" if ursa_csv.is_file() else " (made on a real run)"), flush=True)
        summaries[s] = {}
        for r in recipes:
            if isinstance(flags[r], str):
                continue
            recs = []
            for seed in range(args.seeds):
                if args.dry_run:
                    print("  " + " ".join(ursa_command(set_dir, ursa_csv, Path(f"$TMPRUN_{s}_{r}_{seed}"), seed, flags[r])))
                    continue
                rec = run_ursa(set_dir, ursa_csv, r, seed, flags[r])
                recs.append(rec)
                what = (f"error_rate {rec['error_rate']:.4f}" if rec["error_rate"] is not None
                        else f"FAILED (exit {rec['rc']}): {rec.get('failure', '')}")
                print(f"  {s} {r} seed {seed}: {rec['wall_s']:.1f} s, {what}, peak RSS {rec['rss_mb']:.0f} MB", flush=True)
            records += recs
            if recs:
                summaries[s][r] = summarize(recs)
        sm, fastai_notes[s], fastai_runs[s] = fastai_for_set(set_dir, anchor_csv, args.results, args.fastai_seeds,
                                                              venv, args.dry_run)
        if sm is not None:
            fastai[s] = sm
        if args.dry_run:
            print("  fastai: " + (fastai_notes[s] or f"{len(fastai_runs[s])} measured seed(s) reused"))
        else:
            write_report(args.results, report, records, summaries, fastai, fastai_runs, sets, recipes)
    if args.dry_run:
        return 0
    print_table(sets, recipes, summaries, fastai, fastai_notes)
    aims = write_report(args.results, report, records, summaries, fastai, fastai_runs, sets, recipes)
    print_aims(sets, aims, records)
    print_tta(sets, records)
    print(f"\nwritten: {args.results / 'recipes.json'}")
    return 1 if any(r["error_rate"] is None for r in records) else 0


def write_report(results: Path, report: dict, records: list[dict], summaries: dict, fastai: dict,
                 fastai_runs: dict, sets: list[str], recipes: list[str]) -> dict:
    """recipes.json (atomic, rewritten after every set so an interrupted run keeps what it measured); the aims."""
    aims = {s: evaluate_aims(s, summaries.get(s, {}).get("default"), summaries.get(s, {}).get("frozen"), fastai.get(s))
            for s in sets if "default" in recipes and s in summaries}
    data = {**report, "runs": records, "summaries": summaries, "fastai": fastai, "fastai_runs": fastai_runs, "aims": aims}
    write_atomic(results / "recipes.json", json.dumps(data, indent=1, default=str) + "\n")
    return aims


def print_aims(sets: list[str], aims: dict, records: list[dict]) -> None:
    """Per set: what the default recipe decided (recipe.json) and each of issue 15's aims, held or missed."""
    for s in (s for s in sets if s in aims):
        print(f"\naims for the default recipe on {s}:")
        decided = [r["recipe_json"] for r in records if r["set"] == s and r["recipe"] == "default" and "recipe_json" in r]
        if decided:
            same = all(d == decided[0] for d in decided)
            print(f"  decided (seed 0{'' if same else '; differs by seed'}): {condense(decided[0])}")
        for a in aims[s]:
            print(f"  {a['aim']:<20} {a['value']:>17}  aim {a['target']:<10} {a['verdict']}")


if __name__ == "__main__":
    sys.exit(main())

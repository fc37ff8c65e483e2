"""Issues 15 and 28: the default training recipe on eight or more kinds of data, honestly, against fastai's lesson.

Sets: the four in ../shared/datasets when present, plus the held-out sets in benchmarks/datasets/ (its
README: sources, licences; build.py rebuilds them). Each set is split once 80/20 (sorted image files,
random.Random(42)): the 20% are test images that ursa never sees. ursa trains on the 80% (its own inner
validation split, --split-seed 42, is where it chooses epochs and thresholds), then `ursa predict` gives
the kept model's error on the test images: the held-out error, the figure every table and aim uses.
The error ursa itself reports (on the images it chose on) is shown beside it as "reported".
fastai's lesson recipe (../shared/anchors/fastai_lesson2.py) trains on the same 80% and is scored on
the same 20% (it chooses nothing, so its final error is already held-out).

Recipes, one `ursa train` process per set x recipe x seed: default (the data-aware recipe), lrfind
(`ursa lr-find`'s suggestion as --lr), and fixed alternatives to each rule of the default (no_finetune,
double budget, budget120 (photos' 120 s on every set), size64/size128/size224, flips_none/horizontal/all), and
optimistic (ursa given the 80/20 split itself, so it chooses its epoch on the test images: issue 15's figure, to show what honesty costs);
frozen and lesson (issue 15) on request.
An alternative that repeats what the default decided on a set (same --size, --flips or --budget) is not run
again: the default's runs stand for it. Then per set a table, the aims held or missed, and each rule checked leave-one-set-out (benchmarks/rules.py): all in benchmarks/results/recipes.json.

    .venv/bin/python benchmarks/recipes.py                       # every set at hand, 3 seeds: hours, idle machine only
    .venv/bin/python benchmarks/recipes.py --sets uci_digits,cc0_textures --seeds 1 --recipes default,lrfind,no_finetune
    FASTAI_VENV=... .venv/bin/python benchmarks/recipes.py --fastai-seeds 1    # also measure fastai (~5 min a run)

Split files: results/splits/<set>.csv (path,label,is_valid: the anchor's), <set>.ursa.csv (name,label,
is_valid) and <set>.train.csv (name,label: the 80% ursa trains on), made once and only read after that.
fastai's figures are kept in results/fastai/<set>.seed<S>.json and reused. Stdlib only here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes_report import (  # noqa: E402 - the benchmarks share their plumbing (stdlib only)
    aims_lines, evaluate_aims, fmt, summarize, table_lines, tta_lines, usable_idle)
from fastai_anchor import fastai_for_set  # noqa: E402
from rules import FITTED_ON, check_all, format_checks  # noqa: E402
from run_store import RunStore, commit_of, read_timing, run_key  # noqa: E402
from splits import (  # noqa: E402, F401 - scale.py and the tests take InputError, write_atomic, the split helpers from here
    IMG_EXTS, SETS, SPLIT_SEED, VALID_PCT, InputError, csv_text, ensure_split, find_sets, make_split, read_split,
    split_paths, train_split_path, write_atomic)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ROOT / "benchmarks" / "datasets"

LRFIND = "lr-find"  # flags computed per run: `ursa lr-find`'s suggestion as --lr
RECIPES = {
    "default": ("the data-aware default (default --budget)", []),
    "lrfind": ("the default with lr-find's suggestion as --lr", LRFIND),
    "no_finetune": ("the default without fine-tuning", ["--unfreeze-epochs", "0"]),
    "double": ("the default with twice the budget", None),  # --budget 2*B, B: config.DEFAULT_BUDGET (photos' default)
    "budget120": ("the default budget of photos (120 s: up to 12 fine-tuning epochs) on every set", ["--budget", "120"]),
    "size64": ("the default at 64 px (the size rule before issue 28's change)", ["--size", "64"]),
    "size128": ("the default at 128 px", ["--size", "128"]),
    "size224": ("the default at 224 px", ["--size", "224"]),
    "valid10": ("the default with 10% of its images for validation, not 20% (more to train on)", ["--valid-pct", "0.1"]),
    "refit": ("the default, then trained again on all its images with the same decisions (--refit)", ["--refit"]),
    "last": ("the default keeping its last epoch, not its best on the validation images", ["--epoch-kept", "last"]),
    "last_refit": ("the default keeping its last epoch, then --refit: the whole schedule again on all its images",
                   ["--epoch-kept", "last", "--refit"]),
    "flips_none": ("the default without flips", ["--flips", "none"]),
    "flips_horizontal": ("the default with horizontal flips", ["--flips", "horizontal"]),
    "flips_all": ("the default with all flips and quarter turns", ["--flips", "all"]),
    "optimistic": ("the default on all 80%, scored on the test images it chose its epoch on (issue 15's way)", []),
    "frozen": ("cached frozen stage only, 224 px (ursa before issue 15)", ["--size", "224", "--unfreeze-epochs", "0"]),
    "lesson": ("the lesson: 4 frozen + 2 unfrozen epochs, 224 px", ["--size", "224", "--unfreeze-epochs", "2"]),
}
DEFAULT_RECIPES = ("default", "lrfind", "no_finetune", "budget120", "double", "size64", "size128", "size224", "flips_none",
                   "flips_horizontal", "flips_all", "optimistic")
CHOOSES_ON_TEST = {"optimistic"}  # given <set>.ursa.csv: the test images are ursa's validation images
BUDGET_ARMS = ("double", "budget120")  # the default's recipe with only --budget changed: reused where it decided that budget
SAME_AS_DEFAULT = {"size64": ("size", 64), "size128": ("size", 128), "size224": ("size", 224),
                   "flips_none": ("flips", "none"), "flips_horizontal": ("flips", "horizontal"), "flips_all": ("flips", "all")}
ERROR_LINE = re.compile(r"^error_rate\s+([0-9.eE+-]+)\s+\(accuracy", re.M)
BUDGET_PROBE = (
    "import json\nfrom dataclasses import MISSING, fields\nfrom ursa.training import config\n"
    "f = {x.name: x for x in fields(config.TrainConfig)}.get('budget')\n"
    "d = None if f is None or f.default is MISSING else f.default\n"
    "d = getattr(config, 'DEFAULT_BUDGET', None) if f is not None and d is None else d  # None: the recipe decides\n"
    "print(json.dumps({'has': f is not None, 'default': d}))\n"
)


def read_default_budget() -> tuple[bool, float | None]:
    """(TrainConfig has a budget field, its default in seconds), from a tiny subprocess (the parent stays stdlib-only)."""
    out = subprocess.run([sys.executable, "-c", BUDGET_PROBE], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"cannot read TrainConfig from {ROOT}/ursa ({tail}); run from a working checkout")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return bool(got["has"]), got["default"]


def recipe_flags(recipe: str, has_budget: bool, budget: float | None) -> list[str] | str:
    """The recipe's `ursa train` flags (LRFIND: made per run), or why it is skipped (a str)."""
    if recipe == "double" and not has_budget:
        return "skipped: TrainConfig has no `budget` field (nothing to double)"
    if recipe == "double":
        if not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget <= 0:
            return f"skipped: the default budget is {budget!r}, not a number of seconds to double"
        b = 2 * budget
        return ["--budget", str(int(b)) if float(b).is_integer() else repr(float(b))]
    flags = RECIPES[recipe][1]
    return flags if flags == LRFIND else list(flags)


def ursa_command(data: Path, split: Path, out: Path, seed: int, flags: list[str]) -> list[str]:
    """One `ursa train` run of a recipe, as a user would type it (inner validation split: seed 42 for every seed)."""
    return [sys.executable, "-m", "ursa", "train", str(data), "--csv", str(split), "--out", str(out),
            "--seed", str(seed), "--split-seed", str(SPLIT_SEED), "--quiet", *flags]


def lr_find_command(data: Path, split: Path, out: Path, seed: int) -> list[str]:
    """`ursa lr-find` on the same training images, as a user would run it before training."""
    return [sys.executable, "-m", "ursa", "lr-find", str(data), "--csv", str(split), "--out", str(out),
            "--seed", str(seed), "--json", "--quiet"]


def predict_command(model: Path, files: list[Path]) -> list[str]:
    """`ursa predict` of the test images: one JSON line per image, no 'unsure' (its best guess counts)."""
    return [sys.executable, "-m", "ursa", "predict", str(model), *map(str, files), "--json", "--unsure", "0", "--no-tta"]


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
    """The error rate ursa reports: the `error_rate X (accuracy ...)` line, else report.json's."""
    if m := ERROR_LINE.search(stdout):
        return float(m.group(1))
    try:
        return float(json.loads((run_dir / "report.json").read_text())["error_rate"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def last_line(r: dict) -> str:
    return (r["stderr"].strip().splitlines() or r["stdout"].strip().splitlines() or ["no output"])[-1]


def held_out_error(model: Path, set_dir: Path, test: list[tuple[str, str, bool]], tmp: Path) -> tuple[float | None, str]:
    """The kept model's error on the test images (an image it could not read counts as wrong), or None and why."""
    files = [set_dir / p for p, _, _ in test]
    r = run_measured(predict_command(model, files), tmp)
    truth = {str(f): c for f, (_, c, _) in zip(files, test)}
    wrong, seen = 0, set()
    for line in r["stdout"].splitlines():
        try:
            d = json.loads(line)
            f, label = d["file"], d["label"]
        except (ValueError, KeyError, TypeError):
            continue
        if f in truth and f not in seen:
            seen.add(f)
            wrong += label != truth[f]
    if not seen:
        return None, f"ursa predict gave no answers (exit {r['rc']}): {last_line(r)}"
    return (wrong + len(truth) - len(seen)) / len(truth), ""


def suggested_lr(set_dir: Path, split: Path, seed: int, tmp: Path) -> tuple[float | None, float, str]:
    """lr-find's one suggestion (None and why when it gave none) and the seconds it took."""
    r = run_measured(lr_find_command(set_dir, split, tmp / "lr_find", seed), tmp)
    try:
        sugg = float(json.loads(r["stdout"].strip().splitlines()[-1])["suggestion"])
        return sugg, r["wall_s"], ""
    except (ValueError, KeyError, TypeError, IndexError):
        return None, r["wall_s"], f"lr-find gave no suggestion (exit {r['rc']}): {last_line(r)}"


def default_lr() -> float:
    """The learning rate `ursa train` uses when --lr is not given (TrainConfig's default)."""
    import dataclasses

    from ursa.training.config import TrainConfig

    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "lr")


def run_ursa(set_dir: Path, split: Path, recipe: str, seed: int, flags: list[str] | str,
             test: list[tuple[str, str, bool]], extra: tuple[str, ...] = (), tta: bool = True,
             default_recs: list[dict] = ()) -> dict:
    """One recipe on one set with one seed, in its own process and temp run folder (removed after).

    lr-find's suggestion that is the default learning rate trains the default's model bit for bit (the recipe is
    deterministic: tests/test_defaults.py; uci_digits and captcha_glyphs were checked both ways), so the default's
    run of that seed stands for it, with lr-find's seconds added."""
    with tempfile.TemporaryDirectory(prefix=f"ursa_recipes_{set_dir.name}_{recipe}_{seed}_") as tmp:
        run_dir, rec = Path(tmp) / "run", {"set": set_dir.name, "recipe": recipe, "seed": seed}
        if flags == LRFIND:
            lr, rec["lr_find_s"], why = suggested_lr(set_dir, split, seed, Path(tmp))
            if lr is None:
                return {**rec, "rc": None, "wall_s": rec["lr_find_s"], "rss_mb": 0.0, "error_rate": None, "failure": why}
            same = next((d for d in default_recs if d["seed"] == seed and d.get("error_rate") is not None), None)
            if lr == default_lr() and same is not None:
                return {**{k: v for k, v in same.items() if k not in ("tta", "stored")}, **rec, "lr_used": lr,
                        "wall_s": same["wall_s"] + rec["lr_find_s"], "same_as_default": True}
            rec["lr_used"], flags = lr, [*extra, "--lr", repr(lr)]
        cmd = ursa_command(set_dir, split, run_dir, seed, flags)
        r = run_measured(cmd, Path(tmp))
        rec.update({"command": " ".join(cmd), "rc": r["rc"], "wall_s": r["wall_s"] + rec.get("lr_find_s", 0.0),
                    "rss_mb": r["rss_mb"], "reported_error": parse_error_rate(r["stdout"], run_dir) if r["rc"] == 0 else None,
                    "error_rate": None})
        if (run_dir / "recipe.json").is_file():  # what the default recipe decided, and why
            try:
                rec["recipe_json"] = json.loads((run_dir / "recipe.json").read_text())
            except ValueError as e:
                rec["recipe_json"] = {"unreadable": str(e)}
        model = run_dir / "model.safetensors"
        why = last_line(r) if r["rc"] != 0 else "" if model.is_file() else f"no {model.name} written"
        if not why:
            rec["error_rate"], why = held_out_error(model, set_dir, test, Path(tmp))
            rec["test_error"] = rec["error_rate"]
        if not why and isinstance(flags, list) and "--epoch-kept" in flags and "--refit" not in flags:
            # the same training scored both ways: best.safetensors is the epoch the default keeps, when it is not the last
            best = run_dir / "best.safetensors"
            rec["test_error_best"] = held_out_error(best, set_dir, test, Path(tmp))[0] if best.is_file() else rec["error_rate"]
        if recipe == "default" and not why and tta:
            rec["tta"] = tta_errors(model, set_dir, Path(tmp))
        if why:
            rec["failure"] = why
        return rec


def reuse_default(recipe: str, default_recs: list[dict], seed: int, flags: list[str] | str = ()) -> dict | None:
    """An alternative that repeats what the default decided (same --size, --flips or --budget): the default's run,
    relabelled. ``flags``: the recipe's flags, whose last --budget a budget arm (double, budget120) is compared by."""
    if recipe in BUDGET_ARMS and isinstance(flags, list) and "--budget" in flags:
        last = max(k for k, f in enumerate(flags) if f == "--budget")
        field, value = "budget", float(flags[last + 1])
    elif recipe in SAME_AS_DEFAULT:
        field, value = SAME_AS_DEFAULT[recipe]
    else:
        return None
    for d in default_recs:
        if d["seed"] == seed and d.get("error_rate") is not None and (d.get("recipe_json") or {}).get(field) == value:
            return {**{k: v for k, v in d.items() if k != "tta"}, "recipe": recipe, "same_as_default": True}
    return None


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="", help="comma-separated set names [default: every set under --root and --datasets]")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder holding the shared sets (../shared/datasets)")
    ap.add_argument("--datasets", type=Path, default=DATASETS, help="folder holding the held-out sets (benchmarks/datasets)")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 per recipe")
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    ap.add_argument("--fitted-on", default=",".join(FITTED_ON), help="sets the recipe's rules were tuned on (the others: checked on)")
    ap.add_argument("--fastai-seeds", type=int, default=1, help="fastai anchor seeds 0..K-1 (needs FASTAI_VENV unless measured)")
    ap.add_argument("--train-args", default="", help="more `ursa train` options for every run, before the recipe's "
                    "(a smoke check: '--epochs 1 --budget 10'); the figures are then not the default's")
    ap.add_argument("--no-tta", action="store_true", help="skip scoring the default's models with and without --tta")
    ap.add_argument("--stored-only", action="store_true", help="measure nothing: the report from the stored runs")
    ap.add_argument("--remeasure", default="", help="recipes to measure again although stored (results/recipes_runs/)")
    ap.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    ap.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[dict[str, Path], list[str], Path | None]:
    """Sets (name -> folder), recipes (the default first) and the fastai venv, or InputError naming what is wrong."""
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    bad = [r for r in recipes if r not in RECIPES]
    if bad or not recipes:
        raise InputError(f"--recipes: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(RECIPES)}")
    if args.seeds < 1 or args.fastai_seeds < 0:
        raise InputError(f"--seeds must be >= 1 and --fastai-seeds >= 0, got {args.seeds} and {args.fastai_seeds}")
    sets = find_sets(args.sets, [args.root, args.datasets])
    venv = Path(os.environ["FASTAI_VENV"]) if os.environ.get("FASTAI_VENV") else None
    if venv is not None and not args.dry_run and not (venv / "bin" / "python").is_file():
        raise InputError(f"FASTAI_VENV={venv}: no bin/python there; make it as ../shared/anchors/README.md says")
    return sets, sorted(dict.fromkeys(recipes), key=lambda r: r != "default"), venv  # alternatives may reuse the default's runs


def run_set(name: str, set_dir: Path, rows: list, recipes: list[str], flags: dict, args: argparse.Namespace,
            store: RunStore) -> list[dict]:
    """Every recipe x seed on one set (or, with --dry-run, their commands printed); the records."""
    train_csv, test = train_split_path(args.results, name), [row for row in rows if row[2]]
    print(f"{name}: {len(rows)} images, {len(test)} held out for testing; ursa trains on {train_csv}", flush=True)
    records: list[dict] = []
    for r in (r for r in recipes if not isinstance(flags[r], str) or flags[r] == LRFIND):
        for seed in range(args.seeds):
            if args.dry_run:
                f = flags[r] if flags[r] != LRFIND else [*shlex.split(args.train_args), "--lr", "$SUGGESTION"]
                if flags[r] == LRFIND:
                    print("  " + " ".join(lr_find_command(set_dir, train_csv, Path(f"$TMPRUN_{name}_{r}_{seed}/lr_find"), seed)))
                csv_file = split_paths(args.results, name)[1] if r in CHOOSES_ON_TEST else train_csv
                print("  " + " ".join(ursa_command(set_dir, csv_file, Path(f"$TMPRUN_{name}_{r}_{seed}"), seed, f)))
                continue
            defaults = [d for d in records if d["recipe"] == "default"]
            csv_file = split_paths(args.results, name)[1] if r in CHOOSES_ON_TEST else train_csv
            key = run_key(csv_file, flags[r], shlex.split(args.train_args))
            rec = reuse_default(r, defaults, seed, flags[r]) or store.get(name, r, seed, key)
            if rec is None and args.stored_only:
                continue
            if rec is None:
                rec = run_ursa(set_dir, csv_file, r, seed, flags[r], test, tuple(shlex.split(args.train_args)), not args.no_tta,
                               defaults)
                store.put(rec, key)
            records.append(rec)
            what = (f"held-out error {rec['error_rate']:.4f} (reported {fmt(rec.get('reported_error'), '.4f')})"
                    if rec["error_rate"] is not None else f"FAILED (exit {rec['rc']}): {rec.get('failure', '')}")
            same = (" (lr-find suggested the default learning rate: the default's run)" if rec.get("same_as_default") and r == "lrfind"
                    else " (what the default decided: its run)") if rec.get("same_as_default") else " (stored)" if rec.get("stored") else ""
            print(f"  {name} {r} seed {seed}: {rec['wall_s']:.1f} s, {what}, peak RSS {rec['rss_mb']:.0f} MB{same}", flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    """Run (or with --dry-run print) every set x recipe x seed and the fastai anchor; 0 ok, 1 a run failed, 2 bad input."""
    args = parse_args(argv)
    try:  # every input checked (and every split made) before the first hour-long run
        set_dirs, recipes, venv = check_args(args)
        has_budget, budget = read_default_budget() if "double" in recipes else (True, None)
        splits = {s: ensure_split(d, args.results, write=not args.dry_run) for s, d in set_dirs.items()}
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sets, fitted_on = list(set_dirs), tuple(s.strip() for s in args.fitted_on.split(",") if s.strip())
    extra = shlex.split(args.train_args)
    flags = {r: f if isinstance(f := recipe_flags(r, has_budget, budget), str) else [*extra, *f] for r in recipes}
    report_extra = {"train_args": extra}
    for r, f in flags.items():
        if isinstance(f, str) and f != LRFIND:
            print(f"{r}: {f}", flush=True)
    n_test = {s: sum(v for _, _, v in rows) for s, rows in splits.items()}
    summaries, records, fastai, notes, fastai_runs = {}, [], {}, {}, {}
    report = {"machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
              "budget_default_s": budget, "sets": {s: str(d) for s, d in set_dirs.items()}, "n_test": n_test,
              "fitted_on": fitted_on, **report_extra, "recipes": {r: RECIPES[r][0] for r in recipes}, "flags": flags, "seeds": args.seeds,
              "errors": "error_rate = held-out: the kept model on the 20% test images ursa never saw; "
                        "reported_error = what ursa printed (its inner validation, where it chose epochs)"}
    store = RunStore(args.results / "recipes_runs", {r.strip() for r in args.remeasure.split(",") if r.strip()}, commit_of(ROOT))
    for s, set_dir in set_dirs.items():
        recs = run_set(s, set_dir, splits[s], recipes, flags, args, store)
        records += recs
        summaries[s] = {r: summarize([x for x in recs if x["recipe"] == r]) for r in recipes if any(x["recipe"] == r for x in recs)}
        sm, notes[s], fastai_runs[s] = fastai_for_set(set_dir, split_paths(args.results, s)[0], args.results,
                                                      args.fastai_seeds, venv, args.dry_run, run_measured)
        if sm is not None:
            fastai[s] = sm
        if args.dry_run:
            print("  fastai: " + (notes[s] or f"{len(fastai_runs[s])} measured seed(s) reused"))
        else:
            write_report(args.results, report, records, summaries, fastai, fastai_runs, recipes)
    if args.dry_run:
        return 0
    aims, checks = write_report(args.results, report, records, summaries, fastai, fastai_runs, recipes)
    lines = []
    for s in sets:
        info = f"{len(splits[s])} images, {n_test[s]} test ({1 / n_test[s]:.4f} a picture)" if n_test[s] else ""
        lines += table_lines(s, info, recipes, summaries[s], fastai.get(s), notes[s])
        decided = [r["recipe_json"] for r in records if r["set"] == s and r["recipe"] == "default" and "recipe_json" in r]
        lines += aims_lines(s, aims.get(s, []), decided) if s in aims else []
    lines += [f"\nleave-one-set-out: rules fitted on {', '.join(fitted_on) or '(none)'}; the other sets only check them"]
    lines += format_checks(checks) + tta_lines(sets, records) + [f"\nwritten: {args.results / 'recipes.json'}"]
    print("\n".join(lines))
    return 1 if any(r["error_rate"] is None for r in records) else 0


def write_report(results: Path, report: dict, records: list[dict], summaries: dict, fastai: dict,
                 fastai_runs: dict, recipes: list[str]) -> tuple[dict, list[dict]]:
    """recipes.json (atomic, rewritten after every set so an interrupted run keeps what it measured); aims, rule checks."""
    sets, n_test = list(summaries), report["n_test"]
    timing = read_timing(results) or {}
    seed0 = {r["set"]: r for r in records if r["recipe"] == "default" and r["seed"] == 0}
    idle = {s: got for s in sets if (got := usable_idle(timing.get(s), seed0.get(s)))}
    aims = {s: evaluate_aims(s, summaries[s].get("default"), summaries[s].get("no_finetune") or summaries[s].get("frozen"),
                             fastai.get(s), summaries[s].get("lrfind"), n_test.get(s), idle.get(s))
            for s in sets if "default" in summaries[s]}
    checks = check_all(records, sets, recipes, report["fitted_on"], n_test)
    data = {**report, "idle_timing": idle, "runs": records, "summaries": summaries, "fastai": fastai, "fastai_runs": fastai_runs, "aims": aims,
            "rules": checks}
    write_atomic(results / "recipes.json", json.dumps(data, indent=1, default=str) + "\n")
    return aims, checks


if __name__ == "__main__":
    sys.exit(main())

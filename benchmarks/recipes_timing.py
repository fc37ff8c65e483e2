"""Issue 28's time aims, measured on an idle machine: per set, `ursa train` as a user types it (the default recipe,
seed 0) and fastai's lesson recipe (seed 0), one after the other, each alone on the machine.

benchmarks/recipes.py measures errors (counted plans: the same on a busy machine) and runs two at a time at
`nice -n 19`, so its wall times are busy figures. This script measures the walls the aims compare: nothing else
may run (the 1-minute load average is recorded before and after each run, and a start above --max-load is
refused). The ursa run is also a check of the recipe's reproducibility at benchmark scale: its held-out error is
compared with the stored busy run's (benchmarks/results/recipes_runs/<set>/default.seed0.*.json; `same_as_busy`),
equal at the same thread count (the benchmark runs one thread, this all cores, so a picture apart is possible). `--fastai-stored SETS` takes fastai's wall from its stored seed-0 result (results/fastai/) for sets
whose stored run was itself measured idle, instead of measuring it again (~2-9 minutes a set).

    FASTAI_VENV=/tmp/fastai-venv .venv/bin/python benchmarks/recipes_timing.py --fastai-stored bears,eurosat_dev
    .venv/bin/python benchmarks/recipes_timing.py --sets uci_digits --no-fastai
    .venv/bin/python benchmarks/recipes_timing.py --sets cub_grebes --no-fastai --recipe refit   # beside the default

Results: results/recipes_timing.json (one entry per set, replaced when measured again; the commit each ran at);
benchmarks/recipes.py reads it for the time aims. Stdlib only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastai_anchor import fastai_command, read_fastai  # noqa: E402
from recipes import DATASETS, DEFAULT_ROOT, RECIPES, RESULTS, ROOT, run_measured, run_ursa  # noqa: E402
from run_store import TIMING, commit_of, read_timing  # noqa: E402
from splits import InputError, ensure_split, find_sets, split_paths, train_split_path, write_atomic  # noqa: E402

TIMED = {"default": "ursa", "refit": "ursa_refit"}  # --recipe -> its key in a set's entry (the aims read "ursa")


def load_now() -> float:
    return os.getloadavg()[0]


def wait_idle(max_load: float, timeout: float = 240.0, step: float = 5.0) -> float | None:
    """Wait until the 1-minute load is at most max_load (the previous run's own load decays in ~1-2 min); the load
    then, or None when it stayed above it for `timeout` seconds (another job is running)."""
    waited = 0.0
    while (load := load_now()) > max_load:
        if waited >= timeout:
            return None
        time.sleep(step)
        waited += step
    return load


def stored_default(results: Path, name: str, recipe: str = "default") -> dict | None:
    """The busy benchmark's run of ``recipe``, seed 0 (None when there is none, or several with other flags: ambiguous)."""
    got = []
    for f in sorted((results / "recipes_runs" / name).glob(f"{recipe}.seed0.*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("test_error") is not None:
            got.append(rec)
    return got[0] if len(got) == 1 else None


def time_ursa(name: str, set_dir: Path, results: Path, load: float, recipe: str = "default") -> dict:
    """`ursa train` as a user types it (the default recipe, seed 0; or --recipe refit: with --refit) on the benchmark's
    80%, timed; its held-out error against the busy benchmark's run of the same seed (the plan is counted: equal)."""
    rows = ensure_split(set_dir, results, write=False)
    test = [r for r in rows if r[2]]
    rec = run_ursa(set_dir, train_split_path(results, name), recipe, 0, list(RECIPES[recipe][1]), test, tta=False)
    plan = rec.get("recipe_json") or {}
    busy = stored_default(results, name, recipe) or {}
    ok = rec.get("error_rate") is not None and not rec.get("failure")
    return {"wall_s": round(rec["wall_s"], 1), "counted_s": plan.get("planned_seconds"), "seconds": plan.get("seconds"),
            "error": rec.get("error_rate"), "busy_error": busy.get("test_error"),
            "busy_counted_s": (busy.get("recipe_json") or {}).get("planned_seconds"),
            "same_as_busy": None if not ok or not busy else rec["error_rate"] == busy["test_error"],
            "load_before": round(load, 2), "load_after": round(load_now(), 2), "failure": None if ok else
            rec.get("failure") or "no held-out error"}


def fastai_stored(name: str, results: Path) -> dict:
    """fastai's stored seed-0 result on the benchmark's split (InputError when missing, unreadable or another split)."""
    anchor_csv = split_paths(results, name)[0]
    got = read_fastai(results / "fastai" / f"{name}.seed0.json", hashlib.sha256(anchor_csv.read_bytes()).hexdigest())
    if isinstance(got, str):
        raise InputError(got)
    return {"wall_s": round(got["wall_s"], 1), "error": got["error_rate"], "source": "stored seed 0 (measured idle)",
            "failure": None}


def time_fastai(name: str, set_dir: Path, results: Path, venv: Path, load: float) -> dict:
    """fastai's lesson recipe (seed 0) on the same split, timed; its wall is the anchor's own total (as stored ones)."""
    anchor_csv = split_paths(results, name)[0]
    with tempfile.TemporaryDirectory(prefix="ursa_timing_fastai_") as tmp:
        out = Path(tmp) / "fastai.json"
        r = run_measured(fastai_command(venv, set_dir, anchor_csv, out, 0), Path(tmp))
        got = read_fastai(out, None) if r["rc"] == 0 else f"exit {r['rc']}: " + (r["stderr"].strip().splitlines()
                                                                                 or ["no output"])[-1]
    if isinstance(got, str):
        return {"failure": got, "wall_s": None, "process_wall_s": round(r["wall_s"], 1)}
    return {"wall_s": round(got["wall_s"], 1), "process_wall_s": round(r["wall_s"], 1), "error": got["error_rate"],
            "source": "measured here", "load_before": round(load, 2), "load_after": round(load_now(), 2),
            "failure": None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="", help="comma-separated set names [default: every set found]")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--datasets", type=Path, default=DATASETS)
    ap.add_argument("--fastai-stored", default="", help="sets whose stored fastai seed-0 wall was measured idle")
    ap.add_argument("--no-fastai", action="store_true", help="time ursa only")
    ap.add_argument("--recipe", choices=TIMED, default="default",
                    help="what to time: the default (the time aims), or refit (`--refit`: stored as ursa_refit beside it)")
    ap.add_argument("--max-load", type=float, default=0.6, help="refuse to start a run above this 1-minute load")
    ap.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        sets = find_sets(args.sets, [args.root, args.datasets])
        venv = None if args.no_fastai else Path(os.environ["FASTAI_VENV"]) if os.environ.get("FASTAI_VENV") else None
        stored = {s.strip() for s in args.fastai_stored.split(",") if s.strip()}
        if not args.no_fastai and venv is None and set(sets) - stored:
            raise InputError("set FASTAI_VENV (../shared/anchors/README.md), or --no-fastai, or --fastai-stored SETS")
        for name, set_dir in sets.items():
            ensure_split(set_dir, args.results, write=False)
            if not train_split_path(args.results, name).is_file():
                raise InputError(f"{train_split_path(args.results, name)}: no split for {name} yet; run "
                                 f"benchmarks/recipes.py --sets {name} first (it makes the split this times)")
            if name in stored:
                fastai_stored(name, args.results)
        timing = read_timing(args.results)
        if timing is None:
            raise InputError(f"{args.results / TIMING}: not a timing file (unreadable JSON or not an object); move it "
                             "aside to start a new one")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for name, set_dir in sets.items():
        if (load := wait_idle(args.max_load)) is None:
            return busy(args.max_load)
        u = time_ursa(name, set_dir, args.results, load, args.recipe)
        print(f"{name}: ursa {u['wall_s']} s wall ({u['seconds']} s by its own count), held-out error {u['error']} "
              f"(busy run: {u['busy_error']}), load {u['load_before']} -> {u['load_after']}"
              + (f"; FAILED: {u['failure']}" if u["failure"] else ""), flush=True)
        f = None
        if name in stored:
            f = fastai_stored(name, args.results)
        elif venv is not None:
            if (load := wait_idle(args.max_load)) is None:
                return busy(args.max_load)
            f = time_fastai(name, set_dir, args.results, venv, load)
        if f is not None:
            print(f"{name}: fastai {f['wall_s']} s, error {f.get('error')} ({f.get('source') or 'FAILED: ' + f['failure']})",
                  flush=True)
        failed += bool(u["failure"]) + bool(f and f["failure"])
        key = TIMED[args.recipe]
        entry = {**timing.get(name, {}), key: u, "commit" if key == "ursa" else f"{key}_commit": commit_of(ROOT),
                 "cpus": os.cpu_count()}
        if f is not None:  # --no-fastai keeps an earlier fastai timing
            entry["fastai"] = f
        timing[name] = entry
        write_atomic(args.results / TIMING, json.dumps(timing, indent=1) + "\n")
    print(f"written: {args.results / TIMING}" + (f"; {failed} run(s) failed" if failed else ""))
    return 1 if failed else 0


def busy(max_load: float) -> int:
    print(f"error: the machine is busy (1-minute load above --max-load {max_load} for 4 minutes): idle timings need it "
          "to themselves; stop the other jobs and run again", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Issue 28's time aims, measured on an idle machine: per set, `ursa train` as a user types it (the default recipe,
seed 0) and fastai's lesson recipe (seed 0), one after the other, each alone on the machine.

benchmarks/recipes.py measures errors (counted plans: the same on a busy machine) and runs two at a time at
`nice -n 19`, so its wall times are busy figures. This script measures the walls the aims compare: nothing else
may run (the 1-minute load average is recorded before and after each run, and a start above --max-load is
refused). The ursa run is also a check of the recipe's reproducibility at benchmark scale: its held-out error
must be the stored busy run's (benchmarks/results/recipes_runs/<set>/default.seed0.*.json), and the report says
whether it is. `--fastai-stored SETS` takes fastai's wall from its stored seed-0 result (results/fastai/) for sets
whose stored run was itself measured idle, instead of measuring it again (~2-9 minutes a set).

    FASTAI_VENV=/tmp/fastai-venv .venv/bin/python benchmarks/recipes_timing.py --fastai-stored bears,eurosat_dev
    .venv/bin/python benchmarks/recipes_timing.py --sets uci_digits --no-fastai

Results: results/recipes_timing.json (one entry per set, replaced when measured again; the commit each ran at);
benchmarks/recipes.py reads it for the time aims. Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastai_anchor import fastai_command, read_fastai  # noqa: E402
from recipes import DATASETS, DEFAULT_ROOT, RESULTS, ROOT, run_measured, run_ursa  # noqa: E402
from run_store import TIMING, commit_of, read_timing  # noqa: E402
from splits import InputError, ensure_split, find_sets, split_paths, train_split_path, write_atomic  # noqa: E402

def load_now() -> float:
    return os.getloadavg()[0]


def stored_default_error(results: Path, name: str) -> float | None:
    """The busy benchmark's held-out error of the default recipe, seed 0 (None when not measured)."""
    for f in sorted((results / "recipes_runs" / name).glob("default.seed0.*.json")):
        try:
            return json.loads(f.read_text()).get("test_error")
        except (OSError, ValueError):
            continue
    return None


def time_ursa(name: str, set_dir: Path, results: Path) -> dict:
    rows = ensure_split(set_dir, results, write=False)
    test = [r for r in rows if r[2]]
    before = load_now()
    rec = run_ursa(set_dir, train_split_path(results, name), "default", 0, [], test, tta=False)
    stored = stored_default_error(results, name)
    return {"wall_s": round(rec["wall_s"], 1), "counted_s": (rec.get("recipe_json") or {}).get("planned_seconds"),
            "seconds": (rec.get("recipe_json") or {}).get("seconds"), "error": rec.get("error_rate"),
            "busy_error": stored, "same_as_busy": None if stored is None or rec.get("error_rate") is None
            else rec["error_rate"] == stored, "load_before": round(before, 2), "load_after": round(load_now(), 2),
            "failure": rec.get("failure")}


def time_fastai(name: str, set_dir: Path, results: Path, venv: Path | None, stored: bool) -> dict | None:
    anchor_csv = split_paths(results, name)[0]
    if stored:
        got = read_fastai(results / "fastai" / f"{name}.seed0.json", None)
        if isinstance(got, str):
            raise InputError(got)
        return {"wall_s": round(got["wall_s"], 1), "error": got["error_rate"], "source": "stored seed 0 (measured idle)"}
    if venv is None:
        return None
    with tempfile.TemporaryDirectory(prefix="ursa_timing_fastai_") as tmp:
        out = Path(tmp) / "fastai.json"
        before = load_now()
        r = run_measured(fastai_command(venv, set_dir, anchor_csv, out, 0), Path(tmp))
        after = load_now()
        got = read_fastai(out, None) if r["rc"] == 0 else f"exit {r['rc']}"
    if isinstance(got, str):
        return {"failure": got, "wall_s": round(r["wall_s"], 1)}
    return {"wall_s": round(r["wall_s"], 1), "error": got["error_rate"], "source": "measured here",
            "load_before": round(before, 2), "load_after": round(after, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="", help="comma-separated set names [default: every set found]")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--datasets", type=Path, default=DATASETS)
    ap.add_argument("--fastai-stored", default="", help="sets whose stored fastai seed-0 wall was measured idle")
    ap.add_argument("--no-fastai", action="store_true", help="time ursa only")
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
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    timing = read_timing(args.results)
    for name, set_dir in sets.items():
        if (load := load_now()) > args.max_load:
            print(f"error: the machine is busy (1-minute load {load:.2f} > --max-load {args.max_load}): idle timings "
                  "need it to themselves; stop the other jobs and run again", file=sys.stderr)
            return 2
        u = time_ursa(name, set_dir, args.results)
        print(f"{name}: ursa {u['wall_s']} s wall ({u['seconds']} s by its own count), held-out error {u['error']} "
              f"(busy run: {u['busy_error']}), load {u['load_before']} -> {u['load_after']}", flush=True)
        try:
            f = None if args.no_fastai else time_fastai(name, set_dir, args.results, venv, name in stored)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if f is not None:
            print(f"{name}: fastai {f.get('wall_s')} s wall, error {f.get('error')} ({f.get('source', f.get('failure'))})",
                  flush=True)
        timing[name] = {"ursa": u, "fastai": f, "commit": commit_of(ROOT), "cpus": os.cpu_count()}
        write_atomic(args.results / TIMING, json.dumps(timing, indent=1) + "\n")
    print(f"written: {args.results / TIMING}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

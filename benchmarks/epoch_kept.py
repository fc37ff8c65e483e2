"""The last epoch or the best (`ursa train --epoch-kept`): both scored on the same training runs, held out.

`benchmarks/recipes.py --recipes last` runs the default with `--epoch-kept last`: the decisions and the
training are the default's, the model file holds the schedule's last epoch, and `best.safetensors` beside it
the epoch the default keeps (written whenever that is not the last). Both are scored on the set's held-out
test pictures (`test_error`, `test_error_best`), so each seed is a paired comparison on one machine and one
commit. This prints the table and the leave-one-set-out choice (the rule with the lower mean error on the
other sets) from the stored runs; it trains nothing:

    .venv/bin/python benchmarks/epoch_kept.py [benchmarks/results/recipes_runs]
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

RUNS = Path(__file__).resolve().parent / "results" / "recipes_runs"


def paired(runs: Path) -> dict[str, list[dict]]:
    """set -> the `last` arm's runs that scored both ways, by seed."""
    out: dict[str, list[dict]] = {}
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
        by_key: dict[str, list[dict]] = {}  # last.seed<N>.<hash of the run's flags and split>.json
        for f in sorted(folder.glob("last.seed*.json")):
            rec = json.loads(f.read_text())
            if rec.get("test_error") is not None and rec.get("test_error_best") is not None:
                by_key.setdefault(f.name.split(".")[2], []).append(rec)
        if by_key:
            key = max(by_key, key=lambda k: len(by_key[k]))  # runs with other --train-args are another experiment
            if len(by_key) > 1:
                print(f"{folder.name}: runs of {len(by_key)} keys; using {key}'s", file=sys.stderr)
            out[folder.name] = sorted(by_key[key], key=lambda r: r["seed"])
    return out


def table(sets: dict[str, list[dict]], runs: Path) -> list[str]:
    mean = {s: (statistics.mean(r["test_error_best"] for r in rs), statistics.mean(r["test_error"] for r in rs))
            for s, rs in sets.items()}
    lines = ["| set (test pictures) | seeds | best (the default), per seed | last, per seed | best | last | "
             "leave-one-set-out: mean on the other sets, best / last | chosen there |", "|---|---|---|---|---|---|---|---|"]
    for s, rs in sets.items():
        others = [v for k, v in mean.items() if k != s] or [(float("nan"), float("nan"))]
        b_o, l_o = statistics.mean(v[0] for v in others), statistics.mean(v[1] for v in others)
        chosen = "last" if l_o < b_o else "best"  # a tie (or no other set) keeps the default
        n = _test_pictures(runs.parent / "splits" / f"{s}.csv")
        per_best = ", ".join(f"{r['test_error_best']:.3f}" for r in rs)
        per_last = ", ".join(f"{r['test_error']:.3f}" for r in rs)
        lines.append(f"| {s} ({n}) | {len(rs)} | {per_best} | {per_last} | {mean[s][0]:.3f} | {mean[s][1]:.3f} | "
                     f"{b_o:.4f} / {l_o:.4f} | {chosen}: {mean[s][1 if chosen == 'last' else 0]:.3f} |")
    b, l = [v[0] for v in mean.values()], [v[1] for v in mean.values()]
    lines.append(f"\n{len(mean)} sets: mean error best {statistics.mean(b):.4f}, last {statistics.mean(l):.4f}; "
                 f"last lower on {sum(x < y for y, x in zip(b, l))}, higher on {sum(x > y for y, x in zip(b, l))}, "
                 f"equal on {sum(x == y for y, x in zip(b, l))}")
    refits = {s: _arm(runs / s, "last_refit", [r["seed"] for r in rs]) for s, rs in sets.items()}
    if any(refits.values()):  # --epoch-kept last --refit: the whole schedule again on every picture, same seeds
        lines += ["", "| set | last + --refit, per seed | last + --refit | last | best |", "|---|---|---|---|---|"]
        lines += [f"| {s} | {', '.join(f'{e:.3f}' for e in errs)} | {statistics.mean(errs):.3f} | {mean[s][1]:.3f} | "
                  f"{mean[s][0]:.3f} |" for s, errs in refits.items() if errs]
    return lines


def _arm(folder: Path, arm: str, seeds: list[int]) -> list[float]:
    """Another arm's held-out errors on the same seeds, in seed order; [] unless every seed has one."""
    got: dict[int, float] = {}
    for f in sorted(folder.glob(f"{arm}.seed*.json")):
        rec = json.loads(f.read_text())
        if rec.get("test_error") is not None:
            got[rec["seed"]] = rec["test_error"]
    return [got[k] for k in seeds] if all(k in got for k in seeds) else []


def _test_pictures(split: Path) -> str:
    """How many held-out test pictures the set's split holds (its `is_valid` rows), or '?' without the split."""
    try:
        with open(split, newline="") as f:
            return str(sum(row["is_valid"] == "True" for row in csv.DictReader(f)))
    except (OSError, KeyError):
        return "?"


def main(argv: list[str]) -> int:
    runs = Path(argv[0]) if argv else RUNS
    sets = paired(runs) if runs.is_dir() else {}
    if not sets:
        print(f"no paired runs under {runs}: run benchmarks/recipes.py --recipes default,last first", file=sys.stderr)
        return 2
    print("\n".join(table(sets, runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

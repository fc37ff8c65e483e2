"""How many real problems does `ursa clean` find? Label noise and duplicates injected into bears.

A copy of the data set gets 10% of its labels flipped at random (seeded: the file moves to another
class folder) and 30 injected duplicates (exact copies, copies resized smaller, copies re-encoded
at a low JPEG quality) of images whose labels were not flipped. Then `ursa clean --export` runs
on it (timed, as a user would run it) and this script scores the CSVs it wrote:

- precision and recall at N (N = number flipped) of top losses alone and of the label-issue view
  (confident learning on out-of-fold probabilities), plus precision/recall of the flagged set;
- the share of injected duplicate pairs found in duplicates.csv, per kind of copy.

With ``--sweep`` it also scores duplicate thresholds and classifier settings in-process (slower).

    python benchmarks/clean_eval.py                      # trains a model on the noisy copy first
    python benchmarks/clean_eval.py --model runs/x/model.safetensors --work /tmp/clean_eval
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "bears"
EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


def images(root: Path) -> list[Path]:
    """Every image under root's class folders, sorted for reproducibility."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTS)


def make_noisy_copy(src: Path, dst: Path, noise: float, n_dups: int, seed: int) -> tuple[set[str], list[tuple[str, str, str]]]:
    """Copy src to dst, flip a share of labels, inject duplicates; returns (flipped names, [(orig, copy, kind)])."""
    from PIL import Image

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    rng = random.Random(seed)
    files = images(dst)
    classes = sorted(p.name for p in dst.iterdir() if p.is_dir())
    n_flip = round(noise * len(files))
    flip = rng.sample(range(len(files)), n_flip)
    flipped = set()
    for i in flip:
        f = files[i]
        new = rng.choice([c for c in classes if c != f.parent.name])
        target = dst / new / f.name
        if target.exists():  # the same file name in two class folders
            target = target.with_name(f"{f.stem}_from_{f.parent.name}{f.suffix}")
        f.rename(target)
        flipped.add(target.relative_to(dst).as_posix())
    clean = [p for p in images(dst) if p.relative_to(dst).as_posix() not in flipped]
    originals = rng.sample(clean, n_dups)
    kinds = ["exact", "resized", "jpeg"]
    dups = []
    for k, orig in enumerate(originals):
        kind = kinds[k % 3]
        copy = orig.with_name(f"dup{k:02d}_{kind}_{orig.stem}.jpg")
        if kind == "exact":
            shutil.copyfile(orig, copy)
        else:
            im = Image.open(orig).convert("RGB")
            if kind == "resized":
                s = rng.uniform(0.5, 0.8)
                im = im.resize((max(32, round(im.width * s)), max(32, round(im.height * s))), Image.Resampling.LANCZOS)
                im.save(copy, "JPEG", quality=90)
            else:
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=rng.choice([25, 35, 50]))
                copy.write_bytes(buf.getvalue())
        dups.append((orig.relative_to(dst).as_posix(), copy.relative_to(dst).as_posix(), kind))
    return flipped, dups


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def at_n(ranked: list[str], truth: set[str], n: int) -> tuple[float, float]:
    """(precision, recall) of the first n names of a ranking."""
    hits = len(set(ranked[:n]) & truth)
    return hits / n, hits / len(truth)


def run(cmd: list[str]) -> tuple[float, float]:
    """Run a command; (wall seconds, CPU seconds of the child: less sensitive to other jobs' load)."""
    t0 = time.perf_counter()
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    print(r.stdout.strip())
    return time.perf_counter() - t0, (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)


def sweep(noisy: Path, model: Path, flipped: set[str], dups: list[tuple[str, str, str]]) -> None:
    """Score duplicate thresholds and out-of-fold classifiers in-process, from one embedding pass."""
    import numpy as np

    from ursa.apps import clean
    from ursa.apps.clean import ranking

    ds, scores, ranks = clean.prepare(noisy, model, quiet=True)
    names = scores.names
    idx = {n: i for i, n in enumerate(names)}
    truth = {(min(idx[a], idx[b]), max(idx[a], idx[b])) for a, b, _ in dups}
    x = ranking.l2_normalise(scores.emb)
    sim_true = sorted(float(x[a] @ x[b]) for a, b in truth)
    print(f"\ninjected pairs' cosine similarity: min {sim_true[0]:.3f}, 5th {sim_true[1]:.3f}, median {np.median(sim_true):.3f}")
    print("| threshold | injected found | other pairs |\n|---|---|---|")
    for t in (0.84, 0.86, 0.88, 0.9, 0.92, 0.94, 0.96):
        pairs = ranking.find_duplicates(scores.emb, scores.sha256, scores.readable, threshold=t)
        got = {(p.a, p.b) for p in pairs}
        print(f"| {t:.2f} | {len(got & truth)}/{len(truth)} | {len(got - truth)} |")
    n = len(flipped)
    print("\n| out-of-fold classifier | precision@N | listed | precision of list | CL flagged | CL precision |"
          "\n|---|---|---|---|---|---|")
    for feats, C in (("avg", 0.3), ("avg", 1.0), ("avg", 3.0), ("max+avg", 1.0)):
        emb = scores.avg_emb if feats == "avg" else scores.emb
        oof = ranking.out_of_fold_probs(emb, scores.labels, len(scores.classes), C=C)
        likely, q, cl = ranking.label_issues(scores.labels, oof)
        listed = [names[i] for i in likely]
        cl_only = [names[i] for i in np.flatnonzero(cl)]
        print(f"| logreg on {feats} C={C} | {at_n(listed, flipped, n)[0]:.3f} | {len(listed)} | "
              f"{len(set(listed) & flipped) / max(1, len(listed)):.3f} | {len(cl_only)} | "
              f"{len(set(cl_only) & flipped) / max(1, len(cl_only)):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", type=Path, help="model to use (default: train one on the noisy copy)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ursa_clean_eval"))
    ap.add_argument("--noise", type=float, default=0.10)
    ap.add_argument("--dups", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", action="store_true", help="also score thresholds and classifier settings")
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data}: not found (the shared bears data set)")
    noisy = args.work / "data"
    flipped, dups = make_noisy_copy(args.data, noisy, args.noise, args.dups, args.seed)
    print(f"{len(images(noisy))} images in {noisy}: {len(flipped)} labels flipped, {len(dups)} duplicates injected")
    py = sys.executable
    model = args.model
    if model is None:
        out = args.work / "run"
        secs, _ = run([py, "-m", "ursa", "train", str(noisy), "--out", str(out), "--epochs", "2",
                       "--unfreeze-epochs", "0", "--quiet"])
        print(f"trained in {secs:.0f} s")
        model = out / "model.safetensors"
    export = args.work / "export"
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[0]
    secs, cpu = run([py, "-m", "ursa", "clean", str(noisy), "--model", str(model), "--export", str(export), "--quiet"])
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[0]
    n = len(flipped)
    top = [r["name"] for r in read_csv(export / "top_losses.csv")]
    issue_rows = read_csv(export / "label_issues.csv")
    issues = [r["name"] for r in issue_rows]
    cl = [r["name"] for r in issue_rows if r["confident_learning"] == "true"]
    pairs = {frozenset((r["a"], r["b"])): r for r in read_csv(export / "duplicates.csv")}
    p_top, r_top = at_n(top, flipped, n)
    p_cl, r_cl = at_n(issues, flipped, n)
    found = {k: 0 for k in ("exact", "resized", "jpeg")}
    for a, b, kind in dups:
        found[kind] += frozenset((a, b)) in pairs
    injected = {frozenset((a, b)) for a, b, _ in dups}
    other = len([k for k in pairs if k not in injected])
    hit_flagged = len(set(issues) & flipped)
    print(f"\n`ursa clean --export`: {secs:.1f} s wall, {cpu:.1f} s CPU on {os.cpu_count()} cores; "
          f"load average {load_before} before, {load_after} after (other jobs share the CPU)\n")
    print("| measure | value |\n|---|---|")
    print(f"| images / flipped labels (N) | {len(images(noisy))} / {n} |")
    print(f"| top losses: precision@N / recall@N | {p_top:.3f} / {r_top:.3f} |")
    print(f"| label-error view: precision@N / recall@N | {p_cl:.3f} / {r_cl:.3f} |")
    print(f"| label-error view, whole list: length, precision, recall | {len(issues)}, "
          f"{hit_flagged / max(1, len(issues)):.3f}, {hit_flagged / n:.3f} |")
    cl_hits = len(set(cl) & flipped)
    print(f"| confident learning's own set (cleanlab find_label_issues): size, precision, recall; precision@N "
          f"in its self-confidence order | {len(cl)}, {cl_hits / max(1, len(cl)):.3f}, {cl_hits / n:.3f}; "
          f"{at_n(cl, flipped, n)[0]:.3f} |")
    print(f"| injected duplicates found | {sum(found.values())}/{len(dups)} = {sum(found.values()) / len(dups):.3f} "
          f"(exact {found['exact']}, resized {found['resized']}, re-encoded {found['jpeg']}) |")
    print(f"| other duplicate pairs reported | {other} |")
    print(f"| export wall time / CPU time | {secs:.1f} s / {cpu:.1f} s |")
    if args.sweep:
        sweep(noisy, model, flipped, dups)


if __name__ == "__main__":
    main()

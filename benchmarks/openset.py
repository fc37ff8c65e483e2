"""Issue 23: which "none of these" score to ship, measured on ../shared/datasets.

Two models, each trained by `ursa train` (default: --budget 0, the cached frozen stage, so it runs
in minutes on a busy CPU; --budget B for the default recipe): bears, against every picture of
eurosat_dev, mnist_dev and cub_grebes (far from bears), and cub_grebes trained on three species
(Eared, Pied-billed, Western) against the fourth, Horned (near: Horned and Eared grebes are easily
confused). Each model's validation split is the "known" side.

For every candidate score, fitted on the training images' features alone (top probability is
today's baseline): AUROC (known vs unknown), the share of unknown pictures turned away and of
validation pictures kept at the threshold keeping 95% of the validation images (kept is measured
two-fold: each half with the threshold chosen on the other half, so it is not read off the images
it was chosen on), the time to score one picture (from its features/logits, batches of 64) as a ratio
to the top probability's and to the network's own forward pass in the same run, and the reference
size. Writes benchmarks/results/openset.json and prints the table (Markdown).

    .venv/bin/python benchmarks/openset.py [--budget 0] [--work /tmp/ursa-openset]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ursa.diagnose.openset import fit_unknown, pca_basis  # noqa: E402
from ursa.inference.openset import normalise  # noqa: E402
from ursa.inference.results import softmax  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results"
IMG = {".jpg", ".jpeg", ".png"}
KEEP = 0.95


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG)


def train(data: Path, out: Path, budget: str) -> Path:
    """`ursa train` once (reused when the run folder has a model already)."""
    if not (out / "model.onnx").is_file():
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "ursa", "train", str(data), "--out", str(out), "--budget", budget,
                        "--quiet"], check=True, env=env)
    return out


def run_split(run: Path) -> tuple[list[Path], list[Path]]:
    """The run's own training and validation files (split.csv)."""
    cfg = json.loads((run / "config.json").read_text())
    root = Path(cfg["data"])
    tr, va = [], []
    with open(run / "split.csv", newline="") as f:
        for row in csv.DictReader(f):
            (va if row["is_valid"] in ("1", "True", "true") else tr).append(root / row["name"])
    return tr, va


class Net:
    """The run's model.onnx on ONNX Runtime: raw logits and body features, and the forward time per picture."""

    def __init__(self, run: Path) -> None:
        from ursa.inference.runtime import load_onnx

        self.pred = load_onnx(run / "model.onnx", threads=1)
        self.t = self.temperature = self.pred.temperature
        self.seconds, self.pictures = 0.0, 0

    def __call__(self, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        logits, feats = [], []
        for i in range(0, len(files), 32):
            x = np.stack([self.pred.preprocess(f) for f in files[i:i + 32]])
            t = time.perf_counter()
            lg, ft = self.pred.logits_and_features(x)
            self.seconds += time.perf_counter() - t
            self.pictures += len(x)
            logits.append(lg)
            feats.append(ft)
        return np.concatenate(logits), np.concatenate(feats)


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(score of an unknown picture > score of a known one), ties half (Mann-Whitney)."""
    s = np.concatenate([known, unknown])
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for v in np.unique(s):  # average ranks of ties
        m = s == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    r = ranks[len(known):].sum()
    return float((r - len(unknown) * (len(unknown) + 1) / 2) / (len(known) * len(unknown)))


def threshold(valid: np.ndarray, keep: float = KEEP) -> float:
    v = np.sort(valid)
    return float(v[min(len(v) - 1, max(0, int(np.ceil(keep * len(v))) - 1))])


def kept_two_fold(valid: np.ndarray) -> float:
    halves = np.arange(len(valid)) % 2
    kept = [(valid[halves == h] <= threshold(valid[halves != h])).mean() for h in (0, 1)]
    return float(np.mean(kept))


# --- the candidates: fit(train logits, train feats, train y) -> (score(logits, feats), reference bytes) ---

def top_prob(T: float) -> Callable:
    def fit(lg, ft, y):
        return (lambda lg, ft: 1.0 - softmax(lg / T).max(1)), 0
    return fit


def energy(T: float) -> Callable:
    def fit(lg, ft, y):
        def score(lg, ft):
            z = lg / T
            m = z.max(1)
            return -(m + np.log(np.exp(z - m[:, None]).sum(1)))
        return score, 0
    return fit


def knn_full(k: int) -> Callable:
    def fit(lg, ft, y):
        ref = normalise(ft)

        def score(lg, f):
            s = normalise(f) @ ref.T
            return 1.0 - np.partition(s, s.shape[1] - k, axis=1)[:, -k:].mean(1)
        return score, ref.nbytes
    return fit


def knn_shipped(k: int, dims: int) -> Callable:
    def fit(lg, ft, y):
        det = fit_unknown(ft, ft[:1], k=k, dims=dims)
        return (lambda lg, f: det.score(f)), det.nbytes()
    return fit


def mahalanobis(dims: int = 128) -> Callable:
    """Class-conditional Mahalanobis with a shared covariance (Lee et al. 2018), on normalised features in PCA space."""
    def fit(lg, ft, y):
        center, basis = pca_basis(ft, dims)
        z = (normalise(ft) - center) @ basis
        means = np.stack([z[y == c].mean(0) for c in np.unique(y)])
        r = z - means[np.searchsorted(np.unique(y), y)]
        cov = r.T @ r / len(r) + 1e-4 * np.eye(z.shape[1])
        prec = np.linalg.inv(cov).astype(np.float32)

        def score(lg, f):
            q = (normalise(f) - center) @ basis
            d = q[:, None, :] - means[None]
            return np.einsum("ncd,de,nce->nc", d, prec, d).min(1)
        return score, 4 * (basis.size + means.size + prec.size)
    return fit


def combined(a: Callable, b: Callable) -> Callable:
    """Two scores, each standardised on the training images, summed."""
    def fit(lg, ft, y):
        (sa, na), (sb, nb) = a(lg, ft, y), b(lg, ft, y)
        ra, rb = sa(lg, ft), sb(lg, ft)
        ma, da, mb, db = ra.mean(), ra.std() + 1e-9, rb.mean(), rb.std() + 1e-9
        return (lambda l, f: (sa(l, f) - ma) / da + (sb(l, f) - mb) / db), na + nb
    return fit


def stored(det) -> Callable:
    """The detector `ursa train` wrote into the model file (its own reference features), as predict and serve run it."""
    def fit(lg, ft, y):
        return (lambda lg, f: det.score(f)), det.nbytes()
    return fit


def either(a: Callable, b: Callable) -> Callable:
    """The larger of two scores, each standardised on the training images: unknown when either one says so."""
    def fit(lg, ft, y):
        (sa, na), (sb, nb) = a(lg, ft, y), b(lg, ft, y)
        ra, rb = sa(lg, ft), sb(lg, ft)
        ma, da, mb, db = ra.mean(), ra.std() + 1e-9, rb.mean(), rb.std() + 1e-9
        return (lambda l, f: np.maximum((sa(l, f) - ma) / da, (sb(l, f) - mb) / db)), na + nb
    return fit


def candidates(T: float, det=None) -> dict[str, Callable]:
    more = {"as stored by ursa train (model file)": stored(det)} if det is not None else {}
    return {**more,
        "top probability (baseline)": top_prob(T),
        "energy": energy(T),
        "kNN k=1, full, fp32": knn_full(1),
        "kNN k=10, full, fp32": knn_full(10),
        "kNN k=10, PCA 128, fp16": knn_shipped(10, 128),
        "kNN k=20, PCA 128, fp16 (shipped)": knn_shipped(20, 128),
        "kNN k=20, PCA 256, fp16": knn_shipped(20, 256),
        "kNN k=10, PCA 64, fp16": knn_shipped(10, 64),
        "Mahalanobis (class, PCA 128)": mahalanobis(128),
        "kNN k=20 + top probability": combined(knn_shipped(20, 128), top_prob(T)),
        "max(kNN k=20, top probability)": either(knn_shipped(20, 128), top_prob(T)),
    }


def evaluate(name: str, run: Path, unknown_sets: dict[str, list[Path]]) -> list[dict]:
    net = Net(run)
    tr, va = run_split(run)
    classes = net.pred.classes
    ytr = np.array([classes.index(p.parent.name) for p in tr])
    lg_tr, ft_tr = net(tr)
    lg_va, ft_va = net(va)
    unk = {k: net(v) for k, v in unknown_sets.items()}
    forward = net.seconds / max(1, net.pictures)
    rows = []
    for cand, fit in candidates(net.temperature, net.pred.world.detector).items():
        score, nbytes = fit(lg_tr, ft_tr, ytr)
        sv = score(lg_va, ft_va)
        t = threshold(sv)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.5 or reps < 3:
            for i in range(0, len(lg_va), 64):
                score(lg_va[i:i + 64], ft_va[i:i + 64])
            reps += 1
        per = (time.perf_counter() - start) / (reps * len(lg_va))
        row = {"model": name, "score": cand, "kept_valid": kept_two_fold(sv), "ref_bytes": int(nbytes),
               "seconds_per_picture": per, "vs_forward": per / forward,
               "n_train": len(tr), "n_valid": len(va), "sets": {}}
        for s, (lg, ft) in unk.items():
            su = score(lg, ft)
            row["sets"][s] = {"auroc": auroc(sv, su), "turned_away": float((su > t).mean()), "n": len(su)}
        rows.append(row)
    return with_ratios(rows)


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's time per picture as a ratio to the top probability's of the same model, measured in the same run."""
    base = {r["model"]: r["seconds_per_picture"] for r in rows if r["score"].startswith("top probability")}
    for r in rows:
        r["vs_top_prob"] = r["seconds_per_picture"] / base[r["model"]]
    return rows


def table(rows: list[dict]) -> str:
    """One line per model and score; the unknown sets side by side (AUROC, then the share turned away)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        sets = list(mine[0]["sets"])
        names = " / ".join(f"{s} ({mine[0]['sets'][s]['n']})" for s in sets)
        out += [f"**{model}** ({mine[0]['n_train']} training, {mine[0]['n_valid']} validation images) against {names}:", "",
                "| score | AUROC | turned away at 95% kept | validation kept (2-fold) | time vs top probability | "
                "time vs the network's forward pass | reference |", "|---|---|---|---|---|---|---|"]
        for r in mine:
            auc = " / ".join(f"{r['sets'][s]['auroc']:.3f}" for s in sets)
            away = " / ".join(f"{100 * r['sets'][s]['turned_away']:.1f}%" for s in sets)
            out.append(f"| {r['score']} | {auc} | {away} | {100 * r['kept_valid']:.1f}% | {r['vs_top_prob']:.0f}x | "
                       f"{100 * r['vs_forward']:.2f}% | {r['ref_bytes'] / 1e6:.2f} MB |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="0", help="`ursa train --budget` of both models (0: frozen stage only)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ursa-openset")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=RESULTS / "openset.json")
    ap.add_argument("--table", type=Path, help="only print the table of an earlier run's JSON")
    a = ap.parse_args()
    if a.table:
        print(table(with_ratios(json.loads(a.table.read_text())["rows"])))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    grebes3 = a.work / "grebes3"  # three species, as links: nothing is written into the data folder
    grebes3.mkdir(exist_ok=True)
    for s in ("Eared_Grebe", "Pied_billed_Grebe", "Western_Grebe"):
        if not (grebes3 / s).exists():
            (grebes3 / s).symlink_to(a.data / "cub_grebes" / s)
    bears = train(a.data / "bears", a.work / f"bears_b{a.budget}", a.budget)
    grebes = train(grebes3, a.work / f"grebes3_b{a.budget}", a.budget)
    rows = evaluate("bears", bears, {s: images(a.data / s) for s in ("eurosat_dev", "mnist_dev", "cub_grebes")})
    rows += evaluate("3 grebes", grebes, {"Horned_Grebe": images(a.data / "cub_grebes" / "Horned_Grebe")})
    RESULTS.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"budget": a.budget, "keep": KEEP, "rows": rows}, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()

"""Issue 27: which pictures to label next, measured by simulated labelling (docs/suggest.md).

For each set: the frozen ImageNet body's pooled features of every picture once (ursa's own split:
training and validation), cached in --work. Then, per seed, 5 labelled pictures per class drawn
from the training split; the rest of it is the unlabelled pool, its labels hidden. Each round a
fresh head is fitted on the labelled features (``training.curve.fit_head``: the cached frozen
stage's recipe, as the learning curve refits it), the strategy picks 20 pictures of the pool,
their labels are revealed, and after the round the head is refitted and its validation error
recorded. Strategies: random (the baseline) and each mix in ``ursa.diagnose.suggest.MIXES``
(what ``ursa suggest`` computes, on the same signals: margin/entropy of the head's probabilities,
the unknown detector fitted on the labelled pictures as a training run fits it, coverage in
feature space, and the classes' need, here the per-class validation error of the current head
weighted by its share, which is what the learning curve's per-class fits estimate).

Aims (issue 27): below random after every round on every set, and random's error after 5 rounds
reached with at most half the labels. Held-out sets from benchmarks/datasets/ check that the
chosen mix is not fitted to the four shared sets only. Writes benchmarks/results/suggest.json and
prints the tables (Markdown).

    nice -n 19 .venv/bin/python benchmarks/suggest.py [--sets bears,...] [--seeds 3] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ursa.diagnose.suggest import MIXES, DEFAULT_MIX, rank_pool  # noqa: E402

SHARED = ROOT.parent / "shared" / "datasets"
HELD_OUT = ROOT / "benchmarks" / "datasets"
RESULTS = ROOT / "benchmarks" / "results"
SETS = ("mnist_dev", "eurosat_dev", "cub_grebes", "bears")
HELD_OUT_SETS = ("uci_digits", "animal_silhouettes")
START, BATCH = 5, 20
LINEAR = True  # see Heads


def set_path(name: str) -> Path:
    return SHARED / name if (SHARED / name).is_dir() else HELD_OUT / name


def features(name: str, work: Path) -> dict[str, np.ndarray]:
    """The frozen body's features of the set's training and validation pictures (computed once, kept in work)."""
    path = work / f"{name}.npz"
    if path.is_file():
        return dict(np.load(path))
    import torch

    from ursa.training.config import TrainConfig
    from ursa.training.features import compute_features
    from ursa.training.recipe import build_learner

    torch.set_num_threads(1)
    cfg = TrainConfig(data=set_path(name), out=work / f"run-{name}", quiet=True)
    learn, _ = build_learner(cfg)
    learn.freeze()
    cache = compute_features(learn.model, learn.dls, 1, augment=False, quiet=True)
    hc = learn.model.head_cfg
    d = {"train": cache.train_views[0].numpy(), "train_y": cache.train_y.numpy(), "valid": cache.valid.numpy(),
         "valid_y": cache.valid_y.numpy(), "head": np.asarray([hc.n_features, hc.hidden or 0, hc.n_classes]),
         "pool": np.asarray([0 if hc.pool == "avg" else 1]), "dropout": np.asarray([hc.dropout])}
    work.mkdir(parents=True, exist_ok=True)
    np.savez(path, **d)
    return d


class Heads:
    """Fit a fresh head on labelled features and read its probabilities and errors (the learning curve's refit)."""

    def __init__(self, d: dict[str, np.ndarray]) -> None:
        import torch

        from ursa.training.curve import CurveSettings
        from ursa.vision.models import HeadConfig

        n_features, hidden, n_classes = (int(v) for v in d["head"])
        # A linear head (BN, dropout, linear: hidden 0) with the frozen stage's recipe: the benchmark fits
        # thousands of heads on a shared 2-core machine; every strategy gets the same head.
        self.cfg = HeadConfig(n_features=n_features, n_classes=n_classes, hidden=0 if LINEAR else hidden,
                              pool="avg" if int(d["pool"][0]) == 0 else "concat", dropout=float(d["dropout"][0]))
        self.valid, self.valid_y = torch.from_numpy(d["valid"]), torch.from_numpy(d["valid_y"]).long()
        self.n_classes = n_classes
        self.settings = CurveSettings()
        self.steps = 60  # about what the frozen stage takes on a few hundred pictures; small sets get more epochs

    def fit(self, x: np.ndarray, y: np.ndarray, seed: int):
        import torch

        from ursa.training.curve import fit_head
        from ursa.training.features import FeatureCache
        from ursa.vision.models import create_head

        torch.manual_seed(seed)
        head = create_head(self.cfg)
        cache = FeatureCache([torch.from_numpy(x)], torch.from_numpy(y).long(), self.valid, self.valid_y, 0, False)
        fit_head(head, cache, self.steps, self.settings, seed)
        return head.eval()

    def probs(self, head, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return head(torch.from_numpy(x)).float().softmax(1).numpy()

    def errors(self, head) -> tuple[float, np.ndarray]:
        """Validation error, and each class's error weighted by its share (what that class adds to the error)."""
        p = self.probs(head, self.valid.numpy()).argmax(1)
        y = self.valid_y.numpy()
        wrong = p != y
        per = np.asarray([wrong[y == c].sum() / len(y) for c in range(self.n_classes)])
        return float(wrong.mean()), per


def pick(strategy: str, heads: Heads, head, d: dict[str, np.ndarray], labelled: np.ndarray, pool: np.ndarray,
         rng: np.random.Generator, need: np.ndarray) -> np.ndarray:
    """The 20 pool indices (into the training split) a strategy labels next."""
    if strategy == "random":
        return rng.choice(pool, size=min(BATCH, len(pool)), replace=False)
    from ursa.diagnose.openset import fit_unknown

    mix = MIXES[strategy]
    x = d["train"]
    probs = heads.probs(head, x[pool])
    unknown = None
    if mix.unknown:
        det = fit_unknown(x[labelled], d["valid"])  # as a training run fits it, on the pictures it trained on
        unknown = det.score(x[pool])
    ranking = rank_pool(probs, x[pool], mix, BATCH, unknown=unknown, need=need, reference=x[labelled])
    return pool[ranking.order]


def simulate(name: str, d: dict[str, np.ndarray], strategies: list[str], seeds: int, rounds: int) -> dict:
    heads = Heads(d)
    y = d["train_y"]
    out: dict[str, list[list[float]]] = {s: [] for s in strategies}
    for seed in range(seeds):
        rng0 = np.random.default_rng(1000 + seed)
        start = np.concatenate([rng0.choice(np.nonzero(y == c)[0], size=START, replace=False)
                                for c in range(heads.n_classes)])
        for s in strategies:
            rng = np.random.default_rng(2000 + seed)
            labelled = np.sort(start)
            errs = []
            head = heads.fit(d["train"][labelled], y[labelled], seed)
            err, per = heads.errors(head)
            errs.append(err)
            for r in range(rounds):
                pool = np.setdiff1d(np.arange(len(y)), labelled)
                if len(pool) == 0:
                    break
                chosen = pick(s, heads, head, d, labelled, pool, rng, per)
                labelled = np.sort(np.concatenate([labelled, chosen]))
                head = heads.fit(d["train"][labelled], y[labelled], seed * 100 + r + 1)
                err, per = heads.errors(head)
                errs.append(err)
            out[s].append(errs)
            print(f"  {name} seed {seed} {s:16s} " + " ".join(f"{100 * e:5.1f}" for e in errs), flush=True)
    return {"n_train": int(len(y)), "n_valid": int(len(d["valid_y"])), "classes": int(heads.n_classes),
            "start": START * heads.n_classes, "errors": out}


def labels_to_reach(curve: np.ndarray, target: float, start: int) -> float | None:
    """Labels added (beyond the start) when the mean error first reaches target, interpolated between rounds."""
    for r in range(1, len(curve)):
        if curve[r] <= target + 1e-12:
            e0, e1 = curve[r - 1], curve[r]
            frac = 1.0 if e0 == e1 else min(1.0, max(0.0, (e0 - target) / (e0 - e1)))
            return BATCH * (r - 1 + frac) if e0 > target else BATCH * (r - 1) if r > 1 else 0.0
    return None


def summarise(res: dict, rounds_ref: int = 5) -> dict:
    rows = {}
    rnd = np.asarray(res["errors"]["random"]).mean(0)
    target = float(rnd[min(rounds_ref, len(rnd) - 1)])
    for s, runs in res["errors"].items():
        m = np.asarray(runs).mean(0)
        below = bool(np.all(m[1:] < rnd[1:])) if s != "random" else None
        reach = labels_to_reach(m, target, res["start"])
        reach = None if reach is None else float(reach)
        rows[s] = {"mean": m.tolist(), "below_random_every_round": below, "labels_to_random_r5": reach,
                   "half_labels": None if s == "random" else bool(reach is not None and reach <= BATCH * rounds_ref / 2),
                   "mean_error_rounds": float(m[1:].mean())}
    return rows


def table(name: str, res: dict, rows: dict) -> list[str]:
    n = len(next(iter(rows.values()))["mean"])
    head = "| strategy | " + " | ".join(f"r{r} ({res['start'] + BATCH * r})" for r in range(n)) + \
        " | mean r1+ | labels to random's r5 | below random every round |"
    lines = [f"**{name}** ({res['classes']} classes, pool {res['n_train'] - res['start']}, "
             f"{res['n_valid']} validation pictures; validation error %, mean of {len(res['errors']['random'])} seeds)",
             "", head, "|" + "---|" * (n + 4)]
    for s, r in rows.items():
        reach = "-" if r["labels_to_random_r5"] is None else f"{r['labels_to_random_r5']:.0f}"
        below = "" if r["below_random_every_round"] is None else ("yes" if r["below_random_every_round"] else "no")
        lines.append(f"| {s} | " + " | ".join(f"{100 * e:.1f}" for e in r["mean"]) +
                     f" | {100 * r['mean_error_rounds']:.2f} | {reach} | {below} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(SETS + HELD_OUT_SETS))
    ap.add_argument("--strategies", default=",".join(["random", *MIXES]))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ursa-suggest-bench")
    ap.add_argument("--out", type=Path, default=RESULTS / "suggest.json")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    strategies = a.strategies.split(",")
    if "random" not in strategies:
        strategies.insert(0, "random")
    report: dict = {"default": DEFAULT_MIX, "seeds": a.seeds, "rounds": a.rounds, "start_per_class": START,
                    "batch": BATCH, "sets": {}}
    t0 = time.perf_counter()
    for name in a.sets.split(","):
        if not set_path(name).is_dir():
            print(f"{name}: not found, skipped", file=sys.stderr)
            continue
        d = features(name, a.work)
        res = simulate(name, d, strategies, a.seeds, a.rounds)
        rows = summarise(res)
        report["sets"][name] = {**res, "summary": rows, "held_out": name in HELD_OUT_SETS}
        print("\n".join(table(name, res, rows)), flush=True)
        write(report, strategies, a.out, t0)
    write(report, strategies, a.out, t0, final=True)
    return 0


def write(report: dict, strategies: list[str], out: Path, t0: float, final: bool = False) -> None:
    """The ranking of the mixes so far, printed at the end, and the JSON (after every set: a long run keeps what it has)."""
    # which mix wins: mean error over rounds 1+ relative to random's, averaged over the shared sets
    ranking = {}
    for s in strategies:
        if s == "random":
            continue
        rel = [v["summary"][s]["mean_error_rounds"] / max(1e-9, v["summary"]["random"]["mean_error_rounds"])
               for v in report["sets"].values() if not v["held_out"]]
        held = [v["summary"][s]["mean_error_rounds"] / max(1e-9, v["summary"]["random"]["mean_error_rounds"])
                for v in report["sets"].values() if v["held_out"]]
        ranking[s] = {"shared": float(np.mean(rel)) if rel else None, "held_out": float(np.mean(held)) if held else None,
                      "sets_below_every_round": sum(bool(v["summary"][s]["below_random_every_round"])
                                                    for v in report["sets"].values()),
                      "sets_half_labels": sum(bool(v["summary"][s]["half_labels"]) for v in report["sets"].values())}
    report["ranking"] = ranking
    report["seconds"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    if not final:
        return
    print("| mix | error / random's (shared sets) | (held-out sets) | sets below random every round | sets at half the labels |")
    print("|---|---|---|---|---|")
    for s, r in sorted(ranking.items(), key=lambda kv: kv[1]["shared"] or 9):
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {s} | {f(r['shared'])} | {f(r['held_out'])} | {r['sets_below_every_round']}/{len(report['sets'])} "
              f"| {r['sets_half_labels']}/{len(report['sets'])} |")
    print(f"wrote {out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())

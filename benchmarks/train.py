"""Training speed on a laptop CPU: ordinary frozen vs cached frozen vs the full default recipe (vs 2 views).

Each configuration runs in its own process so its peak RSS is its own. Prints one table:
wall seconds, images/s, peak RSS, final error_rate, and the (a)/(b) speed ratio, with the
error rates of every seed. Measured in one run on the same machine, so ratios are fair.

    .venv/bin/python benchmarks/train.py [--data ../shared/datasets/bears] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "bears"

CONFIGS = {
    "a": "ordinary frozen training (body forward every batch), 4 epochs",
    "b": "cached frozen training (head on cached body features), 4 epochs",
    "c": "full default recipe (`ursa train` defaults)",
    "v": "(b) with 2 views cycled over the 4 epochs (--views 2)",
}


def run_one(config: str, data: Path, seed: int, extra: list[str]) -> dict:
    """Train one configuration in this process and return its figures."""
    import resource

    sys.path.insert(0, str(ROOT))
    from ursa.training.config import TrainConfig
    from ursa.training.recipe import build_learner, train

    t0 = time.perf_counter()
    if config == "c":
        kw = json.loads(extra[0]) if extra else {}
        cfg = TrainConfig(data=data, out=Path(f"/tmp/ursa_bench_c_{seed}"), seed=seed, split_seed=42,
                          quiet=True, **kw)
        res = train(cfg)
        err = res.metrics["error_rate"]
        n_train = res.n_train
        epochs = cfg.epochs + cfg.unfreeze_epochs
    else:
        cfg = TrainConfig(data=data, out=Path(f"/tmp/ursa_bench_{config}_{seed}"), seed=seed, split_seed=42,
                          cache=config != "a", views=2 if config == "v" else None, quiet=True)
        learn, ds = build_learner(cfg)  # the same folder -> learner recipe as `ursa train`
        learn.freeze()
        learn.fit_one_cycle(cfg.epochs, cfg.lr)
        err = learn.recorder.rows[-1]["error_rate"]
        n_train, epochs = len(ds.train_idx), 4
    wall = time.perf_counter() - t0
    # This process only: with the images decoded in memory there are no loader workers, and the
    # children's figure would count a forked `ldconfig -p` (run at import) as the parent's size.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"config": config, "seed": seed, "wall": wall, "img_s": n_train * epochs / wall, "rss_mb": rss, "error_rate": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--configs", default="abcv")
    ap.add_argument("--recipe", default="{}", help="JSON of TrainConfig overrides for (c)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.data, args.seed, [args.recipe])), flush=True)
        return
    if not args.data.is_dir():
        sys.exit(f"data folder {args.data} not found (needs ../shared/datasets/bears)")
    results: dict[str, list[dict]] = {}
    for cfg in args.configs:
        for seed in range(args.seeds):
            cmd = [sys.executable, __file__, "--one", cfg, "--seed", str(seed), "--data", str(args.data), "--recipe", args.recipe]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"config {cfg} seed {seed} failed:\n{out.stderr[-3000:]}")
            r = json.loads(line[7:])
            results.setdefault(cfg, []).append(r)
            print(f"  {cfg} seed {seed}: {r['wall']:.1f} s, error_rate {r['error_rate']:.4f}, peak RSS {r['rss_mb']:.0f} MB", flush=True)
    print()
    print(f"{'config':<58} {'wall s':>8} {'img/s':>7} {'peak RSS':>9} {'error_rate (mean ± sd; per seed)':>36}")
    for cfg, rs in results.items():
        walls = [r["wall"] for r in rs]
        errs = [r["error_rate"] for r in rs]
        sd = statistics.stdev(errs) if len(errs) > 1 else 0.0
        print(f"({cfg}) {CONFIGS[cfg]:<54} {statistics.median(walls):>8.1f} {statistics.median(r['img_s'] for r in rs):>7.1f} "
              f"{max(r['rss_mb'] for r in rs):>7.0f}MB   {statistics.mean(errs):.4f} ± {sd:.4f}; "
              + ", ".join(f"{e:.4f}" for e in errs))
    if "a" in results:
        print()
        for cfg in ("b", "v"):
            if cfg in results:
                ratio = statistics.median(r["wall"] for r in results["a"]) / statistics.median(r["wall"] for r in results[cfg])
                print(f"speed-up (a)/({cfg}): {ratio:.1f}x (wall time, median over seeds)")


if __name__ == "__main__":
    main()

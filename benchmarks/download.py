"""Benchmark: concurrent download vs one at a time, and verify vs a plain Pillow loop.

Serves N image URLs locally with 50 ms added latency per request (bears thumbnails from
../shared/datasets/bears, or images made here), downloads them with ``--workers 1`` and with
the defaults, and reports images/s and the speed-up. The URLs are spread over several loopback
addresses (127.0.0.1, 127.0.0.2, ...) because the default per-host limit (4) is meant to stop
one site from being hammered; one single-host row shows what that limit costs.
Then times ``verify`` on a copy of the bears set against a sequential ``Image.open().load()``.

    .venv/bin/python benchmarks/download.py [--n 1000] [--latency 0.05] [--hosts 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BEARS = REPO.parent / "shared" / "datasets" / "bears"


def start_servers(hosts: int, latency: float, bears: int) -> tuple[list[subprocess.Popen], list[str]]:
    """One fault-server process per loopback address, so the client never shares their GIL."""
    procs, bases = [], []
    for i in range(hosts):
        cmd = [sys.executable, str(REPO / "tests" / "fault_server.py"), "--host", f"127.0.0.{i + 1}",
               "--delay", str(latency), "--bears", str(bears)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline().strip()  # "serving N images on http://127.0.0.x:PORT/"
        procs.append(p)
        bases.append(line.rsplit(" ", 1)[1])
    return procs, bases


def image_names(bears: int) -> list[str]:
    if BEARS.is_dir():
        return [f"{p.parent.name}_{p.name}" for p in sorted(BEARS.rglob("*.jpg"))[:bears]]
    return [f"{i}.jpg" for i in range(8)]


def run_download(urls: list[str], workers: int, per_host: int = 4) -> tuple[float, int, int]:
    from ursa.acquire.download import download_images

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        s = download_images({"bears": urls}, tmp, workers=workers, per_host=per_host, max_pics=0, progress=False,
                            allow_private=True)  # the servers are on 127.0.0.x
        dt = time.perf_counter() - t0
    return dt, s.saved + s.duplicate, s.failed


def bench_verify() -> list[tuple[str, float, int]]:
    from PIL import Image

    from ursa.acquire.verify import verify_images

    if not BEARS.is_dir():
        return []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "bears"
        shutil.copytree(BEARS, data, copy_function=shutil.copyfile)  # not the read-only bits
        for d in [data, *(p for p in data.rglob("*") if p.is_dir())]:
            d.chmod(0o755)
        files = sorted(data.rglob("*.jpg"))
        t0 = time.perf_counter()
        for p in files:
            with Image.open(p) as im:
                im.load()
        rows.append(("Pillow open+load loop (sequential)", time.perf_counter() - t0, len(files)))
        pool = max(2, min(4, os.cpu_count() or 1))
        for workers, label in ((1, "--workers 1"), (pool, f"--workers {pool}"), (None, "default (in-process under 16 MB)")):
            (data / "verify.csv").unlink(missing_ok=True)
            t0 = time.perf_counter()
            s = verify_images(data, workers=workers, progress=False)
            rows.append((f"ursa verify {label}", time.perf_counter() - t0, s.checked))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="URLs per run")
    ap.add_argument("--latency", type=float, default=0.05, help="seconds added to every response")
    ap.add_argument("--hosts", type=int, default=8, help="loopback addresses to spread the URLs over")
    args = ap.parse_args()

    names = image_names(967)
    procs, bases = start_servers(args.hosts, args.latency, len(names) if BEARS.is_dir() else 0)
    try:
        # Unique URLs; the same image may come back under two URLs (then it is a 'duplicate').
        spread = [f"{bases[i % len(bases)]}img/{names[i % len(names)]}?n={i}" for i in range(args.n)]
        single = [f"{bases[0]}img/{names[i % len(names)]}?n={i}" for i in range(args.n)]
        print(f"{args.n} URLs, {args.latency * 1000:.0f} ms latency each, {os.cpu_count()} CPUs\n")
        results = []
        for label, urls, workers in (
            ("--workers 1", spread, 1),
            (f"default (--workers 16 --per-host 4, {args.hosts} hosts)", spread, 16),
            ("default, all URLs on one host", single, 16),
        ):
            dt, done, failed = run_download(urls, workers)
            results.append((label, dt, done, failed))
    finally:
        for p in procs:
            p.terminate()
            p.wait()

    base = results[0][2] / results[0][1]
    print(f"{'download':<48} {'seconds':>8} {'images':>7} {'failed':>7} {'images/s':>9} {'speed-up':>9}")
    for label, dt, done, failed in results:
        rate = done / dt
        print(f"{label:<48} {dt:>8.2f} {done:>7} {failed:>7} {rate:>9.1f} {rate / base:>8.1f}x")

    vrows = bench_verify()
    if vrows:
        print(f"\n{'verify (bears, ' + str(vrows[0][2]) + ' images)':<48} {'seconds':>8} {'images/s':>9} {'vs loop':>9}")
        loop_rate = vrows[0][2] / vrows[0][1]
        for label, dt, n in vrows:
            print(f"{label:<48} {dt:>8.2f} {n / dt:>9.0f} {n / dt / loop_rate:>8.2f}x")
    else:
        print("\n(verify benchmark skipped: ../shared/datasets/bears not present)")


if __name__ == "__main__":
    main()

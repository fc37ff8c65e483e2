"""Benchmark: `ursa serve` under load on loopback, with and without micro-batching.

For each server setting, starts ``python -m ursa serve MODEL`` on a free port (or uses --url),
then sends (1) requests one at a time, for latency, and (2) N requests from C concurrent
clients (httpx async), for throughput, each a bears image posted as multipart field ``file``.
Prints requests/s, p50/p99 latency and the error count (anything but 200 is an error; must be 0).

    .venv/bin/python benchmarks/load.py [MODEL] [--n 2000] [--clients 16] [--max-batch 1,16]
        [--backend auto] [--workers 1] [--url http://127.0.0.1:8000]

The load generator shares the machine's cores with the server: on 2 cores it takes a real
share of the CPU, so these numbers are a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BEARS = REPO.parent / "shared" / "datasets" / "bears"

from benchmarks.inference import ensure_model, percentile  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`ursa serve` in a child process; returns once /health answers."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "ursa", "serve", str(model), "--port", str(port), "--no-access-log", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server failed to start: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("server did not start in 180 s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


async def run_load(url: str, images: list[bytes], n: int, clients: int) -> dict:
    """n POST /predict from `clients` concurrent connections; latency of each, errors counted."""
    import httpx

    lat: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(client: httpx.AsyncClient) -> None:
        for k in counter:
            t = time.perf_counter()
            try:
                r = await client.post("/predict", files={"file": ("bear.jpg", images[k % len(images)], "image/jpeg")})
                ok = r.status_code == 200
                key = str(r.status_code)
            except httpx.HTTPError as e:
                ok, key = False, type(e).__name__
            lat.append(time.perf_counter() - t)
            if not ok:
                errors[key] = errors.get(key, 0) + 1

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        for b in images[:5]:  # warm up
            await client.post("/predict", files={"file": ("bear.jpg", b, "image/jpeg")})
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"n": n, "clients": clients, "rps": n / wall, "p50": percentile(lat, 50) * 1e3,
            "p99": percentile(lat, 99) * 1e3, "errors": sum(errors.values()), "error_kinds": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, help="model.safetensors (default: the one benchmarks/inference.py trains)")
    ap.add_argument("--url", help="measure an already running server instead of starting one")
    ap.add_argument("--n", type=int, default=2000, help="requests in the concurrent phase")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--sequential", type=int, default=200, help="requests sent one at a time first (latency)")
    ap.add_argument("--max-batch", default="1,16", help="server --max-batch values to compare, comma-separated")
    ap.add_argument("--batch-wait-ms", type=float, default=0.0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--data", type=Path, default=BEARS)
    args = ap.parse_args()

    if args.data.is_dir():
        files = sorted(args.data.rglob("*.jpg"))[::10][:100]
    else:
        files = sorted((REPO / "examples" / "heldout").glob("*.jpg"))
    images = [f.read_bytes() for f in files]
    rows = []
    settings = [None] if args.url else [int(v) for v in args.max_batch.split(",")]
    model = None if args.url else ensure_model(args.model)
    if model is not None and args.backend in ("auto", "onnx"):
        from benchmarks.inference import ensure_onnx

        ensure_onnx(model)
    for mb in settings:
        proc = None
        url = args.url
        if url is None:
            extra = ["--max-batch", str(mb), "--batch-wait-ms", str(args.batch_wait_ms), "--backend", args.backend,
                     "--workers", str(args.workers)]
            proc, url = start_server(model, extra)
        try:
            import httpx

            info = httpx.get(url + "/model").json()
            seq = asyncio.run(run_load(url, images, args.sequential, 1))
            conc = asyncio.run(run_load(url, images, args.n, args.clients))
        finally:
            rc = stop_server(proc) if proc else 0
        name = f"{info['backend']}, max-batch {mb if mb is not None else '?'}, {args.workers} worker(s)"
        rows.append((name, seq, conc, rc))
        print(f"  measured {name}", flush=True)

    print()
    print(f"{len(images)} distinct bears images ({info['arch']} at {info['input_size']} px); cores: {os.cpu_count()}; "
          f"client and server share them")
    head = (f"{'server':<40} {'1 client p50':>13} {'p99':>7} {'req/s':>6} | {'clients':>7} {'req/s':>7} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'exit':>4}")
    print(head)
    print("-" * len(head))
    for name, seq, conc, rc in rows:
        print(f"{name:<40} {seq['p50']:13.1f} {seq['p99']:7.1f} {seq['rps']:6.0f} | {conc['clients']:7d} "
              f"{conc['rps']:7.0f} {conc['p50']:7.1f} {conc['p99']:7.1f} {conc['errors']:6d} {rc:4d}")
        if conc["errors"] or seq["errors"]:
            print(f"  errors: {seq['error_kinds']} {conc['error_kinds']}")
    print()
    print("target (lite0 at 224 px): p50 <= 15 ms over HTTP on loopback (one client); 0 errors")


if __name__ == "__main__":
    main()

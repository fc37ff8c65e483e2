"""Benchmark: `ursa serve` under load on loopback, with and without micro-batching, and under attack.

For each server setting, starts ``python -m ursa serve MODEL`` on a free port (or uses --url),
then sends (1) requests one at a time, for latency, and (2) N requests from C concurrent
clients (httpx async), for throughput, each a bears image posted as multipart field ``file``.
Prints requests/s, p50/p99 latency and the error count (anything but 200 is an error; must be 0).

    .venv/bin/python benchmarks/load.py [MODEL] [--n 2000] [--clients 16] [--max-batch 1,16]
        [--backend auto] [--workers 1] [--url http://127.0.0.1:8000]

``--hostile`` (issue 17) runs a mix instead, for ``--rounds`` rounds against one server: N
requests from C clients of which ``--huge-share`` are huge-pixel images (a 258 KB PNG declaring
81 Mpx, refused from its header with 413, and a 48 Mpx JPEG, decoded at 1/8 scale), the rest
normal bears images; meanwhile ``--slow`` clients that send headers and part of a body, or half
their headers, then stall until the server times them out, again and again. It prints, per
round, the normal requests' errors (must be 0), p50 and p99 (p99 must be under 10x p50), what
the huge and slow ones got, and the server's RSS (must stay flat), then PASS or FAIL for each.

    .venv/bin/python benchmarks/load.py [MODEL] --hostile [--n 2000] [--clients 16] [--rounds 3] [--slow 8]

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


def huge_images() -> dict[str, tuple[str, bytes, str]]:
    """The issue's huge-pixel uploads: an 81 Mpx PNG (258 KB, one colour) and a 48 Mpx JPEG."""
    import io

    from PIL import Image

    out = {}
    for name, size, fmt, mime in (("huge.png", (9000, 9000), "PNG", "image/png"),
                                  ("huge.jpg", (8000, 6000), "JPEG", "image/jpeg")):
        buf = io.BytesIO()
        Image.new("RGB", size, (90, 60, 30)).save(buf, fmt)
        out[name] = (name, buf.getvalue(), mime)
    return out


def rss_mb(pid: int | None) -> tuple[float, float] | None:
    """(resident MB now, peak MB so far) of a process on this machine, from /proc."""
    if pid is None:
        return None
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


async def slow_client(host: str, port: int, k: int, outcomes: dict[str, int]) -> None:
    """Over and over: half a request (headers and part of a body, or half the headers), then silence."""
    body_head = (f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/jpeg\r\n"
                 "Content-Length: 200000\r\n\r\n").encode() + b"\xff\xd8\xff" + b"\x00" * 997
    header_half = f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Ty".encode()
    n = 0
    while True:
        n += 1
        kind = "body" if (k + n) % 2 else "headers"
        writer = None
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(body_head if kind == "body" else header_half)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 300)  # until the server closes it
            key = f"{kind} {data[9:12].decode(errors='replace') or 'closed'}"
        except asyncio.CancelledError:  # the round ended while this one stalled
            key = f"{kind} still stalling at the end"
            outcomes[key] = outcomes.get(key, 0) + 1
            raise
        except (OSError, asyncio.TimeoutError) as e:
            key = f"{kind} {type(e).__name__}"
        finally:
            if writer is not None:
                writer.close()
        outcomes[key] = outcomes.get(key, 0) + 1


async def hostile_round(url: str, images: list[bytes], huge: dict, n: int, clients: int, huge_share: float,
                        slow: int) -> dict:
    """One round of the mix: n requests from `clients` connections (some huge), `slow` stalling clients beside them."""
    import httpx

    host, port = url.split("//", 1)[1].rsplit(":", 1)
    lat: list[float] = []
    errors: dict[str, int] = {}
    huge_status: dict[str, int] = {}
    slow_outcomes: dict[str, int] = {}
    every = max(1, round(1 / huge_share)) if huge_share > 0 else 0
    counter = iter(range(n))
    names = sorted(huge)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(client: httpx.AsyncClient) -> None:
        for k in counter:
            if every and k % every == every - 1:
                name = names[(k // every) % len(names)]
                try:
                    r = await client.post("/predict", files={"file": huge[name]})
                    key = f"{name} {r.status_code}"
                except httpx.HTTPError as e:
                    key = f"{name} {type(e).__name__}"
                huge_status[key] = huge_status.get(key, 0) + 1
                continue
            t = time.perf_counter()
            try:
                r = await client.post("/predict", files={"file": ("bear.jpg", images[k % len(images)], "image/jpeg")})
                ok, key = r.status_code == 200, str(r.status_code)
            except httpx.HTTPError as e:
                ok, key = False, type(e).__name__
            lat.append(time.perf_counter() - t)
            if not ok:
                errors[key] = errors.get(key, 0) + 1

    slow_tasks = [asyncio.create_task(slow_client(host, int(port), k, slow_outcomes)) for k in range(slow)]
    try:
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(client) for _ in range(clients)))
            wall = time.perf_counter() - t0
    finally:
        for t in slow_tasks:
            t.cancel()
        await asyncio.gather(*slow_tasks, return_exceptions=True)
    return {"normal": len(lat), "rps": n / wall, "p50": percentile(lat, 50) * 1e3, "p99": percentile(lat, 99) * 1e3,
            "errors": sum(errors.values()), "error_kinds": errors, "huge": huge_status, "slow": slow_outcomes}


def hostile(args: argparse.Namespace, images: list[bytes]) -> None:
    """The issue 17 load test: rounds of normal, huge-pixel and slow clients against one server."""
    import httpx

    huge = huge_images()
    proc, url = None, args.url
    if url is None:
        model = ensure_model(args.model)
        if args.backend in ("auto", "onnx"):
            from benchmarks.inference import ensure_onnx

            ensure_onnx(model)
        proc, url = start_server(model, ["--backend", args.backend, "--workers", "1"])
    rows = []
    try:
        info = httpx.get(url + "/model").json()
        start = rss_mb(proc.pid if proc else None)
        for r in range(args.rounds):
            res = asyncio.run(hostile_round(url, images, huge, args.n, args.clients, args.huge_share, args.slow))
            res["rss"] = rss_mb(proc.pid if proc else None)
            rows.append(res)
            print(f"  round {r + 1}: {res['normal']} normal requests, p50 {res['p50']:.0f} ms", flush=True)
        health = httpx.get(url + "/health", timeout=10).status_code
    finally:
        rc = stop_server(proc) if proc else 0

    print()
    print(f"{info['arch']} at {info['input_size']} px on {info['backend']}; {args.n} requests a round from "
          f"{args.clients} clients ({args.huge_share:.0%} huge-pixel), {args.slow} slow clients beside them; "
          f"cores: {os.cpu_count()}, shared by client and server")
    if start:
        print(f"server RSS before the first round: {start[0]:.0f} MB")
    head = (f"{'round':>5} {'normal':>6} {'errors':>6} {'p50 ms':>7} {'p99 ms':>7} {'p99/p50':>7} {'req/s':>6} "
            f"{'RSS MB':>7} {'peak MB':>7}  huge-pixel answers / slow clients' answers")
    print(head)
    print("-" * len(head))
    for i, res in enumerate(rows, 1):
        rss = res["rss"] or (float("nan"), float("nan"))
        ratio = res["p99"] / res["p50"] if res["p50"] else float("inf")
        print(f"{i:5d} {res['normal']:6d} {res['errors']:6d} {res['p50']:7.0f} {res['p99']:7.0f} {ratio:7.1f} "
              f"{res['rps']:6.0f} {rss[0]:7.0f} {rss[1]:7.0f}  {fmt_counts(res['huge'])} / {fmt_counts(res['slow'])}")
        if res["errors"]:
            print(f"      errors on normal requests: {res['error_kinds']}")
    checks = [("0 errors on normal requests", all(r["errors"] == 0 for r in rows)),
              ("p99 under 10x p50 in every round", all(r["p99"] < 10 * r["p50"] for r in rows)),
              ("/health answers after the rounds", health == 200),
              ("server exits 0 on SIGTERM", rc == 0)]
    if all(r["rss"] for r in rows):
        first, last = rows[0]["rss"][0], rows[-1]["rss"][0]
        checks.append((f"RSS flat: last round {last:.0f} MB within 10% (+32 MB) of the first {first:.0f} MB",
                       last <= first * 1.1 + 32))
    print()
    for what, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}")


def fmt_counts(d: dict[str, int]) -> str:
    """{'huge.png 413': 100} as 'huge.png 413 x100', sorted."""
    return ", ".join(f"{k} x{v}" for k, v in sorted(d.items())) or "-"


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
    ap.add_argument("--hostile", action="store_true", help="the issue 17 mix: normal, huge-pixel and slow clients")
    ap.add_argument("--rounds", type=int, default=3, help="--hostile: rounds against one server (RSS after each)")
    ap.add_argument("--huge-share", type=float, default=0.1, help="--hostile: share of requests that are huge-pixel")
    ap.add_argument("--slow", type=int, default=8, help="--hostile: slow clients stalling beside the load")
    args = ap.parse_args()

    if args.data.is_dir():
        files = sorted(args.data.rglob("*.jpg"))[::10][:100]
    else:
        files = sorted((REPO / "examples" / "heldout").glob("*.jpg"))
    images = [f.read_bytes() for f in files]
    if args.hostile:
        hostile(args, images)
        return
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

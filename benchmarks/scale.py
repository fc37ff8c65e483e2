"""Issue 13: does `ursa train` scale to 16x the images (time linear, memory flat), and what do 2 ranks cost?

Makes sets of 1k, 4k and 16k images from ../shared/datasets/bears: random crops (60-100% of each side,
random position) and random horizontal flips of the ~967 originals, written as JPEG (quality 90) into a
temp folder, class folders (the labels) kept, all from --seed. The largest set is made once; each smaller
set is a folder of hard links to a prefix of it (image i depends only on the seed and i), so nothing is
made twice and generation time is printed on its own, never inside a training run.

Then one `ursa train SET --out RUN --quiet` (the default recipe, plus --train-args) per set, each in its
own process: wall s (the whole command, as a user waits); peak memory of the run's whole process tree
(the command and every descendant: loader workers, torchrun ranks), sampled every 0.2 s from /proc as
the sum of VmRSS, and of Pss (shared pages counted once; read while the RSS grows, else every ~1 s);
wait4's peak RSS for comparison (the largest single process, exact where samples can miss a brief
peak); the error rate; whether pixels were kept in memory (RUN/recipe.json "pixels"). Then the
--ranks-size set with 1 process (the table's run when that size is in --sizes) and with `torchrun
--standalone --nproc-per-node 2` (gloo on CPUs), and the ratio. One table, issue 13's aims held or
missed, and all of it in benchmarks/results/scale.json (rewritten after every run).

    .venv/bin/python benchmarks/scale.py        # 1k, 4k, 16k + 2 ranks: ~20-30 min on 2 cores (bears' 967: ~50 s)
    .venv/bin/python benchmarks/scale.py --sizes 40,80 --ranks-size 40 \\
        --train-args "--epochs 1 --budget 0 --size 64" --out /tmp/scale_smoke.json   # smoke check, ~1 min

The crops of one original land on both sides of ursa's random validation split, so the error rate is
optimistic (a sanity figure, not a score). Generation uses Pillow (run with the venv's python); the
rest is stdlib only. The temp folder (under --work) is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results"
SET_NAME = "bears"
IMG_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CROP_MIN, JPEG_QUALITY = 0.6, 90
SAMPLE_EVERY_S, PSS_EVERY = 0.2, 5  # Pss (smaps_rollup) costs ~5 ms a GB to read: while RSS grows, else every 5th
TIME_AIM, RSS_AIM = 1.3, 1.5
ERROR_LINE = re.compile(r"^(?:\[[^\]\n]*\]:?\s*)?error_rate\s+([0-9.eE+-]+)\s+\(accuracy", re.M)
MACHINE_PROBE = ("import json, torch, PIL\nprint(json.dumps({'torch': torch.__version__, "
                 "'torch_threads': torch.get_num_threads(), 'pillow': PIL.__version__}))\n")


sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import InputError, write_atomic  # noqa: E402 - the benchmarks share their plumbing (stdlib only)


def parse_sizes(text: str) -> list[int]:
    """'1000,4k,16000' -> [1000, 4000, 16000] (sorted, distinct, each >= 1)."""
    sizes = set()
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        try:
            n = int(float(part[:-1]) * 1000) if part.endswith("k") else int(part)
        except ValueError:
            raise InputError(f"--sizes: {part!r} is not a number of images (e.g. 1000,4k,16000)") from None
        if n < 1:
            raise InputError(f"--sizes: {part!r} must be at least 1 image")
        sizes.add(n)
    if not sizes:
        raise InputError("--sizes: give at least one number of images, e.g. 1000,4000,16000")
    return sorted(sizes)


def list_originals(set_dir: Path) -> list[tuple[str, Path]]:
    """(class, image file) of every image in the set's class folders, sorted."""
    if not set_dir.is_dir():
        raise InputError(f"{set_dir} not found; the bears set is ../shared/datasets/bears (give --root)")
    rows = []
    for c in sorted(d.name for d in set_dir.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))):
        rows += [(c, f) for f in sorted((set_dir / c).rglob("*"))
                 if f.is_file() and f.suffix.lower() in IMG_EXTS and not f.name.startswith(".")]
    if not rows:
        raise InputError(f"{set_dir}: no images in class folders; expected {set_dir}/<class>/<image>")
    return rows


def plan_images(originals: list[tuple[str, Path]], n: int, seed: int) -> list[tuple[int, str, Path, str]]:
    """(i, class, original, file name) of images 0..n-1: the originals in one seeded order, cycled; a prefix for smaller n."""
    order = list(range(len(originals)))
    random.Random(seed).shuffle(order)
    width = max(5, len(str(n - 1)))
    out = []
    for i in range(n):
        c, src = originals[order[i % len(order)]]
        out.append((i, c, src, f"{i:0{width}d}_{src.stem}.jpg"))
    return out


def crop_box(w: int, h: int, seed: int, i: int) -> tuple[tuple[int, int, int, int], bool]:
    """Image i's crop (left, top, right, bottom: 60-100% of each side, random position) and horizontal flip."""
    rng = random.Random(f"{seed}/{i}")  # image i depends on the seed and i only: sets grow without remaking
    cw = max(1, round(w * rng.uniform(CROP_MIN, 1.0)))
    ch = max(1, round(h * rng.uniform(CROP_MIN, 1.0)))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return (x, y, x + cw, y + ch), rng.random() < 0.5


def make_images(jobs: list[tuple[str, str, int]], seed: int) -> int:
    """Write each (original, destination, i) as its random crop and flip, JPEG quality 90; how many written."""
    from PIL import Image  # the benchmark's only non-stdlib import, in the generating processes only

    for src, dest, i in jobs:
        with Image.open(src) as im:
            im = im.convert("RGB")
            box, flip = crop_box(im.width, im.height, seed, i)
            im = im.crop(box)
            if flip:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            im.save(dest, "JPEG", quality=JPEG_QUALITY)
    return len(jobs)


def generate_pool(originals: list[tuple[str, Path]], n: int, seed: int, pool: Path, procs: int) -> list[Path]:
    """The n images under pool/<class>/, made in `procs` processes; their paths, in image order."""
    plan = plan_images(originals, n, seed)
    for c in sorted({c for _, c, _, _ in plan}):
        (pool / c).mkdir(parents=True, exist_ok=True)
    jobs = [(str(src), str(pool / c / name), i) for i, c, src, name in plan]
    if procs <= 1 or n < 256:
        make_images(jobs, seed)
    else:
        chunks = [jobs[k:k + 100] for k in range(0, n, 100)]
        with ProcessPoolExecutor(max_workers=procs) as ex:
            list(ex.map(make_images, chunks, [seed] * len(chunks)))
    return [pool / c / name for _, c, _, name in plan]


def link_set(files: list[Path], pool: Path, dest: Path) -> Path:
    """dest/<class>/<name> hard links (symlinks where linking fails) to the given pool files; dest."""
    for f in files:
        target = dest / f.relative_to(pool)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            target.symlink_to(f)
    return dest


def parse_ppid(stat: str) -> int:
    """The parent pid from a /proc/<pid>/stat line (the name in parentheses may hold spaces and parentheses)."""
    return int(stat[stat.rindex(")") + 2:].split()[1])


def process_table() -> dict[int, int]:
    """{pid: parent pid} of every process now running."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", encoding="utf-8", errors="replace") as f:
                    table[int(name)] = parse_ppid(f.read())
            except (OSError, ValueError, IndexError):
                pass  # gone between listing and reading
    return table


def descendants(root: int, ppids: dict[int, int]) -> list[int]:
    """root and every process below it, from a {pid: parent pid} table."""
    children: dict[int, list[int]] = {}
    for pid, ppid in ppids.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return sorted(out)


def parse_kb(text: str, key: str) -> int:
    """The `key:  N kB` figure of a /proc status or smaps_rollup text, 0 when absent (a zombie, a kernel thread)."""
    m = re.search(rf"^{re.escape(key)}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else 0


def read_kb(pid: int, file: str, key: str) -> int:
    """One process's figure from /proc/<pid>/<file>, 0 when it has gone."""
    try:
        with open(f"/proc/{pid}/{file}", encoding="utf-8", errors="replace") as f:
            return parse_kb(f.read(), key)
    except OSError:
        return 0


class TreeSampler(threading.Thread):
    """Peak summed VmRSS (and Pss: while the RSS grows, else every PSS_EVERY samples) of a process tree, until stopped."""

    def __init__(self, pid: int, every: float = SAMPLE_EVERY_S):
        super().__init__(daemon=True)
        self.pid, self.every, self.done = pid, every, threading.Event()
        self.peak_rss_kb = self.peak_pss_kb = self.peak_procs = self.samples = 0

    def sample(self) -> None:
        """One look at the tree now."""
        tree = descendants(self.pid, process_table())
        rss = sum(read_kb(p, "status", "VmRSS") for p in tree)
        if rss > 1.01 * self.peak_rss_kb or self.samples % PSS_EVERY == 0:  # growing, or every ~1 s
            self.peak_pss_kb = max(self.peak_pss_kb, sum(read_kb(p, "smaps_rollup", "Pss") for p in tree))
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_procs = max(self.peak_procs, len(tree))
        self.samples += 1

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.every)


def run_measured(cmd: list[str], log_dir: Path) -> dict:
    """Run cmd; wall seconds, peak memory of its whole process tree (sampled), wait4's peak RSS, its output."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stdout.txt", "w+b") as so, open(log_dir / "stderr.txt", "w+b") as se:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=so, stderr=se, cwd=ROOT)
        sampler = TreeSampler(p.pid)
        sampler.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        finally:
            sampler.done.set()
            sampler.join()
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        so.seek(0), se.seek(0)
        return {"rc": p.returncode, "wall_s": wall, "peak_rss_mb": sampler.peak_rss_kb / 1024,
                "peak_pss_mb": sampler.peak_pss_kb / 1024, "wait4_rss_mb": usage.ru_maxrss / 1024,
                "peak_procs": sampler.peak_procs, "samples": sampler.samples,
                "stdout": so.read().decode(errors="replace"), "stderr": se.read().decode(errors="replace")}


def parse_error_rate(stdout: str, run_dir: Path) -> float | None:
    """The final error rate: the last `error_rate X (accuracy ...)` line, else report.json's."""
    if found := ERROR_LINE.findall(stdout):
        return float(found[-1])
    try:
        return float(json.loads((run_dir / "report.json").read_text())["error_rate"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_recipe(run_dir: Path) -> dict | None:
    """The run's recipe.json, or None."""
    try:
        got = json.loads((run_dir / "recipe.json").read_text())
        return got if isinstance(got, dict) else None
    except (OSError, ValueError):
        return None


def ursa_command(data: Path, out: Path, train_args: list[str], ranks: int = 0) -> list[str]:
    """`ursa train` on a set, plain (ranks 0) or under torchrun with that many processes on this machine."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks else []
    return [sys.executable, *launcher, "-m", "ursa", "train", str(data), "--out", str(out), "--quiet", *train_args]


def tail(text: str, lines: int = 30) -> str:
    """The last lines of a text."""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def train_once(set_dir: Path, n: int, run_dir: Path, train_args: list[str], ranks: int = 0) -> dict:
    """One measured training run; its record."""
    cmd = ursa_command(set_dir, run_dir, train_args, ranks)
    r = run_measured(cmd, run_dir.parent / f"{run_dir.name}_logs")
    recipe = read_recipe(run_dir)
    rec = {"images": n, "ranks": ranks or 1, "launcher": "torchrun" if ranks else "plain", "command": shlex.join(cmd),
           "rc": r["rc"], "wall_s": r["wall_s"], "s_per_1k": r["wall_s"] / (n / 1000),
           **{k: r[k] for k in ("peak_rss_mb", "peak_pss_mb", "wait4_rss_mb", "peak_procs", "samples")},
           "pixels": str(recipe.get("pixels", "?")) if recipe else "?",
           "error_rate": parse_error_rate(r["stdout"], run_dir) if r["rc"] == 0 else None,
           "result_lines": len(ERROR_LINE.findall(r["stdout"])), "recipe_json": recipe}
    if ranks and rec["result_lines"] > 1:  # every rank printed a result: each trained alone, not one run across ranks
        rec["note"] = f"{rec['result_lines']} result lines: each rank trained on its own (only rank 0 should print)"
    if rec["error_rate"] is None:
        rec["failure"] = tail(r["stderr"]) or tail(r["stdout"]) or f"exit {r['rc']}, no output"
    return rec


def fmt(v: float | None, spec: str) -> str:
    """A figure, or '-' when there is none."""
    return "-" if v is None else format(v, spec)


def ok(rec: dict | None) -> bool:
    """A run that finished with an error rate."""
    return rec is not None and rec.get("error_rate") is not None


def _aim(name: str, value: str, target: str, held: bool | None) -> dict:
    return {"aim": name, "value": value, "target": target,
            "verdict": "not measured" if held is None else ("held" if held else "missed")}


def evaluate_aims(rows: list[dict]) -> list[dict]:
    """Issue 13's aims from the per-size runs: s per 1k images and peak RSS, largest set against the smallest."""
    good = sorted((r for r in rows if ok(r)), key=lambda r: r["images"])
    if len(good) < 2 or len(good) != len(rows):
        why = "-" if len(good) >= 2 or len(rows) < 2 else "need two sizes that ran"
        return [_aim("s per 1k: largest / smallest", why, f"<= {TIME_AIM}", None),
                _aim("peak RSS: largest / smallest", why, f"<= {RSS_AIM}", None)]
    lo, hi = good[0], good[-1]
    t, m = hi["s_per_1k"] / lo["s_per_1k"], hi["peak_rss_mb"] / lo["peak_rss_mb"] if lo["peak_rss_mb"] else float("inf")
    span = f"({hi['images']} vs {lo['images']})"
    return [_aim("s per 1k: largest / smallest", f"{t:.2f} {span}", f"<= {TIME_AIM}", t <= TIME_AIM),
            _aim("peak RSS: largest / smallest", f"{m:.2f} {span}", f"<= {RSS_AIM}", m <= RSS_AIM)]


def ranks_ratio(one: dict | None, two: dict | None) -> dict | None:
    """2 ranks / 1 rank: wall, peak RSS and Pss of the process tree; None unless both ran."""
    if not (ok(one) and ok(two)):
        return None
    div = lambda a, b: a / b if b else None  # noqa: E731
    return {"wall": div(two["wall_s"], one["wall_s"]), "peak_rss": div(two["peak_rss_mb"], one["peak_rss_mb"]),
            "peak_pss": div(two["peak_pss_mb"], one["peak_pss_mb"]), "error_diff": two["error_rate"] - one["error_rate"]}


HEADER = (f"{'images':>7} {'ranks':>5} {'wall s':>8} {'s/1k img':>8} {'peak RSS MB':>11} {'peak PSS MB':>11} {'wait4 MB':>8} "
          f"{'procs':>5}  {'pixels':<8} {'error':>7}")


def row_line(r: dict) -> str:
    """One run as a table row (the failure's last line when it failed)."""
    line = (f"{r['images']:>7} {r['ranks']:>5} {r['wall_s']:>8.1f} {r['s_per_1k']:>8.1f} {r['peak_rss_mb']:>11.0f} "
            f"{r['peak_pss_mb']:>11.0f} {r['wait4_rss_mb']:>8.0f} {r['peak_procs']:>5}  {r['pixels']:<8} "
            f"{fmt(r['error_rate'], '.4f'):>7}")
    if not ok(r):
        line += f"  FAILED (exit {r['rc']}): " + (r.get("failure", "").splitlines() or [""])[-1][:160]
    return line


def print_report(rows: list[dict], ranks: dict | None, aims: list[dict]) -> None:
    """The per-size table, the aims, and the ranks comparison."""
    print("\nscale (peak RSS/PSS: summed over the run's whole process tree, sampled; wait4: the largest single process,"
          " the command or a descendant it waited for):")
    print(HEADER)
    for r in rows:
        print(row_line(r))
    print("\naims:")
    for a in aims:
        print(f"  {a['aim']:<30} {a['value']:>20}  aim {a['target']:<7} {a['verdict']}")
    if ranks is not None:
        print(f"\nranks on {ranks['images']} images (gloo, torchrun --standalone; "
              f"1 rank: {'the row above' if ranks.get('one_reused') else 'a plain run'}):")
        print(HEADER)
        for r in (ranks["one"], ranks["two"]):
            if r is not None:
                print(row_line(r))
        for r in (ranks["one"], ranks["two"]):
            if r is not None and r.get("note"):
                print(f"  note ({r['ranks']} ranks): {r['note']}")
        q = ranks["ratio"]
        print("  2 ranks / 1 rank: " + (f"wall {fmt(q['wall'], '.2f')}x, peak RSS {fmt(q['peak_rss'], '.2f')}x, "
                                        f"peak PSS {fmt(q['peak_pss'], '.2f')}x, error {q['error_diff']:+.4f}"
                                        if q else "not measured (a run failed)"))


def machine_info() -> dict:
    """Platform, CPUs, memory, python, and torch/Pillow as the venv sees them (a subprocess: the parent stays small)."""
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "executable": sys.executable, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    try:
        info["mem_total_mb"] = round(parse_kb(Path("/proc/meminfo").read_text(), "MemTotal") / 1024)
    except OSError:
        pass
    p = subprocess.run([sys.executable, "-c", MACHINE_PROBE], capture_output=True, text=True, cwd=ROOT)
    try:
        info.update(json.loads(p.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        info["torch"] = "? (" + ((p.stderr.strip().splitlines() or ["no output"])[-1]) + ")"
    g = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)  # read-only
    info["commit"] = g.stdout.strip() if g.returncode == 0 else None
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,4000,16000", help="comma-separated numbers of images (4k = 4000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated crops and flips")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder holding the bears set")
    ap.add_argument("--work", type=Path, default=None, help="make the temp folder under here [default: /tmp]")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (sets, run folders, logs)")
    ap.add_argument("--train-args", default="", help="extra `ursa train` options for every run, one quoted string")
    ap.add_argument("--ranks", action=argparse.BooleanOptionalAction, default=True, help="also 1 vs 2 ranks (torchrun)")
    ap.add_argument("--ranks-size", default="1000", help="images in the set of the ranks comparison")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale.json", help="results file")
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[list[int], int | None, list[str], list[tuple[str, Path]]]:
    """Sizes, the ranks set's size (None: no ranks), the extra train args, the originals; or InputError."""
    sizes = parse_sizes(args.sizes)
    ranks_size = parse_sizes(args.ranks_size)[0] if args.ranks else None
    if args.ranks and "," in args.ranks_size:
        raise InputError(f"--ranks-size: one number of images, got {args.ranks_size!r}")
    try:
        train_args = shlex.split(args.train_args)
    except ValueError as e:
        raise InputError(f"--train-args: {e}") from None
    if clash := [a for a in train_args if a.split("=")[0] in ("--out", "--quiet", "-q")]:
        raise InputError(f"--train-args: {clash[0]} is set by the benchmark; leave it out")
    if args.work is not None and args.work.exists() and not args.work.is_dir():
        raise InputError(f"--work {args.work} is not a folder")
    return sizes, ranks_size, train_args, list_originals(args.root / SET_NAME)


def main(argv: list[str] | None = None) -> int:
    """Generate the sets, train on each (and with 1 and 2 ranks); 0 ok, 1 a run failed, 2 bad input."""
    args = parse_args(argv)
    try:
        sizes, ranks_size, train_args, originals = check_args(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ursa_scale_", dir=args.work))
    try:
        return run_all(args, work, sizes, ranks_size, train_args, originals)
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_all(args: argparse.Namespace, work: Path, sizes: list[int], ranks_size: int | None, train_args: list[str],
            originals: list[tuple[str, Path]]) -> int:
    """Everything after the checks, inside the temp folder."""
    wanted = sorted(set(sizes) | ({ranks_size} if ranks_size else set()))
    procs = max(1, os.cpu_count() or 1)
    classes = len({c for c, _ in originals})
    print(f"{SET_NAME}: {len(originals)} originals in {classes} classes; work folder {work}", flush=True)
    t0 = time.perf_counter()
    pool = work / "pool"
    files = generate_pool(originals, wanted[-1], args.seed, pool, procs)
    gen_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    sets = {n: link_set(files[:n], pool, work / "sets" / f"n{n}") for n in wanted}
    link_s = time.perf_counter() - t1
    print(f"generated {wanted[-1]} images in {gen_s:.1f} s ({gen_s / (wanted[-1] / 1000):.1f} s per 1k, {procs} processes); "
          f"{len(wanted)} set(s) linked in {link_s:.1f} s (not counted in training)", flush=True)
    report = {"issue": 13, "machine": machine_info(), "set": SET_NAME, "originals": len(originals), "seed": args.seed,
              "sizes": sizes, "train_args": train_args, "generation": {"images": wanted[-1], "seconds": gen_s,
              "link_seconds": link_s, "processes": procs, "crop": f"{CROP_MIN:.0%}-100% of each side, random position",
              "flip": "horizontal, p=0.5", "jpeg_quality": JPEG_QUALITY},
              "sample_every_s": SAMPLE_EVERY_S, "pss_every_samples": PSS_EVERY}
    rows: list[dict] = []
    ranks: dict | None = None

    def save() -> list[dict]:
        aims = evaluate_aims(rows) if len(rows) == len(sizes) else []
        write_atomic(args.out, json.dumps({**report, "runs": rows, "aims": aims, "ranks": ranks}, indent=1, default=str) + "\n")
        return aims

    for n in sizes:
        print(f"  training on {n} images ...", flush=True)
        rec = train_once(sets[n], n, work / "runs" / f"n{n}", train_args)
        rows.append(rec)
        print("  " + row_line(rec).strip(), flush=True)
        save()
    if ranks_size is not None:
        one = next((r for r in rows if r["images"] == ranks_size), None)
        reused = one is not None
        if not reused:
            print(f"  training on {ranks_size} images, 1 rank ...", flush=True)
            one = train_once(sets[ranks_size], ranks_size, work / "runs" / f"n{ranks_size}_1rank", train_args)
            print("  " + row_line(one).strip(), flush=True)
        print(f"  training on {ranks_size} images, 2 ranks (torchrun) ...", flush=True)
        two = train_once(sets[ranks_size], ranks_size, work / "runs" / f"n{ranks_size}_2ranks", train_args, ranks=2)
        print("  " + row_line(two).strip(), flush=True)
        ranks = {"images": ranks_size, "one_reused": reused, "one": one, "two": two, "ratio": ranks_ratio(one, two)}
    aims = save()
    print_report(rows, ranks, aims)
    print(f"\nwritten: {args.out}")
    failed = [r for r in rows if not ok(r)] + ([r for r in (ranks["one"], ranks["two"]) if not ok(r)] if ranks else [])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

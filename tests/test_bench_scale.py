"""benchmarks/scale.py (issue 13's benchmark): its pure parts and a run with a stand-in for `ursa train`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import load_benchmark, make_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """The benchmark script as a module (benchmarks/ is not a package)."""
    yield load_benchmark("scale")
    sys.modules.pop("bench_scale", None)


def make_bears(root: Path, per_class: int = 2) -> Path:
    """root/bears/<class>/<n>.jpg: a tiny stand-in for the bears set (plus files the benchmark must skip)."""
    for k, c in enumerate(("black", "grizzly", "teddy")):
        for i in range(per_class):
            make_image(root / "bears" / c / f"{c}_{i}.jpg", color=(40 * k, 90, 20 * i), size=(60 + 7 * i, 40 + 5 * k))
    (root / "bears" / "black" / "notes.txt").write_text("not an image")
    make_image(root / "bears" / "_quarantine" / "bad.jpg")
    return root / "bears"


def test_sizes_parse_and_bad_ones_are_one_line_errors(bench):
    assert bench.parse_sizes("1000,4k,16000") == [1000, 4000, 16000]
    assert bench.parse_sizes(" 80, 40,40 ,") == [40, 80]
    for bad, said in (("1000,lots", "'lots' is not a number"), ("0", "at least 1"), (" , ", "at least one")):
        with pytest.raises(bench.InputError, match=said):
            bench.parse_sizes(bad)


def test_images_are_a_seeded_prefix_cropped_and_flipped_within_bounds(bench, tmp_path):
    originals = bench.list_originals(make_bears(tmp_path / "data"))
    assert len(originals) == 6 and {c for c, _ in originals} == {"black", "grizzly", "teddy"}
    big, small = bench.plan_images(originals, 14, seed=3), bench.plan_images(originals, 5, seed=3)
    assert big[:5] == small and len({src for _, _, src, _ in big[:6]}) == 6  # every original once before any twice
    assert all(c == src.parent.name for _, c, src, _ in big)  # labels kept
    assert bench.plan_images(originals, 14, seed=4) != big
    flips = set()
    for i in range(200):
        (x0, y0, x1, y1), flip = bench.crop_box(100, 50, seed=1, i=i)
        assert 0 <= x0 < x1 <= 100 and 0 <= y0 < y1 <= 50 and x1 - x0 >= 60 and y1 - y0 >= 30
        assert bench.crop_box(100, 50, seed=1, i=i) == ((x0, y0, x1, y1), flip)
        flips.add(flip)
    assert flips == {True, False}
    with pytest.raises(bench.InputError, match="not found"):
        bench.list_originals(tmp_path / "nowhere" / "bears")


def test_sets_are_made_once_and_linked_as_prefixes(bench, tmp_path):
    from PIL import Image

    originals = bench.list_originals(make_bears(tmp_path / "data"))
    files = bench.generate_pool(originals, 9, seed=0, pool=tmp_path / "pool", procs=1)
    again = bench.generate_pool(originals, 4, seed=0, pool=tmp_path / "pool2", procs=1)
    assert [f.read_bytes() for f in files[:4]] == [f.read_bytes() for f in again]  # growing a set remakes nothing
    with Image.open(files[0]) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
    small = bench.link_set(files[:4], tmp_path / "pool", tmp_path / "sets" / "n4")
    linked = sorted(small.rglob("*.jpg"))
    assert len(linked) == 4 and {p.parent.name for p in linked} <= {"black", "grizzly", "teddy"}
    assert all(p.stat().st_nlink == 2 or p.is_symlink() for p in linked)


def test_process_tree_helpers(bench):
    assert bench.parse_ppid("123 (a) b (c)) S 77 123 123 0 -1") == 77
    table = {1: 0, 10: 1, 11: 10, 12: 10, 13: 11, 20: 1}
    assert bench.descendants(10, table) == [10, 11, 12, 13] and bench.descendants(99, table) == [99]
    status = "Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1536 kB\n"
    assert bench.parse_kb(status, "VmRSS") == 1536 and bench.parse_kb(status, "Pss") == 0


def test_peak_memory_sums_the_whole_process_tree(bench, tmp_path):
    """A parent whose child holds 80 MB: the tree's peak counts the child; wait4 sees it as the largest process."""
    child = "import time; b = bytearray(80 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.0)"
    cmd = [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"]
    r = bench.run_measured(cmd, tmp_path / "logs")
    assert r["rc"] == 0 and r["peak_procs"] == 2 and r["samples"] >= 3
    assert r["peak_rss_mb"] >= 85 and r["peak_pss_mb"] >= 80 and r["wait4_rss_mb"] >= 80


def test_aims_and_ranks_ratio(bench):
    def row(n, wall, rss, err=0.05):
        return {"images": n, "wall_s": wall, "s_per_1k": wall / (n / 1000), "peak_rss_mb": rss, "peak_pss_mb": rss,
                "error_rate": err}

    verdicts = lambda rows: [a["verdict"] for a in bench.evaluate_aims(rows)]  # noqa: E731
    assert verdicts([row(1000, 60, 1000), row(4000, 250, 1100), row(16000, 1200, 1500)]) == ["held", "held"]
    assert verdicts([row(1000, 60, 1000), row(16000, 1300, 1600)]) == ["missed", "missed"]
    assert bench.evaluate_aims([row(1000, 60, 1000), row(16000, 1200, 1200)])[0]["value"] == "1.25 (16000 vs 1000)"
    assert verdicts([row(1000, 60, 1000)]) == verdicts([row(1000, 60, 1000), row(16000, 9, 9, err=None)]) == ["not measured"] * 2
    q = bench.ranks_ratio(row(1000, 60, 1000), row(1000, 90, 2500, err=0.06))
    assert q["wall"] == 1.5 and q["peak_rss"] == 2.5 and q["error_diff"] == pytest.approx(0.01)
    assert bench.ranks_ratio(row(1000, 60, 1000), row(1000, 9, 9, err=None)) is None
    assert bench.parse_error_rate("[rank0]: error_rate 0.0310 (accuracy 0.9690) on 193 images\n", Path("/nowhere")) == 0.031


FAKE_URSA = """
import json, sys
from pathlib import Path
data, out, ranks = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
n = sum(1 for _ in data.rglob("*.jpg"))
out.mkdir(parents=True)
(out / "recipe.json").write_text(json.dumps({"pixels": "stream" if n > 10 else "memory"}))
for _ in range(max(ranks, 1)):
    print(f"error_rate 0.0500 (accuracy 0.9500) on {n // 5} validation images; 1 s, peak memory 1 MB")
"""


def test_a_run_generates_trains_each_size_and_both_rank_counts(bench, tmp_path, monkeypatch, capsys):
    """The whole benchmark with a stand-in for `ursa train` (no training): table, aims, ranks, scale.json, cleanup."""
    make_bears(tmp_path / "data")
    monkeypatch.setattr(bench, "machine_info", lambda: {"cpus": 2})
    monkeypatch.setattr(bench, "ursa_command", lambda data, out, train_args, ranks=0:
                        [sys.executable, "-c", FAKE_URSA, str(data), str(out), str(ranks)])
    out, work = tmp_path / "scale.json", tmp_path / "work"
    argv = ["--root", str(tmp_path / "data"), "--sizes", "6,12", "--ranks-size", "4", "--work", str(work), "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 ranks / 1 rank: wall" in printed and "each rank trained on its own" in printed
    data = json.loads(out.read_text())
    assert [(r["images"], r["pixels"], r["error_rate"]) for r in data["runs"]] == [(6, "memory", 0.05), (12, "stream", 0.05)]
    assert all(r["peak_rss_mb"] > 0 and r["wait4_rss_mb"] > 0 for r in data["runs"])
    assert [a["verdict"] in ("held", "missed") for a in data["aims"]] == [True, True]
    assert data["ranks"]["images"] == 4 and not data["ranks"]["one_reused"] and data["ranks"]["two"]["ranks"] == 2
    assert data["generation"]["images"] == 12 and list(work.iterdir()) == []  # the temp folder is gone
    # --no-ranks; the ranks set reuses a size's run; bad input is one line, exit 2.
    assert bench.main(argv + ["--no-ranks"]) == 0 and json.loads(out.read_text())["ranks"] is None
    assert bench.main([a if a != "4" else "6" for a in argv]) == 0
    assert json.loads(out.read_text())["ranks"]["one_reused"] is True
    capsys.readouterr()
    assert bench.main(["--root", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert bench.main(["--root", str(tmp_path / "data"), "--train-args", "--out x", "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "bears" in err[0] and "--out is set by the benchmark" in err[1]

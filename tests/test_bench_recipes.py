"""benchmarks/recipes.py (issue 15's benchmark): its pure parts, without training anything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import SHARED, load_benchmark


@pytest.fixture(scope="module")
def bench():
    """The benchmark script as a module (benchmarks/ is not a package)."""
    yield load_benchmark("recipes")
    sys.modules.pop("bench_recipes", None)


def make_set(root: Path, name: str = "toy", n: int = 25) -> Path:
    """A folder-per-class set of n files per class (the split looks at names only)."""
    for c in ("b_cls", "a_cls"):
        (root / name / c).mkdir(parents=True)
        for i in range(n):
            (root / name / c / f"{i:03d}.jpg").write_bytes(b"x")
    (root / name / "a_cls" / "notes.txt").write_text("not an image")
    (root / name / "_quarantine").mkdir()
    (root / name / "_quarantine" / "bad.jpg").write_bytes(b"x")
    return root / name


def test_split_is_made_once_deterministically_and_both_files_agree(bench, tmp_path):
    set_dir = make_set(tmp_path / "data")
    rows = bench.ensure_split(set_dir, tmp_path / "r1")
    again = bench.ensure_split(set_dir, tmp_path / "r2")
    assert rows == again == bench.make_split(set_dir)
    assert len(rows) == 50 and sum(v for _, _, v in rows) == 10  # 20% valid; notes.txt and _quarantine left out
    assert [p for p, _, _ in rows] == sorted(p for p, _, _ in rows) and rows[0][:2] == ("a_cls/000.jpg", "a_cls")
    anchor_csv, ursa_csv = bench.split_paths(tmp_path / "r1", "toy")
    assert anchor_csv.read_text().splitlines()[0] == "path,label,is_valid"
    assert ursa_csv.read_text().splitlines()[0] == "name,label,is_valid"
    assert anchor_csv.read_text().splitlines()[1:] == ursa_csv.read_text().splitlines()[1:]
    # Once there, the files are only read: a changed anchor file wins, and a disagreeing pair is refused.
    flipped = [(p, c, not v) for p, c, v in rows]
    anchor_csv.write_text(bench.csv_text(["path", "label", "is_valid"], flipped))
    with pytest.raises(bench.InputError, match="assign different images"):
        bench.ensure_split(set_dir, tmp_path / "r1")
    ursa_csv.unlink()
    assert bench.ensure_split(set_dir, tmp_path / "r1") == flipped
    assert bench.read_split(ursa_csv, ("name", "label", "is_valid")) == flipped


def test_committed_splits_are_what_the_script_makes(bench, tmp_path):
    """benchmarks/results/splits/ holds the split the script makes from the sets' file names.

    The split looks at names only, so a folder of empty files under the committed names stands in
    for each set; where the real sets are beside the repository, their names are checked too.
    """
    for s in bench.SETS:
        anchor_csv, ursa_csv = bench.split_paths(bench.RESULTS, s)
        assert anchor_csv.is_file() and ursa_csv.is_file(), f"{s}: split files not committed"
        committed = bench.read_split(anchor_csv, ("path", "label", "is_valid"))
        assert bench.read_split(ursa_csv, ("name", "label", "is_valid")) == committed
        for path, label, _ in committed:
            assert path.split("/")[0] == label, path
            (tmp_path / s / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / s / path).write_bytes(b"")
        assert bench.make_split(tmp_path / s) == committed, s
        if (SHARED / s).is_dir():
            assert bench.make_split(SHARED / s) == committed, s


def test_aims_say_held_or_missed(bench):
    def sm(err, wall):
        return {"err_mean": err, "wall_mean": wall}

    verdicts = lambda aims: [(a["aim"], a["target"], a["verdict"]) for a in aims]  # noqa: E731
    good = bench.evaluate_aims("bears", sm(0.02, 50.0), sm(0.025, 40.0), sm(0.05, 300.0))
    assert verdicts(good) == [("error / fastai error", "<= 0.5", "held"), ("error vs frozen", "<= frozen", "held"),
                              ("wall / fastai wall", "<= 1", "held"), ("error", "<= 0.03", "held"),
                              ("wall / fastai wall", "<= 0.2", "held")]
    assert good[0]["value"] == "0.40" and good[4]["value"] == "0.17"
    bad = bench.evaluate_aims("bears", sm(0.04, 100.0), sm(0.03, 40.0), sm(0.05, 300.0))
    assert [a["verdict"] for a in bad] == ["missed", "missed", "held", "missed", "missed"]
    # Other sets have the three general aims only; equal to frozen is "not worse"; no fastai figures: not measured.
    other = bench.evaluate_aims("mnist_dev", sm(0.01, 80.0), sm(0.01, 60.0), None)
    assert [a["verdict"] for a in other] == ["not measured", "held", "not measured"]
    assert [a["verdict"] for a in bench.evaluate_aims("cub_grebes", None, sm(0.2, 60.0), sm(0.3, 90.0))] == ["not measured"] * 3
    assert bench.evaluate_aims("eurosat_dev", sm(0.0, 10.0), sm(0.0, 9.0), sm(0.0, 20.0))[0]["verdict"] == "held"


def test_dry_run_prints_the_four_recipes_commands_and_writes_nothing(bench, tmp_path, monkeypatch, capsys):
    make_set(tmp_path / "data", "toy", n=5)
    results = tmp_path / "results"
    monkeypatch.delenv("FASTAI_VENV", raising=False)
    monkeypatch.setattr(bench, "read_default_budget", lambda: (True, 60))
    argv = ["--dry-run", "--root", str(tmp_path / "data"), "--sets", "toy", "--seeds", "2", "--results", str(results)]
    assert bench.main(argv) == 0
    cmds = [line.split() for line in capsys.readouterr().out.splitlines() if " -m ursa train " in line]
    assert len(cmds) == 8  # 4 recipes x 2 seeds
    tails = [c[c.index("--quiet") + 1:] for c in cmds]
    assert tails == [["--size", "224", "--unfreeze-epochs", "0"]] * 2 + [["--size", "224", "--unfreeze-epochs", "2"]] * 2 \
        + [[]] * 2 + [["--budget", "120"]] * 2
    assert [c[c.index("--seed") + 1] for c in cmds] == ["0", "1"] * 4
    assert all(c[c.index("--csv") + 1] == str(results / "splits" / "toy.ursa.csv") for c in cmds)
    assert not results.exists()
    # Before the lead's `budget` field exists: default and double are skipped with a reason, not a crash.
    monkeypatch.setattr(bench, "read_default_budget", lambda: (False, None))
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "default: skipped: TrainConfig has no `budget` field" in out and "double: skipped" in out
    assert sum(" -m ursa train " in line for line in out.splitlines()) == 4
    assert bench.main(argv + ["--recipes", "frozen,nope"]) == 2
    assert "--recipes: unknown nope" in capsys.readouterr().err
    assert bench.parse_error_rate("x\nerror_rate 0.0310 (accuracy 0.9690) on 193 validation images; 35 s\n", tmp_path) == 0.031


FAKE_URSA = """
import json, sys
from pathlib import Path
out, flags = Path(sys.argv[1]), sys.argv[2:]
out.mkdir(parents=True)
if "--budget" not in flags and "--size" not in flags:
    (out / "recipe.json").write_text(json.dumps({"size": 96, "flips": "none", "probe": {"n": 10}}))
err = 0.04 if "--size" in flags else 0.01
print(f"error_rate {err:.4f} (accuracy {1 - err:.4f}) on 10 validation images; 1 s, peak memory 1 MB")
"""


def test_a_run_measures_each_process_and_judges_the_aims(bench, tmp_path, monkeypatch, capsys):
    """The whole run with a stand-in for `ursa train` (no training): figures, fastai's reused JSON, aims, recipes.json."""
    import hashlib
    import json

    set_dir = make_set(tmp_path / "data", "bears", n=5)
    results = tmp_path / "results"
    monkeypatch.delenv("FASTAI_VENV", raising=False)
    monkeypatch.setattr(bench, "read_default_budget", lambda: (True, 60))
    monkeypatch.setattr(bench, "ursa_command", lambda data, split, out, seed, flags: [sys.executable, "-c", FAKE_URSA, str(out), *flags])
    bench.ensure_split(set_dir, results)
    sha = hashlib.sha256(bench.split_paths(results, "bears")[0].read_bytes()).hexdigest()
    (results / "fastai").mkdir()
    (results / "fastai" / "bears.seed0.json").write_text(json.dumps({
        "counts": {"split_sha256": sha}, "final": {"error_rate": 0.05}, "stages_s": {"total_s": 1000.0},
        "peak_rss_mib": 3000.0, "peak_rss_children_mib": 900.0}))
    argv = ["--root", str(tmp_path / "data"), "--sets", "bears", "--seeds", "2", "--results", str(results)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "decided (seed 0): size=96, flips=none, probe={" in out
    data = json.loads((results / "recipes.json").read_text())
    # No upper bound on the RSS here: a child forked from a big pytest process (torch loaded by earlier
    # tests) reports the parent's size at fork in ru_maxrss; the benchmark's own parent is small.
    assert len(data["runs"]) == 8 and all(r["rc"] == 0 and r["rss_mb"] > 0 and r["wall_s"] > 0 for r in data["runs"])
    assert data["summaries"]["bears"]["frozen"]["errs"] == [0.04, 0.04] and data["summaries"]["bears"]["default"]["err_sd"] == 0
    assert data["fastai"]["bears"]["err_mean"] == 0.05 and data["fastai"]["bears"]["rss_max"] == 3000.0
    # default 0.01 vs fastai 0.05 and frozen 0.04, seconds against fastai's 1000 s: every aim held.
    assert [a["verdict"] for a in data["aims"]["bears"]] == ["held"] * 5
    # A fastai result measured on another split is not used.
    (results / "fastai" / "bears.seed0.json").write_text(json.dumps({"counts": {"split_sha256": "0" * 64}}))
    assert bench.main(argv) == 0
    assert "measured on another split" in capsys.readouterr().out
    assert [a["verdict"] for a in json.loads((results / "recipes.json").read_text())["aims"]["bears"]] == \
        ["not measured", "held", "not measured", "held", "not measured"]

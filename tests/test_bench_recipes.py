"""benchmarks/recipes.py (issue 15's benchmark): its pure parts, without training anything."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SHARED, load_benchmark


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
    train = bench.train_split_path(tmp_path / "r1", "toy").read_text().splitlines()
    assert train[0] == "name,label" and train[1:] == [f"{p},{c}" for p, c, v in rows if not v]  # the 80% only
    # Once there, the files are only read: a changed anchor file wins, and a disagreeing pair is refused.
    flipped = [(p, c, not v) for p, c, v in rows]
    anchor_csv.write_text(bench.csv_text(["path", "label", "is_valid"], flipped))
    with pytest.raises(bench.InputError, match="assign different images"):
        bench.ensure_split(set_dir, tmp_path / "r1")
    ursa_csv.unlink()
    with pytest.raises(bench.InputError, match="not the training part"):
        bench.ensure_split(set_dir, tmp_path / "r1")
    bench.train_split_path(tmp_path / "r1", "toy").unlink()
    assert bench.ensure_split(set_dir, tmp_path / "r1") == flipped
    assert bench.read_split(ursa_csv, ("name", "label", "is_valid")) == flipped


def test_committed_splits_are_what_the_script_makes(bench, tmp_path):
    """benchmarks/results/splits/ holds the split the script would make from each set.

    The committed held-out sets are here; the shared ones are not, on a fresh clone. The split
    looks at names only, so a folder of empty files under a shared set's committed names stands in
    for it; where the shared folders are beside the repository, they are checked themselves too.
    """
    folders = [d for d in sorted(bench.DATASETS.iterdir()) if (d / ".built.json").is_file() and (d.name + "/") not in
               (bench.DATASETS / ".gitignore").read_text().split()]  # the committed held-out sets
    for s in bench.SETS:
        anchor_csv = bench.split_paths(bench.RESULTS, s)[0]
        assert anchor_csv.is_file(), f"{s}: split files not committed"
        for path, label, _ in bench.read_split(anchor_csv, ("path", "label", "is_valid")):
            assert path.split("/")[0] == label, path
            (tmp_path / s / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / s / path).write_bytes(b"")
        folders += [tmp_path / s] + ([SHARED / s] if (SHARED / s).is_dir() else [])
    assert len(folders) >= 8
    for d in folders:
        anchor_csv, ursa_csv = bench.split_paths(bench.RESULTS, d.name)
        train_csv = bench.train_split_path(bench.RESULTS, d.name)
        assert anchor_csv.is_file() and ursa_csv.is_file() and train_csv.is_file(), f"{d.name}: split files not committed"
        made = bench.make_split(d)
        assert bench.read_split(anchor_csv, ("path", "label", "is_valid")) == made, d
        assert bench.read_split(ursa_csv, ("name", "label", "is_valid")) == made, d
        assert bench.ensure_split(d, bench.RESULTS, write=False) == made  # the training file agrees too


def test_aims_say_held_or_missed(bench):
    def sm(err, wall):
        return {"err_mean": err, "wall_mean": wall}

    verdicts = lambda aims: [(a["aim"], a["target"], a["verdict"]) for a in aims]  # noqa: E731
    good = bench.evaluate_aims("bears", sm(0.02, 50.0), sm(0.025, 40.0), sm(0.05, 300.0))
    assert verdicts(good) == [("error / fastai error", "<= 0.5", "held"), ("error vs frozen", "<= frozen", "held"),
                              ("wall / fastai wall (busy)", "<= 1", "held"), ("error", "<= 0.03", "held"),
                              ("wall / fastai wall (busy)", "<= 0.2", "held")]
    assert good[0]["value"] == "0.40" and good[4]["value"] == "0.17"
    # idle timings (recipes_timing.py), when both sides have one, replace the benchmark's busy walls in the time aims
    idle = {"ursa": {"wall_s": 70.0}, "fastai": {"wall_s": 300.0}}
    timed = bench.evaluate_aims("bears", sm(0.02, 50.0), sm(0.025, 40.0), sm(0.05, 300.0), idle=idle)
    assert [(a["aim"], a["value"], a["verdict"]) for a in timed if a["aim"].startswith("wall")] == [
        ("wall / fastai wall (idle)", "0.23", "held"), ("wall / fastai wall (idle)", "0.23", "missed")]
    half = {"ursa": {"wall_s": 70.0}, "fastai": None}  # fastai not timed idle: the busy walls stand
    assert bench.evaluate_aims("bears", sm(0.02, 50.0), None, sm(0.05, 300.0), idle=half)[2]["aim"] == "wall / fastai wall (busy)"
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
    argv = ["--dry-run", "--root", str(tmp_path / "data"), "--sets", "toy", "--seeds", "2", "--results", str(results),
            "--recipes", "frozen,lesson,default,double"]
    assert bench.main(argv) == 0
    cmds = [line.split() for line in capsys.readouterr().out.splitlines() if " -m ursa train " in line]
    assert len(cmds) == 8  # 4 recipes x 2 seeds, the default first (alternatives may reuse its runs)
    tails = [c[c.index("--quiet") + 1:] for c in cmds]
    assert tails == [[]] * 2 + [["--size", "224", "--unfreeze-epochs", "0"]] * 2 \
        + [["--size", "224", "--unfreeze-epochs", "2"]] * 2 + [["--budget", "120"]] * 2
    assert [c[c.index("--seed") + 1] for c in cmds] == ["0", "1"] * 4
    assert all(c[c.index("--split-seed") + 1] == "42" for c in cmds)  # one inner split for every seed
    # ursa trains on the 80% only (name,label): the 20% test images are not in its file.
    assert all(c[c.index("--csv") + 1] == str(results / "splits" / "toy.train.csv") for c in cmds)
    assert not results.exists()
    # Without a `budget` field (a recipe that counts instead of timing): double is skipped with a reason, not a crash.
    monkeypatch.setattr(bench, "read_default_budget", lambda: (False, None))
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "double: skipped: TrainConfig has no `budget` field" in out and "default: skipped" not in out
    assert sum(" -m ursa train " in line for line in out.splitlines()) == 6
    # The default list of recipes: lr-find's suggestion runs lr-find first, then trains with it.
    argv_all = argv[:-2] + ["--seeds", "1"]
    monkeypatch.setattr(bench, "read_default_budget", lambda: (True, 60))
    assert bench.main(argv_all) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(" -m ursa train " in line for line in out) == len(bench.DEFAULT_RECIPES)
    i = next(i for i, line in enumerate(out) if " -m ursa lr-find " in line)
    assert out[i + 1].split()[-2:] == ["--lr", "$SUGGESTION"]
    assert bench.main(argv + ["--recipes", "frozen,nope"]) == 2
    assert "--recipes: unknown nope" in capsys.readouterr().err
    assert bench.parse_error_rate("x\nerror_rate 0.0310 (accuracy 0.9690) on 193 validation images; 35 s\n", tmp_path) == 0.031


FAKE_URSA = """
import json, sys
from pathlib import Path
out, flags = Path(sys.argv[1]), sys.argv[2:]
out.mkdir(parents=True)
flips = flags[flags.index("--flips") + 1] if "--flips" in flags else "none"
(out / "recipe.json").write_text(json.dumps({"size": 96, "flips": flips, "probe": {"n": 10}}))
wrong = 2 if "--size" in flags else 1 if "--lr" in flags or flips == "all" else 0  # test images it gets wrong
(out / "model.safetensors").write_text(str(wrong))
err = 0.04 if "--size" in flags else 0.01
print(f"error_rate {err:.4f} (accuracy {1 - err:.4f}) on 10 validation images; 1 s, peak memory 1 MB")
"""
FAKE_PREDICT = """
import json, sys
from pathlib import Path
model, files = Path(sys.argv[1]), sys.argv[2:]
wrong = int(model.read_text())
for i, f in enumerate(files):
    label = Path(f).parent.name
    print(json.dumps({"file": f, "label": "nope" if i < wrong else label, "probs": {}}))
"""


def fake_ursa(bench, monkeypatch, calls: list) -> None:
    """`ursa train`, `ursa lr-find` and `ursa predict` replaced by tiny scripts (no training); train calls recorded."""
    def train(data, split, out, seed, flags):
        calls.append((Path(split).name, list(flags)))
        return [sys.executable, "-c", FAKE_URSA, str(out), *flags]

    monkeypatch.setattr(bench, "ursa_command", train)
    monkeypatch.setattr(bench, "predict_command", lambda model, files: [sys.executable, "-c", FAKE_PREDICT, str(model), *map(str, files)])
    monkeypatch.setattr(bench, "lr_find_command", lambda data, split, out, seed: [
        sys.executable, "-c", "import json; print(json.dumps({'suggestion': 0.0012, 'lrs': []}))"])
    monkeypatch.setattr(bench, "tta_errors", lambda model, set_dir, tmp: {"plain": 0.0, "tta": 0.0})
    monkeypatch.setattr(bench, "read_default_budget", lambda: (True, 60))


def test_a_run_measures_each_process_and_judges_the_aims(bench, tmp_path, monkeypatch, capsys):
    """The whole run with a stand-in for ursa (no training): held-out figures, fastai's reused JSON, aims, recipes.json."""
    import hashlib
    import json

    set_dir = make_set(tmp_path / "data", "bears", n=5)
    results = tmp_path / "results"
    monkeypatch.delenv("FASTAI_VENV", raising=False)
    fake_ursa(bench, monkeypatch, [])
    bench.ensure_split(set_dir, results)
    sha = hashlib.sha256(bench.split_paths(results, "bears")[0].read_bytes()).hexdigest()
    (results / "fastai").mkdir()
    (results / "fastai" / "bears.seed0.json").write_text(json.dumps({
        "counts": {"split_sha256": sha}, "final": {"error_rate": 0.05}, "stages_s": {"total_s": 1000.0},
        "peak_rss_mib": 3000.0, "peak_rss_children_mib": 900.0}))
    argv = ["--root", str(tmp_path / "data"), "--sets", "bears", "--seeds", "2", "--results", str(results),
            "--recipes", "frozen,lesson,default,double"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "decided (seed 0): size=96, flips=none, probe={" in out
    data = json.loads((results / "recipes.json").read_text())
    # No upper bound on the RSS here: a child forked from a big pytest process (torch loaded by earlier
    # tests) reports the parent's size at fork in ru_maxrss; the benchmark's own parent is small.
    assert len(data["runs"]) == 8 and all(r["rc"] == 0 and r["rss_mb"] > 0 and r["wall_s"] > 0 for r in data["runs"])
    # The figure is the held-out one (2 of the 2 test images wrong at --size 224), ursa's own beside it.
    assert data["summaries"]["bears"]["frozen"]["errs"] == [1.0, 1.0] and data["summaries"]["bears"]["default"]["err_sd"] == 0
    assert data["summaries"]["bears"]["frozen"]["reported_mean"] == 0.04
    assert data["fastai"]["bears"]["err_mean"] == 0.05 and data["fastai"]["bears"]["rss_max"] == 3000.0
    # default 0 vs fastai 0.05 and frozen 1.0, seconds against fastai's 1000 s: every aim held.
    assert [a["verdict"] for a in data["aims"]["bears"]] == ["held"] * 5
    # A fastai result measured on another split is not used.
    (results / "fastai" / "bears.seed0.json").write_text(json.dumps({"counts": {"split_sha256": "0" * 64}}))
    assert bench.main(argv) == 0
    assert "measured on another split" in capsys.readouterr().out
    assert [a["verdict"] for a in json.loads((results / "recipes.json").read_text())["aims"]["bears"]] == \
        ["not measured", "held", "not measured", "held", "not measured"]


def test_rules_are_checked_leave_one_set_out_on_held_out_errors(bench, tmp_path, monkeypatch, capsys):
    """lr-find's suggestion as --lr, an alternative that repeats the default reusing its run, the rules' report."""
    import json

    for name in ("bears", "toy", "other"):
        make_set(tmp_path / "data", name, n=10)  # 20 images, 4 test images each
    results = tmp_path / "results"
    monkeypatch.delenv("FASTAI_VENV", raising=False)
    fake_ursa(bench, monkeypatch, calls := [])
    argv = ["--root", str(tmp_path / "data"), "--datasets", str(tmp_path / "none"), "--seeds", "1", "--results", str(results),
            "--recipes", "default,lrfind,flips_none,flips_horizontal,flips_all,optimistic", "--fitted-on", "bears"]
    assert bench.main(["--sets", "bears,toy,other", *argv]) == 0
    out = capsys.readouterr().out
    data = json.loads((results / "recipes.json").read_text())
    # flips_none is what the default decided: not run again; lr-find's suggestion is given as --lr.
    assert sorted({f[-2] if f else "" for _, f in calls}) == ["", "--flips", "--lr"] and len(calls) == 15
    # Every run trains on the 80% only, except `optimistic`: the 80/20 file, choosing its epoch on the test images.
    assert sorted({(split, not f) for split, f in calls if not split.endswith(".train.csv")}) == \
        [("bears.ursa.csv", True), ("other.ursa.csv", True), ("toy.ursa.csv", True)]
    assert [f for _, f in calls if "--lr" in f] == [["--lr", "0.0012"]] * 3
    runs = {(r["set"], r["recipe"]): r for r in data["runs"]}
    assert runs["toy", "flips_none"]["same_as_default"] and runs["toy", "lrfind"]["lr_used"] == 0.0012
    assert runs["toy", "lrfind"]["error_rate"] == 0.25 and runs["toy", "default"]["error_rate"] == 0.0
    # lr-find one picture worse than the default on 4 test images: the aim allows one picture.
    assert data["aims"]["toy"][-1] == {"aim": "lr-find vs default, pictures", "value": "+1.0",
                                       "target": "<= +1 (worst seed)", "verdict": "held"}
    rules = {c["rule"]: c for c in data["rules"]}
    assert rules["flips"]["summary"] == {"fitted on": {"held": 1, "of": 1}, "checked on": {"held": 2, "of": 2}}
    row = next(r for r in rules["flips"]["rows"] if r["set"] == "toy")
    assert row["group"] == "checked on" and row["fitted_without"] == "flips_none" and row["decided"] == "none"
    assert rules["learning rate"]["summary"]["checked on"] == {"held": 2, "of": 2}
    assert rules["input size"]["not_run"] == ["size64", "size128", "size224"]
    assert [r["optimism"] for r in rules["epoch kept"]["rows"]] == [-0.01] * 3
    assert [r["honesty_cost"] for r in rules["epoch kept"]["rows"]] == [0.0] * 3
    assert "rule: flips (default vs flips_none, flips_horizontal, flips_all)" in out and "checked on: held on 2 of 2" in out
    assert "toy: 20 images, 4 test (0.2500 a picture)" in out
    assert data["summaries"]["toy"]["flips_none"]["same_as_default"] == 1 and "(1 = the default's run: what it decided)" in out


def test_a_rerun_skips_the_runs_it_kept_and_measures_again_what_changed(bench, tmp_path, monkeypatch, capsys):
    """Resumable: every finished run is kept on its own; a rerun reuses it unless its flags, its split or --remeasure say no."""
    import json

    make_set(tmp_path / "data", "toy", n=10)
    results = tmp_path / "results"
    monkeypatch.delenv("FASTAI_VENV", raising=False)
    fake_ursa(bench, monkeypatch, calls := [])
    argv = ["--root", str(tmp_path / "data"), "--datasets", str(tmp_path / "none"), "--sets", "toy", "--seeds", "2",
            "--results", str(results), "--recipes", "default,size224", "--fastai-seeds", "0"]
    assert bench.main(argv) == 0 and len(calls) == 4
    kept = json.loads(next((results / "recipes_runs" / "toy").glob("size224.seed1.*.json")).read_text())
    assert kept["key"]["flags"] == ["--size", "224"] and kept["key"]["split"] == "toy.train.csv" and kept["error_rate"] == 0.5
    first = json.loads((results / "recipes.json").read_text())["summaries"]
    capsys.readouterr()
    assert bench.main(argv) == 0 and len(calls) == 4  # nothing measured again: the same figures
    assert json.loads((results / "recipes.json").read_text())["summaries"] == first
    assert capsys.readouterr().out.count("(stored)") == 4
    assert bench.main(argv + ["--seeds", "3"]) == 0 and len(calls) == 6  # a third seed: only its runs
    assert bench.main(argv + ["--remeasure", "size224"]) == 0 and calls[-2:] == [("toy.train.csv", ["--size", "224"])] * 2
    assert bench.main(argv + ["--train-args", "--budget 10"]) == 0 and len(calls) == 12  # other flags: other runs
    assert bench.main(argv) == 0 and len(calls) == 12  # kept beside each other
    default = sorted((results / "recipes_runs" / "toy").glob("default.seed[01].*.json"))
    assert len(default) == 4
    plain = [p for p in default if json.loads(p.read_text())["key"]["train_args"] == []]
    plain[0].write_text("{half a file")  # unreadable: measured again; so is a failed run
    plain[1].write_text(json.dumps({**json.loads(plain[1].read_text()), "error_rate": None}))
    assert bench.main(argv) == 0 and len(calls) == 14 and [f for _, f in calls[-2:]] == [[], []]
    # the report alone from what is stored: nothing measured, a recipe never run is left out
    assert bench.main(argv[:-4] + ["--recipes", "default,size224,size128", "--stored-only"]) == 0 and len(calls) == 14
    data = json.loads((results / "recipes.json").read_text())
    assert {r["recipe"] for r in data["runs"]} == {"default", "size224"} and len(data["runs"]) == 4


def test_a_rule_that_loses_to_the_choice_fitted_on_the_other_sets_is_missed(bench):
    from rules import RULES, check_rule

    # the report's fitted_on decides the groups here (the real rule names its own sets)
    rule = dataclasses.replace(next(r for r in RULES if r.name == "fine-tune or not"), fitted_on=None)
    errs = {("a", "default"): 0.10, ("a", "no_finetune"): 0.20, ("b", "default"): 0.10, ("b", "no_finetune"): 0.30,
            ("c", "default"): 0.30, ("c", "no_finetune"): 0.10}
    recs = [{"set": s, "recipe": r, "test_error": e, "recipe_json": {"fine_tune_epochs": 3}} for (s, r), e in errs.items()]
    got = check_rule(rule, recs, ["a", "b", "c"], ("a",), {"a": 10, "b": 10, "c": 100})
    verdicts = {r["set"]: (r["group"], r["fitted_without"], r["verdict"]) for r in got["rows"]}
    # The constant fitted without c is "no fine-tuning" (the only one); the rule loses to it on c by 20 points,
    # far more than one picture in 100; on a and b it wins.
    assert verdicts == {"a": ("fitted on", "no_finetune", "held"), "b": ("checked on", "no_finetune", "held"),
                        "c": ("checked on", "no_finetune", "missed")}
    assert next(r for r in got["rows"] if r["set"] == "c")["regret_pictures"] == pytest.approx(20.0)
    assert got["summary"]["checked on"] == {"held": 1, "of": 2}
    # One set alone: nothing to fit the choice on.
    one = check_rule(rule, recs, ["a"], (), {"a": 10})
    assert one["rows"][0]["verdict"] == "not measured (no other set)"


def test_an_alternative_run_on_few_sets_is_left_out_of_its_rule_not_the_whole_rule(bench):
    from rules import RULES, check_all, format_checks

    errs = {("a", "default"): 0.10, ("a", "size128"): 0.20, ("a", "size224"): 0.05, ("b", "default"): 0.10,
            ("b", "size128"): 0.30, ("c", "default"): 0.30, ("c", "size128"): 0.10}
    recs = [{"set": s, "recipe": r, "test_error": e, "recipe_json": {"size": 64}} for (s, r), e in errs.items()]
    checks = {c["rule"]: c for c in check_all(recs, ["a", "b", "c"], ["default", "size128", "size224"], (), {"a": 10, "b": 10, "c": 10})}
    size = checks["input size"]
    assert size["left_out"] == ["size64", "size224"] and size["arms"] == ["default", "size128"]
    assert {r["set"]: r["verdict"] for r in size["rows"]} == {"a": "held", "b": "held", "c": "missed"}
    assert checks["flips"]["not_run"] == ["flips_none", "flips_horizontal", "flips_all"]
    # a rule whose only alternative ran on too few sets is not checked, and says why (not "needs --recipes")
    few = [*recs, {"set": "a", "recipe": "valid10", "test_error": 0.1, "recipe_json": {}}]
    share = next(c for c in check_all(few, ["a", "b", "c"], ["default", "valid10"], (), {"a": 10, "b": 10, "c": 10})
                 if c["rule"] == "validation share")
    assert share["too_few"] == ["valid10"] and not share["rows"] and "not_run" not in share
    assert "not checked: valid10 ran on fewer than half the sets" in "\n".join(format_checks([share]))
    # size64 ran on one set of three, size224 never: each said as it is
    sized = [*(r for r in recs if r["recipe"] == "default"), {**recs[0], "recipe": "size64"}]
    size = next(c for c in check_all(sized, ["a", "b", "c"], ["default", "size64", "size224"], (),
                                     {"a": 10, "b": 10, "c": 10}) if c["rule"] == "input size")
    text = "\n".join(format_checks([size]))
    assert size["too_few"] == ["size64"] and set(size["never_ran"]) == {"size128", "size224"}, size
    assert "size64 ran on fewer than half" in text and "size128, size224 never ran" in text
    # the input size was refitted on issue 28's nine sets: there they count as "fitted on", whatever --fitted-on says
    named = [{**r, "set": {"a": "bears", "b": "uci_digits", "c": "new_set"}[r["set"]]} for r in recs]
    size = next(c for c in check_all(named, ["bears", "uci_digits", "new_set"], ["default", "size128"], ("bears",),
                                     {"bears": 10, "uci_digits": 10, "new_set": 10}) if c["rule"] == "input size")
    assert {r["set"]: r["group"] for r in size["rows"]} == {"bears": "fitted on", "uci_digits": "fitted on",
                                                            "new_set": "checked on"}
    assert "  refitted on: bears, eurosat_dev" in "\n".join(format_checks([size]))


@pytest.fixture(scope="module")
def build():
    """benchmarks/datasets/build.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_datasets_build", ROOT / "benchmarks" / "datasets" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_datasets_build"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("bench_datasets_build", None)


def test_committed_sets_are_what_build_made_and_small(build):
    """Every committed set still has the images its .built.json counted and hashed; 40 MB in all at most."""
    import json

    total = 0
    for name, spec in build.SETS.items():
        folder = build.HERE / name
        if not spec.committed:
            continue
        info = json.loads((folder / build.MARKER).read_text())
        assert build.folder_stats(folder) == {k: info[k] for k in ("classes", "images", "bytes")}, name
        assert build.tree_sha256(folder) == info["sha256"], f"{name}: images changed since build.py made them"
        assert len(info["classes"]) >= 3 and min(info["classes"].values()) >= 40, name
        total += info["bytes"]
    assert total <= 40e6


def test_build_is_repeatable_and_never_replaces_a_folder_it_did_not_make(build, tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "sets"
    assert build.main(["--sets", "uci_digits", "--out", str(out)]) == 0
    first = build.tree_sha256(out / "uci_digits")
    (out / "uci_digits" / "3" / "extra.png").write_bytes(b"x")  # a set it made is replaced whole
    assert build.main(["--sets", "uci_digits", "--out", str(out)]) == 0
    assert build.tree_sha256(out / "uci_digits") == first == build.tree_sha256(build.HERE / "uci_digits")
    assert sorted(p.name for p in out.iterdir()) == ["uci_digits"]  # no temp folders left behind
    mine = out / "cc0_textures"
    (mine / "a").mkdir(parents=True)
    (mine / "a" / "photo.jpg").write_bytes(b"mine")
    capsys.readouterr()
    assert build.main(["--sets", "cc0_textures", "--out", str(out)]) == 2
    assert "was not made by this script" in capsys.readouterr().err
    assert (mine / "a" / "photo.jpg").read_bytes() == b"mine"
    assert build.main(["--sets", "nope", "--out", str(out)]) == 2
    assert build.main(["--sets", "omniglot_greek", "--out", str(out)]) == 2
    assert "needs --omniglot" in capsys.readouterr().err


def test_a_pickled_array_is_read_without_unpickling(build):
    import pickle

    import numpy as np

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    arr = np.arange(200, dtype=np.uint8).reshape(2, 10, 10)
    assert build.pickled_array_bytes(pickle.dumps(arr, protocol=4)) == arr.tobytes()
    with pytest.raises(build.BuildError, match="expected one array buffer"):
        build.pickled_array_bytes(pickle.dumps(Boom(), protocol=4))  # nothing runs; no array found


def test_the_markdown_table_shows_each_seed_the_decision_and_the_aims_missed(bench):
    from recipes_report import markdown_table, summarize

    runs = [{"set": "s", "recipe": "default", "seed": k, "error_rate": e, "reported_error": 0.1, "wall_s": 10.0, "rss_mb": 1.0,
             "recipe_json": {"size": 64, "flips": "none", "fine_tune": "planned", "fine_tune_epochs": 12, "planned_seconds": 35.5}}
            for k, e in enumerate((0.2, 0.3))]
    lr = [{**r, "recipe": "lrfind", "same_as_default": True} for r in runs]
    report = {"runs": runs + lr, "n_test": {"s": 10}, "fastai": {"s": {"err_mean": 0.5, "wall_mean": 100.0}},
              "summaries": {"s": {"default": summarize(runs), "lrfind": summarize(lr)}},
              "aims": {"s": [{"aim": "error / fastai error", "verdict": "held"}, {"aim": "wall / fastai wall", "verdict": "missed"},
                             {"aim": "error vs frozen", "verdict": "not measured"}]}}
    row = markdown_table(report)[2]
    assert "| s (10) | **0.250** (0.200, 0.300) | 0.100 | 64 px, flips none; fine-tunes 12 epochs; 35.5 s counted |" in row
    assert "0.250 (= default) (2)" in row and "| not run |" in row and "0.500, 100" in row
    assert row.endswith("| 1 / 2; missed: wall / fastai wall |")
    # idle timings, when measured, get their own column (both walls and the ratio)
    timed = markdown_table({**report, "idle_timing": {"s": {"ursa": {"wall_s": 50.0}, "fastai": {"wall_s": 200.0}}}})
    assert "idle wall s: ursa / fastai" in timed[0] and "| 50 / 200 (0.25) |" in timed[2]


def test_idle_timing_records_both_walls_checks_reproducibility_and_refuses_a_busy_machine(bench, tmp_path, monkeypatch,
                                                                                         capsys):
    import hashlib

    from recipes_report import usable_idle

    timing = load_benchmark("recipes_timing")
    try:
        for name in ("toy", "two"):
            make_set(tmp_path / "data", name, n=5)
        results = tmp_path / "results"
        argv = ["--root", str(tmp_path / "data"), "--sets", "toy,two", "--results", str(results), "--fastai-stored", "toy,two"]
        loads = iter([])
        monkeypatch.setattr(timing, "load_now", lambda: next(loads, 0.1))
        monkeypatch.setattr(timing.time, "sleep", lambda s: None)
        assert timing.main(argv) == 2 and "run benchmarks/recipes.py --sets toy first" in capsys.readouterr().err
        (results / "fastai").mkdir(parents=True)
        for name in ("toy", "two"):
            bench.ensure_split(tmp_path / "data" / name, results)
            runs = results / "recipes_runs" / name
            runs.mkdir(parents=True)
            (runs / "default.seed0.abcd.json").write_text(json.dumps(  # the busy benchmark's run of seed 0
                {"test_error": 0.25, "recipe_json": {"planned_seconds": 40.0}}))
            sha = hashlib.sha256((results / "splits" / f"{name}.csv").read_bytes()).hexdigest()
            (results / "fastai" / f"{name}.seed0.json").write_text(json.dumps(
                {"final": {"error_rate": 0.5}, "stages_s": {"total_s": 300.0}, "counts": {"split_sha256": sha}}))
        calls = []

        def fake_ursa(set_dir, split, recipe, seed, flags, test, tta=True):
            calls.append((set_dir.name, recipe, seed, list(flags), tta))
            if set_dir.name == "two":  # a run that fails after 3 s: no wall to compare
                return {"wall_s": 3.0, "error_rate": None, "failure": "no model.safetensors written"}
            return {"wall_s": 61.04, "error_rate": 0.25, "recipe_json": {"planned_seconds": 40.0, "seconds": 55.5}}

        monkeypatch.setattr(timing, "run_ursa", fake_ursa)
        # the first set's own run leaves the load high for a while: the next set waits for it to fall, then runs
        loads = iter([0.1, 1.9, 1.2, 0.4])
        assert timing.main(argv) == 1 and "1 run(s) failed" in capsys.readouterr().out  # "two" failed: exit 1
        assert calls == [("toy", "default", 0, [], False), ("two", "default", 0, [], False)]  # as a user types it
        got = timing.read_timing(results)
        toy, two = got["toy"], got["two"]
        assert toy["ursa"]["wall_s"] == 61.0 and toy["ursa"]["same_as_busy"] is True and toy["ursa"]["seconds"] == 55.5
        assert toy["fastai"]["wall_s"] == 300.0 and toy["fastai"]["source"].startswith("stored")
        assert two["ursa"]["failure"] and two["ursa"]["same_as_busy"] is None
        busy_run = {"test_error": 0.25, "recipe_json": {"planned_seconds": 40.0}}
        idle = usable_idle(toy, busy_run)
        aims = bench.evaluate_aims("toy", {"err_mean": 0.25, "wall_mean": 500.0}, None, {"err_mean": 0.5, "wall_mean": 200.0},
                                   idle=idle)
        assert aims[2]["aim"] == "wall / fastai wall (idle)" and aims[2]["verdict"] == "held"  # busy walls would miss
        # a failed run, or a timing of another recipe (another counted plan), is not used: the busy walls stand
        assert usable_idle(two, busy_run) is None
        assert usable_idle(toy, {**busy_run, "recipe_json": {"planned_seconds": 41.0}}) is None
        assert usable_idle(toy, {**busy_run, "test_error": None}) is None  # no busy run to compare with
        # the same plan at another thread count may end a picture apart: still the recipe's time, said so in the entry
        assert usable_idle({**toy, "ursa": {**toy["ursa"], "error": 0.3, "same_as_busy": False}}, busy_run) is not None
        # another process keeps the machine busy: refused, nothing runs
        loads = iter([1.7] * 100)
        assert timing.main(argv) == 2 and "the machine is busy" in capsys.readouterr().err and len(calls) == 2
        # --recipe refit: `ursa train --refit`, compared with the busy refit run, kept beside the default's timing
        (results / "recipes_runs" / "toy" / "refit.seed0.abcd.json").write_text(json.dumps(
            {"test_error": 0.2, "recipe_json": {"planned_seconds": 40.0}}))
        calls.clear()
        loads = iter([])
        assert timing.main([*argv[:3], "toy", *argv[4:], "--recipe", "refit"]) == 0
        assert calls == [("toy", "refit", 0, ["--refit"], False)]
        refit = timing.read_timing(results)["toy"]
        assert refit["ursa"] == toy["ursa"] and refit["ursa_refit"]["same_as_busy"] is False  # 0.25 against 0.2
        assert usable_idle(refit, busy_run) == usable_idle(toy, busy_run)  # the time aims still read the default's
        # a tampered timing file is refused in one line, not overwritten
        (results / "recipes_timing.json").write_text("[1, 2")
        assert timing.main(argv) == 2 and "not a timing file" in capsys.readouterr().err
        assert (results / "recipes_timing.json").read_text() == "[1, 2"
    finally:
        sys.modules.pop("bench_recipes_timing", None)


def test_a_budget_arm_that_repeats_what_the_default_decided_is_the_default_run(bench):
    """double (--budget 240) on small images, budget120 on photos: the default decided that budget, so its run stands."""
    small, photos = ({"seed": 0, "error_rate": 0.1, "recipe_json": {"budget": b}} for b in (240.0, 120.0))
    double = ["--time-limit", "3600", "--budget", "240"]
    assert bench.reuse_default("double", [small], 0, double)["recipe"] == "double"
    assert bench.reuse_default("double", [photos], 0, double) is None
    assert bench.reuse_default("budget120", [photos], 0, ["--budget", "120"])["same_as_default"] is True
    assert bench.reuse_default("budget120", [small], 0, ["--budget", "120"]) is None
    assert bench.reuse_default("double", [small], 1, double) is None  # another seed
    assert bench.reuse_default("no_finetune", [small], 0, ["--budget", "240", "--unfreeze-epochs", "0"]) is None


def test_a_debian_package_that_is_not_the_pinned_one_is_refused_before_unpacking(build, tmp_path):
    """oxygen_icons and emoji_objects come from pinned .deb files: one with other bytes is never unpacked."""
    assert build.OXYGEN_DEB[:2] == ("oxygen-icon-theme", "5:5.103.0-1")
    deb = tmp_path / "oxygen-icon-theme_5%3a5.103.0-1_all.deb"  # the name apt-get download gives an epoch version
    deb.write_bytes(b"not the package")  # (were it unpacked, dpkg-deb's failure would say so instead)
    with pytest.raises(build.BuildError, match="not the pinned package"):
        build.debian_package(tmp_path, build.OXYGEN_DEB)
    assert deb.read_bytes() == b"not the package"  # left as it was: not the script's to remove


def test_epoch_kept_pairs_each_seed_and_chooses_leaving_each_set_out(tmp_path, capsys):
    """benchmarks/epoch_kept.py: the best and last epoch of one training per seed, and the rule the other sets choose."""
    ek = load_benchmark("epoch_kept")
    runs = tmp_path / "results" / "recipes_runs"
    (tmp_path / "results" / "splits").mkdir(parents=True)
    pairs = {"small": [(0.25, 0.125), (0.25, 0.1875)], "large": [(0.02, 0.03), (0.02, 0.02)], "flat": [(0.1, 0.1)] * 2}
    for name, seeds in pairs.items():
        (runs / name).mkdir(parents=True)
        rows = ["path,label,is_valid"] + [f"a/{k}.png,a,{k < 8}" for k in range(20)]
        (tmp_path / "results" / "splits" / f"{name}.csv").write_text("\n".join(rows) + "\n")
        for seed, (best, last) in enumerate(seeds):
            rec = {"seed": seed, "test_error": last, "test_error_best": best}
            (runs / name / f"last.seed{seed}.abc.json").write_text(json.dumps(rec))
            (runs / name / f"last_refit.seed{seed}.def.json").write_text(json.dumps({"seed": seed, "test_error": 0.05}))
    (runs / "small" / "last.seed0.old.json").write_text(json.dumps({"seed": 0, "test_error": 0.9, "test_error_best": 0.9}))
    assert ek.main([str(runs)]) == 0
    out = capsys.readouterr()
    assert "small: runs of 2 keys; using abc's" in out.err  # another experiment's run is not mixed in
    rows = {ln.split(" ")[1]: ln for ln in out.out.splitlines() if ln.startswith("| ") and "(8)" in ln}
    assert "| 0.250 | 0.156 |" in rows["small"] and rows["small"].endswith("| best: 0.250 |")  # others favour best
    assert rows["large"].endswith("| last: 0.025 |")  # small's gain carries the others' mean
    assert "3 sets: mean error best 0.1233, last 0.0938; last lower on 1, higher on 1, equal on 1" in out.out
    assert "| small | 0.050, 0.050 | 0.050 | 0.156 | 0.250 |" in out.out
    assert ek.main([str(tmp_path / "nowhere")]) == 2

"""Defaults you can trust (issue 28): decisions counted, not timed, replayed, scored honestly; lr-find's one number."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ursa.training.plan import (GOOD_ENOUGH, MAX_EPOCHS, MIN_EPOCHS, TUNE_MIN_SIZE, FineTune, Plan, Stop, Work,
                                count_gflops, fine_tune_epochs, good_enough, smaller_tune_size, suggest_budget,
                                time_limit)
from ursa.util.numbers import error_upper_bound

BEARS = Work(gflops=0.77, frozen_gflops=0.77, n_train=778, n_valid=189, frozen_epochs=4, views=4)
TILES = Work(gflops=0.065, frozen_gflops=0.065, n_train=320, n_valid=80, frozen_epochs=4, views=4)


def _noise_set(root: Path, n: int = 12, seed: int = 0, px: int = 48) -> Path:
    """Three classes of random-noise pictures (48 px): the frozen body cannot tell them apart, so fine-tuning is planned."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for k in range(n):
            Image.fromarray(rng.integers(0, 256, size=(px, px, 3), dtype=np.uint8)).save(root / c / f"{c}{k}.png")
    return root


def test_the_counted_cost_follows_images_and_flops_not_a_clock():
    # bears at 224 px: one fine-tuning epoch counts ~55 s of the reference machine; 64 px tiles a few seconds
    assert 45 < BEARS.epoch_seconds < 65 and 2 < TILES.epoch_seconds < 6
    assert BEARS.frozen_seconds < BEARS.epoch_seconds  # the cached frozen stage is cheap
    two = Work.from_json({**BEARS.to_json(), "ranks": 2})
    assert two.epoch_seconds == pytest.approx(BEARS.epoch_seconds / 2)
    assert Work.from_json(BEARS.to_json()) == BEARS  # recipe.json holds the inputs: the costs come back the same
    no_cache = Work.from_json({**BEARS.to_json(), "views": 0})
    assert no_cache.frozen_seconds > BEARS.frozen_seconds


def test_flops_are_counted_per_architecture_and_size():
    from ursa.vision.models import create_model

    m = create_model("efficientnet_lite0", n_classes=3, pretrained=False)
    small, large = count_gflops(m, 64), count_gflops(m, 224)
    assert 0.05 < small < 0.09 and 0.7 < large < 0.85  # ~(224/64)^2 times more at 224 px
    assert count_gflops(m, 64) == small  # counted, so the same every time


def test_fine_tuning_is_decided_from_counted_work_with_the_decision_as_data():
    n, how, why = fine_tune_epochs(0.2, 80, TILES, 120)
    assert (n, how) == (MAX_EPOCHS, FineTune.PLANNED) and "counted" in why
    n, how, _ = fine_tune_epochs(0.05, 189, BEARS, 120)  # bears: one 224 px epoch counts ~55 s
    assert (n, how) == (0, FineTune.TOO_FEW_FIT)
    n, how, _ = fine_tune_epochs(0.05, 189, BEARS, 800)
    assert how is FineTune.PLANNED and MIN_EPOCHS <= n
    assert fine_tune_epochs(0.05, 189, BEARS, 10)[1] is FineTune.BUDGET_SPENT
    assert fine_tune_epochs(0.05, 189, BEARS, 0)[1] is FineTune.BUDGET_ZERO
    assert fine_tune_epochs(math.nan, 189, BEARS, 120)[1] is FineTune.NO_ERROR
    assert fine_tune_epochs(0.005, 189, BEARS, 120)[1] is FineTune.GOOD_ENOUGH


def lite0_gflops(s: int) -> float:
    """lite0's counted GFLOPs at s px, as quadratic in the size (what FlopCounterMode gives, within a few %)."""
    return 0.77 * (s / 224) ** 2


def test_too_few_epochs_at_the_input_size_fine_tune_at_a_smaller_one_counted():
    # bears at 224 px: 2 epochs fit the default budget (3 are needed); at a smaller size 3 fit
    assert fine_tune_epochs(0.05, 189, BEARS, 120)[1] is FineTune.TOO_FEW_FIT
    size, n, why, work = smaller_tune_size(0.05, 189, BEARS, 120, 224, lite0_gflops)
    assert TUNE_MIN_SIZE <= size < 224 and size % 32 == 0 and n >= MIN_EPOCHS and f"trains at {size} px" in why
    assert work.gflops == lite0_gflops(size) and work.frozen_gflops == BEARS.frozen_gflops
    assert work.epoch_seconds < BEARS.epoch_seconds
    # the largest size that fits: one step up fits fewer than MIN_EPOCHS
    up = Work.from_json({**work.to_json(), "gflops": lite0_gflops(size + 32)})
    assert fine_tune_epochs(0.05, 189, up, 120)[1] is FineTune.TOO_FEW_FIT
    # a larger budget fits more epochs at a larger size; a smaller one none at TUNE_MIN_SIZE: no fine-tuning
    assert smaller_tune_size(0.05, 189, BEARS, 150, 224, lite0_gflops)[0] > size
    assert smaller_tune_size(0.05, 189, BEARS, 60, 224, lite0_gflops) is None
    # 64 px (given) has no smaller size to go to; a good frozen body is not fine-tuned at any size
    assert smaller_tune_size(0.2, 80, TILES, 20, 64, lite0_gflops) is None
    assert smaller_tune_size(0.005, 189, BEARS, 120, 224, lite0_gflops) is None
    # many small images upsampled to 128 px: when too few epochs fit there, fine-tuning may go down to half of it
    many = Work(gflops=lite0_gflops(128), frozen_gflops=lite0_gflops(128), n_train=1500, n_valid=375, frozen_epochs=4,
                views=4)
    assert fine_tune_epochs(0.1, 375, many, 120)[1] is FineTune.TOO_FEW_FIT
    got = smaller_tune_size(0.1, 375, many, 120, 128, lite0_gflops)
    assert got is not None and got[0] in (64, 96) and got[1] >= MIN_EPOCHS, got
    # images at their own 160 or 192 px keep the 128 px floor: no 2x gap between training and test on real detail
    assert smaller_tune_size(0.1, 375, replace(many, gflops=lite0_gflops(160), frozen_gflops=lite0_gflops(160)), 120,
                             160, lite0_gflops) is None
    # the validation pass stays at the input size: counted at the frozen stage's FLOPs
    only_valid = Work.from_json({**work.to_json(), "n_train": 0})
    assert only_valid.epoch_seconds == pytest.approx(Work.from_json({**BEARS.to_json(), "n_train": 0}).epoch_seconds)


def test_good_enough_gives_one_picture_of_grace():
    # the birds of issue 28: 1 error in 48 (2.1%) is within a picture of 2%: no 70 s of fine-tuning for nothing
    assert good_enough(1 / 48, 48) and not good_enough(2 / 48, 48)
    assert good_enough(4 / 189, 189) and not good_enough(5 / 189, 189)  # bears' frozen 5-7 errors still fine-tune
    assert good_enough(2 / 100, 100) and not good_enough(3 / 100, 100)  # exactly 2% stays good enough
    assert good_enough(200 / 10_000, 10_000) and GOOD_ENOUGH == 0.02  # large sets: the bound is near the rate


def test_good_enough_needs_enough_validation_pictures_to_show_it():
    # Clopper-Pearson's one-sided 95% bound (scipy.stats.beta.ppf(0.95, k + 1, n - k), written down here)
    for (k, n), bound in {(0, 31): 0.09211, (0, 14): 0.19264, (1, 14): 0.29673, (2, 59): 0.10289,
                          (1, 48): 0.09506, (4, 189): 0.04777}.items():
        assert error_upper_bound(k, n) == pytest.approx(bound, abs=1e-5), (k, n)
    assert error_upper_bound(3, 3) == 1.0 and error_upper_bound(0, 0) == 1.0
    # one wrong of 14 (omniglot_greek with a 10% validation share), or none, cannot show 2%: fine-tune
    assert not good_enough(0.0, 14) and not good_enough(1 / 14, 14) and not good_enough(0.0, 10)
    assert good_enough(0.0, 29) and not good_enough(0.0, 28)  # the smallest set where none wrong is enough
    # eurosat_dev's seed 0: 2 of 59 is within a picture of 2% but bounded only at 10.3%: it fine-tunes now
    assert not good_enough(2 / 59, 59) and good_enough(2 / 61, 61)
    n, how, why = fine_tune_epochs(0.0, 14, BEARS, 1000)
    assert how is FineTune.PLANNED and n > 0 and "too few pictures to call it good enough" in why and "19.3%" in why
    # the same reason where the budget does not fit enough epochs: it says what it would have judged
    n, how, why = fine_tune_epochs(1 / 14, 14, BEARS, 60)
    assert (n, how) == (0, FineTune.TOO_FEW_FIT) and "too few pictures" in why and "29.7%" in why
    # good enough on enough pictures says how sure it is
    n, how, why = fine_tune_epochs(0.0, 31, BEARS, 1000)
    assert (n, how) == (0, FineTune.GOOD_ENOUGH) and "at most 9.2%" in why
    # multi-label's error is 1 - macro F1, not a count of pictures: the 2% line alone, no bound, no picture count
    assert good_enough(0.0, 14, counted=False) and not good_enough(2 / 14, 14, counted=False)
    n, how, why = fine_tune_epochs(0.0, 14, BEARS, 1000, counted=False)
    assert how is FineTune.GOOD_ENOUGH and "confidence" not in why and "0 of 14" not in why

    # the same through the recipe's decision: the run's task says whether its error is a count
    from types import SimpleNamespace

    from ursa.training.recipe import _decide

    def decide(multi_label: bool) -> Plan:
        learn = SimpleNamespace(recorder=SimpleNamespace(rows=[{"error_rate": 0.0}]),
                                dist=SimpleNamespace(agree=lambda xs: xs),
                                dls=SimpleNamespace(dataset=SimpleNamespace(valid_idx=list(range(14)))))
        plan = Plan(size=224, size_why="", flips="horizontal", flips_why="", budget=1000, work=BEARS.to_json())
        _decide(SimpleNamespace(multi_label=multi_label, unfreeze_size=None), learn, plan)
        return plan

    assert decide(multi_label=True).fine_tune is FineTune.GOOD_ENOUGH
    assert decide(multi_label=False).fine_tune is FineTune.PLANNED


def test_advice_and_the_budget_suggestion_read_the_decision_not_its_words():
    plan = Plan(224, "", "horizontal", "", 120.0, work=BEARS.to_json())
    rows = [{"stage": "frozen", "error_rate": 0.05}]
    plan.fine_tune, plan.fine_tune_why = FineTune.TOO_FEW_FIT, "whatever the words say"
    assert "--budget" in plan.advice(rows, None)
    assert suggest_budget(plan) >= 12 * BEARS.epoch_seconds
    plan.fine_tune, plan.fine_tune_why = FineTune.GOOD_ENOUGH, "raise --budget (words that used to decide)"
    assert plan.advice(rows, None) is None
    plan.stopped = Stop.TIME_LIMIT
    assert plan.cut and plan.to_json()["stopped"] == "time_limit" and plan.to_json()["fine_tune"] == "good_enough"
    assert time_limit(120, None) == 480 and time_limit(120, 30) == 30


def test_the_selection_corrected_error_is_not_optimistic_by_construction():
    from ursa.training.honest import honest_figures, selection_corrected

    g = torch.Generator().manual_seed(0)
    # 20 epochs of a model that is right on each picture with chance 0.8, independently: the best epoch's raw
    # error is well below 0.2 by luck alone; the cross-fitted figure is not.
    correct = [torch.rand(60, generator=g) < 0.8 for _ in range(20)]
    raw = min(float((~c).float().mean()) for c in correct)
    corrected = selection_corrected(correct)
    assert raw < 0.14 and corrected > raw + 0.03
    same = [torch.tensor([True, True, False, True])] * 3  # no choice to make: the same figure
    assert selection_corrected(same) == 0.25
    assert honest_figures([torch.tensor([True])], 0.0)["selection_corrected"] is None
    # a picture whose file vanished during training (label < 0, never "right") is left out, as the error rate does
    known = torch.tensor([True, True, True, True, False])
    vanished = [torch.tensor([True, True, False, True, False])] * 3
    assert honest_figures(vanished, 0.25, known)["selection_corrected"] == 0.25
    # beside it, how far off so few pictures may be: the 95% bound of the honest figure's count
    got = honest_figures(vanished, 0.25, known)
    assert got["pictures"] == 4 and got["confidence"] == 0.95
    assert got["upper_bound"] == pytest.approx(error_upper_bound(1, 4)) and got["upper_bound"] > 0.7
    none_wrong = honest_figures([torch.ones(25, dtype=torch.bool)] * 3, 0.0)  # omniglot_greek: 0 of 25, held out 7%
    assert none_wrong["selection_corrected"] == 0.0 and none_wrong["upper_bound"] == pytest.approx(0.1129, abs=1e-4)


def test_cleaning_is_scored_on_the_unchanged_validation_pictures(tmp_path):
    from ursa.training.compare import compare_line, compare_valid

    split = tmp_path / "split.csv"
    split.write_text("name,label,is_valid\na/1.jpg,a,True\na/2.jpg,a,True\nb/3.jpg,b,True\nb/4.jpg,b,True\n"
                     "b/5.jpg,b,False\n")
    # the cleaner excluded a/2 (a mistake) and relabelled b/4 as a: the retrain gets b/4 right under its new label
    c = compare_valid(split, ["a/1.jpg", "b/3.jpg", "b/4.jpg"], ["a", "b", "a"], [True, False, True])
    assert c["excluded"] == ["a/2.jpg"] and c["relabelled"] == ["b/4.jpg"] and c["unchanged"] == 2
    assert c["error_rate"] == pytest.approx(1 / 3) and c["error_rate_unchanged"] == 0.5
    assert "1 excluded, 1 relabelled" in compare_line(c) and "50.00% (1 of 2)" in compare_line(c)
    assert c["earlier_error_rate_unchanged"] is None and "compare it with" in compare_line(c)
    # the earlier model got a/2 (now excluded) and b/3 wrong: on the unchanged pictures it had 1 of 2 wrong too
    c = compare_valid(split, ["a/1.jpg", "b/3.jpg", "b/4.jpg"], ["a", "b", "a"], [True, False, True],
                      earlier_wrong=["a/2.jpg", "b/3.jpg"])
    assert c["earlier_errors_unchanged"] == 1 and "the earlier model: 50.00%, 1 of 2" in compare_line(c)
    assert compare_valid(tmp_path / "missing.csv", [], [], []) is None


def test_config_replays_an_earlier_runs_decisions_unless_an_option_changes_them(tmp_path):
    from ursa.cli.train import make_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": "x", "seed": 3, "budget": 120.0}))
    (run / "recipe.json").write_text(json.dumps({"size": 224, "fine_tune_epochs": 5, "tune_size": 160}))
    cfg = make_config(tmp_path / "data", run)
    assert cfg.replay == {"from": str(run), "size": 224, "fine_tune_epochs": 5, "tune_size": 160, "budget": 120.0}
    cfg = make_config(tmp_path / "data", run, budget=600.0)
    assert cfg.replay == {"from": str(run), "size": 224}  # a new budget decides the fine-tuning afresh
    assert make_config(tmp_path / "data", None).replay is None
    from ursa.training.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="replay"):
        TrainConfig(data=tmp_path, replay={"size": "big"})
    with pytest.raises(ConfigError, match="replay"):
        TrainConfig(data=tmp_path, replay={"tune_size": 8})
    with pytest.raises(ConfigError, match="--time-limit"):
        TrainConfig(data=tmp_path, time_limit=0)


def test_lr_find_keeps_the_default_while_the_loss_still_falls():
    from ursa.training.lr_find import suggest

    lrs = [1e-6 * 10 ** (i / 10) for i in range(60)]  # 1e-6 .. ~8e-1
    falling = [2.0 - 0.02 * i for i in range(60)]  # bears: the loss still falls until 1e-1
    lr, why = suggest(lrs, falling, valley=2.5e-4, default=3e-3)
    assert lr == 3e-3 and "still falls" in why
    # a loss that bottoms out at 1e-4 and climbs back by 3e-3: the default is too high, the valley is below it
    bowl = [1.0 + (math.log10(x) + 4) ** 2 for x in lrs]
    lr, why = suggest(lrs, bowl, valley=3e-5, default=3e-3)
    assert lr == 3e-5 and "too high" in why
    assert suggest(lrs, falling, valley=2.5e-4, default=None)[0] == 2.5e-4  # no default: fastai's valley


@pytest.mark.slow
def test_the_default_recipe_decides_the_same_and_trains_the_same_model_on_a_busy_machine(tmp_path, one_thread):
    """Acceptance (issue 28): the default recipe twice, once with every core saturated: same decisions, same weights."""
    from safetensors.torch import load_file

    from ursa.training.config import TrainConfig
    from ursa.training.recipe import train

    data = _noise_set(tmp_path / "data")  # 36 pictures, 7 for validation: the frozen body misses most

    def run(name: str) -> tuple[dict, dict]:
        # 64 px, budget 10 s counted: 3 fine-tuning epochs fit after the frozen stage; the wall-clock cap is far away
        res = train(TrainConfig(data=data, out=tmp_path / name, epochs=2, budget=10, time_limit=600, size=64, quiet=True))
        recipe = json.loads((tmp_path / name / "recipe.json").read_text())
        return recipe, load_file(str(res.model_path))

    idle_recipe, idle_weights = run("idle")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        busy_recipe, busy_weights = run("busy")
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert idle_recipe["fine_tune"] == "planned" and idle_recipe["fine_tune_epochs"] >= MIN_EPOCHS
    assert idle_recipe["epochs_done"] == idle_recipe["fine_tune_epochs"] and not idle_recipe["cut"]
    import torchvision

    # where it ran: the thread count and the numeric packages' versions (a newer release may change the last bits)
    packages = idle_recipe["run"]["packages"]
    assert torch.__version__.split("+")[0] == packages["torch"].split("+")[0] and packages["onnxruntime"]
    assert torchvision.__version__.split("+")[0] == packages["torchvision"].split("+")[0]
    for key in ("seconds", "run"):  # how long it took and where: the only things that may differ
        idle_recipe.pop(key), busy_recipe.pop(key)
    assert busy_recipe == idle_recipe
    assert idle_weights.keys() == busy_weights.keys()
    assert all(torch.equal(idle_weights[k], busy_weights[k]) for k in idle_weights)


@pytest.mark.slow
def test_photos_whose_fine_tuning_does_not_fit_at_their_size_fine_tune_smaller_and_keep_their_size(tmp_path, one_thread):
    """224 px pictures, a budget that fits fewer than 3 epochs at 224 px: fine-tuned at a smaller size, the model at 224."""
    from ursa.training.config import TrainConfig
    from ursa.training.recipe import train
    from ursa.inference import load_predictor

    data = _noise_set(tmp_path / "data", n=8, px=224)  # 24 pictures, 5 for validation: the frozen body misses most
    res = train(TrainConfig(data=data, out=tmp_path / "run", epochs=1, budget=10.2, time_limit=600, quiet=True))
    recipe = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert recipe["size"] == 224 and recipe["fine_tune"] == "planned" and TUNE_MIN_SIZE <= recipe["tune_size"] < 224
    assert recipe["fine_tune_epochs"] >= MIN_EPOCHS and recipe["epochs_done"] == recipe["fine_tune_epochs"]
    assert recipe["work"]["gflops"] < recipe["work"]["frozen_gflops"]  # the counted work is the smaller size's
    assert f"trains at {recipe['tune_size']} px" in recipe["fine_tune_why"]
    assert load_predictor(res.model_path).size == 224  # validated and kept at the input size
    # without the smaller size it would not have fine-tuned: at 224 px too few epochs fit the same budget
    at_size = Work.from_json({**recipe["work"], "gflops": recipe["work"]["frozen_gflops"]})
    assert fine_tune_epochs(0.5, 5, at_size, 10.2)[1] is FineTune.TOO_FEW_FIT


def test_calibration_figures_are_also_given_cross_fitted():
    import numpy as np

    from ursa.diagnose.calibration import calibrate

    inside, cross = [], []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 3, 200)
        logits = rng.normal(0, 1, (200, 3))
        logits[np.arange(200), y] += 2.5  # right about 85% of the time, over-confident after scaling by 3
        cal = calibrate(3 * logits, y)
        inside.append(cal.kept_precision)
        cross.append(cal.kept_precision_cross)
    # the threshold reaches the target on the images it was chosen on by construction; elsewhere it falls short
    assert min(inside) >= 0.95 and np.mean(cross) < np.mean(inside)
    assert "other half" in cal.summary() and cal.to_json()["ece_cross"] is not None
    assert calibrate(logits[:3], y[:3]).ece_cross is None


@pytest.mark.slow
def test_a_retrain_replays_the_decisions_scores_unchanged_pictures_and_says_when_the_clock_cut_it(tmp_path):
    """--config RUN on cleaned labels: RUN's decisions replayed, the excluded picture named, a wall-clock cut marked."""
    from ursa.cli.train import make_config
    from ursa.training.recipe import train
    from ursa.vision.data import read_split

    data = _noise_set(tmp_path / "data", n=8)
    first = train(make_config(data, None, out=tmp_path / "a", epochs=1, budget=10.0, quiet=True))
    assert first.plan.fine_tune is FineTune.PLANNED and not first.plan.compare
    rows = read_split(tmp_path / "a" / "split.csv")
    gone = next(name for name, _, valid in rows if valid)
    (tmp_path / "cleaned.csv").write_text("name,label\n" + "".join(f"{n},{lab}\n" for n, lab, _ in rows if n != gone))
    cfg = make_config(data, tmp_path / "a", out=tmp_path / "b", csv=tmp_path / "cleaned.csv", time_limit=1e-3,
                      quiet=True)
    second = train(cfg)
    plan = second.plan
    assert plan.fine_tune is FineTune.REPLAYED and plan.fine_tune_epochs == first.plan.fine_tune_epochs
    assert plan.size == first.plan.size and "decided" in plan.size_why
    assert plan.budget == 10.0 and str(tmp_path / "a") in plan.budget_why  # kept from the first run, and said so
    assert plan.compare["excluded"] == [gone] and plan.compare["unchanged"] == first.n_valid - 1
    assert plan.compare["earlier_errors_unchanged"] == len(set(first.plan.wrong) - {gone})  # the same pictures, both
    # the clock cut fine-tuning after its first epoch: said, not hidden
    assert plan.cut and plan.stopped is Stop.TIME_LIMIT and plan.epochs_done == 1 and "CUT" in plan.fine_tune_why
    recipe = json.loads((tmp_path / "b" / "recipe.json").read_text())
    assert recipe["cut"] and recipe["compare"]["excluded"] == [gone]
    assert "Cut" in (tmp_path / "b" / "report.html").read_text()


def test_time_limit_on_the_command_line(tmp_path, capsys):
    from ursa.cli import main
    from ursa.cli.train import parse_budget

    assert parse_budget("10m", "--time-limit") == 600
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--time-limit", "abc"]) == 2
    assert "--time-limit: expected seconds" in capsys.readouterr().err


def test_refit_trains_again_on_every_picture_with_the_first_fits_decisions(tmp_path, one_thread, capsys):
    """--refit: the first fit's run and figures unchanged, the model file trained again on all pictures up to the epoch
    kept, the same weights twice; predict then says why it cannot tell unknown pictures."""
    from safetensors.torch import load_file

    from ursa.cli import main
    from ursa.errors import UrsaError
    from ursa.inference import load_predictor
    from ursa.inference.openset import REFIT_CANNOT_TELL

    data = _noise_set(tmp_path / "data")  # 36 pictures, 6 for validation: fine-tuning is planned

    def run(name: str, *more: str) -> tuple[dict, dict, str]:
        args = ["train", str(data), "--out", str(tmp_path / name), "--epochs", "2", "--budget", "10", "--size", "64",
                "--time-limit", "600", *more]
        assert main(args) == 0
        recipe = json.loads((tmp_path / name / "recipe.json").read_text())
        said = capsys.readouterr()
        return recipe, load_file(str(tmp_path / name / "model.safetensors")), said.out + said.err

    plain, plain_w, _ = run("plain")
    refit, refit_w, said = run("refit", "--refit")
    again, again_w, _ = run("again", "--refit")
    facts = refit.pop("refit")
    assert facts["used"] and facts["pictures"] == 36 and facts["first_fit_pictures"] == 36 - plain["work"]["n_valid"]
    last = plain["kept_epoch"] if plain["kept_epoch"] is not None else 2 + plain["epochs_done"] - 1
    assert facts["epochs"] == last + 1 and facts["frozen_epochs"] == 2
    assert f"(refit on all 36 pictures; the figures above are the first fit's)" in said
    assert [ln for ln in said.splitlines() if ln.startswith("refit: epoch")][-1].startswith(f"refit: epoch {last} ")
    # the first fit is the same run: its decisions, kept epoch and honest figures; only the model file differs
    for d in (plain, refit):
        for key in ("seconds", "run", "refit"):
            d.pop(key, None)
    assert refit == plain and plain["honest"]["selection_corrected"] is not None
    assert not all(torch.equal(plain_w[k], refit_w[k]) for k in plain_w)
    assert all(torch.equal(refit_w[k], again_w[k]) for k in refit_w)  # counted, not timed: the same model again
    pred = load_predictor(tmp_path / "refit" / "model.safetensors")
    assert pred.world.why == REFIT_CANNOT_TELL and pred.world.sets is None
    assert pred.world.without_features("an explain pass").why == REFIT_CANNOT_TELL
    with pytest.raises(UrsaError, match="--set: .*ursa train --refit"):
        pred.world.check_sets()
    assert load_predictor(tmp_path / "plain" / "model.safetensors").world.detector is not None
    assert "trained again on all 36 pictures" in (tmp_path / "refit" / "report.html").read_text()
    for name, noted in (("refit", True), ("plain", False)):  # interpret says its validation figures are in-sample
        assert main(["interpret", str(tmp_path / name / "model.safetensors"), str(data), "--out", str(tmp_path / "i")]) == 0
        said = capsys.readouterr()
        assert ("was refit on every picture" in said.out + said.err) is noted


def test_a_refit_that_fails_or_is_cut_is_not_used_and_the_first_model_is_written(tmp_path, one_thread, monkeypatch,
                                                                                 capsys):
    import dataclasses
    import time

    from safetensors.torch import load_file

    from ursa.errors import DivergedError
    from ursa.training import recipe
    from ursa.training.config import TrainConfig
    from ursa.training.refit import EveryPictureDataset, refit
    from ursa.util.progress import make_console

    data = _noise_set(tmp_path / "data", n=8)
    cfg = TrainConfig(data=data, out=tmp_path / "run", epochs=2, budget=10, size=64, time_limit=600, refit=True,
                      quiet=True)

    def gone(ds):
        raise OSError("the disk went away")

    with monkeypatch.context() as m:
        m.setattr(EveryPictureDataset, "of", gone)
        res = recipe.train(cfg)
    assert not res.plan.refit["used"] and res.plan.refit["stopped"] == "failed" and "disk went away" in res.plan.refit["why"]
    written = load_file(str(res.model_path))  # the first fit's model, as the learner holds it
    assert all(torch.equal(v, res.learner.model.state_dict()[k].cpu()) for k, v in written.items())
    assert "the refit was not used" in (tmp_path / "run" / "advice.txt").read_text()
    from ursa.cli import main
    from ursa.inference import load_predictor

    assert not load_predictor(res.model_path).world.refit  # asked for, not used: the model file says whose weights
    capsys.readouterr()
    assert main(["interpret", str(res.model_path), str(data), "--out", str(tmp_path / "i")]) == 0
    said = capsys.readouterr()
    assert "error rate" in said.out and "was refit on every picture" not in said.out + said.err
    # the cap counts from the run's start, as for the first fit: once it has passed, the refit does not start
    plan = dataclasses.replace(res.plan, kept_epoch=None)
    rows = res.learner.recorder.rows
    ds = res.learner.dls.dataset
    assert rows[-1]["epoch"] >= 3  # two frozen epochs, then fine-tuning: the cap applies
    late = refit(cfg, plan, rows, ds, make_console(True), recipe.prepare, t0=time.perf_counter() - 10 * plan.time_limit)
    assert not late.used and late.facts["stopped"] == "time_limit" and late.facts["trained_epochs"] == 0

    def diverging(*args, **kwargs):  # the recipe's learner, whose fits blow up
        learn, every, p = recipe.prepare(*args, **kwargs)

        def blow_up(*a, **k):
            raise DivergedError("the training loss became nan")

        learn.fit_one_cycle = blow_up
        return learn, every, p

    gone_off = refit(cfg, res.plan, rows, ds, make_console(True), diverging, t0=time.perf_counter())
    assert not gone_off.used and gone_off.facts["stopped"] == "diverged" and "nan" in gone_off.facts["why"]


def test_the_lessons_fixed_recipe_refits_whatever_the_clock_and_with_no_frozen_epochs(tmp_path, one_thread):
    """--unfreeze-epochs is never cut by the wall clock (first fit or refit), also with --epochs 0."""
    from ursa.training.config import TrainConfig
    from ursa.training.recipe import train

    data = _noise_set(tmp_path / "data", n=4)
    res = train(TrainConfig(data=data, out=tmp_path / "run", epochs=0, unfreeze_epochs=2, size=64, time_limit=1e-3,
                            refit=True, quiet=True))
    assert res.plan.refit["used"] and res.plan.refit["epochs"] == 2 and res.plan.refit["frozen_epochs"] == 0


def test_stop_after_ends_a_fit_after_the_epoch_kept_counted_over_every_fit():
    from types import SimpleNamespace

    from ursa.training.callbacks import CancelFitException
    from ursa.training.refit import StopAfter

    stop = StopAfter(5)
    stop.after_epoch(SimpleNamespace(epoch=4, epoch_in_fit=0, n_epoch=24))  # the fine-tuning's first epoch: go on
    stop.after_epoch(SimpleNamespace(epoch=5, epoch_in_fit=5, n_epoch=6))  # the fit's last epoch: it ends anyway
    with pytest.raises(CancelFitException):
        stop.after_epoch(SimpleNamespace(epoch=5, epoch_in_fit=1, n_epoch=24))


def test_refit_is_refused_where_it_cannot_hold(tmp_path):
    from ursa.training.config import ConfigError, TrainConfig
    from ursa.training.dist import Dist
    from ursa.training.recipe import prepare
    from ursa.training.refit import EveryPictureDataset
    from ursa.vision.data import load_dataset

    data = _noise_set(tmp_path / "data", n=4)
    with pytest.raises(ConfigError, match="--refit: expected off with --multi-label"):
        TrainConfig(data=data, csv=tmp_path / "x.csv", multi_label=True, refit=True)
    with pytest.raises(ConfigError, match="--refit: not under torchrun"):
        prepare(TrainConfig(data=data, out=tmp_path / "run", refit=True), dist=Dist(0, 2))
    ds = load_dataset(data, None, 0.2, 0)
    every = EveryPictureDataset.of(ds)
    assert every.train_idx == list(range(12)) and every.valid_idx == ds.valid_idx and ds.valid_idx
    assert len(ds.train_idx) + len(ds.valid_idx) == 12
    every.drop({0}, {0: "unreadable since"})  # a copy: the first fit's dataset keeps its pictures and skip list
    assert len(ds) == 12 and not ds.skipped and len(every) == 11


def test_refit_with_nproc_is_refused_before_torchrun_starts(tmp_path, capsys, monkeypatch):
    from ursa.cli import main
    from ursa.cli import train as train_cli

    monkeypatch.setattr(train_cli, "_launch", lambda cfg, nproc: pytest.fail("torchrun was started"))
    data = _noise_set(tmp_path / "data", n=4)
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--refit", "--nproc", "2"]) == 2
    assert "--refit: not under torchrun" in capsys.readouterr().err


def test_epoch_kept_last_holds_the_schedules_end_and_needs_no_selection_correction(tmp_path, one_thread, capsys):
    """--epoch-kept last: the same decisions and training as the default, the last epoch's weights in the model file,
    and an honest figure that is the reported one (nothing was chosen on the validation pictures)."""
    import csv

    from safetensors.torch import load_file

    from ursa.errors import UrsaError
    from ursa.training.config import TrainConfig
    from ursa.training.honest import LAST
    from ursa.training.recipe import train

    data = _noise_set(tmp_path / "data")

    def run(name: str, kept: str) -> tuple[dict, dict, list[dict]]:
        res = train(TrainConfig(data=data, out=tmp_path / name, epochs=2, budget=10, time_limit=600, size=64,
                                epoch_kept=kept))
        said = capsys.readouterr()
        honest_lines[kept] = [ln for ln in (said.out + said.err).splitlines() if ln.startswith("honest figure")]
        with open(tmp_path / name / "history.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        return json.loads((tmp_path / name / "recipe.json").read_text()), load_file(str(res.model_path)), rows

    honest_lines: dict[str, list[str]] = {}
    best, best_w, _ = run("best", "best")
    last, last_w, rows = run("last", "last")
    assert last["kept_epoch"] is None and last["fine_tune_epochs"] == best["fine_tune_epochs"] >= MIN_EPOCHS
    assert last["size"] == best["size"] and last["epochs_done"] == best["epochs_done"]
    honest = last["honest"]
    assert honest["method"] == LAST and honest["selection_corrected"] == honest["error_rate"]
    assert honest["error_rate"] == pytest.approx(float(rows[-1]["error_rate"]), abs=1e-4)
    assert best["honest"]["method"] != LAST and best["honest"]["chosen"] and not honest["chosen"]
    report = (tmp_path / "last" / "report.html").read_text()
    assert "on the last epoch, which was not chosen on the validation pictures" in report
    # the same training; on this set the default puts back an earlier, better epoch, so the weights differ
    assert best["kept_epoch"] is not None and best["kept_epoch"] < 2 + best["epochs_done"] - 1
    assert not all(torch.equal(best_w[k], last_w[k]) for k in best_w)
    # and beside it, best.safetensors holds the epoch the default keeps
    beside = load_file(str(tmp_path / "last" / "best.safetensors"))
    assert all(torch.equal(best_w[k], v) for k, v in beside.items())
    assert not (tmp_path / "best" / "best.safetensors").exists()
    # the console says which: corrected for the choice (with its bound) or not chosen at all
    assert len(honest_lines["best"]) == 1 and "corrected for choosing it" in honest_lines["best"][0]
    assert "at 95% confidence at most" in honest_lines["best"][0]
    assert len(honest_lines["last"]) == 1 and "on the last epoch, not chosen on these pictures" in honest_lines["last"][0]
    assert "at 95% confidence at most" in honest_lines["last"][0]
    advice = (tmp_path / "last" / "advice.txt").read_text()
    assert "the last epoch, which the model file holds (--epoch-kept last" in advice
    with pytest.raises(UrsaError, match="--epoch-kept: expected best or last"):
        TrainConfig(data=data, epoch_kept="first")

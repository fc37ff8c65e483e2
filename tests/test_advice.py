"""The four failure-mode rules on synthetic histories, the epoch callback, and a real diverging run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ursa.diagnose.advice import (
    RULES,
    History,
    advise,
    check,
    diverged,
    format_advice,
    lr_too_low,
    too_few_epochs,
    too_many_epochs,
    write_advice,
)
from ursa.errors import DivergedError
from ursa.training.callbacks import AdvicePrinter, BestWeights, DivergenceGuard, Recorder


pytestmark = pytest.mark.usefixtures("one_thread")


def make_history(train, valid, err, stages=None, per_epoch=10, lr=3e-3, start=1.1, batch_losses=None,
                 stopped=False) -> History:
    """Rows plus per-batch losses that walk linearly from one epoch's train loss to the next."""
    stages = stages or ["frozen"] * len(train)
    rows = [{"epoch": e, "stage": s, "train_loss": t, "valid_loss": v, "error_rate": r, "accuracy": 1 - r,
             "seconds": 1.0} for e, (t, v, r, s) in enumerate(zip(train, valid, err, stages))]
    if batch_losses is None:
        batch_losses, prev = [], start
        for t in train:
            batch_losses += [prev + (t - prev) * (i + 1) / per_epoch for i in range(per_epoch)]
            prev = t
    n = len(batch_losses)
    epochs = [(i + 1) / per_epoch for i in range(n)]
    lrs = [lr if stages[min(len(stages) - 1, i // per_epoch)] == "frozen" else lr / 10 for i in range(n)]
    return History(rows, list(batch_losses), epochs, lrs, stopped)


HEALTHY = dict(train=[0.6, 0.3, 0.2, 0.18], valid=[0.3, 0.22, 0.2, 0.195], err=[0.08, 0.05, 0.04, 0.04])


def test_rules_are_data_with_the_four_failure_modes():
    assert [name for name, _ in RULES] == ["diverged", "lr_too_low", "too_few_epochs", "too_many_epochs"]
    assert all(callable(fn) for _, fn in RULES)


def test_healthy_run_fires_nothing():
    h = make_history(**HEALTHY)
    assert [a for _, a in check(h) if a is not None] == []
    assert advise(h) == []
    assert "[ok] no failure mode detected" in format_advice([], h)


# --- learning rate too high ----------------------------------------------------------------------


def test_diverged_on_nan_batch_loss():
    h = make_history([0.5], [0.4], [0.1], batch_losses=[1.1, 0.9, math.nan])
    a = diverged(h)
    assert a is not None and a.severity == "error"
    assert "nan" in a.message and "10x lower" in a.message


def test_diverged_on_valid_loss_ten_times_its_best():
    h = make_history([0.5, 0.4, 0.6], [0.3, 0.2, 2.5], [0.1, 0.08, 0.3])
    a = diverged(h)
    assert a is not None and "validation loss jumped" in a.message and a.epoch == 2


def test_diverged_on_training_loss_blowing_up_while_valid_looks_fine():
    """What --lr 0.5 does to the cached head: train loss explodes, valid loss stays finite, no NaN."""
    h = make_history([1.88, 6.88, 9.43], [1.98, 2.51, 2.51], [0.14, 0.09, 0.09], lr=0.5, per_epoch=3,
                     batch_losses=[1.2, 0.7, 3.0, 8.0, 7.0, 6.5, 9.0, 10.0, 9.5])
    a = diverged(h)
    assert a is not None
    assert a.title == "learning rate too high"
    assert "training loss shot up" in a.message and "--lr 0.05" in a.message
    assert advise(h) == [a], "a diverged run gets only this advice"


def test_diverged_in_fine_tuning_points_at_unfreeze_lr():
    h = make_history([0.5, 0.3, 20.0], [0.3, 0.2, 0.25], [0.1, 0.05, 0.06], stages=["frozen", "frozen", "unfrozen"])
    a = diverged(h)
    assert a is not None and "--unfreeze-lr" in a.message and "unfrozen" in a.message


def test_diverged_when_the_learner_stopped_the_run():
    h = make_history([0.5], [0.4], [0.1], stopped=True)
    assert diverged(h) is not None


def test_a_loss_that_falls_to_tiny_then_rises_a_little_is_not_divergence():
    h = make_history([0.2, 0.02, 0.1], [0.1, 0.05, 0.06], [0.02, 0.0, 0.0])
    assert diverged(h) is None


def test_a_near_perfect_model_whose_tiny_valid_loss_wobbles_is_not_divergence():
    """cc0_textures (issue 28's benchmark, seed 1): valid loss 1.2e-4 then 1.8e-3, every picture right, was called
    diverged (15x its best): exit 3 and no model file for a perfect model."""
    h = make_history([0.05, 0.001, 0.0008], [0.0005, 0.000122, 0.00181], [0.0, 0.0, 0.0])
    assert diverged(h) is None
    assert diverged(make_history([0.5, 0.1, 0.6], [0.3, 0.02, 0.25], [0.1, 0.0, 0.2])) is not None  # 0.02 -> 0.25, 20 points


def test_a_loss_blowup_is_divergence_whatever_the_error_says():
    # a collapse to the majority class of a 90/10 set: the error barely moves, the loss is 80x its best
    assert diverged(make_history([0.5, 0.3, 9.0], [0.3, 0.25, 20.0], [0.09, 0.08, 0.10])) is not None
    # no error figure at that epoch: the loss alone decides
    assert diverged(make_history([0.5, 0.3, 0.6], [0.3, 0.02, 0.5], [0.1, 0.0, math.nan])) is not None
    # the error rose 20 points but the loss is tiny (under 0.1): no divergence
    assert diverged(make_history([0.05, 0.01, 0.01], [0.004, 0.0002, 0.05], [0.0, 0.0, 0.2])) is None


def test_one_picture_turned_confidently_wrong_is_not_divergence():
    """cc0_textures seed 2 (issue 28's benchmark): the frozen stage's valid loss went 0.000464 -> 0.868 while one
    validation picture of ~30 turned wrong: exit 3 and no model for a model that was right on all the others."""
    h = make_history([0.3, 0.05, 0.04, 0.02], [0.01, 0.000464, 0.868, 0.001], [0.0, 0.0, 0.032, 0.0])
    assert diverged(h) is None


def test_a_valid_loss_on_a_handful_of_pictures_is_not_read_as_divergence():
    """The studio's test project: 32 pictures, 2 for validation. One confidently wrong picture is a 0.5 error rise and
    a mean loss over 2.0: read as divergence, it was exit 3 and no model file. The same figures on 40 pictures are."""
    import dataclasses

    h = make_history([0.7, 0.5, 0.4], [0.3, 0.15, 2.4], [0.0, 0.0, 0.5])
    assert diverged(dataclasses.replace(h, n_valid=2)) is None
    assert diverged(dataclasses.replace(h, n_valid=40)) is not None
    assert diverged(h) is not None  # not known (a history.csv read back): as before
    # NaN and a training loss blowing up still count on a handful of pictures
    assert diverged(dataclasses.replace(make_history([0.5, 0.4, 0.3], [0.3, 0.2, math.nan], [0.0, 0.0, 0.5]), n_valid=2))
    blowup = make_history([1.88, 6.88, 9.43], [1.98, 2.51, 2.51], [0.14, 0.09, 0.09], lr=0.5, per_epoch=3,
                          batch_losses=[1.2, 0.7, 3.0, 8.0, 7.0, 6.5, 9.0, 10.0, 9.5])
    assert diverged(dataclasses.replace(blowup, n_valid=2)) is not None


# --- learning rate too low -----------------------------------------------------------------------


def test_lr_too_low_when_the_loss_barely_moves():
    h = make_history([1.08, 1.05, 1.02], [1.07, 1.04, 1.0], [0.6, 0.55, 0.5], lr=1e-6)
    a = lr_too_low(h)
    assert a is not None and a.title == "learning rate too low" and "barely moved" in a.message
    assert lr_too_low(make_history(**HEALTHY)) is None


def test_lr_too_low_ignores_a_loss_that_is_already_low():
    h = make_history([0.1, 0.098, 0.097], [0.1, 0.1, 0.1], [0.02, 0.02, 0.02], start=0.1)
    assert lr_too_low(h) is None


# --- too few epochs ------------------------------------------------------------------------------


def test_underfitting_when_valid_loss_still_falls_fast():
    a = too_few_epochs(make_history([0.9, 0.6, 0.45], [0.6, 0.4, 0.3], [0.2, 0.1, 0.08]))
    assert a is not None
    assert a.title == "underfitting: train longer or raise the learning rate"
    assert "still falling" in a.message and "--epochs" in a.message


def test_underfitting_when_train_loss_is_above_valid_loss():
    a = too_few_epochs(make_history([0.8, 0.6, 0.5], [0.35, 0.3, 0.29], [0.1, 0.08, 0.08],
                                    stages=["frozen", "unfrozen", "unfrozen"]))
    assert a is not None and "above the validation loss" in a.message and "--unfreeze-epochs" in a.message


def test_train_above_valid_after_valid_stopped_improving_is_not_underfitting():
    assert too_few_epochs(make_history([0.8, 0.6, 0.5], [0.3, 0.28, 0.29], [0.1, 0.08, 0.08])) is None


# --- too many epochs -----------------------------------------------------------------------------


def test_too_many_epochs_when_error_rises_for_two_epochs_after_its_best():
    h = make_history([0.5, 0.3, 0.2, 0.1], [0.3, 0.2, 0.25, 0.3], [0.1, 0.05, 0.06, 0.07])
    a = too_many_epochs(h)
    assert a is not None and a.epoch == 1
    assert a.title == "error is getting worse: fewer epochs, more data, or regularisation"
    assert "--epochs 2 --unfreeze-epochs 0" in a.message


def test_too_many_epochs_in_fine_tuning_suggests_fewer_unfreeze_epochs():
    h = make_history([0.5, 0.3, 0.2, 0.1, 0.05], [0.3, 0.2, 0.15, 0.2, 0.3], [0.1, 0.05, 0.03, 0.04, 0.05],
                     stages=["frozen", "frozen", "unfrozen", "unfrozen", "unfrozen"])
    a = too_many_epochs(h)
    assert a is not None and a.epoch == 2 and "--unfreeze-epochs 1" in a.message


@pytest.mark.parametrize("err", [[0.1, 0.05, 0.07, 0.05], [0.1, 0.05, 0.07], [0.1, 0.08, 0.05]])
def test_too_many_epochs_needs_two_worse_epochs_at_the_end(err):
    n = len(err)
    assert too_many_epochs(make_history([0.5] * n, [0.3] * n, err)) is None


def test_rules_cope_with_empty_and_nan_histories():
    empty = History([])
    assert all(a is None for _, a in check(empty))
    nan_rows = make_history([math.nan], [math.nan], [math.nan], batch_losses=[])
    assert diverged(nan_rows) is not None  # a NaN valid loss is divergence
    assert [a for name, a in check(nan_rows) if name != "diverged" and a is not None] == []


def test_history_reads_history_csv(tmp_path):
    r = Recorder(rows=make_history(**HEALTHY).rows)
    (tmp_path / "history.csv").write_text(r.history_csv())
    h = History.read_csv(tmp_path / "history.csv")
    assert [x["epoch"] for x in h.rows] == [0, 1, 2, 3] and h.rows[0]["stage"] == "frozen"
    assert advise(h) == []


def test_advice_txt_lists_findings_and_the_checklist(tmp_path):
    h = make_history([0.5, 0.3, 0.2, 0.1], [0.3, 0.2, 0.25, 0.3], [0.1, 0.05, 0.06, 0.07])
    found = advise(h)
    path = write_advice(tmp_path / "advice.txt", found, h, ["weights of epoch 1 are in best.safetensors"])
    text = path.read_text()
    assert "[warning] error is getting worse" in text and "best.safetensors" in text
    assert "[x] too_many_epochs" in text and "[ ] diverged" in text
    assert not list(tmp_path.glob(".*.tmp"))


# --- during training -----------------------------------------------------------------------------


def _fake_learner():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    return SimpleNamespace(model=model, recorder=Recorder(), console=SimpleNamespace(print=lambda *a, **k: None),
                           stage="frozen", batch_cancelled=False, epoch_in_fit=0, n_epoch=1)


def _epoch(learn, cbs, e, train, valid, err, losses):
    """What the loop does at the end of an epoch: the recorder's row, then each callback's after_epoch."""
    learn.recorder.batch_losses += losses
    learn.recorder.batch_epochs += [e + (i + 1) / len(losses) for i in range(len(losses))]
    learn.recorder.batch_lrs += [1e-3] * len(losses)
    learn.recorder.rows.append({"epoch": e, "stage": "frozen", "train_loss": train, "valid_loss": valid,
                                "error_rate": err, "accuracy": 1 - err, "seconds": 1.0})
    for cb in cbs:
        cb("after_epoch", learn)


def test_best_weights_and_advice_printer_keep_the_best_epoch_and_say_new_advice_once():
    learn, said = _fake_learner(), []
    learn.console = SimpleNamespace(print=lambda msg, **k: said.append(msg))
    cbs = [BestWeights(), AdvicePrinter()]
    _epoch(learn, cbs, 0, 0.5, 0.3, 0.10, [1.0, 0.6])
    with torch.no_grad():
        learn.model[0].weight.add_(1.0)
    _epoch(learn, cbs, 1, 0.4, 0.2, 0.05, [0.5, 0.4])
    best = {k: v.clone() for k, v in learn.model.state_dict().items()}
    for e, err in ((2, 0.06), (3, 0.07), (4, 0.08)):
        with torch.no_grad():
            learn.model[0].weight.add_(1.0)
        _epoch(learn, cbs, e, 0.3, 0.25, err, [0.35, 0.3])
    assert cbs[0].epoch == 1
    assert all(torch.equal(best[k], cbs[0].state[k]) for k in best)
    assert sum("error is getting worse" in m for m in said) == 1


def test_advice_waits_for_the_end_of_the_fit_where_a_one_cycle_anneals():
    """A rise mid-cycle is not yet "too many epochs": the last epochs of the schedule may bring it down again."""
    learn, said = _fake_learner(), []
    learn.console = SimpleNamespace(print=lambda msg, **k: said.append(msg))
    cbs, learn.n_epoch = [AdvicePrinter()], 4
    for e, err in enumerate((0.037, 0.053, 0.048)):
        learn.epoch_in_fit = e
        _epoch(learn, cbs, e, 0.3, 0.2, err, [0.3])
    assert said == []  # worse for 2 epochs, but the fit has one to go
    learn.epoch_in_fit = 3
    _epoch(learn, cbs, 3, 0.3, 0.2, 0.050, [0.3])  # the last epoch did not bring it back: now it is said
    assert sum("error is getting worse" in m for m in said) == 1


def test_divergence_guard_stops_a_run_whose_training_loss_blows_up_and_restores_the_last_good_weights():
    learn, guard = _fake_learner(), DivergenceGuard()
    _epoch(learn, [guard], 0, 1.5, 2.0, 0.1, [1.2, 0.7, 3.0])
    good = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with torch.no_grad():
        learn.model[0].weight.add_(1.0)
    with pytest.raises(DivergedError, match="learning rate too high"):
        _epoch(learn, [guard], 1, 8.0, 2.5, 0.1, [8.0, 9.0, 10.0])
    assert all(torch.equal(good[k], v) for k, v in learn.model.state_dict().items())


def test_divergence_guard_stops_at_the_first_non_finite_batch_loss():
    learn, guard = _fake_learner(), DivergenceGuard()
    learn.recorder.batch_losses += [1.0, math.nan]
    learn.recorder.batch_epochs += [0.5, 1.0]
    learn.loss_value = math.nan
    with pytest.raises(DivergedError, match="training loss became nan"):
        guard("after_batch", learn)


# --- end to end ----------------------------------------------------------------------------------


def test_train_with_a_huge_learning_rate_exits_3_and_writes_no_model(tmp_path, sample_dir, capsys):
    """--lr 0.5 on the sample: the cached head's train loss explodes; the run must stop as diverged."""
    from ursa.cli import main

    out = tmp_path / "run"
    rc = main(["train", str(sample_dir), "--out", str(out), "--size", "128", "--epochs", "3",
               "--unfreeze-epochs", "1", "--lr", "0.5", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "learning rate too high" in err and "10x lower" in err
    assert not (out / "model.safetensors").exists()
    assert not list(out.glob("*.safetensors")), "no model file of any kind from a diverged run"
    advice = (out / "advice.txt").read_text()
    assert "learning rate too high" in advice and "try 10x lower" in advice.lower()
    assert "No model file was written" in advice
    assert (out / "history.csv").read_text().startswith("epoch,stage,train_loss")
    assert (out / "report.html").is_file() and (out / "losses.png").is_file()


@pytest.fixture(scope="module")
def fresh_learner(sample_dir):
    """An untrained head on the bundled sample at 128 px."""
    from tests.conftest import sample_learner

    return sample_learner(128)


@pytest.mark.slow
def test_the_guard_stops_a_real_fit_at_the_epoch_it_diverges(fresh_learner):
    """The learner's DivergenceGuard: --lr 0.5 stops early instead of finishing."""
    learn = fresh_learner
    learn.freeze()
    with pytest.raises(DivergedError, match="learning rate too high"):
        learn.fit_one_cycle(3, 0.5)
    assert learn.diverged and len(learn.recorder.rows) < 3
    guard = next(cb for cb in learn.cbs if isinstance(cb, DivergenceGuard))
    assert all(torch.equal(v, guard.last_good[k]) for k, v in learn.model.state_dict().items()), \
        "the weights of the last good epoch (or of the start) are put back"


@pytest.mark.slow
def test_write_run_saves_best_weights_when_the_error_got_worse(sample_dir, tmp_path):
    from tests.conftest import sample_learner
    from ursa.inference.modelfile import load_model
    from ursa.training.config import TrainConfig
    from ursa.training.run import write_run

    learn = sample_learner(128)
    rows = make_history([0.5, 0.3, 0.2, 0.1], [0.3, 0.2, 0.25, 0.3], [0.1, 0.05, 0.06, 0.07]).rows
    learn.recorder.rows[:] = rows  # as if four epochs had run
    learn.best.state = {k: torch.zeros_like(v) if v.is_floating_point() else v.clone()
                        for k, v in learn.model.state_dict().items()}
    learn.best.epoch, learn.best.row = 1, rows[1]
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    cfg = TrainConfig(data=sample_dir, out=tmp_path, size=128)
    files = write_run(tmp_path, learn, cfg, learn.dls.dataset)
    assert files.best == tmp_path / "best.safetensors" and files.model == tmp_path / "model.safetensors"
    model, meta = load_model(tmp_path / "best.safetensors")
    assert meta.metrics["epoch"] == 1 and meta.metrics["error_rate"] == 0.05
    assert meta.config["size"] == 128 and meta.config["data"] == str(sample_dir)  # the run's settings travel along
    assert all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items()), "the learner keeps its weights"
    best_weights = load_model(tmp_path / "best.safetensors")[0].state_dict()
    assert all(float(v.abs().sum()) == 0 for k, v in best_weights.items() if v.is_floating_point()
               and "running" not in k)
    advice = (tmp_path / "advice.txt").read_text()
    assert "error is getting worse" in advice and "best.safetensors" in advice
    assert (tmp_path / "report.html").is_file() and (tmp_path / "config.json").is_file()
    assert (tmp_path / "split.csv").is_file()


def test_a_nan_in_the_first_unfrozen_epoch_names_that_stage_and_its_flag():
    rows = [{"epoch": 0, "stage": "frozen", "train_loss": 0.5, "valid_loss": 0.3, "error_rate": 0.1,
             "accuracy": 0.9, "seconds": 1.0}]
    h = History(rows, [0.6, 0.5, 0.4, math.nan], [0.5, 1.0, 1.5, 2.0], [1e-3, 1e-3, 1e-4, 1e-4], True, "unfrozen")
    a = diverged(h)
    assert a is not None and "during the unfrozen stage" in a.text() and "--unfreeze-lr" in a.text()
    h.stage = None  # without the running stage the last row's would be blamed
    assert "during the frozen stage" in diverged(h).text()

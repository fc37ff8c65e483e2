"""The one training loop: events in order, cancel exceptions, configuration validated once and saved with the run."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from ursa.errors import UrsaError
from ursa.training.callbacks import Callback, CancelBatchException, CancelEpochException, CancelFitException
from ursa.training.config import LearnerConfig, TrainConfig
from ursa.training.learner import Learner
from ursa.training.optim import make_optimizer


class TwoBatches:
    """A batch source of two fixed batches for a linear model."""

    n_batches = 2

    def __init__(self, module):
        self.module = module
        self.ended = 0

    def train_modes(self):
        self.module.train()

    def batches(self, epoch):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(2):
            yield torch.randn(4, 3, generator=g), torch.tensor([0, 1, 0, 1])

    def forward(self, xb):
        return self.module(xb)

    def end_epoch(self):
        self.ended += 1

    def validate(self):
        return 0.5, 0.25, 0.75


class Events(Callback):
    order = 100

    def __init__(self, cancel=None):
        self.seen, self.cancel = [], cancel

    def __call__(self, event, learn):
        self.seen.append(event)
        if self.cancel and self.cancel[0] == event and learn.iter == self.cancel[1]:
            raise self.cancel[2]()


def _run(n_epoch=2, cbs=(), validate=True):
    model = torch.nn.Linear(3, 2)
    learn = Learner(SimpleNamespace(bs=4), model, LearnerConfig(quiet=True))
    source = TwoBatches(model)
    opt = make_optimizer([{"params": list(model.parameters()), "lr": 1e-2}], 0.0)
    learn.run(n_epoch, source, opt, stage="test", validate=validate, cbs=list(cbs) or None)
    return learn, source


def test_events_fire_in_fastai_order_and_callbacks_run_by_order():
    ev = Events()
    learn, source = _run(1, [ev])
    batch = ["before_batch", "after_loss", "after_step", "after_batch"]
    assert ev.seen == ["before_fit", "before_epoch", *batch, *batch, "after_epoch", "after_fit"]
    assert source.ended == 1 and learn.epochs_done == 1

    order = []

    class A(Callback):
        order = 5

        def before_fit(self, learn):
            order.append("A")

    class B(Callback):
        order = 1

        def before_fit(self, learn):
            order.append("B")

    _run(1, [A(), B()])
    assert order == ["B", "A"]


def test_default_callbacks_record_a_row_per_epoch():
    model = torch.nn.Linear(3, 2)
    learn = Learner(SimpleNamespace(bs=4), model, LearnerConfig(quiet=True))
    opt = make_optimizer([{"params": list(model.parameters()), "lr": 1e-2}], 0.0)
    learn.run(3, TwoBatches(model), opt, stage="frozen")
    assert [r["epoch"] for r in learn.recorder.rows] == [0, 1, 2]
    assert len(learn.recorder.batch_losses) == 6 and learn.recorder.rows[-1]["error_rate"] == 0.25
    assert learn.best.epoch == 0  # equal errors: the first is kept
    assert learn.recorder.history_csv().splitlines()[0] == "epoch,stage,train_loss,valid_loss,error_rate,accuracy,balanced_error,seconds"


def test_cancel_batch_skips_the_step_but_not_after_batch():
    ev = Events(("before_batch", 0, CancelBatchException))
    learn, _ = _run(1, [ev])
    i = ev.seen.index("after_cancel_batch")
    assert ev.seen[i - 1] == "before_batch" and ev.seen[i + 1] == "after_batch"
    assert ev.seen.count("after_step") == 1


def test_a_cancelled_batch_takes_no_step_and_the_default_callbacks_skip_it():
    class SkipFirst(Callback):
        def before_batch(self, learn):
            if learn.iter == 0:
                raise CancelBatchException()

    model = torch.nn.Linear(3, 2)
    learn = Learner(SimpleNamespace(bs=4), model, LearnerConfig(quiet=True), cbs=[SkipFirst()])
    opt = make_optimizer([{"params": list(model.parameters()), "lr": 1e-2}], 0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class OnlyFirst(TwoBatches):
        n_batches = 1

        def batches(self, epoch):
            yield from list(super().batches(epoch))[:1]

    learn.run(1, OnlyFirst(model), opt, stage="frozen")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "no step for a cancelled batch"
    assert learn.recorder.batch_losses == [] and len(learn.recorder.rows) == 1


def test_cancel_epoch_and_fit():
    ev = Events(("after_batch", 0, CancelEpochException))
    learn, source = _run(2, [ev])
    assert ev.seen.count("after_cancel_epoch") == 2 and ev.seen.count("after_epoch") == 2
    assert ev.seen.count("after_step") == 2 and source.ended == 2 and learn.epochs_done == 2  # still validated
    ev = Events(("after_batch", 1, CancelFitException))
    learn, _ = _run(3, [ev])
    assert ev.seen[-2:] == ["after_cancel_fit", "after_fit"] and ev.seen.count("before_epoch") == 1


def test_after_fit_runs_when_an_error_stops_the_fit():
    ev = Events(("after_loss", 0, lambda: RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        _run(1, [ev])
    assert ev.seen[-1] == "after_fit" and "after_batch" not in ev.seen


# --- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,expected", [
    ("valid_pct", 1.5, "--valid-pct: expected a number between 0 and 1, got 1.5"),
    ("lr", 0.0, "--lr: expected a positive number, got 0.0"),
    ("bs", 1, "--bs: expected a whole number >= 2, got 1"),
    ("size", 16, "--size: expected a whole number from 32 to 1024, got 16"),
    ("unfreeze_lr", (1e-3, 1e-4), "--unfreeze-lr: expected LO,HI with 0 < LO <= HI, got '0.001,0.0001'"),
    ("views", 0, "--views: expected a whole number >= 1, got 0"),
    ("label_smoothing", 1.0, "--label-smoothing: expected a number in [0, 1), got 1.0"),
])
def test_config_is_validated_once_with_what_was_expected_and_given(tmp_path, field, value, expected):
    with pytest.raises(UrsaError) as e:
        TrainConfig(data=tmp_path, **{field: value})
    assert str(e.value) == expected


def test_nothing_to_do_is_refused(tmp_path):
    with pytest.raises(UrsaError, match="at least one epoch"):
        TrainConfig(data=tmp_path, epochs=0, unfreeze_epochs=0)


def test_config_is_frozen_and_round_trips_through_json(tmp_path):
    cfg = TrainConfig(data=tmp_path, unfreeze_lr=(1e-5, 1e-4), views=2, quiet=True)
    with pytest.raises(AttributeError):
        cfg.lr = 1.0  # type: ignore[misc]
    d = json.loads(json.dumps(cfg.to_json()))
    assert "quiet" not in d and d["unfreeze_lr"] == [1e-5, 1e-4]
    back = TrainConfig.from_json({**d, "from_a_newer_version": 1})
    assert dataclasses.replace(back, quiet=True) == cfg
    lc = cfg.learner_config(tmp_path / "f")
    assert lc.views == 2 and lc.spill_dir == tmp_path / "f" and lc.seed == cfg.seed


def test_cli_train_bad_option_is_one_line_exit_2(tmp_path, capsys):
    from ursa.cli import main

    (tmp_path / "a").mkdir()
    assert main(["train", str(tmp_path), "--valid-pct", "2", "--out", str(tmp_path.parent / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --valid-pct: expected a number between 0 and 1, got 2.0"


@pytest.mark.slow
def test_train_writes_its_config_and_a_retrain_can_start_from_it(tmp_path, sample_dir, capsys):
    from ursa.cli import main
    from ursa.inference.modelfile import read_meta

    run = tmp_path / "run"
    assert main(["train", str(sample_dir), "--out", str(run), "--size", "64", "--epochs", "1", "--views", "1", "--budget", "0",
                 "--split-seed", "5", "--quiet"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["size"] == 64 and cfg["epochs"] == 1 and cfg["split_seed"] == 5 and cfg["lr"] == 3e-3
    assert read_meta(run / "model.safetensors").config == cfg
    again = tmp_path / "again"
    assert main(["train", str(sample_dir), "--config", str(run), "--out", str(again), "--lr", "0.002",
                 "--quiet"]) == 0
    cfg2 = json.loads((again / "config.json").read_text())
    assert {k: v for k, v in cfg2.items() if k not in ("out", "lr", "replay")} == {
        k: v for k, v in cfg.items() if k not in ("out", "lr", "replay")}
    assert cfg2["lr"] == 0.002 and cfg2["out"] == str(again)
    # --lr changes what the fine-tuning decision depends on, so only the input size is replayed from RUN (and the
    # budget RUN's config.json had is kept, so the recipe can say where it came from)
    assert cfg.get("replay") is None and cfg2["replay"] == {"from": str(run), "size": 64, "budget": 0.0}
    assert (run / "split.csv").read_text() == (again / "split.csv").read_text()  # the same split
    third = tmp_path / "third"  # another training seed from the same run: still that run's validation images
    assert main(["train", str(sample_dir), "--config", str(run), "--out", str(third), "--seed", "1", "--quiet"]) == 0
    cfg3 = json.loads((third / "config.json").read_text())
    assert cfg3["seed"] == 1 and cfg3["split_seed"] == 5
    assert (run / "split.csv").read_text() == (third / "split.csv").read_text()
    capsys.readouterr()
    assert main(["train", str(sample_dir), "--config", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "no config.json there" in capsys.readouterr().err

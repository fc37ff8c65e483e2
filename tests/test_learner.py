"""Training loop: the cached frozen stage equals ordinary frozen training; one-cycle; checkpoints."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from ursa.vision.data import load_dataset

from ursa.vision.loaders import dataloaders
from ursa.errors import DivergedError
from ursa.training.config import LearnerConfig
from ursa.training.learner import Learner
from ursa.training.optim import make_optimizer, one_cycle, param_groups, recalibrate_bn
from ursa.vision.models import create_model, get_spec


def _small(tmp_path, sample_dir, per_class=8):
    root = tmp_path / "small"
    for c in ("black", "grizzly", "teddy"):
        (root / c).mkdir(parents=True)
        for f in sorted((sample_dir / c).iterdir())[:per_class]:
            shutil.copy(f, root / c / f.name)
    return root


@pytest.fixture
def small_dls(tmp_path, sample_dir):
    ds = load_dataset(_small(tmp_path, sample_dir), valid_pct=0.25)
    spec = get_spec("efficientnet_lite0")
    return dataloaders(ds, 64, spec.mean, spec.std, bs=64)


def _learner(dls, model):
    learn = Learner(dls, model, LearnerConfig(quiet=True, augment=False))
    learn.freeze()
    return learn


def _fit_on_images(learn, n_epoch, lr):
    """The same frozen one-cycle as fit_one_cycle, but through the images (body BatchNorm in eval mode)."""
    source = learn.batch_source(cached=False)
    opt = make_optimizer(param_groups(learn.model.param_groups(), lr), learn.config.wd)
    learn.run(n_epoch, source, opt, one_cycle(opt, n_epoch * source.n_batches), stage="frozen")


def test_cached_frozen_training_equals_ordinary_frozen_training(small_dls):
    torch.manual_seed(0)
    base = create_model(n_classes=3, dropout=0.0)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    la, lb = _learner(small_dls, a), _learner(small_dls, b)
    _fit_on_images(la, 3, 3e-3)
    lb.fit_one_cycle(3, 3e-3)
    assert lb.feature_cache is not None and la.feature_cache is None
    for ra, rb in zip(la.recorder.rows, lb.recorder.rows):
        assert ra["valid_loss"] == pytest.approx(rb["valid_loss"], rel=1e-3, abs=1e-4)
    pa, _ = la.get_preds()
    pb, _ = lb.get_preds()
    assert torch.allclose(pa, pb, atol=1e-4)
    # the body was not touched by either path
    for (n, p), q in zip(a.body.state_dict().items(), base.body.state_dict().values()):
        assert torch.equal(p, q), n


def test_fit_one_cycle_learns_and_records(small_dls):
    torch.manual_seed(0)
    learn = Learner(small_dls, create_model(n_classes=3), LearnerConfig(quiet=True))
    learn.freeze()
    learn.fit_one_cycle(3, 1e-2)
    r = learn.recorder
    assert [row["stage"] for row in r.rows] == ["frozen"] * 3
    assert len(r.batch_losses) == len(r.batch_lrs) == 3  # one batch per epoch (bs > n)
    learn.unfreeze()
    learn.fit_one_cycle(1, slice(1e-5, 1e-4))
    assert r.rows[-1]["stage"] == "unfrozen"
    # It learns: the training loss falls over the frozen epochs (the error on these ~6 validation
    # images at 64 px is too coarse to say more than "not always wrong").
    assert r.rows[2]["train_loss"] < r.rows[0]["train_loss"]
    assert r.rows[-1]["error_rate"] < 1.0
    assert r.history_csv().splitlines()[0] == "epoch,stage,train_loss,valid_loss,error_rate,accuracy,balanced_error,seconds"


def test_one_cycle_schedule_warms_up_then_anneals(sample_dir):
    ds = load_dataset(sample_dir)
    dls = dataloaders(ds, 32, (0.5,) * 3, (0.5,) * 3, bs=8)
    learn = Learner(dls, create_model(n_classes=3, pretrained=False), LearnerConfig(quiet=True))
    learn.freeze()
    learn.fit_one_cycle(2, 1e-2)
    lrs = learn.recorder.batch_lrs
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(1e-2, rel=0.05)
    assert 0 < peak < len(lrs) // 2 and lrs[0] < 1e-3 and lrs[-1] < 1e-5


def test_save_and_load_checkpoint(small_dls, tmp_path):
    learn = Learner(small_dls, create_model(n_classes=3, pretrained=False), LearnerConfig(quiet=True))
    learn.save(tmp_path / "ck.safetensors")
    before = copy.deepcopy(learn.model.state_dict())
    with torch.no_grad():
        for p in learn.model.parameters():
            p.add_(1.0)
    learn.load(tmp_path / "ck.safetensors")
    assert all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())
    assert (tmp_path / "ck.safetensors").read_bytes()[8:9] == b"{"  # safetensors, not a pickle


def test_nan_loss_stops_training_with_advice(small_dls):
    learn = Learner(small_dls, create_model(n_classes=3, pretrained=False), LearnerConfig(quiet=True, cache=False))
    learn.freeze()
    with pytest.raises(DivergedError, match="learning rate too high.*10x lower"):
        learn.fit_one_cycle(2, 1e6)


def test_recalibrate_bn_matches_batch_statistics():
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(4))
    x = torch.randn(100, 4) * 3 + 5
    recalibrate_bn(head, [x[:50], x[50:]])
    assert torch.allclose(head[0].running_mean, x.mean(0), atol=1e-4)
    assert head[0].momentum == 0.1

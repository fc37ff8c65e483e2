"""Feature cache internals: the same features on ONNX Runtime and torch, the fallback, views, the prefetch thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ursa.vision.data import load_dataset

from ursa.vision.loaders import dataloaders
from ursa.training.config import LearnerConfig
from ursa.training.features import compute_features, prefetch
from ursa.inference.onnx import onnx_features
from ursa.training.learner import Learner
from ursa.vision.models import create_model, get_spec


@pytest.fixture(scope="module")
def learn(sample_dir):
    ds = load_dataset(sample_dir)
    spec = get_spec("efficientnet_lite0")
    dls = dataloaders(ds, 64, spec.mean, spec.std, bs=16)
    torch.manual_seed(0)
    learn = Learner(dls, create_model(n_classes=3), LearnerConfig(quiet=True, seed=3))
    learn.freeze()
    return learn


def _features(learn, **kw):
    return compute_features(learn.model, learn.dls, seed=learn.config.seed, quiet=True, **kw)


def test_cache_is_the_same_on_either_backend_and_falls_back_to_torch(learn, monkeypatch, capsys):
    assert onnx_features(learn.model, 64) is not None, "ONNX Runtime should run the lite0 body"
    threads = torch.get_num_threads()
    fast = _features(learn, n_views=2, augment=True, backend="auto")
    slow = _features(learn, n_views=2, augment=True, backend="torch")
    assert torch.get_num_threads() == threads  # restored after the pass
    # the same augmented views (seeded per view), the same features
    for a, b in zip([*fast.train_views, fast.valid], [*slow.train_views, slow.valid]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(fast.train_views[0], fast.train_views[1])  # two different augmentations

    def broken_export(*args, **kwargs):
        raise RuntimeError("cannot trace this body")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    assert onnx_features(learn.model, 64) is None
    fallback = _features(learn, n_views=1, augment=False)
    assert torch.allclose(fallback.valid, fast.valid, atol=1e-4, rtol=1e-4)


def test_a_wrong_export_is_caught_and_torch_used(learn, monkeypatch):
    import onnxruntime

    real = onnxruntime.InferenceSession.run

    def off_by_one(self, *args, **kwargs):
        return [out + 1.0 for out in real(self, *args, **kwargs)]

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", off_by_one)
    learn.model.head.train()
    assert onnx_features(learn.model, 64) is None
    assert learn.model.head.training and not learn.model.body.training  # modes left as they were


def test_large_caches_spill_to_memory_mapped_files(learn, tmp_path, monkeypatch):
    import ursa.training.features

    monkeypatch.setattr(ursa.training.features, "RAM_BUDGET", 0)
    spilled = _features(learn, n_views=1, augment=False, spill_dir=tmp_path)
    in_ram = _features(learn, n_views=1, augment=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_view0.npy", "valid.npy"]
    assert torch.equal(spilled.train_views[0], in_ram.train_views[0])
    assert torch.equal(spilled.valid, in_ram.valid)


def test_prefetch_keeps_order_and_reraises_in_the_consumer():
    assert list(prefetch(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        list(prefetch(failing()))


@pytest.mark.parametrize("slow", [False, True])
def test_prefetch_producer_has_ended_when_the_consumer_stops_early(slow):
    produced = []

    def endless():
        i = 0
        while True:
            if slow:
                time.sleep(0.2)  # busy inside next() when the consumer stops
            produced.append(i)
            yield i
            i += 1

    gen = prefetch(endless(), depth=2)
    assert next(gen) == 0
    gen.close()
    assert not any(t.name == "ursa-prefetch" for t in threading.enumerate())  # joined, not left running
    n = len(produced)
    time.sleep(0.3)
    assert len(produced) == n < 10


def test_fewer_views_than_epochs_are_cycled(learn, monkeypatch):
    seen = []
    real = torch.Tensor.__getitem__

    learn = Learner(learn.dls, learn.model, LearnerConfig(quiet=True, seed=3, views=2))
    learn.freeze()
    try:
        learn.fit_one_cycle(1, 3e-3)  # builds a cache of 1 view (never more views than epochs)
        assert len(learn.feature_cache.train_views) == 1
        learn.batch_source(cached=True, n_views=2)  # 2 views now: computed once, kept
        cache = learn.feature_cache
        assert len(cache.train_views) == 2
        ids = {id(v): k for k, v in enumerate(cache.train_views)}

        def spy(self, idx):
            if id(self) in ids and isinstance(idx, torch.Tensor) and idx.ndim == 1 and idx.dtype == torch.long:
                seen.append(ids[id(self)])
            return real(self, idx)

        monkeypatch.setattr(torch.Tensor, "__getitem__", spy)
        learn.fit_one_cycle(4, 3e-3)
    finally:
        monkeypatch.undo()
    assert learn.feature_cache is cache  # 2 views were enough: not recomputed for 4 epochs
    order = [k for i, k in enumerate(seen) if i == 0 or seen[i - 1] != k]
    assert order == [0, 1, 0, 1]  # epoch e trains on view e mod 2
    assert [r["stage"] for r in learn.recorder.rows[-4:]] == ["frozen"] * 4

"""Feature cache internals: the same features on ONNX Runtime and torch, the fallback, views, the prefetch thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ursa.data import dataloaders, load_dataset
from ursa.features import _prefetch, compute_features
from ursa.models import onnx_features
from ursa.learner import Learner
from ursa.models import create_model, get_spec


@pytest.fixture(scope="module")
def learn(sample_dir):
    ds = load_dataset(sample_dir)
    spec = get_spec("efficientnet_lite0")
    dls = dataloaders(ds, 64, spec.mean, spec.std, bs=16)
    torch.manual_seed(0)
    learn = Learner(dls, create_model(n_classes=3), quiet=True, seed=3)
    learn.freeze()
    return learn


def test_cache_is_the_same_on_either_backend_and_falls_back_to_torch(learn, monkeypatch):
    learn.feature_backend = "auto"
    fast = compute_features(learn, n_views=2, augment=True)
    learn.feature_backend = "torch"
    slow = compute_features(learn, n_views=2, augment=True)
    learn.feature_backend = "auto"
    # the same augmented views (seeded per view), the same features
    for a, b in zip([*fast.train_views, fast.valid], [*slow.train_views, slow.valid]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(fast.train_views[0], fast.train_views[1])  # two different augmentations

    def broken_export(*args, **kwargs):
        raise RuntimeError("cannot trace this body")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    assert onnx_features(learn.model, 64) is None
    fallback = compute_features(learn, n_views=1, augment=False)
    assert torch.allclose(fallback.valid, fast.valid, atol=1e-4, rtol=1e-4)


def test_prefetch_keeps_order_and_reraises_in_the_consumer():
    assert list(_prefetch(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        list(_prefetch(failing()))


def test_prefetch_producer_ends_when_the_consumer_stops_early():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    gen = _prefetch(endless(), depth=2)
    assert next(gen) == 0
    gen.close()
    deadline = time.monotonic() + 5
    while any(t.name == "ursa-prefetch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "ursa-prefetch" for t in threading.enumerate())
    assert len(produced) < 10


def test_fewer_views_than_epochs_are_cycled(learn):
    learn.n_views, learn.feature_cache = 2, None
    try:
        learn.fit_one_cycle(4, 3e-3)
    finally:
        learn.n_views = None
    assert len(learn.feature_cache.train_views) == 2
    assert [r["stage"] for r in learn.recorder.rows[-4:]] == ["frozen"] * 4

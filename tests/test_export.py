"""The model file: safetensors + metadata, exact round trip, no pickle, clear errors."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch

from ursa.errors import ModelFileError
from ursa.inference.modelfile import FORMAT, ModelMeta, load_model, read_header, read_meta, save_model
from ursa.inference.predictor import load_predictor
from tests.conftest import HELDOUT


def test_header_has_the_documented_metadata(tiny_model):
    h = read_header(tiny_model)
    for key in ("format", "format_version", "ursa_version", "arch", "classes", "input_size", "mean", "std",
                "head", "metrics", "created"):
        assert key in h and isinstance(h[key], str)
    assert h["format"] == FORMAT and json.loads(h["classes"]) == ["black", "grizzly", "teddy"]
    assert json.loads(h["input_size"]) == 128 and json.loads(h["mean"]) == [0.5] * 3
    assert set(json.loads(h["metrics"])) == {"valid_loss", "error_rate", "accuracy", "balanced_error", "recall"}


def test_round_trip_probabilities_match_in_memory_model(tiny_run, tmp_path, sample_dir):
    from ursa.vision.data import load_dataset
    from ursa.vision.loaders import dataloaders
    from ursa.training.config import LearnerConfig
    from ursa.training.learner import Learner
    from ursa.vision.models import create_model

    ds = load_dataset(sample_dir)
    dls = dataloaders(ds, 128, (0.5,) * 3, (0.5,) * 3, bs=16)
    torch.manual_seed(1)
    learn = Learner(dls, create_model(n_classes=3), LearnerConfig(quiet=True))
    learn.freeze()
    learn.fit_one_cycle(1, 3e-3)
    path = learn.export(tmp_path / "m.safetensors")
    mem, _ = learn.get_preds()
    model, meta = load_model(path)
    disk, _ = Learner(dls, model, LearnerConfig(quiet=True)).get_preds()
    assert torch.allclose(mem, disk, atol=1e-5)
    # the Predictor (file -> preprocess -> probs) agrees with the learner's eval pipeline
    pred = load_predictor(path)
    i = ds.valid_idx[0]
    _, _, probs = pred.predict(ds.files[i])
    assert torch.allclose(torch.tensor(list(probs.values())), mem[0], atol=1e-4)


def test_loading_never_unpickles(tiny_model, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model, meta = load_model(tiny_model)
    assert meta.classes == ["black", "grizzly", "teddy"]
    label, index, probs = load_predictor(tiny_model).predict(HELDOUT / "teddy_huahang_00000150.jpg")
    assert label in probs and abs(sum(probs.values()) - 1) < 1e-5


def test_predict_batch_equals_single(tiny_model):
    pred = load_predictor(tiny_model)
    files = sorted(HELDOUT.glob("*.jpg"))
    batch = pred.predict_batch(files, bs=4)
    for f, b in zip(files, batch):
        label, index, probs = pred.predict(f)
        assert b.label == label and b.index == index
        assert all(abs(probs[c] - b.probs[c]) < 1e-5 for c in probs)


def test_not_a_model_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"hello")
    with pytest.raises(ModelFileError, match="not a model file"):
        load_model(tmp_path / "x.safetensors")
    (tmp_path / "img.safetensors").write_bytes(open(HELDOUT / "teddy_huahang_00000150.jpg", "rb").read())
    with pytest.raises(ModelFileError, match="not an ursa model"):
        load_model(tmp_path / "img.safetensors")
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "missing.safetensors")


def test_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="not an ursa model file"):
        read_meta(tmp_path / "other.safetensors")


def test_truncated_model_file(tiny_model, tmp_path):
    data = tiny_model.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated or damaged"):
        load_model(cut)


def test_newer_format_version_is_refused(tiny_model, tmp_path):
    data = tiny_model.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["format_version"] = "99"
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)  # safetensors keeps the tensor data 8-byte aligned
    (tmp_path / "v99.safetensors").write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])
    with pytest.raises(ModelFileError, match="format version '99'"):
        load_model(tmp_path / "v99.safetensors")


CONFIG = {"seed": 7, "valid_pct": 0.25, "arch": "efficientnet_lite0", "size": 128, "epochs": [1, 2],
          "lr": None, "tfms": {"flip": True}}


def test_config_round_trips_through_the_model_file(tiny_model, tmp_path):
    """The run's configuration is kept in the header (JSON), so later stages read the seed instead of guessing."""
    model, meta = load_model(tiny_model)
    meta.config = dict(CONFIG)
    path = save_model(model, tmp_path / "m.safetensors", meta)
    assert json.loads(read_header(path)["config"]) == CONFIG
    assert read_meta(path).config == CONFIG
    again, meta2 = load_model(path)
    assert meta2 == meta and meta2.format_version == "1"
    assert ModelMeta.from_json(meta2.to_json(), path) == meta2  # the ONNX export's form too


def test_a_header_without_config_still_loads(tiny_model, tmp_path):
    """Files written before `config` existed stay valid: same format version, an empty config."""
    from safetensors.torch import save_file

    model, meta = load_model(tiny_model)
    header = meta.to_header()
    del header["config"]
    old = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old), metadata=header)
    assert "config" not in read_header(old)
    _, old_meta = load_model(old)
    assert old_meta.config == {} and old_meta.classes == meta.classes and old_meta.format_version == "1"
    assert ModelMeta.from_json(json.dumps({k: v for k, v in json.loads(meta.to_json()).items() if k != "config"}),
                               old).config == {}
    assert load_predictor(old, backend="torch").meta.config == {}


def test_a_config_that_is_not_an_object_is_refused(tiny_model, tmp_path):
    from safetensors.torch import save_file

    model, meta = load_model(tiny_model)
    header = meta.to_header()
    header["config"] = "[1, 2]"
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bad), metadata=header)
    with pytest.raises(ModelFileError, match="header is damaged"):
        read_meta(bad)

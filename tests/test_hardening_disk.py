"""Issue 29, a full disk and file permissions: one "no space left writing X" line (exit 2) from every writer,
nothing half-written left behind; the umask read once, never set, so threads cannot race on it."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from ursa.errors import NoSpaceError


def _full_disk_for(monkeypatch, match=lambda path: True) -> list[str]:
    """os.fsync raises ENOSPC for files whose path `match`es (where a full disk shows up on many file systems)."""
    real, hit = os.fsync, []

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if match(path):
            hit.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return hit


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.is_file())


def test_an_atomic_write_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch) -> None:
    from ursa.util.files import atomic_write_text

    (tmp_path / "a.txt").write_text("old")
    _full_disk_for(monkeypatch)
    with pytest.raises(NoSpaceError, match=r"no space left writing .*a\.txt"):
        atomic_write_text(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "old" and _hidden(tmp_path) == []


def _model(tmp_path: Path):
    from ursa.inference.modelfile import ModelMeta, save_model
    from ursa.vision.models import create_model

    model = create_model("efficientnet_lite0", n_classes=2, pretrained=False)
    meta = ModelMeta(arch="efficientnet_lite0", classes=["a", "b"], input_size=32, mean=[0.5] * 3, std=[0.25] * 3,
                     head={k: v for k, v in vars(model.head_cfg).items()})
    return model, meta, save_model


def test_the_model_file_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys) -> None:
    model, meta, save_model = _model(tmp_path)
    hit = _full_disk_for(monkeypatch)
    with pytest.raises(NoSpaceError, match="no space left writing .*model.safetensors"):
        save_model(model, tmp_path / "model.safetensors", meta)
    assert hit and sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_on_a_full_disk_is_one_line_exit_2_and_leaves_nothing(tmp_path, monkeypatch, capsys) -> None:
    from ursa.cli import main

    model, meta, save_model = _model(tmp_path)
    save_model(model, tmp_path / "model.safetensors", meta)
    _full_disk_for(monkeypatch, lambda p: "model.onnx" in p)
    rc = main(["export", str(tmp_path / "model.safetensors"), "--onnx"])
    err = capsys.readouterr().err
    assert rc == 2 and "no space left writing" in err and "model.onnx" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_safetensors_error_is_one_line_too(tmp_path, monkeypatch) -> None:
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from ursa.errors import WriteError
    from ursa.util.files import save_tensors

    def refuse(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.torch, "save", refuse)
    with pytest.raises(WriteError, match="could not write"):
        save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def _tiny_learner(tmp_path: Path):
    import torch
    from PIL import Image

    from ursa.training.config import LearnerConfig
    from ursa.training.learner import Learner
    from ursa.vision.data import load_dataset
    from ursa.vision.loaders import dataloaders
    from ursa.vision.models import create_model, get_spec

    for c, col in (("a", (200, 20, 20)), ("b", (20, 20, 200))):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (36, 36), (col[0], i * 20, col[2])).save(tmp_path / "d" / c / f"{i}.png")
    torch.manual_seed(0)
    ds = load_dataset(tmp_path / "d")
    spec = get_spec("efficientnet_lite0")
    dls = dataloaders(ds, 32, spec.mean, spec.std, bs=4)
    return Learner(dls, create_model("efficientnet_lite0", n_classes=2, pretrained=False),
                   LearnerConfig(quiet=True, cache=False))


def test_the_checkpoint_writer_on_a_full_disk_warns_once_and_leaves_no_orphans(tmp_path, monkeypatch) -> None:
    from ursa.training.checkpoint import CheckpointWriter

    learn = _tiny_learner(tmp_path)
    run = tmp_path / "run"
    writer = CheckpointWriter(run, lambda: {"config": {"x": 1}, "plan": {}})
    learn.fit_one_cycle(1, 1e-3)
    writer.write(learn, stopped=False)  # epoch 1's checkpoint, complete
    good = sorted(p.name for p in (run / "checkpoint").iterdir())
    learn.fit_one_cycle(1, 1e-3)
    said: list[str] = []
    monkeypatch.setattr(learn.console, "print", lambda *a, **k: said.append(str(a[0])))
    hit = _full_disk_for(monkeypatch, lambda p: ".e2.state." in p)  # epoch 2: weights written, the state fails
    writer.write(learn, stopped=False)
    writer.write(learn, stopped=False)
    assert hit and len(said) == 1 and "no space left writing" in said[0], said
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == good  # no e2.* orphan, epoch 1 intact


def test_verify_fix_on_a_full_disk_is_one_line_and_leaves_no_fixed_part(tmp_path, monkeypatch, capsys) -> None:
    from PIL import Image

    from ursa.cli import main

    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 50, 10, 10)).convert("P").save(data / "a" / f"{i}.png")  # palette: fixed
    _full_disk_for(monkeypatch, lambda p: p.endswith(".fixed.part"))
    rc = main(["verify", str(data), "--fix", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "no space left writing" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not list(data.rglob("*.fixed.part"))
    assert sorted(p.name for p in (data / "a").iterdir()) == ["0.png", "1.png", "2.png"]


# --- item 12: permissions and the umask --------------------------------------------------------------------------------


def _process_umask() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask line")


def test_atomic_writes_from_many_threads_never_change_the_umask(tmp_path) -> None:
    import torch

    from ursa.util.files import FILE_MODE, atomic_write_text, save_tensors

    old = os.umask(0o022)
    try:
        seen: list[int] = []

        def work(k: int) -> None:
            for i in range(150):
                atomic_write_text(tmp_path / f"t{k}_{i % 5}.txt", "x")
                seen.append(_process_umask())

        threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(seen) == {0o022}, sorted(set(seen))
        save_tensors(tmp_path / "model.safetensors", {"a": torch.zeros(2)})
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
        assert set(modes.values()) == {FILE_MODE}, modes  # model files too: the same mode as every other file
    finally:
        os.umask(old)

"""Readers, the stable split, bad-input messages, and loaders."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from ursa.vision.data import from_csv, from_folder, is_valid_split, load_dataset

from ursa.vision.transforms import eval_transform, train_transform

from ursa.vision.loaders import dataloaders
from ursa.errors import DataError
from tests.conftest import make_image


def _folder(tmp_path: Path, counts: dict[str, int]) -> Path:
    root = tmp_path / "data"
    for ci, (c, n) in enumerate(counts.items()):
        for i in range(n):
            make_image(root / c / f"{c}_{i:03d}.jpg", color=(40 * ci, 100, 7 * i % 255), fmt="JPEG")
    return root


def test_folder_per_class(sample_dir):
    ds = from_folder(sample_dir)
    assert ds.classes == ["black", "grizzly", "teddy"]
    assert len(ds) == 120
    assert 0.1 < sum(ds.is_valid) / len(ds) < 0.3
    assert set(ds.class_counts().values()) == {40}


def test_split_is_seeded_and_stable_when_images_are_removed(sample_copy):
    before = from_folder(sample_copy, valid_pct=0.2, seed=42)
    side = {before.rel(i): before.is_valid[i] for i in range(len(before))}
    removed = sorted(side)[::10]  # remove 10%
    for r in removed:
        (sample_copy / r).unlink()
    after = from_folder(sample_copy, valid_pct=0.2, seed=42)
    assert len(after) == len(before) - len(removed)
    changed = [after.rel(i) for i in range(len(after)) if after.is_valid[i] != side[after.rel(i)]]
    assert changed == []
    other_seed = from_folder(sample_copy, valid_pct=0.2, seed=7)
    assert other_seed.is_valid != after.is_valid


def test_split_also_stable_when_images_are_added(sample_copy):
    before = from_folder(sample_copy)
    side = {before.rel(i): before.is_valid[i] for i in range(len(before))}
    for i in range(20):
        make_image(sample_copy / "teddy" / f"new_{i}.jpg", fmt="JPEG")
    after = from_folder(sample_copy)
    assert all(after.is_valid[i] == side[after.rel(i)] for i in range(len(after)) if after.rel(i) in side)


def test_split_hash_fraction():
    share = sum(is_valid_split(f"c/{i}.jpg", 0.2, 42) for i in range(5000)) / 5000
    assert 0.18 < share < 0.22


def test_train_valid_folders(tmp_path):
    root = tmp_path / "tv"
    for side, n in (("train", 4), ("valid", 2)):
        for c in ("a", "b"):
            for i in range(n):
                make_image(root / side / c / f"{i}.png")
    ds = load_dataset(root)
    assert ds.classes == ["a", "b"]
    assert sum(ds.is_valid) == 4 and len(ds) == 12
    assert all(ds.is_valid[i] == ("valid" in ds.rel(i)) for i in range(len(ds)))


def test_csv_layout(tmp_path):
    root = _folder(tmp_path, {"a": 5, "b": 5})
    csv = root / "cleaned.csv"
    csv.write_text("name,label\n" + "".join(f"a/a_{i:03d}.jpg,b\n" for i in range(5)) + "".join(f"b/b_{i:03d}.jpg,c\n" for i in range(5)))
    ds = from_csv(root, csv)
    assert ds.classes == ["b", "c"] and len(ds) == 10
    assert ds.labels[:5] == [0] * 5


@pytest.mark.parametrize("case,match", [
    ("missing", "folder not found"),
    ("no_images", "no images found"),
    ("one_class", "only one class"),
    ("empty_class", "has no images"),
    ("flat", "no class folders"),
])
def test_bad_folders_have_clear_messages(tmp_path, case, match):
    root = tmp_path / "d"
    if case == "no_images":
        (root / "a").mkdir(parents=True)
        (root / "a" / "notes.txt").write_text("x")
        (root / "b").mkdir()
        match = "has no images"
    elif case == "one_class":
        make_image(root / "only" / "1.png")
    elif case == "empty_class":
        make_image(root / "a" / "1.png")
        (root / "b").mkdir()
    elif case == "flat":
        make_image(root / "1.png")
    elif case == "missing":
        pass
    if case == "no_images" or case == "missing":
        pass
    with pytest.raises(DataError, match=match):
        load_dataset(root)


def test_empty_folder(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_dataset(tmp_path / "e")


def test_bad_csvs(tmp_path):
    root = _folder(tmp_path, {"a": 3, "b": 3})
    (root / "nocol.csv").write_text("file,class\na/a_000.jpg,a\n")
    with pytest.raises(DataError, match="needs columns 'name' and 'label'"):
        from_csv(root, root / "nocol.csv")
    (root / "missing.csv").write_text("name,label\na/a_000.jpg,a\na/ghost.jpg,a\nb/b_000.jpg,b\n")
    with pytest.raises(DataError, match="1 file\\(s\\) named in the CSV are missing.*ghost.jpg"):
        from_csv(root, root / "missing.csv")
    with pytest.raises(DataError, match="CSV file not found"):
        from_csv(root, root / "none.csv")


def test_unreadable_files_are_skipped_counted_and_named(tmp_path, caplog):
    root = _folder(tmp_path, {"a": 6, "b": 6})
    (root / "a" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (root / "b" / "empty.jpg").write_bytes(b"")
    ds = load_dataset(root, valid_pct=0.3)
    with caplog.at_level(logging.WARNING, logger="ursa"):
        dls = dataloaders(ds, 32, (0.5,) * 3, (0.5,) * 3, bs=4)
    assert len(dls.dataset) == 12
    assert sorted(n for n, _ in ds.skipped) == ["a/broken.jpg", "b/empty.jpg"]
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "skipped 2 unreadable image(s)" in msgs[0] and "a/broken.jpg" in msgs[0]


def test_loaders_give_channels_last_normalised_batches(sample_dir):
    ds = load_dataset(sample_dir)
    dls = dataloaders(ds, 64, (0.5,) * 3, (0.5,) * 3, bs=8)
    xb, yb = next(iter(dls.train))
    assert xb.shape == (8, 3, 64, 64) and xb.dtype == torch.float32
    assert xb.is_contiguous(memory_format=torch.channels_last)
    assert -1.0 <= xb.min() and xb.max() <= 1.0
    xv, _ = next(iter(dls.valid))
    xv2, _ = next(iter(dls.valid))
    assert torch.equal(xv, xv2)  # eval transform is deterministic


def test_transforms_keep_shape_on_odd_inputs():
    x = torch.randint(0, 255, (3, 300, 90), dtype=torch.uint8)
    assert train_transform(64, (0.5,) * 3, (0.5,) * 3)(x).shape == (3, 64, 64)
    assert eval_transform(64, (0.5,) * 3, (0.5,) * 3)(x).shape == (3, 64, 64)


def test_train_never_writes_into_data(sample_copy):
    from ursa.training.config import TrainConfig
    from ursa.training.recipe import train

    with pytest.raises(DataError, match="outside the data folder"):
        train(TrainConfig(data=sample_copy, out=sample_copy / "run", quiet=True))
    assert not (sample_copy / "run").exists()

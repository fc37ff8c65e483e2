"""Issue 17, items 5-8: crafted model files, every command's exit codes, symlinked class folders, CSV formulas.

Model files here are made in seconds (an untrained network at 32 px, or a header rewritten around
the tiny run's weights), never trained.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import socket
import struct
from dataclasses import asdict, fields
from pathlib import Path

import pytest

from ursa.cli import main
from ursa.errors import DataError, DivergedError, ModelFileError
from ursa.inference.metaschema import HEAD_FIELDS
from ursa.inference.modelfile import ModelMeta, load_model, read_header, read_meta, save_model
from ursa.util.files import FORMULA_START
from ursa.vision.data import from_csv, from_folder
from ursa.vision.models import HeadConfig
from tests.conftest import make_image

EVIL = "=cmd|' /C calc'!A0"  # the classic payload: a formula in a spreadsheet (a label in a CSV)
EVIL_DIR = "=cmd|' -C calc'!A0"  # the same without the slash: a legal folder name on Linux


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread) -> dict[str, Path]:
    """Two classes of ten small images, and an untrained efficientnet_lite0 for them at 32 px (no training)."""
    import torch

    from ursa.vision.models import create_model

    d = tmp_path_factory.mktemp("hardening")
    data = d / "data"
    for ci, c in enumerate(("a", "b")):
        for i in range(10):
            make_image(data / c / f"{i}.png", color=(200 * ci, 20 * i, 90), size=(40, 36))
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", n_classes=2, pretrained=False)
    meta = ModelMeta(arch="efficientnet_lite0", classes=["a", "b"], input_size=32, mean=[0.5] * 3, std=[0.5] * 3,
                     head=asdict(model.head_cfg), metrics={"error_rate": 0.5})
    path = save_model(model, d / "run" / "model.safetensors", meta)
    bad = d / "bad.jpg"
    bad.write_text("not an image")
    return {"dir": d, "data": data, "model": path, "bad_image": bad, "image": data / "a" / "0.png"}


def rewrite_header(src: Path, dst: Path, change) -> Path:
    """A copy of a model file with its safetensors header changed by change(header) (tensor data kept)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)  # safetensors keeps the tensor data 8-byte aligned
    dst.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    return dst


def set_meta(**values):
    """A header change: set metadata fields (strings as given; anything else JSON-encoded)."""
    def change(h):
        for k, v in values.items():
            if v is None:
                h["__metadata__"].pop(k, None)
            else:
                h["__metadata__"][k] = v if isinstance(v, str) else json.dumps(v)
    return change


def _one_line(capsys, rc: int, *expect: str, code: int = 2) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for e in expect:
        assert e in err, err
    return err


HEAD = {"n_features": 1280, "n_classes": 2, "hidden": 512, "dropout": 0.5, "pool": "concat", "extra": {}}
DEEP = "[" * 100_000 + "]" * 100_000

BAD_METADATA = [  # (name, header change, field named in the message)
    ("classes-a-string", set_meta(classes='"abc"'), "'classes'"),
    ("classes-not-json", set_meta(classes="abc"), "'classes'"),
    ("classes-empty", set_meta(classes=[]), "'classes'"),
    ("classes-numbers", set_meta(classes=[1, 2]), "'classes[0]'"),
    ("classes-blank", set_meta(classes=["a", " "]), "'classes[1]'"),
    ("classes-twice", set_meta(classes=["a", "a"]), "appears twice"),
    ("head-unknown-key", set_meta(head={**HEAD, "evil": 1}), "'head.evil'"),
    ("head-negative", set_meta(head={**HEAD, "n_features": -5}), "'head.n_features'"),
    ("head-zero-classes", set_meta(head={**HEAD, "n_classes": 0}), "'head.n_classes'"),
    ("head-wrong-type", set_meta(head={**HEAD, "hidden": "512"}), "'head.hidden'"),
    ("head-huge", set_meta(head={**HEAD, "hidden": 10**9}), "'head.hidden'"),
    ("head-class-count", set_meta(head={**HEAD, "n_classes": 3}), "'head.n_classes'"),
    ("head-not-object", set_meta(head=[1, 2]), "'head'"),
    ("head-bad-pool", set_meta(head={**HEAD, "pool": "max"}), "'head.pool'"),
    ("head-bad-dropout", set_meta(head={**HEAD, "dropout": 1.5}), "'head.dropout'"),
    ("input-size-0", set_meta(input_size="0"), "'input_size'"),
    ("input-size-negative", set_meta(input_size="-3"), "'input_size'"),
    ("input-size-huge", set_meta(input_size="100000"), "'input_size'"),
    ("input-size-float", set_meta(input_size="224.5"), "'input_size'"),
    ("std-zeros", set_meta(std=[0, 0, 0]), "'std[0]'"),
    ("std-negative", set_meta(std=[-1]), "'std[0]'"),
    ("std-two", set_meta(std=[0.5, 0.5]), "'std'"),
    ("mean-nan", set_meta(mean="[NaN, 0.5, 0.5]"), "'mean[0]'"),
    ("mean-strings", set_meta(mean=["a", "b", "c"]), "'mean[0]'"),
    ("arch-unknown", set_meta(arch="resnet9000"), "efficientnet_lite0"),
    ("arch-missing", set_meta(arch=None), "'arch'"),
    ("metrics-list", set_meta(metrics=[1, 2]), "'metrics'"),
    ("config-number", set_meta(config=5), "'config'"),
    ("config-deep", set_meta(config=DEEP), "'config'"),
    ("calibration-temperature", set_meta(calibration={"temperature": 0}), "'calibration.temperature'"),
    ("calibration-threshold", set_meta(calibration={"temperature": 1.2, "threshold": 2}), "'calibration.threshold'"),
    ("calibration-precision", set_meta(calibration={"target_precision": 0}), "'calibration.target_precision'"),
    ("calibration-ece", set_meta(calibration={"ece_after": -0.1}), "'calibration.ece_after'"),
    ("calibration-list", set_meta(calibration=[1]), "'calibration'"),
    ("created-number", lambda h: h["__metadata__"].__setitem__("created", 5), "'created'"),
    ("metadata-a-list", lambda h: h.__setitem__("__metadata__", ["format", "ursa.model"]), "not an object"),
]


# --- item 5: the model metadata's schema -------------------------------------------------------


@pytest.mark.parametrize("name,change,field", BAD_METADATA, ids=[c[0] for c in BAD_METADATA])
def test_damaged_metadata_is_one_clear_line_naming_the_field(world, tmp_path, name, change, field):
    bad = rewrite_header(world["model"], tmp_path / "m.safetensors", change)
    with pytest.raises(ModelFileError) as e:
        read_meta(bad)
    msg = str(e.value)
    assert msg.startswith(f"{bad}: ") and field in msg and "\n" not in msg and len(msg) < 500, msg
    if name != "metadata-a-list":
        assert "must be" in msg and "got" in msg, msg


def test_a_deeply_nested_header_is_not_a_traceback(world, tmp_path):
    bad = tmp_path / "deep.safetensors"
    body = DEEP.encode() + b" " * (-len(DEEP) % 8)
    bad.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(ModelFileError, match="damaged safetensors header"):
        read_meta(bad)


def test_the_good_file_loads_and_round_trips(world):
    meta = read_meta(world["model"])
    assert meta.classes == ["a", "b"] and meta.input_size == 32 and meta.calibration == {}
    assert ModelMeta.from_json(meta.to_json(), world["model"]) == meta


def test_the_schema_knows_every_head_field():
    assert set(HEAD_FIELDS) == {f.name for f in fields(HeadConfig)}


def test_calibration_is_optional_checked_and_round_trips(world, tmp_path):
    model, meta = load_model(world["model"])
    assert meta.calibration == {} and meta.format_version == "1"  # a file without it loads
    meta.calibration = {"temperature": 1.7, "threshold": 0.6, "target_precision": 0.95, "ece_before": 0.12,
                        "ece_after": 0.03, "from_a_newer_version": [1]}
    path = save_model(model, tmp_path / "cal.safetensors", meta)
    assert json.loads(read_header(path)["calibration"])["temperature"] == 1.7
    again = read_meta(path)
    assert again.calibration == meta.calibration  # unknown keys are kept, unchecked
    assert ModelMeta.from_json(again.to_json(), path).calibration == meta.calibration
    nulls = {"temperature": 2, "threshold": None, "target_precision": None, "ece_before": None, "ece_after": None}
    ok = rewrite_header(world["model"], tmp_path / "nulls.safetensors", set_meta(calibration=nulls))
    assert read_meta(ok).calibration == {**nulls, "temperature": 2.0}


def test_a_head_that_does_not_fit_the_weights_is_refused_before_building_it(world, tmp_path):
    """hidden 65536 passes the range check; the shapes are compared on the meta device, so no 300 MB is allocated."""
    for hidden in (256, 65536):
        bad = rewrite_header(world["model"], tmp_path / f"h{hidden}.safetensors", set_meta(head={**HEAD, "hidden": hidden}))
        read_meta(bad)  # the header alone is in range
        with pytest.raises(ModelFileError, match="does not fit the weights"):
            load_model(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("damage", ["std-zeros", "classes-a-string", "metadata-a-list", "head-negative"])
@pytest.mark.parametrize("command", ["predict", "interpret", "clean", "serve", "export"])
def test_every_command_refuses_a_damaged_model_file(world, tmp_path, capsys, monkeypatch, command, damage):
    """One line, exit 2, and nothing starts (a server that started would fail the test, not hang it)."""
    import ursa.apps.clean
    import ursa.apps.serve.runner

    def started(*a, **k):
        raise AssertionError("started on a damaged model file")

    monkeypatch.setattr(ursa.apps.serve.runner, "Server", started)
    monkeypatch.setattr(ursa.apps.clean, "serve", started)
    change = next(c for n, c, _ in BAD_METADATA if n == damage)
    bad = rewrite_header(world["model"], tmp_path / "model.safetensors", change)
    data, port = str(world["data"]), str(_free_port())
    argv = {
        "predict": ["predict", str(bad), str(world["image"])],
        "interpret": ["interpret", str(bad), data, "--out", str(tmp_path / "out"), "--all", "--quiet"],
        "clean": ["clean", data, "--model", str(bad), "--port", port, "--no-browser", "--quiet"],
        "serve": ["serve", str(bad), "--port", port],
        "export": ["export", str(bad), "--onnx", "--out", str(tmp_path / "m.onnx")],
    }[command]
    _one_line(capsys, main(argv), str(bad))


def _onnx_file(path: Path, meta: dict | str, classes: int = 2, size: int = 32) -> Path:
    """A tiny real ONNX graph (global average pool: [N, 3, S, S] -> [N, 3]) carrying the given ursa metadata."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Slice", ["f", "starts", "ends", "axes"], ["logits"])]
    inits = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("starts", 0), ("ends", classes), ("axes", 1))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    prop = model.metadata_props.add()
    prop.key, prop.value = "ursa", meta if isinstance(meta, str) else json.dumps(meta)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("change,field", [
    ({"classes": "abc"}, "'classes'"),
    ({"classes": ["a", 3]}, "'classes[1]'"),
    ({"std": [0, 0, 0]}, "'std[0]'"),
    ({"input_size": 4096}, "'input_size'"),  # beyond the range; 100000 would make old code decode 30 GB
    ({"head": {**HEAD, "bogus": True}}, "'head.bogus'"),
    ("[1, 2]", "not an object"),
    (DEEP, "not valid JSON"),
])
def test_onnx_metadata_goes_through_the_same_schema(world, tmp_path, capsys, change, field):
    good = json.loads(read_meta(world["model"]).to_json())
    meta = change if isinstance(change, str) else {**good, **change}
    path = _onnx_file(tmp_path / "model.onnx", meta)
    err = _one_line(capsys, main(["predict", str(path), str(world["image"])]), field, "ONNX")
    assert "ursa export" in err


def test_an_onnx_graph_that_disagrees_with_its_metadata_is_caught(world, tmp_path):
    from ursa.inference.onnx import check_session_fits, ort_session

    good = json.loads(read_meta(world["model"]).to_json())
    sess = ort_session(str(_onnx_file(tmp_path / "ok.onnx", good)), threads=1)
    check_session_fits(sess, 2, 32, "ok.onnx")
    with pytest.raises(ModelFileError, match=r"output is \[N, 2\] but its metadata says \[N, 3\]"):
        check_session_fits(sess, 3, 32, "ok.onnx")
    with pytest.raises(ModelFileError, match="input"):
        check_session_fits(sess, 2, 64, "ok.onnx")


# --- item 6: every command's exit codes ---------------------------------------------------------


def test_predict_with_some_bad_images_predicts_the_rest_and_exits_1(world, capsys):
    rc = main(["predict", str(world["model"]), str(world["image"]), str(world["bad_image"]), str(world["data"] / "b" / "1.png")])
    out, err = capsys.readouterr()
    assert rc == 1, err
    assert len(out.strip().splitlines()) == 2 and "Traceback" not in err
    assert str(world["bad_image"]) in err and "1 of 3 images could not be read" in err


def _exit_cases() -> list:
    """(case, argv with {placeholders}, expected exit status); the slow ones train or sweep for a few seconds."""
    slow = pytest.mark.slow
    return [c if hasattr(c, "marks") else pytest.param(*c, id=c[0]) for c in [
        ("download-ok-some-failed", ["download", "a={urls}", "--dest", "{tmp}/dl", "--retries", "0", "--timeout", "2",
                                     "--allow-private", "--quiet"], 0),  # failed downloads are a summary, not 1
        ("download-no-url-file", ["download", "a={tmp}/nope.txt", "--dest", "{tmp}/dl"], 2),
        ("verify-ok", ["verify", "{data}", "--quiet", "--workers", "1"], 0),
        ("verify-missing", ["verify", "{tmp}/nope"], 2),
        pytest.param("lr-find-ok", ["lr-find", "{data}", "--size", "32", "--out", "{tmp}/lr", "--quiet"], 0,
                     marks=slow, id="lr-find-ok"),
        ("lr-find-missing", ["lr-find", "{tmp}/nope", "--out", "{tmp}/lr"], 2),
        pytest.param("train-ok", ["train", "{data}", "--size", "32", "--epochs", "1", "--no-pretrained",
                                  "--unfreeze-epochs", "0", "--out", "{tmp}/run", "--quiet"], 0, marks=slow,
                     id="train-ok"),
        ("train-missing", ["train", "{tmp}/nope"], 2),
        ("train-bad-option", ["train", "{data}", "--valid-pct", "2"], 2),
        ("train-diverged", ["train", "{data}", "--out", "{tmp}/run", "--quiet"], 3),
        ("interpret-ok", ["interpret", "{model}", "{data}", "--out", "{tmp}/int", "--all", "--quiet"], 0),
        ("interpret-missing-model", ["interpret", "{tmp}/nope.safetensors", "{data}", "--out", "{tmp}/int"], 2),
        ("clean-export-ok", ["clean", "{data}", "--model", "{model}", "--export", "{tmp}/rank", "--quiet"], 0),
        ("clean-missing-model", ["clean", "{data}", "--model", "{tmp}/nope.safetensors", "--export", "{tmp}/rank"], 2),
        ("predict-ok", ["predict", "{model}", "{image}"], 0),
        ("predict-one-bad-image", ["predict", "{model}", "{bad}"], 2),
        ("predict-some-bad-images", ["predict", "{model}", "{image}", "{bad}"], 1),
        ("predict-all-bad-images", ["predict", "{model}", "{bad}", "{tmp}/missing.png"], 1),
        ("export-ok", ["export", "{model}", "--onnx", "--out", "{tmp}/m.onnx"], 0),
        ("export-nothing", ["export", "{model}"], 2),
        ("serve-missing-model", ["serve", "{tmp}/nope.safetensors"], 2),
        ("usage-serve-bad-port", ["serve", "{model}", "--port", "70000"], 2),
        ("sgd-ok", ["sgd", "--out", "{tmp}/s.html", "--steps", "2", "--quiet"], 0),
        ("sgd-bad-lr", ["sgd", "--out", "{tmp}/s.html", "--lr", "-1"], 2),
        ("usage-unknown-command", ["frobnicate"], 2),
        ("usage-unknown-option", ["predict", "--frobnicate"], 2),
    ]]


@pytest.mark.parametrize("case,args,code", _exit_cases())
def test_exit_codes_of_every_command(world, tmp_path, capsys, monkeypatch, case, args, code):
    """0 ok, 1 the job ran but failed, 2 bad input (no traceback), 3 diverged (DESIGN.md); cheap cases only."""
    import ursa.training.recipe

    if case == "train-diverged":  # the real run is test_advice's end-to-end test; here: the CLI's mapping
        def diverge(cfg):
            raise DivergedError("training diverged (learning rate too high); try 10x lower")

        monkeypatch.setattr(ursa.training.recipe, "train", diverge)
    urls = tmp_path / "urls.txt"
    urls.write_text(f"http://127.0.0.1:{_free_port()}/x.jpg\n")  # nothing listens there: a failed row
    values = {"tmp": tmp_path, "data": world["data"], "model": world["model"], "image": world["image"],
              "bad": world["bad_image"], "urls": urls}
    if case == "verify-ok":  # verify writes verify.csv into the folder: use a copy
        values["data"] = shutil.copytree(world["data"], tmp_path / "vdata")
    rc = main([a.format(**values) for a in args])
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    if code in (2, 3) and not case.startswith("usage-"):  # usage errors are click's: usage, then the error
        assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, err


# --- item 7: symlinked class folders and files --------------------------------------------------


def _classes(root: Path, names=("teddy", "grizzly"), n: int = 6) -> Path:
    for ci, c in enumerate(names):
        for i in range(n):
            make_image(root / c / f"{i}.png", color=(90 * ci, 30 * i, 50), size=(20, 20))
    return root


def test_a_class_folder_that_links_to_another_class_is_refused(tmp_path, capsys):
    root = _classes(tmp_path / "data")
    (root / "teddy_link").symlink_to("teddy")
    with pytest.raises(DataError) as e:
        from_folder(root)
    msg = str(e.value)
    assert "'teddy'" in msg and "'teddy_link'" in msg and "same folder" in msg and "remove the link" in msg
    rc = main(["train", str(root), "--out", str(tmp_path / "run")])
    _one_line(capsys, rc, "teddy_link", "same folder")


def test_a_link_to_the_same_folder_by_an_absolute_path_or_across_train_and_valid(tmp_path):
    root = _classes(tmp_path / "data")
    (root / "bears").symlink_to(root / "teddy", target_is_directory=True)
    with pytest.raises(DataError, match="same folder"):
        from_folder(root)
    tv = tmp_path / "tv"
    _classes(tv / "train")
    (tv / "valid").mkdir()
    (tv / "valid" / "teddy").symlink_to(tv / "train" / "teddy")
    make_image(tv / "valid" / "grizzly" / "v.png")
    with pytest.raises(DataError, match="same folder"):
        from_folder(tv)


def test_a_class_folder_inside_another_through_a_link_is_refused(tmp_path):
    root = _classes(tmp_path / "data")
    make_image(root / "teddy" / "cubs" / "c.png")
    (root / "cubs").symlink_to(root / "teddy" / "cubs")
    with pytest.raises(DataError, match="inside class folder 'teddy'"):
        from_folder(root)


def test_linked_class_folders_outside_the_data_folder_are_fine(tmp_path):
    """Users keep images on another disk and link them in: not duplicates, so nothing to say."""
    elsewhere = _classes(tmp_path / "disk")
    root = tmp_path / "data"
    root.mkdir()
    for c in ("teddy", "grizzly"):
        (root / c).symlink_to(elsewhere / c)
    ds = from_folder(root)
    assert ds.classes == ["grizzly", "teddy"] and len(ds) == 12
    assert ds.rel(0).startswith("grizzly/")  # names stay as the user sees them, not the link's target


def test_a_file_reached_twice_is_counted_once_with_a_warning(tmp_path, caplog):
    root = _classes(tmp_path / "data")
    (root / "teddy" / "again.png").symlink_to(root / "teddy" / "0.png")
    with caplog.at_level(logging.WARNING, logger="ursa"):
        ds = from_folder(root)
    assert len(ds) == 12 and [ds.rel(i) for i in range(len(ds))].count("teddy/again.png") == 0
    assert "counted once" in caplog.text and "teddy/again.png is teddy/0.png" in caplog.text


def test_a_file_linked_into_two_classes_is_refused(tmp_path):
    root = _classes(tmp_path / "data")
    (root / "grizzly" / "odd.png").symlink_to(root / "teddy" / "0.png")
    with pytest.raises(DataError, match="same file .* two labels, 'grizzly' and 'teddy'"):
        from_folder(root)


def test_a_csv_naming_one_file_twice_counts_it_once(tmp_path, caplog):
    root = _classes(tmp_path / "data")
    rows = [f"{c}/{i}.png,{c}" for c in ("teddy", "grizzly") for i in range(6)] + ["teddy/./0.png,teddy"]
    (tmp_path / "c.csv").write_text("name,label\n" + "\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="ursa"):
        ds = from_csv(root, tmp_path / "c.csv")
    assert len(ds) == 12 and "counted once" in caplog.text


# --- item 8: formula injection in the CSV files ursa writes -------------------------------------


def _cells(path: Path) -> list[str]:
    return [cell for row in csv.reader(io.StringIO(path.read_text(encoding="utf-8"))) for cell in row]


def _assert_no_formula(path: Path) -> None:
    bad = [c for c in _cells(path) if c.startswith(FORMULA_START)]
    assert bad == [], f"{path.name}: cells a spreadsheet would run: {bad}"


@pytest.mark.skipif(os.name != "posix", reason="folder names with | and ' need a POSIX file system")
def test_a_formula_class_name_is_written_safely_and_reads_back(tmp_path):
    root = _classes(tmp_path / "data", names=(EVIL_DIR, "-neg", "@home"), n=8)
    make_image(root / "-neg" / "-1.png")  # a leading '-' is common in real file names
    ds = from_folder(root)
    assert set(ds.classes) == {EVIL_DIR, "-neg", "@home"}
    split = tmp_path / "split.csv"
    ds.write_split(split)
    _assert_no_formula(split)
    assert f"'{EVIL_DIR}/0.png" in _cells(split) and f"'{EVIL_DIR}" in _cells(split)
    back = from_csv(root, split)  # split.csv has name,label,is_valid: the --csv reader takes it as it is
    assert back.classes == ds.classes and back.is_valid == ds.is_valid
    assert [back.rel(i) for i in range(len(back))] == [ds.rel(i) for i in range(len(ds))]
    assert [back.classes[k] for k in back.labels] == [ds.classes[k] for k in ds.labels]


def test_a_formula_label_in_a_csv_round_trips_through_split_csv(tmp_path):
    """The exact payload (its '/' cannot be in a folder name) as a label of a --csv dataset."""
    from ursa.util.files import atomic_write_csv

    root = _classes(tmp_path / "data", names=("x", "y"), n=8)
    rows = [[f"{c}/{i}.png", EVIL if c == "x" else "+1 - 2"] for c in ("x", "y") for i in range(8)]
    given = atomic_write_csv(tmp_path / "labels.csv", ["name", "label"], rows)
    _assert_no_formula(given)
    ds = from_csv(root, given)
    assert ds.classes == sorted([EVIL, "+1 - 2"])
    ds.write_split(tmp_path / "split.csv")
    _assert_no_formula(tmp_path / "split.csv")
    back = from_csv(root, tmp_path / "split.csv")
    assert back.classes == ds.classes and back.labels == ds.labels and back.is_valid == ds.is_valid
    raw = tmp_path / "raw.csv"  # a CSV a person wrote, with no escaping, still reads as written
    raw.write_text("name,label\n" + "".join(f"{n},{'-neg' if n.startswith('x') else 'pos'}\n" for n, _ in rows))
    assert from_csv(root, raw).classes == ["-neg", "pos"]


@pytest.mark.skipif(os.name != "posix", reason="folder names with | and ' need a POSIX file system")
def test_the_cleaners_csv_files_are_safe_and_cleaned_csv_trains(tmp_path):
    from ursa.apps.clean.decisions import Decisions

    root = _classes(tmp_path / "data", names=(EVIL_DIR, "-neg"), n=8)
    ds = from_folder(root)
    names = [ds.rel(i) for i in range(len(ds))]
    dec = Decisions(root, names, [ds.classes[k] for k in ds.labels], ds.classes)
    first_evil = next(n for n in names if n.startswith(EVIL_DIR))
    dec.decide(first_evil, "relabel", "-neg")
    dec.decide(next(n for n in names if n.startswith("-neg")), "exclude")
    for f in (dec.cleaned_path, dec.log_path):
        _assert_no_formula(f)
    back = from_csv(root, dec.cleaned_path)  # `ursa train DATA --csv DATA/cleaned.csv`
    assert back.classes == sorted([EVIL_DIR, "-neg"]) and len(back) == len(ds) - 1
    assert back.classes[back.labels[[back.rel(i) for i in range(len(back))].index(first_evil)]] == "-neg"


# ursa's own readers take the spreadsheet quote off again (ursa.util.files.csv_row_values / csv_cell_value).


def test_the_cleaners_log_replays_decisions_about_formula_named_files(tmp_path):
    from ursa.apps.clean.decisions import Decisions

    root = _classes(tmp_path / "data", names=(EVIL_DIR, "-neg"), n=4)
    ds = from_folder(root, valid_pct=0.5)
    names, labels = [ds.rel(i) for i in range(len(ds))], [ds.classes[k] for k in ds.labels]
    Decisions(root, names, labels, ds.classes).decide(names[0], "relabel", "-neg")
    again = Decisions(root, names, labels, ds.classes)
    assert again.load() == 1 and again.label_of(names[0]) == "-neg"


def test_interpret_reads_a_split_csv_with_formula_named_classes(tmp_path):
    from ursa.diagnose.interpret import load_items

    root = _classes(tmp_path / "data", names=(EVIL_DIR, "-neg"), n=8)
    ds = from_folder(root)
    ds.write_split(tmp_path / "split.csv")
    items, split, _ = load_items(tmp_path / "model.safetensors", root, ds.classes)
    assert split == "valid" and len(items) == len(ds.valid_idx)


def test_a_download_manifest_reads_back_formula_like_classes(tmp_path):
    from ursa.acquire.manifest import ManifestWriter, read_manifest

    path = tmp_path / "downloads.csv"
    w = ManifestWriter(path, [], rewrite=True)
    w.write({"url": "http://example.test/a.jpg", "class": "-neg", "file": "-neg/00000001.jpg", "status": "saved"})
    w.close()
    _assert_no_formula(path)
    row = read_manifest(path)[0]
    assert (row["class"], row["file"]) == ("-neg", "-neg/00000001.jpg")

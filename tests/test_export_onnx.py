"""ONNX export: the file carries classes and the full ursa metadata, and agrees with torch to 1e-4."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from ursa.cli import main
from ursa.errors import ModelFileError
from ursa.inference.export import export_onnx
from ursa.inference.modelfile import ONNX_META_KEY, read_meta
from ursa.inference.predictor import load_predictor
from tests.conftest import HELDOUT


@pytest.fixture(scope="module")
def exported(tiny_model: Path, tmp_path_factory) -> Path:
    """A copy of the tiny model with model.onnx beside it; returns the .safetensors path."""
    d = tmp_path_factory.getbasetemp() / "tiny_onnx"  # shared with test_predict: one export per run
    model = d / "model.safetensors"
    if not (d / "model.onnx").is_file():
        d.mkdir(exist_ok=True)
        shutil.copy2(tiny_model, model)
        assert main(["export", str(model), "--onnx", "--out", str(d / "model.onnx")]) == 0  # the CLI, --out included
    return model


def test_export_writes_metadata_and_dynamic_batch(exported):
    import onnx

    proto = onnx.load(str(exported.with_suffix(".onnx")))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = read_meta(exported)
    assert json.loads(props[ONNX_META_KEY]) == asdict(meta)
    assert json.loads(props["classes"]) == meta.classes
    assert props["arch"] == meta.arch and int(props["input_size"]) == meta.input_size
    assert proto.producer_name == "ursa"
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: any batch size
    assert proto.opset_import[0].version >= 13


def test_onnx_and_torch_give_the_same_probabilities(exported):
    torch_pred = load_predictor(exported, backend="torch")
    onnx_pred = load_predictor(exported, backend="onnx")
    assert (torch_pred.backend, onnx_pred.backend) == ("torch", "onnx")
    assert onnx_pred.meta == torch_pred.meta
    files = sorted(HELDOUT.glob("*.jpg"))
    a = torch_pred.predict_batch(files)
    b = onnx_pred.predict_batch(files)
    for pa, pb in zip(a, b):
        assert pa.label == pb.label
        diff = max(abs(pa.probs[c] - pb.probs[c]) for c in pa.probs)
        assert diff < 1e-4
    single = np.array(list(onnx_pred.predict(files[0])[2].values()))
    assert np.abs(single - np.array(list(b[0].probs.values()))).max() < 1e-5  # batch size 1 works too


def test_onnx_path_alone_and_out_guard(exported, tmp_path):
    alone = tmp_path / "bears.onnx"
    shutil.copy2(exported.with_suffix(".onnx"), alone)
    assert load_predictor(alone).classes == read_meta(exported).classes  # a .onnx path alone is enough
    with pytest.raises(ModelFileError, match="overwrite the model file"):
        export_onnx(exported, exported)


def test_cli_export_needs_onnx_flag_and_a_model(tmp_path, capsys, exported):
    assert main(["export", str(exported)]) == 2
    assert "pass --onnx" in capsys.readouterr().err
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"nope")
    assert main(["export", str(bad), "--onnx"]) == 2
    assert "not a model file" in capsys.readouterr().err
    assert not bad.with_suffix(".onnx").exists()


def test_onnx_file_without_ursa_metadata_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g", [x], [y])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ModelFileError, match="not an ursa ONNX export"):
        load_predictor(path)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx at all")
    with pytest.raises(ModelFileError, match="not a readable ONNX model"):
        load_predictor(junk)


def test_exported_graph_has_static_padding(exported):
    """No run-time "same" padding arithmetic (Shape/Ceil/Pad chains): one Conv per convolution, fusable."""
    import onnx

    ops = [n.op_type for n in onnx.load(str(exported.with_suffix(".onnx"))).graph.node]
    assert not {"Shape", "Ceil", "Pad", "Gather"} & set(ops), sorted(set(ops))
    assert len(ops) < 250  # 600+ with dynamic padding (lite0)


def test_static_padding_is_exact_at_odd_sizes():
    import torch

    from ursa.inference.static import with_static_padding
    from ursa.vision.models import create_model

    model = create_model(n_classes=3, pretrained=False).eval()
    for size in (97, 128):
        static, n = with_static_padding(model, size)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            assert n >= 4 and torch.equal(static(x), model(x))


def test_write_onnx_beside_never_fails_the_run(tmp_path, caplog):
    from ursa.inference.export import write_onnx_beside

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"nope")
    assert write_onnx_beside(bad) is None and "no ONNX file written" in caplog.text


def test_export_has_logits_then_body_features_matching_torch(exported):
    """Output 0 stays the logits (every one-output reader works); output 1 is Classifier.features, batched."""
    import onnx
    import torch

    from ursa.inference.modelfile import load_model
    from ursa.inference.runtime import load_onnx

    proto = onnx.load(str(exported.with_suffix(".onnx")))
    assert [o.name for o in proto.graph.output] == ["logits", "features", "evidence"]
    for out in proto.graph.output:
        assert out.type.tensor_type.shape.dim[0].dim_param  # any batch size, features too
    model, meta = load_model(exported)
    onnx_pred = load_onnx(exported.with_suffix(".onnx"))
    x = np.stack([onnx_pred.preprocess(f) for f in sorted(HELDOUT.glob("*.jpg"))[:5]])
    with torch.inference_mode():
        want = model.eval().features(torch.from_numpy(x)).numpy()
    logits, feats = onnx_pred.logits_and_features(x)
    assert feats.shape == want.shape == (5, 2 * meta.head["n_features"]) and feats.dtype == np.float32
    assert np.abs(feats - want).max() < 1e-3
    assert np.array_equal(logits, onnx_pred.logits(x))  # the same output 0 as before


def test_check_onnx_refuses_features_that_differ(exported):
    """The export's check covers the features output too: a graph whose features disagree is refused."""
    import onnx
    from onnx import helper

    from ursa.inference.export import check_onnx
    from ursa.inference.modelfile import load_model

    model, meta = load_model(exported)
    proto = onnx.load(str(exported.with_suffix(".onnx")))
    g = proto.graph
    feat = g.output[1].name
    producer = next(n for n in g.node if feat in n.output)
    producer.output[list(producer.output).index(feat)] = "raw_features"
    for n in g.node:  # the head still reads the true features; only the output is scaled
        n.input[:] = ["raw_features" if i == feat else i for i in n.input]
    g.initializer.append(onnx.numpy_helper.from_array(np.array(1.01, dtype=np.float32), "k"))
    g.node.append(helper.make_node("Mul", ["raw_features", "k"], [feat]))
    assert check_onnx(exported.with_suffix(".onnx").read_bytes(), model, meta.input_size) < 1e-4  # the real file passes
    with pytest.raises(ModelFileError, match="body features differ"):
        check_onnx(proto.SerializeToString(), model, meta.input_size)


def test_a_class_name_that_is_not_utf8_exports_and_reads_back(tiny_model, tmp_path):
    """Issue 29 item 9: a class folder named with raw bytes trains; its export was a UnicodeEncodeError traceback."""
    from dataclasses import replace

    from ursa.inference.modelfile import load_model, save_model
    from ursa.inference.runtime import load_onnx

    model, meta = load_model(tiny_model)
    odd = [f"ted\udcffdy{i}" if i == 0 else c for i, c in enumerate(meta.classes)]  # b"ted\xffdy0" on disk
    path = save_model(model, tmp_path / "model.safetensors", replace(meta, classes=odd))
    onnx_file = export_onnx(path)
    assert load_onnx(onnx_file).meta.classes == odd  # the metadata keeps the name whole; the doc string shows \xff

"""Registry, offline weights, head, freezing and layer groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ursa.errors import ArchError
from ursa.training.optim import lr_groups
from ursa.vision.models import REGISTRY, create_imagenet_model, create_model, get_spec, list_archs


def test_registry_lists_the_offline_backbones():
    assert list_archs() == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert [REGISTRY[a].input_size for a in list_archs()] == [224, 240, 260]
    assert all(REGISTRY[a].mean == (0.5, 0.5, 0.5) == REGISTRY[a].std for a in list_archs())


def test_pretrained_lite0_ranks_espresso_first_for_coffee():
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    model = create_imagenet_model("efficientnet_lite0").eval()
    im = Image.fromarray(skimage_data.coffee()).resize((224, 224), Image.Resampling.BILINEAR)
    x = (torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        top = model(x[None]).softmax(1)[0].argmax().item()
    assert top == 967  # ImageNet class 967: espresso


@pytest.mark.parametrize("arch,n", [("efficientnet_lite1", 386), ("efficientnet_lite2", 386)])
def test_other_lite_weights_load(arch, n):
    from ursa.vision.models import create_backbone

    m = create_backbone(arch, pretrained=True, num_classes=1000)
    assert len(m.state_dict()) == n


def test_unknown_architecture_names_the_offline_choices():
    with pytest.raises(ArchError, match="unknown architecture 'resnet9000'.*efficientnet_lite0"):
        get_spec("resnet9000")


def test_hub_model_without_network_gives_a_clear_message(monkeypatch):
    import timm

    def boom(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(timm, "create_model", boom)
    from ursa.vision.models import create_backbone

    with pytest.raises(ArchError, match="cannot download pretrained weights for 'resnet18'.*offline choices"):
        create_backbone("resnet18", pretrained=True)


def test_freeze_trains_head_and_batchnorm_only():
    m = create_model(n_classes=3, pretrained=False)
    m.freeze(train_bn=True)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any(n.startswith("head.") for n in trainable)
    assert all(n.startswith("head.") or ".bn" in n or n.startswith("body.bn") for n in trainable)
    assert "body.conv_stem.weight" not in trainable
    m.freeze(train_bn=False)
    assert all(n.startswith("head.") for n, p in m.named_parameters() if p.requires_grad)
    m.unfreeze()
    assert all(p.requires_grad for p in m.parameters())


def test_layer_groups_cover_every_parameter_once():
    m = create_model(n_classes=3, pretrained=False)
    groups = m.param_groups()
    assert len(groups) == 3
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert {id(p) for p in m.head.parameters()} == {id(p) for p in groups[2]}


def test_slice_spreads_learning_rates_geometrically():
    assert lr_groups(slice(1e-5, 1e-3), 3) == pytest.approx([1e-5, 1e-4, 1e-3])
    assert lr_groups(3e-3, 3) == [3e-3] * 3
    assert lr_groups(slice(None, 1e-3), 3) == pytest.approx([1e-4, 1e-4, 1e-3])


def test_head_uses_concat_pooling():
    m = create_model(n_classes=4, pretrained=False).eval()
    f = m.features(torch.randn(2, 3, 64, 64))
    assert f.shape == (2, 2 * 1280)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_onnx_features_equal_torch_features():
    import torch

    from ursa.inference.onnx import onnx_features
    from ursa.vision.models import create_model

    torch.manual_seed(0)
    model = create_model(n_classes=3).eval()
    run = onnx_features(model, 64)
    assert run is not None, "ONNX Runtime should run the lite0 body"
    x = torch.randn(5, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = model.features(x)
    got = run(x)
    assert got.shape == ref.shape == (5, 2560)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)

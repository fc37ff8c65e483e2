"""Evidence maps in torch: how much each place of the last feature map adds to the predicted class's score.

ursa's classifier is ``body -> pool -> head`` (``vision.models``): the pool puts the channel-wise
maximum and mean of the body's last feature map ``A`` [C, h, w] side by side (fastai's concat
pool; or the mean alone), and the head is BatchNorm, dropout, linear, ReLU, BatchNorm, dropout,
linear. In evaluation mode that head is piecewise linear: with its ReLU pattern fixed, every
logit is ``y_j = J_j . p + b_j`` exactly, where ``p`` is the pooled vector and ``J`` the head's
Jacobian (``head_jacobian``: the weights multiplied back through the layers, the ReLU mask
included). The pooled vector itself is a sum over places: the mean puts ``A_k(x)/hw`` at every
place ``x``, the maximum puts ``A_k`` at its arg-max (split evenly among ties). So

    M_j(x) = sum_k A_k(x) * (J_j[avg k] / hw + J_j[max k] * [x is channel k's arg-max])

sums over the places to ``y_j - b_j`` exactly: the class activation map (CAM, Zhou et al. 2016)
generalised from a linear head on a mean pool to this head and pool ("exact"). Grad-CAM
(Selvaraju et al. 2017) weights each ``A_k`` everywhere by its mean gradient, ``J_j[avg k] / hw +
J_j[max k] / hw``: the same for the mean half of the pool, while the maximum half's weight is spread
over every place in proportion to ``A_k`` instead of put on the one place that gave the maximum.
Measured on pictures whose class is decided by one small square (``benchmarks/explain.py``,
docs/explain.md), the exact map puts more of its evidence on the square but, for channels that
respond broadly, spikes at whichever place happens to hold their maximum: on one of eight small
trainings its peak was on the square in 24% of the pictures, where Grad-CAM's always was. ursa draws
Grad-CAM ("gradcam"), with its weights computed, not back-propagated: for this head the gradient
is the Jacobian ``J``, so the maps need no autograd and run inside the ONNX graph. The map shown
for class ``c`` uses ``J_c`` minus the mean of the other classes' rows: the gradient of c's logit
margin over the others (the quantity the softmax turns into c's probability; for two classes
the log-odds), so evidence that raises every class alike cancels.

``EvidenceModel`` wraps a ``Classifier`` so one forward pass gives (logits, pooled features,
per-class maps): the ONNX export's three outputs (``export``), so the torch-free runtime reads the
map from the graph. The body itself stays non-linear: a place of ``A`` stands for its receptive
field, not for one pixel, and the map is as coarse as ``A`` (7 x 7 for a 224 px EfficientNet-Lite0).
"""

from __future__ import annotations

import torch
from torch import nn

from ursa.errors import UrsaError
from ursa.vision.models import Classifier


class NoEvidenceMaps(UrsaError):
    """A head made of layers other than BatchNorm1d, Dropout, Linear and ReLU: no exact map for it."""


def head_jacobian(head: nn.Sequential, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, K], d logits / d f [N, K, F]) of an evaluation-mode head, exact for its ReLU pattern at f."""
    masks, wts, x = [], [], f
    for m in head:
        if isinstance(m, nn.ReLU):
            masks.append((x > 0).to(x.dtype))
        if isinstance(m, nn.Linear):  # one transposed weight for the forward and the Jacobian: one copy in ONNX
            wts.append(m.weight.t())
            x = x @ wts[-1] if m.bias is None else x @ wts[-1] + m.bias
        else:
            x = m(x)
    jac: torch.Tensor | None = None
    for m in reversed(head):
        if isinstance(m, nn.Linear):  # [K, F] until a ReLU mask makes it per image
            wt = wts.pop()
            jac = wt.t() if jac is None else (wt @ jac.transpose(-1, -2)).transpose(-1, -2)
        elif isinstance(m, nn.BatchNorm1d) and jac is not None:
            scale = torch.rsqrt(m.running_var + m.eps)
            jac = jac * (scale if m.weight is None else m.weight * scale)
        elif isinstance(m, nn.ReLU) and jac is not None:
            jac = jac * masks.pop().unsqueeze(1)
        elif not isinstance(m, (nn.Dropout, nn.Identity)) or jac is None:
            raise NoEvidenceMaps(f"expected a head of BatchNorm1d, Dropout, Linear and ReLU ending in Linear, "
                                 f"got {type(m).__name__}")
    assert jac is not None
    if jac.dim() == 2:  # no ReLU: the same for every image
        jac = jac + torch.zeros_like(f[:, :1]).unsqueeze(1)
    return x, jac


def check_head(head: nn.Module) -> None:
    """NoEvidenceMaps unless `head` is what ``head_jacobian`` maps exactly (checked by type, nothing run)."""
    layers = list(head) if isinstance(head, nn.Sequential) else [head]
    allowed = (nn.BatchNorm1d, nn.Dropout, nn.Identity, nn.Linear, nn.ReLU)
    bad = next((m for m in layers if not isinstance(m, allowed)), None)
    last = next((m for m in reversed(layers) if not isinstance(m, (nn.Dropout, nn.Identity))), None)
    if bad is not None or not isinstance(last, nn.Linear):
        got = type(bad if bad is not None else last).__name__
        raise NoEvidenceMaps(f"expected a head of BatchNorm1d, Dropout, Linear and ReLU ending in Linear, got {got}")


def contrast(jac: torch.Tensor) -> torch.Tensor:
    """Each class's weights minus the mean of the other classes' ([N, K, F]): the weights of the logit margin."""
    k = int(jac.shape[1])  # a constant in an exported graph
    if k < 2:
        return jac
    return jac * (k / (k - 1)) - jac.sum(1, keepdim=True) / (k - 1)


def place_maps(fmap: torch.Tensor, weights: torch.Tensor, pool: str, method: str = "gradcam") -> torch.Tensor:
    """Per-class maps [N, K, h, w]: weights [N, K, F] on the pooled vector spread back over the places of fmap [N, C, h, w].

    "gradcam" (what ursa draws): every channel weighted everywhere by its mean gradient, the maximum
    half of the pool treated like the mean half. "exact": the maximum half's weight put only where
    the maximum is (ties split), so the map sums to ``weights . pooled`` exactly.
    """
    c, h, w = (int(v) for v in fmap.shape[1:])  # fixed by the input size: constants in an exported graph
    spread = "nkc,nchw->nkhw"  # no reshapes, so the exported graph has no shape arithmetic
    if pool != "concat":
        return torch.einsum(spread, weights, fmap) / (h * w)
    w_max, w_avg = weights[..., :c], weights[..., c:]  # AdaptiveConcatPool2d: [max, mean]
    if method == "gradcam":
        return torch.einsum(spread, w_avg + w_max, fmap) / (h * w)
    ties = (fmap == fmap.amax((2, 3), keepdim=True)).to(fmap.dtype)
    share = ties / ties.sum((2, 3), keepdim=True)
    return torch.einsum(spread, w_avg, fmap) / (h * w) + torch.einsum(spread, w_max, fmap * share)


class EvidenceModel(nn.Module):
    """A classifier returning (logits, pooled features, per-class evidence maps) from one forward pass."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model
        check_head(model.head)  # NoEvidenceMaps now, not half-way through an export

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap = self.model.body(x)
        f = self.model.pool(fmap)
        logits, jac = head_jacobian(self.model.head, f)
        return logits, f, place_maps(fmap, contrast(jac), self.model.head_cfg.pool)


def evidence(model: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, K], evidence maps [N, K, h, w]) of a preprocessed batch, in float32 (the model in eval mode)."""
    with torch.inference_mode():
        logits, _, maps = EvidenceModel(model)(x.float())
    return logits, maps

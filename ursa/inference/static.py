"""Static "same" padding for a fixed input size: the exported graph without run-time padding arithmetic.

timm's TensorFlow-ported networks (the EfficientNet-Lite family) pad their stride-2 convolutions
"same" at run time: ``Conv2dSame`` computes the padding from the input's shape on every call,
which the ONNX exporter turns into Shape/Gather/Sub/Div/Ceil/Cast chains (604 nodes for lite0)
that block ONNX Runtime's fusions. The input size of an ursa model is fixed, so the padding is
known: each ``Conv2dSame`` becomes a plain convolution with its padding written in (symmetric:
``nn.Conv2d(padding=...)``; asymmetric: a constant ``F.pad`` first), and in the ONNX graph each
such Pad is folded into its Conv's own ``pads`` attribute (ONNX convolutions take asymmetric
padding), so the graph is one Conv per convolution, 231 nodes for lite0. Outputs are identical.
"""

from __future__ import annotations

import copy
import inspect
import io
import warnings
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def torchscript_exporter() -> dict:
    """torch.onnx.export's keyword for the TorchScript exporter (needs no onnxscript); torch < 2.5 has only that one."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def same_padding(n: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TensorFlow's "same" padding (before, after) of one axis of length n: the extra pixel goes after."""
    out = -(-n // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
    return total // 2, total - total // 2


class PadConv2d(nn.Module):
    """A convolution with fixed asymmetric zero padding (left, right, top, bottom); the weights are the original's."""

    def __init__(self, conv: nn.Conv2d, pads: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv, self.pads = conv, tuple(int(p) for p in pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return F.conv2d(F.pad(x, self.pads), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)


def _is_dynamic_same(mod: nn.Module) -> bool:
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # pragma: no cover - timm is a dependency of the torch side
        return False
    return isinstance(mod, Conv2dSame)


def with_static_padding(model: nn.Module, size: int) -> tuple[nn.Module, int]:
    """A copy of `model` (same weights) with every run-time "same" padding fixed for size x size inputs; and how many."""
    model = copy.deepcopy(model)
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, inp, name=name: sizes.__setitem__(name, tuple(inp[0].shape[-2:])))
             for name, m in model.named_modules() if _is_dynamic_same(m)]
    modes = [m.training for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
        for m, training in zip(model.modules(), modes):
            m.training = training
    for name, (h, w) in sizes.items():
        old = model.get_submodule(name)
        (kh, kw), (sh, sw), (dh, dw) = old.kernel_size, old.stride, old.dilation
        (t, b), (l, r) = same_padding(h, kh, sh, dh), same_padding(w, kw, sw, dw)
        if t == b and l == r:
            new: nn.Module = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, (t, l),
                                       old.dilation, old.groups, old.bias is not None)
            new.weight, new.bias = old.weight, old.bias
        else:
            plain = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, 0,
                              old.dilation, old.groups, old.bias is not None)
            plain.weight, plain.bias = old.weight, old.bias
            new = PadConv2d(plain, (l, r, t, b))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model, len(sizes)


def _constant_value(graph: Any, name: str, producers: dict[str, Any], opsets: list[Any]) -> Any:
    """The value of a tensor computed from constants only (initialisers, Constant nodes), or None."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    inits = {i.name: i for i in graph.initializer}
    if name in inits:
        return numpy_helper.to_array(inits[name])
    needed: dict[int, Any] = {}
    todo, used_inits = [name], set()
    while todo:
        t = todo.pop()
        if t in inits:
            used_inits.add(t)
            continue
        node = producers.get(t)
        if node is None:  # a graph input: not a constant
            return None
        if id(node) not in needed:
            needed[id(node)] = node
            todo.extend(i for i in node.input if i)
    order = [n for n in graph.node if id(n) in needed]
    sub = helper.make_graph(order, "c", [], [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)],
                            [inits[i] for i in used_inits])
    model = helper.make_model(sub, opset_imports=opsets)
    return ReferenceEvaluator(model).run(None, {})[0]


def fold_pads(proto: Any) -> int:
    """Fold each constant zero Pad that feeds only a Conv into the Conv's `pads`; drop the dead nodes. How many."""
    from onnx import helper

    g = proto.graph
    opsets = list(proto.opset_import)
    producers = {o: n for n in g.node for o in n.output}
    users: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    folded = 0
    for pad in [n for n in g.node if n.op_type == "Pad"]:
        after = users.get(pad.output[0], [])
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        if len(after) != 1 or after[0].op_type != "Conv" or mode != b"constant" or len(pad.input) > 3:
            continue
        pads = _constant_value(g, pad.input[1], producers, opsets)
        value = _constant_value(g, pad.input[2], producers, opsets) if len(pad.input) > 2 and pad.input[2] else 0
        if pads is None or value is None or float(value) != 0.0 or len(pads) != 8:
            continue
        pads = [int(p) for p in pads]  # [n, c, h, w] begins, then ends
        conv = after[0]
        old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
        if pads[0] or pads[1] or pads[4] or pads[5] or any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET")
                                                          for a in conv.attribute):
            continue
        new = [old[0] + pads[2], old[1] + pads[3], old[2] + pads[6], old[3] + pads[7]]
        for a in list(conv.attribute):
            if a.name == "pads":
                conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        folded += 1
    _drop_dead_nodes(g)
    return folded


def _drop_dead_nodes(g: Any) -> None:
    live = {o.name for o in g.output}
    keep: set[int] = set()
    for n in reversed(list(g.node)):
        if any(o in live for o in n.output):
            keep.add(id(n))
            live.update(i for i in n.input if i)
    dead = [n for n in g.node if id(n) not in keep]
    for n in dead:
        g.node.remove(n)
    for init in [i for i in g.initializer if i.name not in live]:
        g.initializer.remove(init)


def export_graph(module: nn.Module, size: int, input_name: str, output_name: str | Sequence[str], opset: int = 17) -> Any:
    """`module` (eval mode) as an ONNX ModelProto: dynamic batch, fixed size x size input, static padding folded."""
    import onnx

    names = [output_name] if isinstance(output_name, str) else list(output_name)
    static, _ = with_static_padding(module, size)
    static.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter (dynamo=False) needs no onnxscript and is still supported in
        # torch 2.x; its deprecation notice and tracer notes are not the user's concern.
        warnings.simplefilter("ignore")
        torch.onnx.export(static, (torch.zeros(2, 3, size, size),), buf, **torchscript_exporter(),
                          opset_version=opset, input_names=[input_name], output_names=names,
                          dynamic_axes={n: {0: "batch"} for n in [input_name, *names]})
    proto = onnx.load_from_string(buf.getvalue())
    fold_pads(proto)
    return proto

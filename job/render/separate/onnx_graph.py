"""An ONNX graph run by torch: the MDX-Net passes on the device, in the machine's precision, at a
third of ONNX Runtime's memory (whose CPU provider, the reference, runs them in fp32 on the host).

The graph is not translated into code: its nodes run in their stored (topological) order, each
by the torch operation with ONNX's semantics, from a table of the operators UVR's MDX-Net exports
and the shape arithmetic exporters add around them (:data:`OPS`). A graph with an operator outside
the table is not taken (:class:`UnsupportedGraphError`): the pass stays on ONNX Runtime. Every
operator in the table is tested against ONNX Runtime on the same inputs (tests/test_onnx_graph.py).

How it computes:

- the weights as the file stores them (float32); under a lower precision the convolutions and
  matrix products run in it through autocast (bf16 on the CPU, fp16 on a GPU), the rest in fp32;
- at load, nodes that read only constants run once (the exporter's Identity copies of shared
  weights, shape arithmetic), and a batch norm that alone reads a convolution's output is folded
  into it;
- with ``channels_last`` (the fast kernels) the 4-D convolution weights and the input are
  channels-last (oneDNN's NHWC kernels on the CPU); a matrix product over the last axis of a
  channels-last tensor (MDX-Net's dense layers across frequency) runs on that layout as it lies,
  and a transpose of the spatial axes is laid out channels-last again, instead of either being
  copied to the plain layout;
- an activation whose input nobody reads afterwards (and whose memory no live value or constant
  shares) is computed in place; each intermediate is dropped after its last reader;
- :meth:`TorchGraph.output_shape` runs the graph on torch's meta device: shapes, no arithmetic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional

log = logging.getLogger("melodia.onnx_graph")

Value = torch.Tensor
Op = Callable[["Node", list[Value | None]], list[Value]]


class UnsupportedGraphError(Exception):
    """The graph uses operators (or forms of them) this runner does not implement."""


class Node:
    """One node: its operator, attributes (decoded), input and output names."""

    def __init__(self, proto: Any) -> None:
        from onnx import helper

        self.op: str = proto.op_type
        self.domain: str = proto.domain
        self.name: str = proto.name or proto.output[0]
        self.inputs: list[str] = list(proto.input)
        self.outputs: list[str] = list(proto.output)
        self.attrs: dict[str, Any] = {a.name: helper.get_attribute_value(a) for a in proto.attribute}
        self.cache: dict[str, Value] = {}  # per-node constants derived once (a transposed weight)

    def attr(self, name: str, default: Any = None) -> Any:
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value


def _ints(value: Value | None) -> list[int]:
    return [] if value is None else [int(v) for v in value.reshape(-1).tolist()]


def _need(values: list[Value | None], i: int) -> Value:
    value = values[i] if i < len(values) else None
    if value is None:
        raise UnsupportedGraphError("a required input is missing")
    return value


# --- elementwise -----------------------------------------------------------------------------------
def _binary(fn: Callable[[Value, Value], Value]) -> Op:
    return lambda node, v: [fn(_need(v, 0), _need(v, 1))]


def _unary(fn: Callable[[Value], Value]) -> Op:
    return lambda node, v: [fn(_need(v, 0))]


def _div(a: Value, b: Value) -> Value:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX's integer division truncates


def _clip(node: Node, v: list[Value | None]) -> list[Value]:
    x = _need(v, 0)
    low = v[1] if len(v) > 1 and v[1] is not None else node.attrs.get("min")
    high = v[2] if len(v) > 2 and v[2] is not None else node.attrs.get("max")
    return [torch.clamp(x, min=low, max=high)]


def _leaky_relu(node: Node, v: list[Value | None]) -> list[Value]:
    return [functional.leaky_relu(_need(v, 0), float(node.attr("alpha", 0.01)))]


def _softmax(node: Node, v: list[Value | None]) -> list[Value]:
    return [torch.softmax(_need(v, 0), int(node.attr("axis", -1)))]


def _cast(node: Node, v: list[Value | None]) -> list[Value]:
    return [_need(v, 0).to(_dtype(int(node.attr("to"))))]


def _dtype(onnx_type: int) -> torch.dtype:
    from onnx import helper

    try:
        return torch.from_numpy(np.zeros(0, dtype=helper.tensor_dtype_to_np_dtype(onnx_type))).dtype
    except (KeyError, TypeError) as exc:
        raise UnsupportedGraphError(f"tensor type {onnx_type}") from exc


# --- linear algebra --------------------------------------------------------------------------------
def _matmul(node: Node, v: list[Value | None]) -> list[Value]:
    a, b = _need(v, 0), _need(v, 1)
    if a.dim() == 4 and b.dim() == 2 and _channels_last(a):
        if a.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            return [_lowered_dense(node, a, b, torch.get_autocast_dtype("cpu"))]
        # a's memory is [n, h, w, c]: out[n, c, h, j] = sum_w a[n, c, h, w] b[w, j] is b^T (j x w)
        # times each [w, c] block as laid out, the result laid out channels-last again
        return [torch.matmul(_transposed(node, b, b.dtype), a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)]
    return [torch.matmul(a, b)]


def _transposed(node: Node, b: Value, dtype: torch.dtype) -> Value:
    """``b^T`` in ``dtype``, contiguous: made once per weight (kept while the node reads the same
    tensor, as it does a constant)."""
    if node.cache.get("b") is not b or node.cache["bT"].dtype != dtype:
        node.cache["b"], node.cache["bT"] = b, b.T.to(dtype).contiguous()
    return node.cache["bT"]


def _lowered_dense(node: Node, a: Value, b: Value, dtype: torch.dtype) -> Value:
    """``a @ b`` for a channels-last ``a`` ``[n, c, h, w]`` and ``b`` ``[w, j]`` on the CPU in a
    lowered ``dtype``, as one matrix product: ``b^T`` (``j x w``) times ``a`` laid out ``[w, n*h*c]``
    (one copy, made in ``dtype``), the result laid out channels-last again.

    The batched form :func:`_matmul` takes in fp32 (``b^T`` broadcast over every ``[w, c]`` block)
    is slower in bf16: torch's bf16 batched product copies the broadcast weight out for each block
    (256 copies of a 2048 x 256 matrix per dense layer of UVR's karaoke shape, a fifth of a chunk's
    time) and runs the small products at under a quarter of the bf16 matrix product's rate. The
    same products, summed in fp32 either way: the same numbers to the rounding of the result."""
    n, c, h, w = a.shape
    columns = torch.empty((w, n, h, c), dtype=dtype)
    columns.copy_(a.permute(3, 0, 2, 1))  # a's memory is [n, h, w, c]
    out = torch.mm(_transposed(node, b, dtype), columns.view(w, n * h * c))  # [j, n*h*c]
    return out.view(-1, n, h, c).permute(1, 3, 2, 0).contiguous(memory_format=torch.channels_last)


def _gemm(node: Node, v: list[Value | None]) -> list[Value]:
    a, b = _need(v, 0), _need(v, 1)
    a = a.T if node.attr("transA", 0) else a
    b = b.T if node.attr("transB", 0) else b
    out = float(node.attr("alpha", 1.0)) * (a @ b)
    if len(v) > 2 and v[2] is not None:
        out = out + float(node.attr("beta", 1.0)) * v[2]
    return [out]


def _conv_padding(node: Node, dims: int) -> tuple[list[int], list[int]]:
    """(begin, end) padding per spatial axis; ``auto_pad`` other than NOTSET/VALID is not taken."""
    auto = node.attr("auto_pad", "NOTSET")
    if auto not in ("NOTSET", "VALID"):
        raise UnsupportedGraphError(f"{node.op} with auto_pad {auto}")
    pads = list(node.attr("pads", [0] * (2 * dims))) if auto == "NOTSET" else [0] * (2 * dims)
    return pads[:dims], pads[dims:]


def _torch_pad(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX's per-axis (begin, end) as functional.pad's list (the last axis first)."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        out += [b, e]
    return out


def _conv(node: Node, v: list[Value | None]) -> list[Value]:
    x, w = _need(v, 0), _need(v, 1)
    bias = v[2] if len(v) > 2 else None
    dims = w.dim() - 2
    if dims not in (1, 2):
        raise UnsupportedGraphError(f"Conv over {dims} axes")
    begin, end = _conv_padding(node, dims)
    stride = list(node.attr("strides", [1] * dims))
    dilation = list(node.attr("dilations", [1] * dims))
    groups = int(node.attr("group", 1))
    if begin != end:
        x, padding = functional.pad(x, _torch_pad(begin, end)), [0] * dims
    else:
        padding = begin
    conv = functional.conv1d if dims == 1 else functional.conv2d
    return [conv(x, w, bias, stride, padding, dilation, groups)]


def _conv_transpose(node: Node, v: list[Value | None]) -> list[Value]:
    x, w = _need(v, 0), _need(v, 1)
    bias = v[2] if len(v) > 2 else None
    dims = w.dim() - 2
    if dims not in (1, 2) or "output_shape" in node.attrs:
        raise UnsupportedGraphError("ConvTranspose with output_shape, or not over 1 or 2 axes")
    begin, end = _conv_padding(node, dims)
    stride = list(node.attr("strides", [1] * dims))
    dilation = list(node.attr("dilations", [1] * dims))
    extra = list(node.attr("output_padding", [0] * dims))
    groups = int(node.attr("group", 1))
    deconv = functional.conv_transpose1d if dims == 1 else functional.conv_transpose2d
    if begin == end:
        return [deconv(x, w, bias, stride, begin, extra, groups, dilation)]
    # ONNX's length: stride*(in-1) + output_padding + (k-1)*d + 1 - begin - end; torch's with no
    # padding is the same without the last two: crop them
    out = deconv(x, w, bias, stride, 0, extra, groups, dilation)
    for axis, (b, e) in enumerate(zip(begin, end, strict=True)):
        out = out.narrow(2 + axis, b, out.shape[2 + axis] - b - e)
    return [out]


# --- normalisation ---------------------------------------------------------------------------------
def _batch_norm(node: Node, v: list[Value | None]) -> list[Value]:
    if node.attr("training_mode", 0):
        raise UnsupportedGraphError("BatchNormalization in training mode")
    x, scale, bias, mean, var = (_need(v, i) for i in range(5))
    return [functional.batch_norm(x, mean, var, scale, bias, False, 0.0, float(node.attr("epsilon", 1e-5)))]


def _instance_norm(node: Node, v: list[Value | None]) -> list[Value]:
    x, scale, bias = (_need(v, i) for i in range(3))
    return [functional.instance_norm(x, weight=scale, bias=bias, eps=float(node.attr("epsilon", 1e-5)))]


def _layer_norm(node: Node, v: list[Value | None]) -> list[Value]:
    x, scale = _need(v, 0), _need(v, 1)
    bias = v[2] if len(v) > 2 else None
    axis = int(node.attr("axis", -1)) % x.dim()
    if len(node.outputs) > 1 and any(node.outputs[1:]):
        raise UnsupportedGraphError("LayerNormalization's mean and inverse deviation outputs")
    return [functional.layer_norm(x, x.shape[axis:], scale, bias, float(node.attr("epsilon", 1e-5)))]


# --- shapes ----------------------------------------------------------------------------------------
def _axes(node: Node, v: list[Value | None], position: int) -> list[int] | None:
    """Axes from the input at ``position`` (newer opsets) or the ``axes`` attribute (older)."""
    if len(v) > position and v[position] is not None:
        return _ints(v[position])
    return list(node.attrs["axes"]) if "axes" in node.attrs else None


def _transpose(node: Node, v: list[Value | None]) -> list[Value]:
    x = _need(v, 0)
    perm = list(node.attr("perm") or reversed(range(x.dim())))
    out = x.permute(*perm)
    if x.dim() == 4 and perm[:2] == [0, 1] and _channels_last(x):
        # the spatial axes swapped (MDX-Net's frequency and time): laid out channels-last again, as
        # the next convolution takes it (left as a view, the convolution copies it to the plain
        # layout: five times the time)
        return [out.contiguous(memory_format=torch.channels_last)]
    return [out]


def _channels_last(x: Value) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _reshape(node: Node, v: list[Value | None]) -> list[Value]:
    x, shape = _need(v, 0), _ints(_need(v, 1))
    if not node.attr("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _flatten(node: Node, v: list[Value | None]) -> list[Value]:
    x = _need(v, 0)
    axis = int(node.attr("axis", 1)) % (x.dim() + 1)
    return [x.reshape(int(np.prod(x.shape[:axis])), -1)]


def _shape(node: Node, v: list[Value | None]) -> list[Value]:
    dims = list(_need(v, 0).shape)
    start, end = node.attr("start", 0), node.attr("end", None)
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


def _gather(node: Node, v: list[Value | None]) -> list[Value]:
    x, idx = _need(v, 0), _need(v, 1).long()
    axis = int(node.attr("axis", 0)) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).to(x.device)
    picked = x.index_select(axis, idx.reshape(-1))
    return [picked.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))]


def _unsqueeze(node: Node, v: list[Value | None]) -> list[Value]:
    x = _need(v, 0)
    axes = _axes(node, v, 1) or []
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return [x]


def _squeeze(node: Node, v: list[Value | None]) -> list[Value]:
    x = _need(v, 0)
    axes = _axes(node, v, 1)
    if axes is None:
        return [x.squeeze()]
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return [x]


def _concat(node: Node, v: list[Value | None]) -> list[Value]:
    parts = [t for t in v if t is not None and t.numel() > 0] or [t for t in v if t is not None]
    return [torch.cat(parts, int(node.attr("axis")))]


def _slice(node: Node, v: list[Value | None]) -> list[Value]:
    x = _need(v, 0)
    starts, ends = _ints(_need(v, 1)), _ints(_need(v, 2))
    axes = _ints(v[3]) if len(v) > 3 and v[3] is not None else list(range(len(starts)))
    steps = _ints(v[4]) if len(v) > 4 and v[4] is not None else [1] * len(starts)
    for start, end, given_axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = given_axis % x.dim()
        size = x.shape[axis]
        if step > 0:
            lo, hi = slice(start, end).indices(size)[:2]
            x = x.narrow(axis, lo, max(0, hi - lo))[(slice(None),) * axis + (slice(None, None, step),)]
        else:  # torch slices forwards only: the same elements by index
            idx = torch.arange(*slice(start, end, step).indices(size), device=x.device)
            x = x.index_select(axis, idx)
    return [x]


def _split(node: Node, v: list[Value | None]) -> list[Value]:
    x = _need(v, 0)
    axis = int(node.attr("axis", 0)) % x.dim()
    sizes = _ints(v[1]) if len(v) > 1 and v[1] is not None else list(node.attrs.get("split", []))
    if not sizes:
        count = int(node.attr("num_outputs", len(node.outputs)))
        each = -(-x.shape[axis] // count)
        sizes = [min(each, x.shape[axis] - i * each) for i in range(count)]
    return list(torch.split(x, sizes, axis))


def _pad(node: Node, v: list[Value | None]) -> list[Value]:
    x = _need(v, 0)
    pads = _ints(v[1]) if len(v) > 1 and v[1] is not None else list(node.attrs.get("pads", []))
    if len(v) > 3 and v[3] is not None:
        raise UnsupportedGraphError("Pad with axes")
    value = float(v[2].item()) if len(v) > 2 and v[2] is not None and v[2].numel() else 0.0
    mode = node.attr("mode", "constant")
    half = len(pads) // 2
    spec = _torch_pad(pads[:half], pads[half:])
    if mode == "constant":
        return [functional.pad(x, spec, value=value)]
    if mode in ("reflect", "edge"):
        # functional.pad pads the last axes only, in these modes on a batch and channel axis in front
        while spec and spec[-2:] == [0, 0]:
            spec = spec[:-2]
        return [functional.pad(x, spec, mode="reflect" if mode == "reflect" else "replicate")]
    raise UnsupportedGraphError(f"Pad mode {mode}")


def _reduce_mean(node: Node, v: list[Value | None]) -> list[Value]:
    x = _need(v, 0)
    axes = _axes(node, v, 1)
    keep = bool(node.attr("keepdims", 1))
    if not axes:
        return [x.mean().reshape([1] * x.dim()) if keep else x.mean()]
    return [x.mean(dim=axes, keepdim=keep)]


MAX_MADE = 1 << 28  # elements a node may make from a shape it is given (1 GiB of float32)


def _made(node: Node, shape: Sequence[int]) -> list[int]:
    """``shape``, refused when a node would make more than :data:`MAX_MADE` elements from it."""
    if any(d < 0 for d in shape) or int(np.prod(shape, dtype=np.float64)) > MAX_MADE:
        raise UnsupportedGraphError(f"{node.op} making a {list(shape)} tensor")
    return list(shape)


def _constant_of_shape(node: Node, v: list[Value | None]) -> list[Value]:
    from onnx import numpy_helper

    fill = node.attrs.get("value")
    value = torch.from_numpy(numpy_helper.to_array(fill).copy()) if fill is not None else torch.zeros(1)
    return [value.reshape(()).expand(_made(node, _ints(_need(v, 0)))).clone()]


def _expand(node: Node, v: list[Value | None]) -> list[Value]:
    x, shape = _need(v, 0), _ints(_need(v, 1))
    rank = max(x.dim(), len(shape))
    target = [1] * (rank - len(shape)) + shape
    dims = [1] * (rank - x.dim()) + list(x.shape)
    return [x.reshape(dims).expand(_made(node, [max(a, b) for a, b in zip(dims, target, strict=True)]))]


def _range(node: Node, v: list[Value | None]) -> list[Value]:
    start, limit, delta = (_need(v, i).item() for i in range(3))
    if delta == 0 or (limit - start) / delta > MAX_MADE:
        raise UnsupportedGraphError(f"Range from {start} to {limit} by {delta}")
    return [torch.arange(start, limit, delta, dtype=_need(v, 0).dtype)]


def _where(node: Node, v: list[Value | None]) -> list[Value]:
    return [torch.where(_need(v, 0).bool(), _need(v, 1), _need(v, 2))]


def _constant(node: Node, v: list[Value | None]) -> list[Value]:
    from onnx import numpy_helper

    if "value" in node.attrs:
        return [torch.from_numpy(numpy_helper.to_array(node.attrs["value"]).copy())]
    for name, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if name in node.attrs:
            return [torch.tensor(node.attrs[name], dtype=dtype)]
    for name, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if name in node.attrs:
            return [torch.tensor(list(node.attrs[name]), dtype=dtype)]
    raise UnsupportedGraphError("a Constant without a tensor, a float or an int")


OPS: dict[str, Op] = {
    "Identity": _unary(lambda x: x),
    "Constant": _constant,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pow": _binary(torch.pow),
    "Max": _binary(torch.maximum),
    "Min": _binary(torch.minimum),
    "Equal": _binary(torch.eq),
    "Where": _where,
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Sqrt": _unary(torch.sqrt),
    "Exp": _unary(torch.exp),
    "Erf": _unary(torch.erf),
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "LeakyRelu": _leaky_relu,
    "Clip": _clip,
    "Softmax": _softmax,
    "Cast": _cast,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm,
    "Transpose": _transpose,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Shape": _shape,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Slice": _slice,
    "Split": _split,
    "Pad": _pad,
    "ReduceMean": _reduce_mean,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Range": _range,
}

IN_PLACE: dict[str, Callable[[Any], Value]] = {"Relu": torch.relu_, "Sigmoid": torch.sigmoid_, "Tanh": torch.tanh_}


class TorchGraph:
    """An ONNX model's graph (one input, its first output) on a torch device.

    Args:
        proto: the parsed ``onnx.ModelProto`` (checked by :func:`job.render.onnx_files.parse_self_contained`)
        device: where it runs
        dtype: the convolutions' and matrix products' compute type (float32: none lowered)
        channels_last: 4-D convolution weights and the input channels-last (the CPU's fast kernels)
    """

    def __init__(self, proto: Any, device: torch.device, dtype: torch.dtype, channels_last: bool) -> None:
        from onnx import numpy_helper

        graph = proto.graph
        unknown = sorted({n.op_type for n in graph.node if n.op_type not in OPS or n.domain not in ("", "ai.onnx")})
        if unknown:
            raise UnsupportedGraphError(", ".join(unknown))
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.constants: dict[str, Value] = {}
        for t in graph.initializer:
            value = torch.from_numpy(numpy_helper.to_array(t).copy())
            # weights go to the device; integers (shapes, axes, indices) stay on the host
            self.constants[t.name] = value.to(device) if value.is_floating_point() else value
        self.nodes = self._fold_batch_norms(self._fold_constants([Node(n) for n in graph.node]), graph.output)
        read = {name for node in self.nodes for name in node.inputs}  # the weights folding replaced go
        self.constants = {k: v for k, v in self.constants.items() if k in read}
        if channels_last:
            for node in self.nodes:
                if node.op in ("Conv", "ConvTranspose") and len(node.inputs) > 1 and node.inputs[1] in self.constants:
                    weight = self.constants[node.inputs[1]]
                    if weight.dim() == 4:
                        self.constants[node.inputs[1]] = weight.contiguous(memory_format=torch.channels_last)
        self._constant_memory = {t.untyped_storage().data_ptr() for t in self.constants.values()}
        inputs = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
        if len(inputs) != 1 or not graph.output:
            raise UnsupportedGraphError("not one input and an output")
        self.input, self.output = inputs[0], graph.output[0].name
        # after which node each value is read for the last time (then it is dropped)
        self.last_read: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for name in node.inputs:
                if name and name not in self.constants:
                    self.last_read[name] = i

    def _fold_constants(self, nodes: list[Node]) -> list[Node]:
        """Nodes that read only constants (the exporter's Identity copies of shared weights,
        Constant, shape arithmetic on constants) run once here; their outputs become constants."""
        kept = []
        with torch.inference_mode():
            for node in nodes:
                if all(not name or name in self.constants for name in node.inputs):
                    args = [self.constants[n] if n else None for n in node.inputs]
                    for name, out in zip(node.outputs, OPS[node.op](node, args), strict=False):
                        if name:
                            self.constants[name] = out
                else:
                    kept.append(node)
        return kept

    def _fold_batch_norms(self, nodes: list[Node], outputs: Any) -> list[Node]:
        """A batch norm that alone reads a convolution's output, folded into the convolution's
        weights and bias (the same function; float32 rounding apart)."""
        readers: dict[str, int] = {}
        for n in nodes:
            for name in n.inputs:
                readers[name] = readers.get(name, 0) + 1
        for o in outputs:
            readers[o.name] = readers.get(o.name, 0) + 1
        made_by = {out: n for n in nodes for out in n.outputs}
        dropped: set[int] = set()
        for bn in nodes:
            conv = made_by.get(bn.inputs[0]) if bn.op == "BatchNormalization" and bn.inputs else None
            if (
                conv is None
                or conv.op not in ("Conv", "ConvTranspose")
                or readers.get(bn.inputs[0]) != 1
                or bn.attr("training_mode", 0)
                or len(bn.outputs) != 1
                or int(conv.attr("group", 1)) != 1
                or not all(n in self.constants for n in bn.inputs[1:5] + conv.inputs[1:])
            ):
                continue
            scale, shift, mean, var = (self.constants[n] for n in bn.inputs[1:5])
            factor = scale / torch.sqrt(var + float(bn.attr("epsilon", 1e-5)))
            weight = self.constants[conv.inputs[1]]
            axis = 0 if conv.op == "Conv" else 1  # ConvTranspose's weight is [in, out, ...]
            shape = [1] * weight.dim()
            shape[axis] = -1
            bias = self.constants[conv.inputs[2]] if len(conv.inputs) > 2 else torch.zeros_like(mean)
            folded_w, folded_b = f"{conv.name}/folded_weight", f"{conv.name}/folded_bias"
            self.constants[folded_w] = weight * factor.reshape(shape)
            self.constants[folded_b] = (bias - mean) * factor + shift
            conv.inputs = [conv.inputs[0], folded_w, folded_b]
            conv.outputs = list(bn.outputs)
            dropped.add(id(bn))
        return [n for n in nodes if id(n) not in dropped]

    def _may_overwrite(self, name: str, at: int, values: dict[str, Value]) -> bool:
        """Whether node ``at`` may write over value ``name``: read by no later node, not the graph's
        input, and sharing its memory with no other live value (a view: Identity, Reshape,
        Transpose...) nor with a constant."""
        if self.last_read.get(name) != at or name == self.input or name not in values:
            return False
        if values[name].device.type == "meta":  # a shape trial: nothing to save
            return False
        memory = values[name].untyped_storage().data_ptr()
        if memory in self._constant_memory:
            return False
        return not any(k != name and v.untyped_storage().data_ptr() == memory for k, v in values.items())

    def __call__(self, x: Value) -> Value:
        """The graph's output for ``x`` (float32, on the graph's device), as float32."""
        x = x.to(self.device)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        lowered = self.dtype != torch.float32
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=lowered):
            return self._run(x, self.constants).float()

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The output's shape for an input of ``shape``, found on torch's meta device (shapes, no
        arithmetic: free); raises what a run would raise for a graph whose nodes torch cannot run."""
        meta = {k: v.to("meta") if v.is_floating_point() else v for k, v in self.constants.items()}
        x = torch.empty(tuple(shape), device="meta")
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return tuple(self._run(x, meta).shape)

    def _run(self, x: Value, constants: dict[str, Value]) -> Value:
        values: dict[str, Value] = {self.input: x}
        for i, node in enumerate(self.nodes):
            args = [None if not n else values[n] if n in values else constants[n] for n in node.inputs]
            if node.op in IN_PLACE and self._may_overwrite(node.inputs[0], i, values):
                outs = [IN_PLACE[node.op](args[0])]  # its input's memory is read by no one after
            else:
                outs = OPS[node.op](node, args)
            values.update({name: out for name, out in zip(node.outputs, outs, strict=False) if name})
            for name in node.inputs:
                if self.last_read.get(name) == i and name != self.output:
                    values.pop(name, None)
        return values[self.output]


def load_torch_graph(
    proto: Any, name: str, device: torch.device, dtype: torch.dtype, channels_last: bool
) -> TorchGraph | None:
    """:class:`TorchGraph`, or None (logged) when the graph has operators it does not run.

    Args:
        proto: the parsed ``onnx.ModelProto``
        name: the model's name, for the log
        device: where it runs
        dtype: the convolutions' and matrix products' compute type
        channels_last: the CPU's fast layout
    """
    try:
        return TorchGraph(proto, device, dtype, channels_last)
    except UnsupportedGraphError as exc:
        log.warning("%s stays on ONNX Runtime: torch does not run its %s", name, exc)
    except Exception as exc:  # noqa: BLE001  # a constant node torch fails on at load: ONNX Runtime gets the model
        log.warning("%s stays on ONNX Runtime: on torch its constants fail (%s)", name, exc)
    return None

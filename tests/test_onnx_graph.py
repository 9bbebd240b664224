"""ONNX graphs run by torch (job/render/separate/onnx_graph.py) against ONNX Runtime on the same
inputs: every operator in its table on graphs built with ONNX's helper API, then MDX-Net-shaped
networks exported by torch, in fp32 (the same numbers to float32 rounding) and in bf16 (an error
bounded against fp32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from job.devkit import mdx as devkit
from job.render.onnx_files import parse_self_contained
from job.render.separate.onnx_graph import OPS, Node, TorchGraph, UnsupportedGraphError, load_torch_graph

RNG = np.random.default_rng(7)
CPU = torch.device("cpu")


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def graph(
    nodes: list[Any], x: np.ndarray, consts: dict[str, np.ndarray] | None = None, out_type: int = TensorProto.FLOAT
) -> Any:
    """One input ``x``, one output ``y``."""
    inp = helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(x.dtype), list(x.shape))
    out = helper.make_tensor_value_info("y", out_type, None)
    inits = [numpy_helper.from_array(v, k) for k, v in (consts or {}).items()]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [inp], [out], initializer=inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    return model  # the output's shape unsaid: ONNX's checker wants one, ONNX Runtime does not


def by_ort(proto: Any, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def by_torch(proto: Any, x: np.ndarray, channels_last: bool = False, dtype: torch.dtype = torch.float32) -> np.ndarray:
    out = TorchGraph(proto, CPU, dtype, channels_last)(torch.from_numpy(x))
    return out.numpy() if out.dtype != torch.bfloat16 else out.float().numpy()


def node(op: str, inputs: list[str], outputs: list[str] | None = None, **attrs: Any) -> Any:
    return helper.make_node(op, inputs, outputs or ["y"], **attrs)


X4 = randn(2, 6, 10, 12)
CASES: dict[str, tuple[list[Any], np.ndarray, dict[str, np.ndarray]]] = {
    "conv, padded, strided, dilated": (
        [node("Conv", ["x", "w", "b"], pads=[1, 2, 1, 2], strides=[2, 1], dilations=[1, 2])],
        X4,
        {"w": randn(8, 6, 3, 3), "b": randn(8)},
    ),
    "conv, grouped, asymmetric pads": (
        [node("Conv", ["x", "w"], pads=[0, 1, 2, 0], group=2)],
        X4,
        {"w": randn(4, 3, 3, 2)},
    ),
    "conv 1-d": ([node("Conv", ["x", "w", "b"], pads=[2, 2])], randn(2, 6, 30), {"w": randn(5, 6, 5), "b": randn(5)}),
    "conv transpose, stride 2": (
        [node("ConvTranspose", ["x", "w", "b"], strides=[2, 2])],
        X4,
        {"w": randn(6, 4, 2, 2), "b": randn(4)},
    ),
    "conv transpose, pads and output padding": (
        [node("ConvTranspose", ["x", "w"], strides=[2, 3], pads=[1, 0, 0, 2], output_padding=[1, 1])],
        X4,
        {"w": randn(6, 3, 3, 4)},
    ),
    "batch norm": (
        [node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)],
        X4,
        {"s": randn(6), "b": randn(6), "m": randn(6), "v": np.abs(randn(6)) + 0.5},
    ),
    "instance norm": ([node("InstanceNormalization", ["x", "s", "b"])], X4, {"s": randn(6), "b": randn(6)}),
    "layer norm": ([node("LayerNormalization", ["x", "s", "b"], axis=-1)], X4, {"s": randn(12), "b": randn(12)}),
    "matmul over the last axis": ([node("MatMul", ["x", "w"])], X4, {"w": randn(12, 5)}),
    "gemm": (
        [node("Gemm", ["x", "w", "c"], transB=1, alpha=0.5, beta=2.0)],
        randn(3, 7),
        {"w": randn(4, 7), "c": randn(4)},
    ),
    "add, sub, mul, div with broadcasting": (
        [
            node("Add", ["x", "a"], ["t1"]),
            node("Sub", ["t1", "b"], ["t2"]),
            node("Mul", ["t2", "a"], ["t3"]),
            node("Div", ["t3", "c"]),
        ],
        X4,
        {"a": randn(1, 6, 1, 1), "b": randn(12), "c": np.abs(randn(10, 1)) + 1},
    ),
    "pow, max, min, where, equal": (
        [
            node("Abs", ["x"], ["a"]),
            node("Pow", ["a", "p"], ["t1"]),
            node("Max", ["t1", "lo"], ["t2"]),
            node("Min", ["t2", "hi"], ["t3"]),
            node("Equal", ["t3", "hi"], ["eq"]),
            node("Where", ["eq", "x", "t3"]),
        ],
        X4,
        {"p": np.array(1.5, np.float32), "lo": np.array(0.2, np.float32), "hi": np.array(1.1, np.float32)},
    ),
    "unary": (
        [
            node("Neg", ["x"], ["a"]),
            node("Exp", ["a"], ["b"]),
            node("Sqrt", ["b"], ["c"]),
            node("Erf", ["c"], ["d"]),
            node("Tanh", ["d"], ["e"]),
            node("Sigmoid", ["e"], ["f"]),
            node("Relu", ["x"], ["g"]),
            node("LeakyRelu", ["x"], ["h"], alpha=0.2),
            node("Add", ["f", "g"], ["i"]),
            node("Add", ["i", "h"]),
        ],
        X4,
        {},
    ),
    "activations over a value that is read again, through a view": (
        [
            node("Abs", ["x"], ["a"]),
            node("Identity", ["a"], ["alias"]),
            node("Reshape", ["alias", "flat"], ["view"]),
            node("Neg", ["view"], ["n"]),
            node("Relu", ["n"], ["r"]),  # r is n's own: may be computed in place
            node("Tanh", ["view"], ["t"]),  # view is a's memory, read below: must not be
            node("Reshape", ["c", "flat"], ["cv"]),
            node("Sigmoid", ["cv"], ["s"]),  # a constant's memory: must not be
            node("Add", ["r", "t"], ["rt"]),
            node("Add", ["rt", "s"], ["u"]),
            node("Reshape", ["u", "back"], ["ub"]),
            node("Add", ["ub", "a"], ["ua"]),
            node("Add", ["ua", "c"]),
        ],
        X4,
        {"flat": ints(-1), "back": ints(2, 6, 10, 12), "c": randn(2, 6, 10, 12)},
    ),
    "clip and softmax": (
        [node("Clip", ["x", "lo", "hi"], ["c"]), node("Softmax", ["c"], axis=1)],
        X4,
        {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)},
    ),
    "transpose, reshape with 0 and -1, flatten": (
        [
            node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
            node("Reshape", ["t", "shape"], ["r"]),
            node("Flatten", ["r"], ["f"], axis=2),
            node("Identity", ["f"]),
        ],
        X4,
        {"shape": ints(0, -1, 4, 3)},
    ),
    "shape arithmetic: shape, gather, unsqueeze, concat, reshape": (
        [
            node("Shape", ["x"], ["s"]),
            node("Gather", ["s", "i"], ["d"], axis=0),
            node("Unsqueeze", ["d", "zero"], ["du"]),
            node("Concat", ["du", "minus"], ["shape"], axis=0),
            node("Reshape", ["x", "shape"]),
        ],
        X4,
        {"i": np.array(1, np.int64), "zero": ints(0), "minus": ints(-1)},
    ),
    "squeeze, slices (negative step too), split": (
        [
            node("Slice", ["x", "st", "en", "ax", "sp"], ["s"]),
            node("Unsqueeze", ["s", "zero"], ["u"]),
            node("Squeeze", ["u", "zero"], ["q"]),
            node("Split", ["q", "parts"], ["a", "b"], axis=3),
            node("Concat", ["b", "a"], axis=3),
        ],
        X4,
        {
            "st": ints(1, -1, 0),
            "en": ints(100, -9, 12),
            "ax": ints(1, 2, 3),
            "sp": ints(2, -2, 1),
            "zero": ints(0),
            "parts": ints(5, 7),
        },
    ),
    "pad: constant, reflect, edge": (
        [
            node("Pad", ["x", "p1", "v"], ["a"], mode="constant"),
            node("Pad", ["a", "p2"], ["b"], mode="reflect"),
            node("Pad", ["b", "p3"], mode="edge"),
        ],
        X4,
        {
            "p1": ints(0, 1, 2, 0, 0, 0, 1, 3),
            "v": np.array(0.5, np.float32),
            "p2": ints(0, 0, 1, 2, 0, 0, 2, 1),
            "p3": ints(0, 0, 0, 1, 0, 0, 3, 0),
        },
    ),
    "reduce mean, constant of shape, expand, range, cast": (
        [
            node("ReduceMean", ["x"], ["m"], axes=[1, 3], keepdims=1),
            node("ConstantOfShape", ["shape"], ["ones"], value=numpy_helper.from_array(np.array([2.0], np.float32))),
            node("Mul", ["m", "ones"], ["a"]),
            node("Expand", ["a", "big"], ["e"]),
            node("Range", ["r0", "r1", "r2"], ["r"]),
            node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
            node("Add", ["e", "rf"], ["s"]),
            node("Constant", [], ["k"], value_float=0.25),
            node("Mul", ["s", "k"]),
        ],
        X4,
        {
            "shape": ints(1, 1, 10, 1),
            "big": ints(2, 6, 10, 4),
            "r0": np.array(0, np.int64),
            "r1": np.array(8, np.int64),
            "r2": np.array(2, np.int64),
        },
    ),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["plain", "channels-last"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_operator_gives_what_onnx_runtime_gives(case: str, channels_last: bool) -> None:
    nodes, x, consts = CASES[case]
    proto = graph(nodes, x, consts)
    want = by_ort(proto, x)
    got = by_torch(proto, x, channels_last)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_every_operator_in_the_table_is_tested() -> None:
    tested = {n.op_type for nodes, _, _ in CASES.values() for n in nodes}
    assert tested == set(OPS), set(OPS) ^ tested


def test_a_graph_with_an_operator_it_does_not_run_stays_on_onnx_runtime(caplog: pytest.LogCaptureFixture) -> None:
    proto = graph([node("Round", ["x"], ["r"]), node("Relu", ["r"])], X4)
    with pytest.raises(UnsupportedGraphError, match="Round"):
        TorchGraph(proto, CPU, torch.float32, False)
    assert load_torch_graph(proto, "odd.onnx", CPU, torch.float32, False) is None
    assert "odd.onnx stays on ONNX Runtime" in caplog.text and "Round" in caplog.text


def test_constants_torch_fails_on_at_load_leave_the_graph_to_onnx_runtime(caplog: pytest.LogCaptureFixture) -> None:
    bad = graph(
        [node("Reshape", ["c", "shape"], ["r"]), node("Add", ["x", "r"])], X4, {"c": randn(6), "shape": ints(4)}
    )
    assert load_torch_graph(bad, "bad.onnx", CPU, torch.float32, False) is None
    assert "bad.onnx stays on ONNX Runtime: on torch its constants fail" in caplog.text


def test_a_node_that_would_make_a_huge_tensor_is_refused_before_it_allocates() -> None:
    """ConstantOfShape of a shape the file gives runs at load (it reads only constants): a
    hostile shape must not allocate 4 TB there."""
    huge = graph(
        [node("ConstantOfShape", ["shape"], ["z"]), node("Add", ["x", "z"])], X4, {"shape": ints(1 << 20, 1 << 20)}
    )
    with pytest.raises(UnsupportedGraphError, match="ConstantOfShape making"):
        TorchGraph(huge, CPU, torch.float32, False)


@pytest.mark.parametrize("channels_last", [False, True], ids=["plain", "channels-last"])
def test_an_mdx_net_shaped_network_gives_onnx_runtime_s_numbers(tmp_path: Path, channels_last: bool) -> None:
    """The devkit's MDX-Net layout (convolutions, batch norms, dense layers across frequency,
    transposed convolutions, skips), exported by torch: the same output to float32 rounding."""
    path = devkit.write_convtdf(tmp_path / "m.onnx", 64, 32, size="tiny", seed=3)
    proto = parse_self_contained(path.read_bytes(), path.name)
    x = randn(1, 4, 64, 32)
    want = by_ort(proto, x)
    got = by_torch(proto, x, channels_last)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


@pytest.mark.parametrize(("dtype", "bound"), [(torch.bfloat16, 0.02), (torch.float16, 0.002)], ids=["bf16", "fp16"])
def test_a_lowered_precision_stays_close_to_fp32_on_an_mdx_net_shaped_network(
    tmp_path: Path, dtype: torch.dtype, bound: float
) -> None:
    """The convolutions and matrix products in bf16 (CPUs with native bf16 run it; this one
    emulates it) or fp16 (a GPU's; here on the CPU): within ``bound`` relative L2 of fp32 on a
    random-weight network, and not the same numbers (the precision is really lowered)."""
    path = devkit.write_convtdf(tmp_path / "m.onnx", 64, 32, size="tiny", seed=3)
    proto = parse_self_contained(path.read_bytes(), path.name)
    x = randn(1, 4, 64, 32)
    exact = by_torch(proto, x)
    low = by_torch(proto, x, channels_last=True, dtype=dtype)
    error = np.linalg.norm(low - exact) / np.linalg.norm(exact)
    assert 1e-6 < error < bound, error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_dense_layer_across_frequency_in_a_lowered_precision_is_the_product_rounded_once(dtype: torch.dtype) -> None:
    """MDX-Net's dense layers (a matrix product over the last axis of a channels-last activation),
    under the CPU's autocast, run as one matrix product of the activation laid out anew: the same
    numbers as the product of the rounded inputs summed exactly and rounded once to ``dtype``, in
    the layout the next convolution takes, and the weight's transposed copy made once."""
    a = torch.randn(2, 6, 5, 12).contiguous(memory_format=torch.channels_last)
    b = torch.randn(12, 7)
    matmul = Node(node("MatMul", ["x", "w"]))
    with torch.autocast("cpu", dtype=dtype):
        got = OPS["MatMul"](matmul, [a, b])[0]
        made = matmul.cache["bT"]
        OPS["MatMul"](matmul, [a, b])
    assert matmul.cache["bT"] is made and made.dtype == dtype
    want = torch.matmul(a.to(dtype).double(), b.to(dtype).double())
    assert got.shape == (2, 6, 5, 7) and got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    # each sum (of exact products, in fp32) rounded once: half a unit in dtype's last place, plus
    # fp32's rounding of the sum's terms
    terms = torch.matmul(a.to(dtype).double().abs(), b.to(dtype).double().abs())
    bound = torch.finfo(dtype).eps / 2 * want.abs() + 1e-6 * terms
    assert torch.all((got.double() - want).abs() <= bound)

"""MDX-Net-shaped ONNX models for tests and benchmarks: the runtime contract's input and output
names and shapes (``input``: ``(batch, 4, dim_f, dim_t)`` -> ``output``: the same), with
either a simple known function (identity, a gain and a bias: to check the runtime's arithmetic)
or random weights in the layout of UVR's MDX-Net models (KUIELab's ConvTDFNet: a U-Net of
TFC-TDF blocks, each ``l`` 3x3 convolutions then a bottlenecked dense layer across frequency;
strided 2x2 convolutions down, transposed ones up, skips multiplied in) for what a real-size
model costs. Random weights separate nothing: they show the shapes, the speed and the plumbing.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

Size = Literal["tiny", "real"]


def _io(dim_f: int, dim_t: int) -> tuple[Any, Any]:
    from onnx import TensorProto, helper

    shape: list[int | str] = ["batch", 4, dim_f, dim_t]
    return (
        helper.make_tensor_value_info("input", TensorProto.FLOAT, shape),
        helper.make_tensor_value_info("output", TensorProto.FLOAT, shape),
    )


def write_affine(path: Path, dim_f: int, dim_t: int, gain: float = 1.0, bias: float = 0.0) -> Path:
    """``output = gain * input + bias`` (identity by default), built with ONNX's helper API.

    Args:
        path: the ``.onnx`` to write
        dim_f: frequency bins
        dim_t: frames
        gain: the factor on the input
        bias: the scale of a fixed random pattern added to the spectrogram (a stand-in for what a
            network adds whatever its input)
    """
    import onnx
    from onnx import helper, numpy_helper

    inp, out = _io(dim_f, dim_t)
    nodes = [
        helper.make_node("Mul", ["input", "gain"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["output"]),
    ]
    pattern = bias * np.random.default_rng(0).standard_normal((1, 4, dim_f, dim_t))
    consts = [
        numpy_helper.from_array(np.array(gain, dtype=np.float32), "gain"),
        numpy_helper.from_array(pattern.astype(np.float32), "bias"),
    ]
    graph = helper.make_graph(nodes, "mdx_affine", [inp], [out], initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


class _TfcTdf(nn.Module):
    def __init__(self, c: int, layers: int, f: int, bn: int) -> None:
        super().__init__()
        self.tfc = nn.Sequential(
            *(m for _ in range(layers) for m in (nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()))
        )
        self.tdf = nn.Sequential(
            nn.Linear(f, max(1, f // bn), bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Linear(max(1, f // bn), f, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, c, t, f]
        x = self.tfc(x)
        return x + self.tdf(x)


class ConvTdfNet(nn.Module):
    """The MDX-Net layout.

    Args:
        dim_f: frequency bins (divisible by ``2 ** levels``)
        levels: scales down and up (UVR's models: 5)
        g: channels added per scale
        layers: 3x3 convolutions per TFC block
        bn: the dense layer's bottleneck factor across frequency
    """

    def __init__(self, dim_f: int, levels: int, g: int, layers: int, bn: int) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(4, g, 1), nn.BatchNorm2d(g), nn.ReLU())
        self.down_blocks, self.downs, self.ups, self.up_blocks = (nn.ModuleList() for _ in range(4))
        f, c = dim_f, g
        for _ in range(levels):
            self.down_blocks.append(_TfcTdf(c, layers, f, bn))
            self.downs.append(nn.Sequential(nn.Conv2d(c, c + g, 2, stride=2), nn.BatchNorm2d(c + g), nn.ReLU()))
            f, c = f // 2, c + g
        self.middle = _TfcTdf(c, layers, f, bn)
        for _ in range(levels):
            self.ups.append(nn.Sequential(nn.ConvTranspose2d(c, c - g, 2, stride=2), nn.BatchNorm2d(c - g), nn.ReLU()))
            f, c = f * 2, c - g
            self.up_blocks.append(_TfcTdf(c, layers, f, bn))
        self.last = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, 4, f, t]
        x = self.first(x).transpose(-1, -2)  # frequency last: the dense layers act across it
        skips = []
        for block, down in zip(self.down_blocks, self.downs, strict=True):
            x = block(x)
            skips.append(x)
            x = down(x)
        x = self.middle(x)
        for up, block in zip(self.ups, self.up_blocks, strict=True):
            x = block(up(x) * skips.pop())
        return self.last(x.transpose(-1, -2))


SIZES: dict[Size, dict[str, int]] = {
    "tiny": {"levels": 1, "g": 8, "layers": 1, "bn": 4},
    "real": {"levels": 5, "g": 48, "layers": 3, "bn": 8},  # UVR's karaoke and de-reverb models' layout
}


def write_convtdf(path: Path, dim_f: int, dim_t: int, size: Size = "tiny", seed: int = 0) -> Path:
    """A random-weight MDX-Net-shaped model exported to ONNX (TorchScript exporter, opset 17).

    Args:
        path: the ``.onnx`` to write
        dim_f: frequency bins (divisible by 2 ** levels)
        dim_t: frames (divisible by 2 ** levels)
        size: ``tiny`` (one scale, 8 channels) or ``real`` (UVR's layout)
        seed: the weights' seed
    """
    torch.manual_seed(seed)
    net = ConvTdfNet(dim_f, **SIZES[size]).eval()
    with torch.no_grad():  # small weights: the random network's output stays in range over its depth
        for p in net.parameters():
            if p.dim() > 1:
                p.mul_(0.5)
    buffer = io.BytesIO()
    torch.onnx.export(
        net,
        (torch.zeros(1, 4, dim_f, dim_t),),
        buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to a file object too
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


def parameter_count(size: Size, dim_f: int) -> int:
    return sum(int(np.prod(p.shape)) for p in ConvTdfNet(dim_f, **SIZES[size]).parameters())

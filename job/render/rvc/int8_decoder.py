"""The RVC decoder quantized to int8 on ONNX Runtime (``COVER_DECODER=int8``, CPUs only).

For CPUs without native bf16 (AVX2 machines such as the AMD EPYCs Cloud Run may run on), where the
decoder computes in fp32 at about half the cores' FMA peak and takes four fifths of a conversion.
Built once per voice and kept under the model store's ``derived/`` folder, keyed by the
checkpoint's sha256, :data:`RECIPE` and ONNX Runtime's version:

1. the decoder's layers (everything after the NSF excitation, :meth:`Generator._layers`) are
   exported to ONNX in the plain conv1d layout, batch and time dynamic;
2. activation ranges (min/max per tensor) are calibrated on the voice's own decoder inputs for the
   reference phrase (:func:`job.render.phrase.reference_phrase`) sung at -12, 0 and +12 semitones,
   in tiles of :data:`CALIBRATION_FRAMES` frames, one tile's intermediate tensors in memory at a time;
3. weights become int8 per output channel with a 7-bit range (``reduce_range``: AVX2 CPUs without
   VNNI multiply uint8 by int8 in 16-bit sums that saturate otherwise), activations uint8 per
   tensor, in ONNX Runtime's operator format (QLinearConv and friends).

The decoder runs in the same tiles as the torch path (``Generator.decode``). Its error against the
exact fp32 path is tested (``tests/test_int8_decoder.py``) and measured by ``python -m bench.convert``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from job.render.rvc.generator import Generator
from shared.hashing import sha256_of

RECIPE = 1  # bump when export, calibration or quantisation change: old builds are then rebuilt
CALIBRATION_FRAMES = 50  # 0.5 s of output per calibration tile (the build's peak: ~1 GB over the models)
CALIBRATION_TILES = 24  # at most, spread evenly over the phrase's three renditions (build time ~1 s each)
CALIBRATION_SHIFTS = (-12, 0, 12)  # semitones the reference phrase is sung at for calibration
OPSET = 17

Prior = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # z, g, excitation (engine's prior)


class _Layers(nn.Module):
    """``Generator._layers`` with plain float32 tensors in and out (what is exported)."""

    def __init__(self, decoder: Generator) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, x: torch.Tensor, g: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder._layers(x, g, source)


def _session(path: Path, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # no busy-waiting between calls: the threads would compete with torch's for the same cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Int8Decoder:
    """A built int8 decoder: called like ``Generator._layers`` on [B, C, T] float32 tensors."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.path = path
        self.session = _session(path, threads or torch.get_num_threads())
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, x: torch.Tensor, g: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        feed = {"x": x.float().numpy(), "g": g.float().numpy()}
        if "source" in self.inputs:
            assert source is not None, "this decoder takes the NSF excitation"
            feed["source"] = source.float().numpy()
        (y,) = self.session.run(None, feed)
        return torch.from_numpy(y)


def build_key(checkpoint: Path) -> str:
    """The derived file's name for ``checkpoint``: its sha256, the recipe and ONNX Runtime's version."""
    import onnxruntime

    return f"{sha256_of(checkpoint)[:32]}-r{RECIPE}-ort{onnxruntime.__version__}.onnx"


def calibration_tiles(
    priors: Sequence[Prior], upp: int, frames: int = CALIBRATION_FRAMES, most: int = CALIBRATION_TILES
) -> list[dict[str, np.ndarray]]:
    """The decoder's inputs cut into tiles of ``frames`` (a last shorter piece is dropped), at most
    ``most`` of them, evenly spread.

    Args:
        priors: the decoder's recorded inputs
        upp: samples per frame
        frames: a tile's frames
        most: tiles at most
    """
    tiles = []
    for z, g, source in priors:
        for k in range(z.shape[0]):
            for start in range(0, z.shape[-1] - frames + 1, frames):
                tile = {"x": z[k : k + 1, :, start : start + frames].float().numpy(), "g": g[:1].float().numpy()}
                if source is not None:
                    tile["source"] = source[k : k + 1, :, start * upp : (start + frames) * upp].float().numpy()
                tiles.append(tile)
    if len(tiles) > most:
        tiles = [tiles[round(i)] for i in np.linspace(0, len(tiles) - 1, most)]
    return tiles


def build(decoder: Generator, priors: Sequence[Prior], target: Path) -> Path:
    """Export, calibrate on ``priors`` and quantise ``decoder`` into ``target`` (written atomically)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    tiles = calibration_tiles(priors, decoder.upp)
    if not tiles:
        raise ValueError(f"calibration needs at least {CALIBRATION_FRAMES} frames of decoder input")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        exported, prepared, quantised = (Path(tmp) / n for n in ("float.onnx", "prepared.onnx", "int8.onnx"))
        sample = tiles[0]
        names = list(sample)
        args = tuple(torch.from_numpy(sample[n]) for n in names)
        axes = {n: {0: "batch", 2: "time"} for n in [*names, "y"] if n != "g"}
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                _Layers(decoder).eval(),
                args,
                str(exported),
                dynamo=False,
                opset_version=OPSET,
                input_names=names,
                output_names=["y"],
                dynamic_axes=axes,
            )
        quant_pre_process(str(exported), str(prepared), skip_symbolic_shape=True)

        class Tiles(CalibrationDataReader):
            """One tile per ``CalibStridedMinMax`` step (ranges merge between steps)."""

            def __init__(self) -> None:
                self.next, self.end = 0, len(tiles)

            def __len__(self) -> int:
                return len(tiles)

            def set_range(self, start_index: int, end_index: int) -> None:
                self.next, self.end = start_index, end_index

            def get_next(self) -> dict[str, np.ndarray] | None:
                if self.next >= self.end:
                    return None
                self.next += 1
                return tiles[self.next - 1]

        quantize_static(
            str(prepared),
            str(quantised),
            Tiles(),
            quant_format=QuantFormat.QOperator,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            extra_options={"CalibStridedMinMax": 1},
        )
        os.replace(quantised, target)
    return target

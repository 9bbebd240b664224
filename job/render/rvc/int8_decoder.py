"""The RVC decoder with its first stages quantized to int8 on ONNX Runtime (``COVER_DECODER=int8``,
CPUs only).

For CPUs without native bf16 (AVX2 machines such as the AMD EPYCs Cloud Run may run on), where the
decoder computes in fp32 at about half the cores' FMA peak and takes four fifths of a conversion.
Mixed precision: the front of the decoder (its input convolution and the first
:data:`INT8_STAGES` upsampling stages with their residual blocks, :meth:`Generator.front`) runs in
int8; the rest (:meth:`Generator.back`: for a 48 kHz voice the stages at 24 and 48 kHz and the output convolution) in
torch's fp32, where the quantisation error would reach the output unshaped. Measured on the
real-size v2 48 kHz voice (docs/engine.md): the whole decoder in int8 was 0.64 of fp32's time at
3.2 dB log-spectral distance; each stage quantised alone showed the error growing toward the
output (stage 1: 0.11 dB, 2: 0.47, 3: 1.14, 4: 2.42, the output's own activations 3.1); the
first two stages in int8 are 0.77 to 0.82 of fp32's time at 0.6 dB (bf16's, accepted on the Xeon
class, is 1.0). Built once per voice and kept under the model store's ``derived/`` folder, keyed by
the checkpoint's sha256, :data:`RECIPE` and ONNX Runtime's version:

1. the decoder's front (after the NSF excitation, which it takes as an input) is exported to ONNX in
   the plain conv1d layout, batch and time dynamic;
2. activation ranges (min/max per tensor) are calibrated on the voice's own decoder inputs for the
   reference phrase (:func:`job.render.phrase.reference_phrase`) sung at -12, 0 and +12 semitones,
   in tiles of :data:`CALIBRATION_FRAMES` frames, one tile's intermediate tensors in memory at a time;
3. weights become int8 per output channel with a 7-bit range (``reduce_range``: AVX2 CPUs without
   VNNI multiply uint8 by int8 in 16-bit sums that saturate otherwise), activations uint8 per
   tensor, in ONNX Runtime's operator format (QLinearConv and friends).

The decoder runs in tiles of the fp32 path's length (``Generator.decode``). Its error against the
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

from job.render.rvc.generator import Generator, to_fast_layout
from shared.hashing import sha256_of

RECIPE = 2  # bump when export, calibration or quantisation change: old builds are then rebuilt
CALIBRATION_FRAMES = 50  # 0.5 s of output per calibration tile (the build's peak: ~1 GB over the models)
CALIBRATION_TILES = 8  # at most, spread evenly over the phrase's three renditions: 6, 12 and 24 tiles gave the same
# error on other vocals (0.59-0.60 dB) and 5.5, 6.3 and 10.6 s of build
CALIBRATION_SHIFTS = (-12, 0, 12)  # semitones the reference phrase is sung at for calibration
OPSET = 17
INT8_STAGES = 2  # upsampling stages in int8 (RVC's decoders have 4, or 5 at 32 kHz): the rest stays fp32

Prior = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # z, g, excitation (engine's prior)


class _Front(nn.Module):
    """``Generator.front`` with plain float32 tensors in and out (what is exported)."""

    def __init__(self, decoder: Generator) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, x: torch.Tensor, g: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder.front(x, g, source, INT8_STAGES)


def _session(path: Path, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # no busy-waiting between calls: the threads would compete with torch's for the same cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Int8Decoder:
    """A built int8 decoder: called like ``Generator._layers`` on [B, C, T] float32 tensors; its
    front on ONNX Runtime in int8, then ``decoder``'s back in fp32 (the fast layout)."""

    def __init__(self, path: Path, decoder: Generator, threads: int | None = None) -> None:
        self.path = path
        self.decoder = decoder
        self.session = _session(path, threads or torch.get_num_threads())
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, x: torch.Tensor, g: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        feed = {"x": x.float().numpy(), "g": g.float().numpy()}
        if "source" in self.inputs:
            assert source is not None, "this decoder takes the NSF excitation"
            feed["source"] = source.float().numpy()
        (h,) = self.session.run(None, feed)
        fast = to_fast_layout(torch.from_numpy(h), torch.float32)
        excitation = to_fast_layout(source, torch.float32) if source is not None else None
        return self.decoder.back(fast, excitation, INT8_STAGES)[:, :, 0]


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
    """Export ``decoder``'s front, calibrate it on ``priors`` and quantise it into ``target``
    (written atomically)."""
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
        axes = {n: {0: "batch", 2: "time"} for n in [*names, "h"] if n != "g"}
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                _Front(decoder).eval(),
                args,
                str(exported),
                dynamo=False,
                opset_version=OPSET,
                input_names=names,
                output_names=["h"],
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

"""MDX-Net separation (UVR's ONNX models), run with ONNX Runtime on a stem after Demucs: a karaoke
model splits the vocals into lead and backing, a de-reverb model the lead into dry voice and room.

The runtime contract is public: the model takes ``(batch, 4, dim_f, dim_t)`` float32, the left and
right channels' real and imaginary STFT parts (hop 1024, periodic Hann window of ``n_fft``, the
lowest ``dim_f`` bins), and returns its primary stem's spectrogram in the same layout. The stem is
peak-normalised, cut into chunks of ``dim_t`` frames that overlap by ``n_fft / 2`` samples at each
side; each chunk's output loses those edges (a model is unreliable there) and the kept middles
tile the song exactly. With ``denoise`` each chunk is run on ``x`` and ``-x`` and the primary is
``0.5 * (f(x) - f(-x))``: what the network adds regardless of the input's sign cancels. The
secondary stem is ``mix - primary * compensate``. A chunk whose samples all stay under -60 dBFS
(an instrumental break in a vocal stem) is not run: its primary stem is silence (with denoise,
what the network gives for silence anyway), its secondary the chunk as it is. Chunks are read
from and written to the files one at a time: memory stays that of one chunk.

The network runs on torch (by default, ``COVER_MDX_RUNTIME=auto`` with the fast kernels: on the
device, its convolutions and matrix products in the settings' precision;
:mod:`job.render.separate.onnx_graph`) or on ONNX Runtime's CPU provider in fp32 (the reference).
:attr:`MdxModel.arithmetic` says which ran; the stem cache keys the split stems by it.

Loading refuses what ONNX Runtime should never be handed: a file that does not parse
(``model.corrupt``), tensors stored outside the file (``model.unsafe``: ONNX's external data
would make the runtime read other files by path), and an input that is not the contract's shape
(``model.mismatch``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from job.render.compute import heap_buffers, precision_name
from job.render.media.audio import MIX_SAMPLE_RATE, WavReader, WavWriter
from job.render.onnx_files import parse_self_contained
from job.render.separate.mdx_params import HOP, MdxParams
from job.render.separate.onnx_graph import TorchGraph, load_torch_graph
from shared.errors import CoverError, ErrorCode

log = logging.getLogger("melodia.mdx")
ProgressFn = Callable[[float], None]
PEAK_FLOOR = 1e-6  # a silent stem is not scaled up
SILENT_CHUNK = 1e-3  # -60 dBFS: a chunk (with its edges) quieter than this is not run through the network


def check_onnx(raw: bytes, name: str, params: MdxParams) -> Any:
    """The parsed model (``onnx.ModelProto``); refused when it is malformed, stores tensors outside
    itself, or its input is not ``(batch, 4, dim_f, dim_t)`` (dimensions may be symbolic)."""
    proto = parse_self_contained(raw, name)
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) != 1 or len(proto.graph.output) < 1:
        raise CoverError(
            ErrorCode.MODEL_MISMATCH, f"{name}: expected one input and an output, got {len(inputs)} inputs"
        )
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    wanted = [None, 4, params.dim_f, params.dim_t]
    if len(dims) != 4 or any(d is not None and w is not None and d != w for d, w in zip(dims, wanted, strict=True)):
        shape = "x".join("?" if d is None else str(d) for d in dims)
        raise CoverError(
            ErrorCode.MODEL_MISMATCH,
            f"{name} takes {shape}, not batch x 4 x {params.dim_f} x {params.dim_t} (dim_f, dim_t of its parameters)",
        )
    return proto


class MdxModel:
    """One MDX-Net ONNX model, loaded once and run on stems.

    Args:
        path: the ``.onnx`` file
        params: its parameters (:mod:`job.render.separate.mdx_params`)
        threads: ONNX Runtime's intra-op threads (0: torch's thread count)
        on_torch: run the graph on torch (:mod:`job.render.separate.onnx_graph`) rather than ONNX
            Runtime; a graph with an operator torch's runner lacks stays on ONNX Runtime
        device: torch's device (``on_torch``)
        dtype: torch's compute type for the convolutions and matrix products (``on_torch``)
        channels_last: the CPU's fast layout (``on_torch``)
    """

    def __init__(
        self,
        path: Path,
        params: MdxParams,
        threads: int = 0,
        on_torch: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        self.path, self.params = path, params
        raw = path.read_bytes()
        proto = check_onnx(raw, path.name, params)
        device = device or torch.device("cpu")
        self.graph: TorchGraph | None = None
        if on_torch:
            self.graph = self._tried(load_torch_graph(proto, path.name, device, dtype, channels_last))
        if self.graph is None:
            self.session = self._session(raw, path.name, threads)
            self.input = self.session.get_inputs()[0].name
        self.window = torch.hann_window(params.n_fft, periodic=True)

    def _tried(self, graph: TorchGraph | None) -> TorchGraph | None:
        """``graph`` if it turns a chunk into the contract's shape (tried on torch's meta device:
        shapes only, no arithmetic); else None (logged), and the model runs on ONNX Runtime, which
        refuses it when it loads if it is malformed."""
        if graph is None:
            return None
        shape = (1, 4, self.params.dim_f, self.params.dim_t)
        try:
            out = graph.output_shape(shape)
        except Exception as exc:  # noqa: BLE001  # whatever torch raised: ONNX Runtime gets the model
            log.warning("%s stays on ONNX Runtime: on torch it fails (%s)", self.path.name, exc)
            return None
        if out != shape:
            log.warning("%s stays on ONNX Runtime: on torch it gives %s", self.path.name, out)
            return None
        return graph

    @staticmethod
    def _session(raw: bytes, name: str, threads: int) -> Any:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3
        # without its arena and memory pattern the de-reverb shape peaks at 2.8 GB, not 5.3 (one chunk,
        # about 3 % slower): a 6 GiB job whose work folder is in memory keeps its room
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        try:  # from the bytes: nothing else on the disk is reachable by a path inside the model
            return ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])
        except (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidProtobuf, ort_errors.NotImplemented) as exc:
            raise CoverError(ErrorCode.MODEL_CORRUPT, f"{name} does not load: {exc}") from None

    @property
    def arithmetic(self) -> str:
        """What computed the network (for the stem cache's key and the log): ``onnxruntime`` (fp32,
        the reference) or ``torch-PRECISION`` (the device does not change it)."""
        return "onnxruntime" if self.graph is None else f"torch-{precision_name(self.graph.dtype)}"

    # --- one chunk -------------------------------------------------------------------------------
    def spectrogram(self, chunk: np.ndarray) -> np.ndarray:
        """``[2, chunk]`` -> ``[4, dim_f, dim_t]``: per channel, real then imaginary part."""
        p = self.params
        spec = torch.stft(
            torch.from_numpy(chunk), p.n_fft, HOP, window=self.window, center=True, return_complex=True
        )  # [2, bins, dim_t]
        parts = torch.view_as_real(spec).permute(0, 3, 1, 2).reshape(4, -1, p.dim_t)
        return parts[:, : p.dim_f].numpy()

    def waveform(self, spec: np.ndarray) -> np.ndarray:
        """``[4, dim_f, dim_t]`` -> ``[2, chunk]`` (the bins above ``dim_f`` silent)."""
        p = self.params
        full = np.zeros((4, p.n_fft // 2 + 1, p.dim_t), dtype=np.float32)
        full[:, : p.dim_f] = spec
        parts = torch.from_numpy(full).reshape(2, 2, -1, p.dim_t).permute(0, 2, 3, 1).contiguous()
        return torch.istft(
            torch.view_as_complex(parts), p.n_fft, HOP, window=self.window, center=True, length=p.chunk
        ).numpy()

    def run(self, spec: np.ndarray) -> np.ndarray:
        batch = spec[None].astype(np.float32)
        if self.graph is not None:
            return self.graph(torch.from_numpy(batch)).cpu().numpy().reshape(spec.shape)
        out = self.session.run(None, {self.input: batch})[0]
        return np.asarray(out, dtype=np.float32).reshape(spec.shape)

    def primary_chunk(self, chunk: np.ndarray, denoise: bool) -> np.ndarray:
        """The primary stem of one normalised chunk, its edges not yet trimmed."""
        spec = self.spectrogram(chunk)
        if denoise:
            return self.waveform(0.5 * (self.run(spec) - self.run(-spec)))
        return self.waveform(self.run(spec))

    # --- whole stems -----------------------------------------------------------------------------
    def split(
        self,
        source: Path,
        primary_out: Path,
        secondary_out: Path,
        denoise: bool = False,
        progress: ProgressFn | None = None,
    ) -> tuple[Path, Path]:
        """Split the stereo float WAV ``source`` into its primary and secondary stems.

        Args:
            source: the stem to split (44.1 kHz stereo, as the separator writes it)
            primary_out: the model's own stem's WAV
            secondary_out: ``source - primary * compensate``'s WAV
            denoise: run each chunk on ``x`` and ``-x`` (twice the time)
            progress: called with the fraction done
        """
        p = self.params
        # torch on the CPU reuses its large buffers from the heap, as separation does (compute.py)
        on_cpu = self.graph is not None and self.graph.device.type == "cpu"
        with WavReader(source) as mix, heap_buffers() if on_cpu else nullcontext():
            if mix.sample_rate != MIX_SAMPLE_RATE or mix.channels != 2:
                got = f"{mix.sample_rate} Hz x {mix.channels}"
                raise CoverError(ErrorCode.INTERNAL, f"MDX-Net models take 44.1 kHz stereo, got {got}")
            peak = max(
                (float(np.abs(mix.read(a, a + (1 << 20))).max(initial=0.0)) for a in range(0, mix.frames, 1 << 20)),
                default=0.0,
            )
            scale = peak if peak > PEAK_FLOOR else 1.0
            count = -(-mix.frames // p.step)
            with (
                WavWriter(primary_out, mix.sample_rate, 2) as first,
                WavWriter(secondary_out, mix.sample_rate, 2) as second,
            ):
                for i in range(count):
                    start = i * p.step
                    window = _padded(mix, start - p.trim, p.chunk)
                    if float(np.abs(window).max(initial=0.0)) < SILENT_CHUNK:
                        primary: np.ndarray = np.zeros((2, p.step), dtype=np.float32)
                    else:
                        primary = self.primary_chunk(window / scale, denoise)[:, p.trim : p.trim + p.step] * scale
                    kept = min(p.step, mix.frames - start)
                    original = window[:, p.trim : p.trim + kept]
                    first.write(primary[:, :kept])
                    second.write(original - primary[:, :kept] * p.compensate)
                    if progress:
                        progress((i + 1) / count)
        return primary_out, secondary_out

    def split_array(self, mix: np.ndarray, work: Path, denoise: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`split` of an in-memory ``[2, n]`` array (through files in ``work``)."""
        from job.render.media.audio import read_wav, write_wav

        src = write_wav(work / "mdx-in.wav", mix.astype(np.float32), MIX_SAMPLE_RATE)
        a, b = self.split(src, work / "mdx-primary.wav", work / "mdx-secondary.wav", denoise)
        return read_wav(a)[0], read_wav(b)[0]


def _padded(reader: WavReader, start: int, length: int) -> np.ndarray:
    """``[2, length]`` from ``start`` on, zeros before the file's start and after its end."""
    out = np.zeros((reader.channels, length), dtype=np.float32)
    lo, hi = max(0, start), min(reader.frames, start + length)
    if hi > lo:
        out[:, lo - start : hi - start] = reader.read(lo, hi)
    return out

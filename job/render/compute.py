"""Where and how the neural stages compute: device, precision and kernel layout (one place for
the separator and the RVC engine; settings ``COVER_DEVICE``, ``COVER_PRECISION``, ``COVER_KERNELS``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch

from shared.errors import CoverError, ErrorCode

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
GPU_BATCH = 8  # Demucs segments / conversion chunks per call on a GPU (``batch_size``)
GIB_PER_REQUEST = 12  # a GPU runner admits one request per this much GPU memory (``in_flight``)
# ... and 3 per 8 host cores: the CPU's stages (decode, quality, mix, upload) bound its throughput
# (H200, 16 cores, 2 heavy slots: 4 / 6 / 8 in flight 10.1 / 10.8 / 10.6 covers a minute)
REQUESTS_PER_CORE = 3 / 8
MAX_IN_FLIGHT = 8
GPU_HEAVY_SLOTS = 2  # heavy stages at once on a GPU: 4 in flight 9.4 -> 10.1 covers a minute on the H200
KERNELS = ("fast", "reference")
DECODERS = ("auto", "torch", "int8")
GRAPH_RUNTIMES = ("auto", "onnxruntime", "torch")


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU; otherwise a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """A CPU with bf16 arithmetic in hardware (AVX512-BF16 or AMX), as oneDNN reports it."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute type of the heavy networks (Demucs, the RVC decoder; on the CPU's fast kernels
    HuBERT as well, :class:`job.render.rvc.engine.VoiceConverter`). ``auto``: float16 on a
    GPU (on an H200 its error against fp32 was 4 to 15 times smaller than bf16's at the same
    speed, and it is what RVC itself runs on GPUs), bfloat16 on CPUs with native bf16, float32
    elsewhere (older CPUs emulate bf16 slowly). Tolerances against fp32 are tested (docs/engine.md,
    "Quality checks for the approximations"; the GPU's own errors in bench/RESULTS-gpu.md).

    ``fp32`` on a GPU also turns TF32 off for the process (convolutions and matmuls), so the
    exact path is exact there too."""
    if precision not in PRECISIONS:
        raise CoverError(ErrorCode.OPTIONS_INVALID, f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if precision == "fp32" and device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(dtype: torch.dtype) -> str:
    """``fp32``, ``bf16`` or ``fp16``: how settings, cache keys and reports name a compute type."""
    return _NAMES[dtype]


def batch_size(setting: int, device: torch.device) -> int:
    """Segments or chunks per network call: the setting, or (0) 1 on the CPU, where a batch only
    adds memory, and :data:`GPU_BATCH` on a GPU, where one call must carry enough work to fill it."""
    if setting:
        return setting
    return 1 if device.type == "cpu" else GPU_BATCH


def requests_in_flight(setting: int, device: torch.device) -> int:
    """How many requests a runner holds at once: the setting, or (0) 1 on the CPU and on a GPU the
    least of one per :data:`GIB_PER_REQUEST` of its memory, :data:`REQUESTS_PER_CORE` per host
    core (rounded) and :data:`MAX_IN_FLIGHT`, at least 1."""
    if setting:
        return setting
    if device.type != "cuda":
        return 1
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    cores = round((os.cpu_count() or 1) * REQUESTS_PER_CORE)
    return max(1, min(MAX_IN_FLIGHT, int(total // GIB_PER_REQUEST), cores))


def heavy_slots(setting: int, device: torch.device) -> int:
    """Heavy stages (separation, conversion) allowed on the device at once: the setting, or (0) 1
    on the CPU (its cores are already all in use by one) and :data:`GPU_HEAVY_SLOTS` on a GPU (one
    request's host-side work between its kernels leaves the card idle)."""
    if setting:
        return setting
    return GPU_HEAVY_SLOTS if device.type == "cuda" else 1


def resolve_kernels(kernels: str) -> bool:
    """True for the fast layouts (channels-last), False for the reference path."""
    if kernels not in KERNELS:
        raise CoverError(ErrorCode.OPTIONS_INVALID, f"kernels must be fast or reference, not {kernels!r}")
    return kernels == "fast"


def resolve_decoder(decoder: str, device: torch.device, dtype: torch.dtype, fast: bool) -> bool:
    """True for the RVC decoder with its front in int8 on ONNX Runtime
    (``job/render/rvc/int8_decoder.py``; CPUs only), False for torch's (in the precision and kernels
    above). ``auto``: int8 on a CPU whose decoder would otherwise run in fp32 with the fast kernels
    (CPUs without native bf16: its error against the exact path is below bf16's, 0.6 dB against 1.0,
    at about 0.8 of fp32's time); torch with bf16, on a GPU and on the reference kernels (the exact
    path).

    Args:
        decoder: ``auto``, ``torch`` or ``int8``
        device: where the networks run
        dtype: the decoder's resolved compute type (:func:`resolve_precision`)
        fast: the fast kernels (:func:`resolve_kernels`)
    """
    if decoder not in DECODERS:
        raise CoverError(ErrorCode.OPTIONS_INVALID, f"decoder must be auto, torch or int8, not {decoder!r}")
    if decoder == "int8" and device.type != "cpu":
        raise CoverError(ErrorCode.OPTIONS_INVALID, f"the int8 decoder runs on the CPU only, not on {device}")
    if decoder == "auto":
        return device.type == "cpu" and dtype == torch.float32 and fast
    return decoder == "int8"


def resolve_graph_runtime(runtime: str, fast: bool) -> bool:
    """True when the MDX-Net passes' ONNX graphs run on torch (:mod:`job.render.separate.onnx_graph`:
    on the device, their convolutions and matrix products in the precision), False for ONNX
    Runtime's CPU provider in fp32 (the reference). ``auto``: torch with the fast kernels on every
    device (on the AVX2 CPU in fp32 both passes together as fast as ONNX Runtime, at a third of its
    peak memory: 1.6 to 1.9 GB against 5.5 for the de-reverb shape, measured; bf16 on CPUs with
    native bf16; fp16 on a GPU), ONNX Runtime with the reference kernels (the exact path). A graph
    with an operator torch's runner lacks stays on ONNX Runtime whatever this says.

    Args:
        runtime: ``auto``, ``onnxruntime`` or ``torch``
        fast: the fast kernels (:func:`resolve_kernels`)
    """
    if runtime not in GRAPH_RUNTIMES:
        raise CoverError(ErrorCode.OPTIONS_INVALID, f"mdx_runtime must be auto, onnxruntime or torch, not {runtime!r}")
    if runtime == "auto":
        return fast
    return runtime == "torch"


TRIM_ABOVE_BYTES = 256 * 2**20  # trim once the heap holds this much freed memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc


def release_freed_memory(above: int = TRIM_ABOVE_BYTES) -> None:
    """Hand the heap's free pages back to the system once more than ``above`` bytes of it are free
    (glibc ``malloc_trim``; a no-op elsewhere).

    Chunks of different lengths leave the heap fragmented: converting 5 minutes of vocals let peak
    RSS grow by about 4 MB per second of audio. Trimming after every chunk held it flat but cost
    about 10 % of the conversion's time (freed pages fault back in); trimming only past a quarter
    GiB of free heap keeps the bound for less (docs/performance.md)."""
    libc = _libc()
    if libc is not None and libc.mallinfo2().fordblks > above:
        libc.malloc_trim(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
GLIBC_SETTLED_MMAP = 32 * 2**20  # glibc's mmap threshold once it has adapted (its dynamic maximum) ...
GLIBC_SETTLED_TRIM = 2 * GLIBC_SETTLED_MMAP  # ... and the trim threshold it sets beside it
HEAP_BUFFERS_UP_TO = 128 * 2**20  # HTDemucs' largest activations are 33 to 66 MB
HEAP_KEEPS_UP_TO = 512 * 2**20  # freed memory kept at the heap's top meanwhile (trimmed at 128 MB, a
# segment still took 140 000 to 190 000 faults; at 512 MB, under 20 000 and the same peak RSS)


class ProcessSetting:
    """A process-wide setting held for as long as any user is inside (``with setting():``): the
    first one in applies it (:meth:`apply`), the last one out puts back what was there
    (:meth:`restore`), so concurrent users (a GPU runner's renders in flight) share it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0

    def apply(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self.apply()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self.restore()


class _HeapBuffers(ProcessSetting):
    """Buffers up to :data:`HEAP_BUFFERS_UP_TO` served from the heap, and reused once freed (up to
    :data:`HEAP_KEEPS_UP_TO` of freed memory kept), while any user is inside (``with
    heap_buffers():``); glibc's settled thresholds and a trim when the last one leaves. A no-op
    without glibc.

    glibc maps every buffer over 32 MB afresh and unmaps it when it is freed, so its pages fault in
    again, zeroed by the kernel, at each use: one HTDemucs segment (real size, 2 threads) takes
    160 000 to 330 000 page faults and 0.3 to 0.6 s of system time that way. Served from the heap,
    separation takes 14 % less time (docs/engine.md) for 20 to 50 MB more peak RSS meanwhile,
    far under the conversion's. The conversion is inside too (its decoder tiles, the harmonic
    source and HuBERT's front end: a fifth of the page faults). The quality stage and the mix are
    not: process-wide, they kept freed buffers at the peak (journal, 2026-12-06)."""

    def apply(self) -> None:
        libc = _libc()
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, HEAP_BUFFERS_UP_TO)
            libc.mallopt(M_TRIM_THRESHOLD, HEAP_KEEPS_UP_TO)

    def restore(self) -> None:
        libc = _libc()
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, GLIBC_SETTLED_MMAP)
            libc.mallopt(M_TRIM_THRESHOLD, GLIBC_SETTLED_TRIM)
            libc.malloc_trim(0)


heap_buffers = _HeapBuffers()

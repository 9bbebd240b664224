"""Where and how the neural stages compute: device, precision and kernel layout (one place for
the separator and the RVC engine; settings ``COVER_DEVICE``, ``COVER_PRECISION``, ``COVER_KERNELS``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

import torch

from shared.errors import CoverError, ErrorCode

PRECISIONS = ("auto", "fp32", "bf16")
KERNELS = ("fast", "reference")


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
    """The compute type of the heavy networks (Demucs, the RVC decoder). ``auto``: bfloat16 on
    CPUs with native bf16, float32 elsewhere (older CPUs emulate bf16 slowly; GPUs keep fp32 until
    measured on one). Tolerances against fp32 are tested (README, "Performance")."""
    if precision not in PRECISIONS:
        raise CoverError(ErrorCode.OPTIONS_INVALID, f"precision must be auto, fp32 or bf16, not {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def resolve_kernels(kernels: str) -> bool:
    """True for the fast layouts (channels-last), False for the reference path."""
    if kernels not in KERNELS:
        raise CoverError(ErrorCode.OPTIONS_INVALID, f"kernels must be fast or reference, not {kernels!r}")
    return kernels == "fast"


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
    GiB of free heap keeps the bound for less (README, "Performance")."""
    libc = _libc()
    if libc is not None and libc.mallinfo2().fordblks > above:
        libc.malloc_trim(0)

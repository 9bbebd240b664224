"""Where and how the neural stages compute: device, precision and kernel layout (one place for
the separator and the RVC engine; settings ``COVER_DEVICE``, ``COVER_PRECISION``, ``COVER_KERNELS``).
"""

from __future__ import annotations

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
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and \
        bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


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

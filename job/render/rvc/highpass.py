"""The conversion's input high-pass (RVC's 5th-order 48 Hz Butterworth, forward and backward),
run a block at a time into one float32 array.

``scipy.signal.sosfiltfilt`` over the whole input holds the signal in float64 four times at once
(its copy, the padded copy, the forward pass and the reversed pass): 183 MB above the input for
10 minutes at 16 kHz. Here the forward pass runs block by block with its state carried from one
block to the next (the recursion is the same, so its numbers are sosfiltfilt's), its result is kept
in the float32 output array, and the backward pass runs over that array from the end, in place.
The one difference from sosfiltfilt is that rounding of the forward pass to float32: the result is
within float32 rounding of sosfiltfilt's (tested). The edges are sosfiltfilt's: odd extension by
its default pad length, each pass started from the filter's steady state for its first sample.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import butter, sosfilt, sosfilt_zi

HIGHPASS_HZ = 48.0
BLOCK = 1 << 18  # samples per block (16 s at 16 kHz): 2 MB of float64 at a time

__all__ = ["HIGHPASS_HZ", "highpass", "highpass_sos", "pad_length"]


def highpass_sos(sample_rate: int) -> np.ndarray:
    return np.asarray(butter(5, HIGHPASS_HZ, btype="high", fs=sample_rate, output="sos"))


def pad_length(sos: np.ndarray) -> int:
    """sosfiltfilt's default odd-extension length for ``sos``."""
    taps = 2 * len(sos) + 1 - min(int((sos[:, 2] == 0).sum()), int((sos[:, 5] == 0).sum()))
    return 3 * taps


def highpass(x: np.ndarray, sample_rate: int, out: np.ndarray | None = None) -> np.ndarray:
    """``x`` (1-D) high-passed forward and backward into ``out`` (float32, ``len(x)`` samples; a
    new array by default; ``x`` itself is allowed). Signals no longer than the pad are returned as
    they are (sosfiltfilt refuses them)."""
    n = len(x)
    y = np.empty(n, dtype=np.float32) if out is None else out
    sos = highpass_sos(sample_rate)
    edge = pad_length(sos)
    if n <= edge:
        y[:] = x
        return y
    zi = sosfilt_zi(sos)  # [sections, 2]: the state for a unit step
    first, last = x[: edge + 1].astype(np.float32), x[-edge - 1 :].astype(np.float32)
    left = 2 * first[0] - first[edge:0:-1]  # odd extension, in the input's float32 as sosfiltfilt makes it
    right = 2 * last[-1] - last[-2::-1]

    state = zi * np.float64(left[0])
    _, state = sosfilt(sos, left.astype(np.float64), zi=state)
    for start in range(0, n, BLOCK):
        block, state = sosfilt(sos, x[start : start + BLOCK].astype(np.float64), zi=state)
        y[start : start + BLOCK] = block
    tail, _ = sosfilt(sos, right.astype(np.float64), zi=state)  # the forward pass over the right pad

    state = zi * tail[-1]
    _, state = sosfilt(sos, tail[::-1], zi=state)
    for end in range(n, 0, -BLOCK):
        start = max(0, end - BLOCK)
        block, state = sosfilt(sos, y[start:end][::-1].astype(np.float64), zi=state)
        y[start:end] = block[::-1]
    return y

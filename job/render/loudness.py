"""Loudness and true peak in numpy, as ITU-R BS.1770-4 / EBU R128 define them.

* Integrated loudness (LUFS): K-weighting (a high shelf and a high-pass, each a biquad designed
  for the signal's rate from the standard's analog constants), mean square per channel over 400 ms
  blocks every 100 ms, the absolute gate at -70 LUFS and the relative gate 10 LU below the gated
  mean.
* True peak (dBTP): the largest magnitude of the signal interpolated to 4x its rate (a 96-tap
  windowed-sinc interpolator, 24 taps per phase). :func:`peak_envelope` gives it per sample, which
  is what the limiter works from.

The mix stage measures and limits with these before its single encode; FFmpeg's ``ebur128``
meter checks the encoded file in the tests (they agree within 0.1 LU and 0.2 dB there).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.signal import firwin, lfilter

ABSOLUTE_GATE_LUFS = -70.0
RELATIVE_GATE_LU = -10.0
BLOCK_S = 0.4
STEP_S = 0.1
OVERSAMPLE = 4
TAPS_PER_PHASE = 24
SHELF_HZ, SHELF_GAIN_DB, SHELF_Q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
HIGHPASS_HZ, HIGHPASS_Q = 38.13547087602444, 0.5003270373238773


def _k_weighting(rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The two K-weighting biquads (b, a) at ``rate``, by the bilinear transform."""
    k = math.tan(math.pi * SHELF_HZ / rate)
    vh = 10 ** (SHELF_GAIN_DB / 20)
    vb = vh**0.4996667741545416
    a0 = 1 + k / SHELF_Q + k * k
    shelf_b = np.array([vh + vb * k / SHELF_Q + k * k, 2 * (k * k - vh), vh - vb * k / SHELF_Q + k * k]) / a0
    shelf_a = np.array([1.0, 2 * (k * k - 1) / a0, (1 - k / SHELF_Q + k * k) / a0])
    k = math.tan(math.pi * HIGHPASS_HZ / rate)
    a0 = 1 + k / HIGHPASS_Q + k * k
    high_b = np.array([1.0, -2.0, 1.0])
    high_a = np.array([1.0, 2 * (k * k - 1) / a0, (1 - k / HIGHPASS_Q + k * k) / a0])
    return [(shelf_b, shelf_a), (high_b, high_a)]


def integrated_lufs(audio: np.ndarray, rate: int) -> float:
    """Integrated loudness of ``[channels, samples]`` (front channels, weight 1 each); -inf for
    silence or audio shorter than one block."""
    step = int(STEP_S * rate)
    per_block = int(BLOCK_S / STEP_S)
    steps = audio.shape[-1] // step
    if steps < per_block:
        return float("-inf")
    energy = np.zeros(steps)
    filters = _k_weighting(rate)
    block = step * 256  # whole steps, filtered a block at a time with the filters' state carried
    for channel in np.atleast_2d(audio):
        state = [np.zeros(2) for _ in filters]
        for start in range(0, steps * step, block):
            weighted = np.asarray(channel[start : min(start + block, steps * step)], dtype=np.float64)
            for k, (b, a) in enumerate(filters):
                weighted, state[k] = lfilter(b, a, weighted, zi=state[k])
            energy[start // step : start // step + len(weighted) // step] += (
                np.square(weighted).reshape(-1, step).mean(axis=1)
            )
    # 400 ms blocks overlapping by 75 %: the mean of four consecutive 100 ms steps
    blocks = np.convolve(energy, np.full(per_block, 1 / per_block), mode="valid")
    with np.errstate(divide="ignore"):
        loudness = -0.691 + 10 * np.log10(blocks)
    gated = blocks[loudness > ABSOLUTE_GATE_LUFS]
    if gated.size == 0:
        return float("-inf")
    relative = -0.691 + 10 * math.log10(gated.mean()) + RELATIVE_GATE_LU
    kept = blocks[loudness > max(relative, ABSOLUTE_GATE_LUFS)]
    return float(-0.691 + 10 * math.log10(kept.mean()))


@lru_cache(maxsize=1)
def _interpolator() -> np.ndarray:
    """``[OVERSAMPLE, TAPS_PER_PHASE]``: the polyphase branches of a 4x interpolation filter."""
    taps = firwin(OVERSAMPLE * TAPS_PER_PHASE, 1 / OVERSAMPLE, window=("kaiser", 5.0)) * OVERSAMPLE
    return taps.reshape(TAPS_PER_PHASE, OVERSAMPLE).T.copy()


def peak_envelope(audio: np.ndarray, block: int = 1 << 20) -> np.ndarray:
    """``[samples]`` float32: per sample, the largest magnitude over the channels and the 4x
    interpolated points from that sample to the next (aligned to within a sample)."""
    audio = np.atleast_2d(audio)
    n = audio.shape[-1]
    phases = _interpolator()
    delay = TAPS_PER_PHASE // 2  # the interpolator's delay, in input samples
    out = np.zeros(n, dtype=np.float32)
    for start in range(0, n, block):
        lo, hi = max(0, start - TAPS_PER_PHASE), min(n, start + block + TAPS_PER_PHASE)
        peak = np.zeros(hi - lo, dtype=np.float32)
        for channel in audio:
            x = np.asarray(channel[lo:hi], dtype=np.float32)
            np.maximum(peak, np.abs(x), out=peak)
            for branch in phases:
                y = np.convolve(x, branch.astype(np.float32))[delay : delay + len(x)]
                np.maximum(peak, np.abs(y), out=peak)
        end = min(n, start + block)
        out[start:end] = peak[start - lo : start - lo + end - start]
    return out


def true_peak_dbtp(audio: np.ndarray) -> float:
    """True peak of ``[channels, samples]`` in dBTP (-inf for silence)."""
    peak = float(peak_envelope(audio).max(initial=0.0))
    return 20 * math.log10(peak) if peak > 0 else float("-inf")

"""A look-ahead true-peak limiter, vectorised (no per-sample Python loop).

From the signal's true-peak envelope (:func:`job.render.mix.loudness.peak_envelope`) it computes one
gain per sample, shared by the channels, that keeps every interpolated peak under the ceiling:

1. the gain each sample needs, ``min(1, ceiling / peak)``;
2. attack with look-ahead: the smallest gain needed over the last ``ATTACK_S``, averaged over the
   next ``ATTACK_S``, so the gain ramps down before a peak, is down when it arrives, and is never
   above what any sample needs;
3. release: the attenuation ``1 - gain`` decays no faster than exponentially with time constant
   ``RELEASE_S`` (as in FFmpeg's ``alimiter``: deep reductions recover quickly, so dense material
   can still be made loud), computed as a running maximum in the log domain:
   ``log a[n] = max_j (log a_needed[j] + (n - j) log beta)``.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import minimum_filter1d, uniform_filter1d

ATTACK_S = 0.002  # look-ahead: the gain starts falling this long before a peak
RELEASE_S = 0.05  # time constant of the gain's return after a peak
BLOCK = 1 << 20


class Limiter:
    """The limiter run a block at a time: :meth:`gains` takes each block's envelope with
    :attr:`context` samples of its neighbours on either side (fewer only at the signal's ends) and
    carries the release from block to block, so the gains are those of :func:`limiter_gain` on
    the whole signal and memory is a block's."""

    def __init__(self, ceiling: float, rate: int) -> None:
        self.ceiling = ceiling
        self.attack = max(1, int(ATTACK_S * rate))
        self.context = 2 * (self.attack + 1) + 2  # the reach of the two look-ahead filters
        self.log_beta = -1.0 / (RELEASE_S * rate)  # the release, per sample
        self.position = 0  # the next block's first sample, counted from the signal's start
        self.carry = -np.inf  # the running maximum of (attenuation[j] - j * log_beta) so far

    def gains(self, envelope: np.ndarray, lead: int, length: int) -> np.ndarray:
        """``[length]`` float32 gains (<= 1) for ``envelope[lead : lead + length]``, the next block."""
        needed = np.minimum(1.0, self.ceiling / np.maximum(envelope, 1e-12)).astype(np.float32)
        attack = self.attack
        # held[j]: the least gain needed over the last `attack` samples; smooth[n]: the mean of held
        # over the next `attack` samples. Every held[j] averaged into smooth[n] covers n, so smooth
        # never exceeds what a sample needs, and it ramps down over `attack` samples before a peak
        # and back up over `attack` after it (then the release takes over).
        held = minimum_filter1d(needed, size=attack + 1, origin=attack // 2, mode="nearest")
        smooth = uniform_filter1d(held, size=attack + 1, origin=-(attack // 2), mode="nearest")
        smooth = np.minimum(smooth[lead : lead + length], needed[lead : lead + length])
        with np.errstate(divide="ignore"):
            attenuation = np.log(np.maximum(1.0 - smooth.astype(np.float64), 0.0))  # -inf where none
        out = np.empty(length, dtype=np.float32)
        for start in range(0, length, BLOCK):
            stop = min(length, start + BLOCK)
            decay = np.arange(self.position + start, self.position + stop, dtype=np.float64) * self.log_beta
            running = np.maximum.accumulate(np.maximum(attenuation[start:stop] - decay, self.carry))
            self.carry = running[-1]
            out[start:stop] = 1.0 - np.exp(running + decay)
        self.position += length
        return np.minimum(out, smooth)


def limiter_gain(envelope: np.ndarray, ceiling: float, rate: int) -> np.ndarray:
    """``[samples]`` float32 gains (<= 1) that keep ``envelope * gain`` under ``ceiling`` (linear)."""
    return Limiter(ceiling, rate).gains(envelope, 0, len(envelope))

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
from collections.abc import Iterable, Iterator
from functools import lru_cache

import numpy as np
from scipy.signal import firwin, sosfilt

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


class LoudnessMeter:
    """Integrated loudness of a signal fed a block at a time (``[channels, samples]`` blocks of any
    length): the K-weighting filters carry their state across blocks, and what is kept is one
    energy per 100 ms step (a 10-minute song: 6,000 numbers), so memory does not grow with the
    length. A trailing partial step is left out, as in :func:`integrated_lufs`."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.step = int(STEP_S * rate)
        # both biquads as one second-order-sections cascade: half the time of two lfilter calls
        self._sections = np.array([np.concatenate([b, a]) for b, a in _k_weighting(rate)])
        self._state: np.ndarray | None = None  # [sections, channels, 2]
        self._pending = np.zeros(0)  # weighted power (summed over channels) of the unfinished step
        self._energy: list[np.ndarray] = []

    def add(self, block: np.ndarray) -> None:
        block = np.atleast_2d(block)
        if self._state is None:
            self._state = np.zeros((len(self._sections), block.shape[0], 2))
        weighted, self._state = sosfilt(self._sections, block, axis=-1, zi=self._state)
        power = np.concatenate([self._pending, np.square(weighted).sum(axis=0)])
        whole = len(power) // self.step * self.step
        self._energy.append(power[:whole].reshape(-1, self.step).mean(axis=1))
        self._pending = power[whole:]

    def steps(self) -> np.ndarray:
        """The K-weighted energy of each whole 100 ms step added so far (summed over channels)."""
        return np.concatenate(self._energy) if self._energy else np.zeros(0)

    def integrated(self) -> float:
        """LUFS over everything added; -inf for silence or less than one 400 ms block."""
        return gated_loudness(self.steps())


def gated_loudness(energy: np.ndarray) -> float:
    """Integrated loudness (LUFS) from a signal's 100 ms steps' energies (:meth:`LoudnessMeter.steps`,
    of the whole signal or its stretches' in order); -inf for silence or less than one 400 ms block."""
    per_block = int(BLOCK_S / STEP_S)
    if len(energy) < per_block:
        return float("-inf")
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


def integrated_lufs(audio: np.ndarray, rate: int, block: int = 1 << 18) -> float:
    """Integrated loudness of ``[channels, samples]`` (front channels, weight 1 each); -inf for
    silence or audio shorter than one block."""
    meter = LoudnessMeter(rate)
    audio = np.atleast_2d(audio)
    for start in range(0, audio.shape[-1], block):
        meter.add(audio[:, start : start + block])
    return meter.integrated()


@lru_cache(maxsize=1)
def _interpolator() -> np.ndarray:
    """``[OVERSAMPLE, TAPS_PER_PHASE]``: the polyphase branches of a 4x interpolation filter."""
    taps = firwin(OVERSAMPLE * TAPS_PER_PHASE, 1 / OVERSAMPLE, window=("kaiser", 5.0)) * OVERSAMPLE
    return taps.reshape(TAPS_PER_PHASE, OVERSAMPLE).T.copy()


STRETCH = 1 << 16  # input samples interpolated at a time: the working arrays stay in cache


def _interpolated_peak(x: np.ndarray, peak: np.ndarray) -> None:
    """``peak = max(peak, |x|, |each of x's 4x interpolated points|)``, ``x`` zero beyond its ends.

    Each branch as 24 scaled, shifted copies of the input added up a cache-sized stretch at a time
    (one thread, no BLAS, no temporaries the size of the input) rather than ``np.convolve``:
    2^20 samples 140 -> 44 ms on the AMD EPYC, the same numbers within 1e-6."""
    delay = TAPS_PER_PHASE // 2  # the interpolator's delay, in input samples
    padded = np.concatenate([np.zeros(delay - 1, np.float32), x, np.zeros(delay, np.float32)])
    taps = _interpolator().astype(np.float32)[:, ::-1]  # taps[p, i] weighs padded[m + i] for point m
    np.maximum(peak, np.abs(x), out=peak)
    point, term = np.empty(min(STRETCH, len(x)), np.float32), np.empty(min(STRETCH, len(x)), np.float32)
    for start in range(0, len(x), STRETCH):
        m = min(STRETCH, len(x) - start)
        out, tmp, stretch = point[:m], term[:m], peak[start : start + m]
        for branch in taps:
            np.multiply(padded[start : start + m], branch[0], out=out)
            for i in range(1, TAPS_PER_PHASE):
                np.multiply(padded[start + i : start + i + m], branch[i], out=tmp)
                np.add(out, tmp, out=out)
            np.abs(out, out=out)
            np.maximum(stretch, out, out=stretch)


def peak_envelope(audio: np.ndarray, block: int = 1 << 20) -> np.ndarray:
    """``[samples]`` float32: per sample, the largest magnitude over the channels and the 4x
    interpolated points from that sample to the next (aligned to within a sample)."""
    audio = np.atleast_2d(audio)
    n = audio.shape[-1]
    out = np.zeros(n, dtype=np.float32)
    for start in range(0, n, block):
        lo, hi = max(0, start - TAPS_PER_PHASE), min(n, start + block + TAPS_PER_PHASE)
        peak = np.zeros(hi - lo, dtype=np.float32)
        for channel in audio:
            _interpolated_peak(np.asarray(channel[lo:hi], dtype=np.float32), peak)
        end = min(n, start + block)
        out[start:end] = peak[start - lo : start - lo + end - start]
    return out


def windows(blocks: Iterable[np.ndarray], context: int) -> Iterator[tuple[np.ndarray, int, int]]:
    """Each ``[channels, samples]`` block of a signal with up to ``context`` samples of its
    neighbours on either side (fewer only at the signal's ends), as ``(window, lead, length)``: the
    block is ``window[:, lead : lead + length]``. Every block but the last must be at least
    ``context`` long."""
    previous: np.ndarray | None = None
    current: np.ndarray | None = None
    for block in blocks:
        if current is not None:
            yield _window(previous, current, block, context)
        previous, current = current, block
    if current is not None:
        yield _window(previous, current, None, context)


def _window(
    previous: np.ndarray | None, current: np.ndarray, following: np.ndarray | None, context: int
) -> tuple[np.ndarray, int, int]:
    before = previous[:, previous.shape[-1] - context :] if previous is not None and context else current[:, :0]
    after = following[:, :context] if following is not None else current[:, :0]
    return np.concatenate([before, current, after], axis=1), before.shape[-1], current.shape[-1]


def envelope_windows(blocks: Iterable[np.ndarray], context: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """``(block, envelope, lead)`` for each block of a signal: the true-peak envelope of the block
    with ``context`` samples either side (fewer only at the signal's ends), ``envelope[lead]``
    being the block's first sample's, the same numbers :func:`peak_envelope` gives for the whole
    signal there. Memory is a block's."""
    pad = context + TAPS_PER_PHASE  # the interpolator's reach beyond the envelope that is kept
    for window, lead, length in windows(blocks, pad):
        envelope = peak_envelope(window)
        lo = lead - context if lead == pad else 0  # a neighbour before, or the signal's start
        tail = window.shape[-1] - lead - length
        hi = lead + length + (context if tail == pad else tail)
        yield window[:, lead : lead + length], envelope[lo:hi], lead - lo


def window_true_peak(window: np.ndarray, lead: int, length: int, floor: float = 0.0) -> float:
    """The largest true peak of ``window[:, lead : lead + length]`` (what :func:`peak_envelope` of
    the whole signal gives there; the window carries :data:`TAPS_PER_PHASE` samples of context
    where the signal has them), or ``floor`` if it is not above it. Stretches whose sample peak
    times the interpolator's largest gain cannot pass the floor are not interpolated: on most
    material the first loud stretch sets the floor and the rest are only scanned."""
    bound = float(np.abs(_interpolator()).sum(axis=1).max())  # |interpolated point| <= bound * max|x|
    best = floor
    for start in range(lead, lead + length, STRETCH):
        stop = min(lead + length, start + STRETCH)
        lo, hi = max(0, start - TAPS_PER_PHASE), min(window.shape[-1], stop + TAPS_PER_PHASE)
        if float(np.abs(window[:, lo:hi]).max(initial=0.0)) * max(1.0, bound) <= best:
            continue
        best = max(best, float(peak_envelope(window[:, lo:hi])[start - lo : stop - lo].max()))
    return best


def true_peak_dbtp(audio: np.ndarray) -> float:
    """True peak of ``[channels, samples]`` in dBTP (-inf for silence)."""
    peak = float(peak_envelope(audio).max(initial=0.0))
    return 20 * math.log10(peak) if peak > 0 else float("-inf")

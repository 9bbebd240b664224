"""The mix's own scores, measured as it is rendered: clipping, silence and the report page's waveform."""

from __future__ import annotations

import numpy as np

from job.render.media.audio import levels as level_scale
from shared.quality import MixScores


def _round(value: float, digits: int = 4) -> float:
    return round(value, digits) if np.isfinite(value) else 0.0


class MixMeter:
    """The mix's clipping, silence and waveform, fed a block at a time (``[channels, samples]``
    blocks of a signal ``length`` samples long, in order), so the mix never has to be whole in
    memory: clipped samples are counted, 50 ms blocks' powers reduced to a count of silent ones,
    and the waveform kept as the peak of each of ``columns`` equal stretches."""

    def __init__(self, length: int, rate: int, columns: int = 1000) -> None:
        self.block = max(1, int(0.05 * rate))
        self.whole = length // self.block * self.block  # a trailing partial 50 ms block is left out
        self.edges = np.linspace(0, length, min(columns, length) + 1).astype(int)
        self.columns = np.zeros(len(self.edges) - 1)
        self.energy = np.zeros(len(self.edges) - 1)  # each column's sum of squares (channels averaged)
        self.counts = np.zeros(len(self.edges) - 1)
        self.position = self.clipped = self.samples = self.silent = self.blocks = 0
        self._pending = np.zeros(0)  # the unfinished 50 ms block's per-sample powers

    def add(self, block: np.ndarray) -> None:
        stereo = np.atleast_2d(block)
        n = stereo.shape[-1]
        if n == 0:
            return
        magnitude = np.abs(stereo).max(axis=0)
        self.clipped += int(np.count_nonzero(np.abs(stereo) >= 0.999))
        power = np.mean(np.square(stereo, dtype=np.float64), axis=0)  # per sample, over the channels
        self.samples += stereo.size
        # waveform: each sample's column, then the largest magnitude per column
        first = int(np.searchsorted(self.edges, self.position, side="right")) - 1
        last = int(np.searchsorted(self.edges, self.position + n - 1, side="right")) - 1
        starts = np.maximum(self.edges[first : last + 1], self.position) - self.position
        columns = np.arange(first, last + 1)
        np.maximum.at(self.columns, columns, np.maximum.reduceat(magnitude, starts))
        np.add.at(self.energy, columns, np.add.reduceat(power, starts))
        np.add.at(self.counts, columns, np.diff(np.append(starts, n)))
        # 50 ms blocks: the same per-sample powers, averaged, counted as silent under -60 dB
        usable = np.concatenate([self._pending, power[: max(0, min(n, self.whole - self.position))]])
        full = len(usable) // self.block * self.block
        blocks = np.mean(usable[:full].reshape(-1, self.block), axis=-1)
        self.silent += int(np.count_nonzero(10 * np.log10(np.maximum(blocks, 1e-20)) < -60))
        self.blocks += len(blocks)
        self._pending = usable[full:].copy()
        self.position += n

    def scores(self, loudness_lufs: float, true_peak_dbtp: float) -> MixScores:
        """Clipping and silence of what was fed, with its loudness and true peak."""
        return MixScores(
            loudness_lufs=round(loudness_lufs, 2),
            true_peak_dbtp=round(true_peak_dbtp, 2),
            clipped_share=_round(self.clipped / max(1, self.samples), 6) or 0.0,
            silent_share=_round(self.silent / self.blocks if self.blocks else 0.0) or 0.0,
        )

    def levels(self) -> list[float]:
        """The RMS level of each stretch on the report page's scale (-60 to 0 dBFS as 0 to 1)."""
        return level_scale(self.energy, self.counts)

    def peaks(self) -> list[float]:
        """The peak of each stretch (either channel), 0 to 1: the report page's waveform."""
        return [round(float(min(1.0, peak)), 3) for peak in self.columns]


def _metered(audio: np.ndarray, rate: int, columns: int = 1000, block: int = 1 << 20) -> MixMeter:
    stereo = np.atleast_2d(audio)
    meter = MixMeter(stereo.shape[-1], rate, columns)
    for start in range(0, stereo.shape[-1], block):
        meter.add(stereo[:, start : start + block])
    return meter


def waveform_peaks(audio: np.ndarray, columns: int = 1000) -> list[float]:
    """The peak of each of ``columns`` equal stretches of ``audio`` (either channel), 0 to 1."""
    return _metered(audio, 1, columns).peaks()


def waveform_levels(audio: np.ndarray, columns: int = 1000) -> list[float]:
    """The RMS level of each of ``columns`` equal stretches of ``audio`` (channels averaged), -60 to
    0 dBFS as 0 to 1: what the mix keeps for the report page, a block at a time."""
    return _metered(audio, 1, columns).levels()


def mix_scores(audio: np.ndarray, rate: int, loudness_lufs: float, true_peak_dbtp: float) -> MixScores:
    """Clipping and silence of the final mix (before encoding), with its loudness and true peak.

    Args:
        audio: the final mix before encoding, ``[channels, samples]``
        rate: its sample rate
        loudness_lufs: its integrated loudness, measured by the mix
        true_peak_dbtp: its true peak, measured by the mix
    """
    return _metered(audio, rate).scores(loudness_lufs, true_peak_dbtp)

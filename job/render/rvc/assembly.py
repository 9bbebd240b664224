"""The converted chunks put together into the output as they finish, and written out as soon as
they are final.

The engine converts a song chunk by chunk, in order; each chunk's audio overlaps its neighbours'
by a 40 ms crossfade. :class:`Assembler` adds each chunk into a buffer that starts where the
output is not final yet, applies RVC's loudness envelope (``rms_mix_rate``) once the 1 s windows
around a stretch are complete, clips, and hands the finished samples to a sink: a WAV file for a
cover, an array for a short conversion. Memory is a chunk's audio and about a second more, where
the output held whole is 115 MB for 10 minutes at 48 kHz. The numbers are those of assembling the
whole output first and then applying the envelope (:func:`mix_rms`): the same sums over the same
samples (tested bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Sink = Callable[[np.ndarray], None]  # takes the next finished float32 samples

__all__ = ["ArraySink", "Assembler", "Sink", "frame_rms", "mix_rms"]


def _hop_sums(x: np.ndarray, hop: int) -> np.ndarray:
    """Sum of squares over each ``hop`` samples of ``x`` (zero-padded to whole hops), in float64."""
    seg = x.astype(np.float64)
    seg = np.pad(seg, (0, -len(seg) % hop))
    return np.square(seg).reshape(-1, hop).sum(axis=1)


def _rms_frames(sums: np.ndarray, hop: int) -> np.ndarray:
    """RMS over the 1 s windows centred on each hop boundary, from the hops' sums (the last one 0)."""
    windows = sums + np.concatenate([[0.0], sums[:-1]])  # hops k-1 and k around centre k
    return np.sqrt(windows / (2 * hop)).astype(np.float32)


def frame_rms(x: np.ndarray, sample_rate: int) -> np.ndarray:
    """RMS over 1 s windows centred every 0.5 s (frame k at k * 0.5 s), computed block by block."""
    hop = sample_rate // 2
    n_hops = -(-len(x) // hop)
    sums = np.zeros(n_hops + 1, dtype=np.float64)
    block = 32 * hop  # 16 s: 6 MB of float64 at 48 kHz (512 hops held 190 MB at once; the sums are the same)
    for start in range(0, len(x), block):
        part = _hop_sums(x[start : start + block], hop)
        sums[start // hop : start // hop + len(part)] = part
    return _rms_frames(sums, hop)


def _gains(source_rms: np.ndarray, output_rms: np.ndarray, rate: float) -> np.ndarray:
    res = np.maximum(output_rms, 1e-6)
    k = min(len(source_rms), len(res))
    return (source_rms[:k].astype(np.float64) ** (1 - rate)) * (res[:k].astype(np.float64) ** (rate - 1))


def _apply_gain(out: np.ndarray, start: int, gain: np.ndarray, hop: int) -> None:
    """Scale ``out`` (the output from sample ``start`` on) by ``gain`` (one per hop boundary),
    interpolated linearly between boundaries and held after the last."""
    block = 1 << 20
    for at in range(0, len(out), block):
        positions = np.arange(start + at, start + min(len(out), at + block)) / hop
        out[at : at + block] *= np.interp(positions, np.arange(len(gain)), gain).astype(np.float32)


def mix_rms(out: np.ndarray, out_rate: int, source: np.ndarray, source_rate: int, rate: float) -> None:
    """RVC's ``rms_mix_rate`` over a whole output: give ``out`` (in place) the source's loudness
    envelope to the power 1 - rate; rate 1 keeps the output's own envelope. The whole-array form,
    kept as the reference :class:`Assembler` is tested against.

    Args:
        out: the converted audio, changed in place
        out_rate: its sample rate
        source: the source audio
        source_rate: its sample rate
        rate: RVC's ``rms_mix_rate``
    """
    gain = _gains(frame_rms(source, source_rate), frame_rms(out, out_rate), rate)
    _apply_gain(out, 0, gain, out_rate // 2)


class ArraySink:
    """A sink into one preallocated array of the output's length."""

    def __init__(self, frames: int) -> None:
        self.audio = np.zeros(frames, dtype=np.float32)
        self.at = 0

    def __call__(self, block: np.ndarray) -> None:
        self.audio[self.at : self.at + len(block)] = block
        self.at += len(block)


class Assembler:
    """The output of ``length`` samples at ``rate``, assembled from chunks added in order.

    ``add(start, piece)`` adds a chunk's samples at ``start``; ``final(position)`` says that
    nothing will be added before ``position`` any more; ``close()`` writes the rest. With
    ``envelope`` (the source's :func:`frame_rms` and ``rms_mix_rate``), the loudness envelope is
    applied as in :func:`mix_rms`. Samples from ``limit`` on stay silent. Every sample is clipped to
    [-1, 1] and goes to ``sink`` exactly once, in order."""

    def __init__(
        self,
        sink: Sink,
        length: int,
        rate: int,
        envelope: tuple[np.ndarray, float] | None = None,
        limit: int | None = None,
    ) -> None:
        self.sink, self.length, self.hop = sink, length, rate // 2
        self.limit = length if limit is None else min(length, limit)
        self.envelope = envelope
        self.base = 0  # the buffer holds samples [base, base + len(buffer)) before the envelope
        self.buffer = np.zeros(0, dtype=np.float32)
        self.done = 0  # samples before this are final (nothing more is added to them)
        self.sums: list[np.ndarray] = []  # the hops' sums of squares, as the final samples complete them
        self.summed = 0  # samples summed so far (whole hops until the end)

    def add(self, start: int, piece: np.ndarray) -> None:
        end = min(self.limit, start + len(piece))
        if end <= start:
            return
        if start < self.done:
            raise ValueError(f"sample {start} was already final (up to {self.done})")
        self._reach(end)
        self.buffer[start - self.base : end - self.base] += piece[: end - start]

    def final(self, position: int) -> None:
        position = min(self.length, position)
        if position <= self.done:
            return
        self._reach(position)  # silence up to there if nothing was added
        self.done = position
        self._emit()

    def close(self) -> None:
        self.final(self.length)

    def _reach(self, end: int) -> None:
        """Grow the buffer with silence to hold the samples before ``end``."""
        if end > self.base + len(self.buffer):
            grown = np.zeros(end - self.base, dtype=np.float32)
            grown[: len(self.buffer)] = self.buffer
            self.buffer = grown

    def _emit(self) -> None:
        if self.envelope is None:
            self._write(self.done - self.base)
            return
        source_rms, rate = self.envelope
        at_end = self.done == self.length
        whole = (self.done // self.hop) * self.hop if not at_end else self.done
        if whole > self.summed:
            self.sums.append(_hop_sums(self.buffer[self.summed - self.base : whole - self.base], self.hop))
            self.summed = whole
        sums = np.concatenate(self.sums) if self.sums else np.zeros(0)
        if at_end:
            sums = np.append(sums, 0.0)
        # gain k needs the hops k - 1 and k; a sample between boundaries k and k + 1 needs gains k and k + 1
        gain = _gains(source_rms, _rms_frames(sums, self.hop), rate) if len(sums) else np.zeros(0)
        frames = min(len(source_rms), -(-self.length // self.hop) + 1)  # the whole output's gains
        ready = self.length if len(gain) >= frames else max(0, (len(gain) - 1) * self.hop)
        ready = min(ready, self.done)
        if ready > self.base:
            count = ready - self.base
            _apply_gain(self.buffer[:count], self.base, gain, self.hop)
            self._write(count)

    def _write(self, count: int) -> None:
        if count <= 0:
            return
        block = self.buffer[:count]
        np.clip(block, -1, 1, out=block)
        self.sink(block)
        self.buffer = self.buffer[count:].copy()
        self.base += count

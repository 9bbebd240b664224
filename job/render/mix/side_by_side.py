"""The mix's passes that encode nothing, over stretches of the song side by side.

The measure pass (loudness and true peak) and the probe passes (the limited mix's loudness at
several gains) read the whole song each. On a host with cores to spare each stretch of the song
goes to a thread of its own (numpy and scipy let go of the GIL in most of their loops: on 2 cores
two stretches in two threads ran at 1.56 to 1.62 times one thread's rate in the probe pass, 1.32 to
1.46 in the measure pass), and the stretches' results are put together: the 100 ms steps' energies
in order (:func:`job.render.mix.loudness.gated_loudness`), the largest true peak.

What runs across a stretch's start is run in on the song's own samples: the K-weighting filters and
the limiter's release start :data:`RUN_IN_S` before it and that run-in's steps are dropped. After 2 s
the limiter's release has decayed under float32's resolution (exp(-40) of an attenuation) and the
filters' state under float64's, so the numbers are those of one pass over the whole song within
float rounding (tested: the same passes with the song as one stretch). Stretches start on the
loudness meter's 100 ms grid and where the vocals' and the mix's sample grids meet, so every block a
stretch reads is one the whole-song pass could have read. The song as one stretch is the one-piece
pass, the same code: whole blocks, each read a worker thread ahead (:func:`ahead`), no run-in.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from job.render.media.audio import MIX_SAMPLE_RATE
from job.render.mix.limiter import Limiter
from job.render.mix.loudness import (
    STEP_S,
    TAPS_PER_PHASE,
    LoudnessMeter,
    envelope_windows,
    gated_loudness,
    window_true_peak,
    windows,
)

if TYPE_CHECKING:
    from job.render.mix.mixer import MixSource

RUN_IN_S = 2.0  # of the song before a stretch, run through the filters and the limiter, then dropped
MIN_STRETCH_S = 20.0  # a stretch's least length (each costs its run-in)
STEP = int(STEP_S * MIX_SAMPLE_RATE)  # the loudness meter's 100 ms step, in samples
PIECES_PER_BLOCK = 4  # a stretch is read in quarters of the one-pass block: its threads hold as much together
AHEAD = 2  # blocks a pass prepares ahead of the one it is using (ahead)

T = TypeVar("T")
R = TypeVar("R")


def stretches(source: MixSource, workers: int) -> list[tuple[int, int]]:
    """The samples ``(first, end)`` of each stretch: as many as ``workers`` allows with none under
    :data:`MIN_STRETCH_S`, of one length (the last one a little shorter), or the
    whole song as one."""
    align = math.lcm(source.up, STEP)
    count = min(workers, int(source.length // (MIN_STRETCH_S * MIX_SAMPLE_RATE)))
    if count < 2:
        return [(0, source.length)]
    size = math.ceil(source.length / count / align) * align
    return [(first, min(first + size, source.length)) for first in range(0, source.length, size)]


def ahead(items: Iterable[T], depth: int = AHEAD) -> Iterator[T]:
    """``items``, each made in a worker thread up to ``depth`` ahead of its use: reading and
    resampling the stems and the true-peak interpolation (numpy, which lets go of the GIL for its
    loops) of the next blocks run beside the limiter, the meters and the encoder's pipe of this
    one. The order is kept; an exception in the worker is raised here; stopping early waits only
    for the blocks already asked for."""
    it, done = iter(items), object()
    with ThreadPoolExecutor(1, thread_name_prefix="mix-ahead") as pool:
        pending = deque(pool.submit(next, it, done) for _ in range(depth))
        while (item := pending.popleft().result()) is not done:
            pending.append(pool.submit(next, it, done))
            yield item  # type: ignore[misc]


def _ranges(source: MixSource, first: int, end: int, piece: int) -> list[tuple[int, int]]:
    """The reads of one stretch: its run-in, the stretch in pieces of ``piece`` samples (a short
    last one joined to the one before where the song goes on, so every piece but the song's last
    holds the passes' context), and a piece after it that only lends its start as context. The
    whole song as one stretch reads as :meth:`MixSource.blocks` does."""
    lo = max(0, first - round(RUN_IN_S * MIX_SAMPLE_RATE / STEP) * STEP)
    ranges = [(lo, first)] if lo < first else []
    blocks = [(a, min(end, a + piece)) for a in range(first, end, piece)]
    if end < source.length and len(blocks) > 1 and blocks[-1][1] - blocks[-1][0] < STEP:
        blocks[-2:] = [(blocks[-2][0], blocks[-1][1])]
    ranges += blocks
    if end < source.length:
        ranges.append((end, min(source.length, end + STEP)))
    return ranges


def _read(source: MixSource, ranges: list[tuple[int, int]]) -> Iterator[np.ndarray]:
    for a, b in ranges:
        yield source.read(a, b)


def _measure_stretch(source: MixSource, first: int, end: int, whole: bool) -> tuple[np.ndarray, float]:
    """The stretch's 100 ms steps' energies and its largest true peak (linear). ``whole``: the
    stretch is the song, read in whole blocks made a worker thread ahead."""
    ranges = _ranges(source, first, end, source.block if whole else _piece(source))
    found = windows(_read(source, ranges), TAPS_PER_PHASE)
    meter, peak = LoudnessMeter(MIX_SAMPLE_RATE), 0.0
    for (a, _), (window, lead, length) in zip(ranges, ahead(found) if whole else found, strict=False):
        if a >= end:
            break
        meter.add(window[:, lead : lead + length])
        if a >= first:
            peak = window_true_peak(window, lead, length, peak)
    return meter.steps()[(first - ranges[0][0]) // STEP :], peak


def _probe_stretch(
    source: MixSource, first: int, end: int, gains: list[float], ceiling: float, whole: bool
) -> list[np.ndarray]:
    """The stretch's 100 ms steps' energies of the limited mix at each of ``gains`` (one envelope
    per piece, one limiter per gain). ``whole``: as :func:`_measure_stretch`'s.

    Args:
        source: the mix
        first: the stretch's first sample
        end: the sample after its last
        gains: the gains (dB) the limited mix is measured at
        ceiling: the limiter's ceiling (linear)
        whole: the stretch is the song
    """
    ranges = _ranges(source, first, end, source.block if whole else _piece(source))
    limiters = [Limiter(ceiling, MIX_SAMPLE_RATE) for _ in gains]
    for limiter in limiters:
        limiter.position = ranges[0][0]  # the release's decay is counted from the song's start
    meters = [LoudnessMeter(MIX_SAMPLE_RATE) for _ in gains]
    scales = [np.float32(10 ** (g / 20)) for g in gains]
    envelopes = envelope_windows(_read(source, ranges), limiters[0].context)
    for (a, _), (block, envelope, lead) in zip(ranges, ahead(envelopes) if whole else envelopes, strict=False):
        if a >= end:
            break
        for limiter, meter, scale in zip(limiters, meters, scales, strict=True):
            meter.add(block * (limiter.gains(envelope * scale, lead, block.shape[-1]) * scale))
    return [meter.steps()[(first - ranges[0][0]) // STEP :] for meter in meters]


def _piece(source: MixSource) -> int:
    """A stretch's reads: a quarter of the one-piece block, on the rates' common grid."""
    return source.block // PIECES_PER_BLOCK // source.up * source.up


def _each(parts: list[tuple[int, int]], work: Callable[[int, int, bool], R]) -> list[R]:
    """``work(first, end, whole)`` for each part: the song as one part here, several side by side."""
    if len(parts) == 1:
        return [work(parts[0][0], parts[0][1], True)]
    with ThreadPoolExecutor(len(parts), thread_name_prefix="mix-pass") as pool:
        return list(pool.map(lambda part: work(part[0], part[1], False), parts))


def measure(source: MixSource, parts: list[tuple[int, int]]) -> tuple[float, float]:
    """The mix's integrated loudness (LUFS) and true peak (linear), ``parts`` side by side."""
    found = _each(parts, lambda first, end, whole: _measure_stretch(source, first, end, whole))
    return gated_loudness(np.concatenate([steps for steps, _ in found])), max(peak for _, peak in found)


def probe(source: MixSource, parts: list[tuple[int, int]], gains: list[float], ceiling: float) -> list[float]:
    """The limited mix's integrated loudness at each of ``gains``, ``parts`` side by side.

    Args:
        source: the mix
        parts: its stretches (:func:`stretches`)
        gains: the gains (dB) the limited mix is measured at
        ceiling: the limiter's ceiling (linear)
    """
    found = _each(parts, lambda first, end, whole: _probe_stretch(source, first, end, gains, ceiling, whole))
    return [gated_loudness(np.concatenate([steps[g] for steps in found])) for g in range(len(gains))]

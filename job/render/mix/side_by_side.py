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
float rounding (tested against :func:`job.render.mix.mixer._measure` and ``_probe``). Stretches start
on the loudness meter's 100 ms grid and where the vocals' and the mix's sample grids meet, so every
block a stretch reads is one the whole-song pass could have read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

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


def _ranges(source: MixSource, first: int, end: int, run_in: int) -> list[tuple[int, int]]:
    """The reads of one stretch: its run-in, the stretch in pieces of a quarter block (a short last
    one joined to the one before, so every piece but the song's last holds the passes' context), and
    a piece after it that only lends its start as context."""
    lo = max(0, first - run_in)
    ranges = [(lo, first)] if lo < first else []
    piece = source.block // PIECES_PER_BLOCK // source.up * source.up
    blocks = [(a, min(end, a + piece)) for a in range(first, end, piece)]
    if len(blocks) > 1 and blocks[-1][1] - blocks[-1][0] < STEP:
        blocks[-2:] = [(blocks[-2][0], blocks[-1][1])]
    ranges += blocks
    if end < source.length:
        ranges.append((end, min(source.length, end + STEP)))
    return ranges


def _read(source: MixSource, ranges: list[tuple[int, int]]) -> Iterator[np.ndarray]:
    for a, b in ranges:
        yield source.read(a, b)


def _measure_stretch(source: MixSource, first: int, end: int) -> tuple[np.ndarray, float]:
    """The stretch's 100 ms steps' energies and its largest true peak (linear)."""
    ranges = _ranges(source, first, end, round(RUN_IN_S * MIX_SAMPLE_RATE / STEP) * STEP)
    meter, peak = LoudnessMeter(MIX_SAMPLE_RATE), 0.0
    for (a, _), (window, lead, length) in zip(ranges, windows(_read(source, ranges), TAPS_PER_PHASE), strict=False):
        if a >= end:
            break
        meter.add(window[:, lead : lead + length])
        if a >= first:
            peak = window_true_peak(window, lead, length, peak)
    return meter.steps()[(first - ranges[0][0]) // STEP :], peak


def _probe_stretch(source: MixSource, first: int, end: int, gains: list[float], ceiling: float) -> list[np.ndarray]:
    """The stretch's 100 ms steps' energies of the limited mix at each of ``gains``."""
    ranges = _ranges(source, first, end, round(RUN_IN_S * MIX_SAMPLE_RATE / STEP) * STEP)
    limiters = [Limiter(ceiling, MIX_SAMPLE_RATE) for _ in gains]
    for limiter in limiters:
        limiter.position = ranges[0][0]  # the release's decay is counted from the song's start
    meters = [LoudnessMeter(MIX_SAMPLE_RATE) for _ in gains]
    scales = [np.float32(10 ** (g / 20)) for g in gains]
    envelopes = envelope_windows(_read(source, ranges), limiters[0].context)
    for (a, _), (block, envelope, lead) in zip(ranges, envelopes, strict=False):
        if a >= end:
            break
        for limiter, meter, scale in zip(limiters, meters, scales, strict=True):
            meter.add(block * (limiter.gains(envelope * scale, lead, block.shape[-1]) * scale))
    return [meter.steps()[(first - ranges[0][0]) // STEP :] for meter in meters]


def measure(source: MixSource, parts: list[tuple[int, int]]) -> tuple[float, float]:
    """The mix's integrated loudness (LUFS) and true peak (linear), ``parts`` side by side."""
    with ThreadPoolExecutor(len(parts), thread_name_prefix="mix-measure") as pool:
        found = list(pool.map(lambda part: _measure_stretch(source, *part), parts))
    return gated_loudness(np.concatenate([steps for steps, _ in found])), max(peak for _, peak in found)


def probe(source: MixSource, parts: list[tuple[int, int]], gains: list[float], ceiling: float) -> list[float]:
    """The limited mix's integrated loudness at each of ``gains``, ``parts`` side by side.

    Args:
        source: the mix
        parts: its stretches (:func:`stretches`)
        gains: the gains (dB) the limited mix is measured at
        ceiling: the limiter's ceiling (linear)
    """
    with ThreadPoolExecutor(len(parts), thread_name_prefix="mix-probe") as pool:
        found = list(pool.map(lambda part: _probe_stretch(source, part[0], part[1], gains, ceiling), parts))
    return [gated_loudness(np.concatenate([steps[g] for steps in found])) for g in range(len(gains))]

"""Several voices on one lead (duets, unison): where the cuts fall, and the joins.

Each cut a request asks for (a range's start or end) moves to the quietest 10 ms of the lead
within 250 ms of it, so a voice rarely changes inside a sung note. Between cuts, a stretch is sung
by the voices whose ranges cover it (the main voice where none does); in unison each of ``n``
voices is at ``1/sqrt(n)``, so the stretch keeps its power. At a cut, every voice's gain moves
from its level before to its level after over :data:`FADE_S` centred on the cut, along an
equal-power curve (``g = sqrt((1 - s) a^2 + s b^2)``, ``s = sin^2(pi x / 2)``): one voice handing
over to another is the classic sine/cosine crossfade, and nothing jumps from one sample to the
next. Each voice converts only its own stretches (plus the fades, plus the engine's context).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
from pydantic import BaseModel

SNAP_S = 0.25  # a cut moves to the quietest point this near
FRAME_S = 0.01  # the loudness frames the quietest point is found in
FADE_S = 0.04  # the crossfade at a cut, centred on it


class Span(BaseModel):
    """A stretch of the lead between two cuts and the voices singing it."""

    start_s: float
    end_s: float
    voices: tuple[str, ...]


def frame_energy(audio: np.ndarray, rate: int) -> np.ndarray:
    """Mean square of each :data:`FRAME_S` frame of mono ``audio``."""
    hop = max(1, round(FRAME_S * rate))
    n = len(audio) // hop
    if n == 0:
        return np.zeros(1)
    return np.square(audio[: n * hop].astype(np.float64)).reshape(n, hop).mean(axis=1)


def snap(t: float, energy: np.ndarray) -> float:
    """The centre of the quietest frame within :data:`SNAP_S` of ``t`` (the nearest of equals)."""
    centre = t / FRAME_S
    lo, hi = max(0, int(np.floor(centre - SNAP_S / FRAME_S))), min(len(energy), int(np.ceil(centre + SNAP_S / FRAME_S)))
    if hi <= lo:
        return t
    frames = np.arange(lo, hi)
    quietest = energy[lo:hi].min()
    candidates = frames[energy[lo:hi] <= quietest * (1 + 1e-9) + 1e-20]
    best = candidates[np.argmin(np.abs(candidates + 0.5 - centre))]
    return float((best + 0.5) * FRAME_S)


def plan(
    duration_s: float, main: str, parts: list[tuple[str, list[tuple[float, float]]]], energy: np.ndarray
) -> list[Span]:
    """The lead's stretches, in order, covering ``0`` to ``duration_s``.

    Args:
        duration_s: the lead's length
        main: the voice that sings what no part names
        parts: each further voice's name and its ranges in seconds
        energy: :func:`frame_energy` of the lead, for moving cuts to quiet points
    """
    snapped: dict[float, float] = {}

    def moved(t: float) -> float:
        t = min(max(t, 0.0), duration_s)
        if t in (0.0, duration_s):
            return t
        if t not in snapped:
            snapped[t] = min(max(snap(t, energy), 0.0), duration_s)
        return snapped[t]

    ranges = [(name, moved(a), moved(b)) for name, rs in parts for a, b in rs]
    cuts = sorted({0.0, duration_s, *(t for _, a, b in ranges for t in (a, b))})
    spans: list[Span] = []
    for a, b in itertools.pairwise(cuts):
        if b - a <= 1e-9:
            continue
        mid = (a + b) / 2
        voices = tuple(sorted({name for name, lo, hi in ranges if lo <= mid < hi})) or (main,)
        if spans and spans[-1].voices == voices:
            spans[-1] = spans[-1].model_copy(update={"end_s": b})
        else:
            spans.append(Span(start_s=a, end_s=b, voices=voices))
    return spans


def gain(spans: list[Span], voice: str, frames: int, rate: int, fade_s: float = FADE_S) -> np.ndarray:
    """``voice``'s gain at each of ``frames`` samples at ``rate``: its level in each stretch
    (``1/sqrt(n)`` of ``n`` voices, 0 where it does not sing), equal-power crossfaded at the cuts.

    Args:
        spans: :func:`plan`'s stretches
        voice: the voice
        frames: the output's length
        rate: its sample rate
        fade_s: the crossfade's length, centred on each cut
    """
    levels = [1 / np.sqrt(len(s.voices)) if voice in s.voices else 0.0 for s in spans]
    out = np.zeros(frames, dtype=np.float32)
    for span, level in zip(spans, levels, strict=True):
        out[round(span.start_s * rate) : round(span.end_s * rate)] = level
    half = max(1, round(fade_s * rate / 2))
    for i in range(1, len(spans)):
        before, after = levels[i - 1], levels[i]
        if before == after:
            continue
        cut = round(spans[i].start_s * rate)
        lo, hi = max(0, cut - half), min(frames, cut + half)
        x = (np.arange(lo, hi) - (cut - half) + 0.5) / (2 * half)
        s = np.sin(np.pi * x / 2) ** 2
        out[lo:hi] = np.sqrt((1 - s) * before**2 + s * after**2)
    return out


def runs(spans: list[Span], voice: str, duration_s: float, fade_s: float = FADE_S) -> list[tuple[float, float]]:
    """Where ``voice`` must be converted: its stretches joined, widened by half a fade each side.

    Args:
        spans: :func:`plan`'s stretches
        voice: the voice
        duration_s: the lead's length (nothing beyond it)
        fade_s: the crossfade's length
    """
    out: list[tuple[float, float]] = []
    for span in spans:
        if voice not in span.voices:
            continue
        a, b = max(0.0, span.start_s - fade_s / 2), min(duration_s, span.end_s + fade_s / 2)
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def sing(
    spans: list[Span],
    frames: int,
    rate: int,
    render: Callable[[str, float, float], np.ndarray],
    duration_s: float,
    fade_s: float = FADE_S,
) -> np.ndarray:
    """The lead sung by every voice in ``spans``: ``[frames]`` at ``rate``.

    Args:
        spans: :func:`plan`'s stretches
        frames: the output's length at ``rate``
        rate: the output's rate (the main voice's)
        render: ``(voice, from_s, to_s)`` -> that stretch converted by the voice, at ``rate``
        duration_s: the lead's length in seconds
        fade_s: the crossfade at each cut
    """
    out = np.zeros(frames, dtype=np.float32)
    for voice in dict.fromkeys(v for s in spans for v in s.voices):
        envelope = gain(spans, voice, frames, rate, fade_s)
        for a, b in runs(spans, voice, duration_s, fade_s):
            lo = round(a * rate)
            audio = render(voice, a, b)[: frames - lo]
            out[lo : lo + len(audio)] += envelope[lo : lo + len(audio)] * audio
    return out

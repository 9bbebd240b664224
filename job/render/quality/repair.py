"""The repair loop: segments below the thresholds are rendered again with other settings, and the
best render of each is kept, all within a time budget.

For each weak segment, worst first (``shortfall``), the loop tries these changes in this fixed order,
each applied to the best settings found so far for that segment, and stops at the first render that
meets every threshold:

1. ``octave``: where the cover is an octave off the singer (octave errors past their threshold), the
   pitch shift moved 12 semitones the other way (the pitch tracker took the wrong octave).
2. ``f0_method``: on any melody failure, another pitch tracker: instead of ``rmvpe``, a vote of
   three (``rmvpe+fcpe+crepe-tiny``: one tracker's octave slip is outvoted) where the store holds
   FCPE, else ``crepe-tiny``; ``rmvpe`` instead of any other.
3. ``index_rate``: on melody or naturalness failures, with a voice that has an index in use, half the
   index rate (retrieved features blur articulation; fewer of them trade some likeness for clarity).
   Not tried when only the speaker similarity fails: a lower rate makes that worse.
4. ``protect``: on naturalness or speaker failures, stronger protection of voiceless consonants and
   breaths. In RVC's convention a *lower* ``protect`` protects more (0.5 is off): it goes down by 0.15
   (to at least 0.1), or to 0.33 from off.

Each candidate is the segment converted alone with half a second of the song either side as context
(as the engine converts a chunk), scored by the quality stage's models on the segment, and compared
with the best so far by ``shortfall``. The kept render replaces the segment with the engine's 40 ms
linear crossfades at both ends. A candidate is started only when the time spent so far plus its
estimate fits in the budget: a share (``COVER_REPAIR_BUDGET``, 0.3) of the conversion stage's time.
The estimate is 1.5 times the sum of its two parts, each at the slowest rate seen: converting (per
second converted, first the conversion stage's rate) and scoring (per second scored, first the
quality stage's scoring rate times its DNSMOS workers: the stage scores that many segments' DNSMOS
side by side, a lone candidate one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from job.render.media.audio import to_16k
from job.render.quality.meter import QualityMeter, frame_span
from shared.options import ConversionOptions, F0Method
from shared.quality import Candidate, QualityReport, Repair, RepairedSegment, Verdict, shortfall

ORDER = ("octave", "f0_method", "index_rate", "protect")
MELODY = frozenset({"f0_correlation", "f0_rmse_cents", "octave_error_share", "unvoiced_share"})
NATURALNESS = frozenset({"dnsmos_ovrl"})
IDENTITY = frozenset({"speaker_similarity"})
CONTEXT_S = 0.5  # of the song either side of a re-rendered segment (the engine's chunk context)
CROSSFADE_S = 0.04  # the engine's crossfade, centred on each end of the segment
SAFETY = 1.5  # a candidate's estimate: its cost at the slowest rates seen, times this
PROTECT_STEP, PROTECT_FLOOR, PROTECT_ON = 0.15, 0.1, 0.33

# renders the converted audio from lo_s to hi_s of the song with the given options (output rate)
SpanRenderer = Callable[[float, float, ConversionOptions], np.ndarray]


@dataclass(frozen=True)
class Voice:
    """What the loop needs to know of the voice."""

    f0: bool  # pitch-guided (every RVC singing voice is)
    index: bool  # has a retrieval index
    fcpe: bool = False  # the store holds FCPE: a three-tracker vote is on offer


def change(
    name: str, options: ConversionOptions, failed: set[str], voice: Voice, octave_direction: int
) -> tuple[str, ConversionOptions] | None:
    """The setting ``name`` tries on top of ``options`` for a segment failing ``failed``, or None
    when it does not apply.

    Args:
        name: the change (one of :data:`ORDER`)
        options: the best options found so far for the segment
        failed: the measures the segment fails
        voice: what the voice has (pitch, an index)
        octave_direction: +1 or -1: which way the tracker slipped an octave (0: none seen)
    """
    if name == "octave" and voice.f0 and "octave_error_share" in failed and octave_direction:
        assert options.pitch != "auto"  # the loop fixes the pitch the first render chose
        pitch = int(options.pitch) - 12 * octave_direction
        if -24 <= pitch <= 24:
            return f"pitch {pitch:+d}", options.model_copy(update={"pitch": pitch})
    if name == "f0_method" and voice.f0 and failed & MELODY:
        vote = "rmvpe+fcpe+crepe-tiny" if voice.fcpe else F0Method.CREPE_TINY.value
        method = vote if options.f0_method == F0Method.RMVPE.value else F0Method.RMVPE.value
        return f"f0_method {method}", options.model_copy(update={"f0_method": method})
    if name == "index_rate" and voice.index and options.index_rate > 0.05 and failed & (MELODY | NATURALNESS):
        rate = round(options.index_rate / 2, 3)
        return f"index_rate {rate:g}", options.model_copy(update={"index_rate": rate})
    if name == "protect" and voice.f0 and failed & (NATURALNESS | IDENTITY):
        protect = PROTECT_ON if options.protect >= 0.5 else round(options.protect - PROTECT_STEP, 3)
        if protect >= PROTECT_FLOOR:
            return f"protect {protect:g}", options.model_copy(update={"protect": protect})
    return None


def octave_direction(f0_src: np.ndarray, f0_out: np.ndarray) -> int:
    """+1 when the cover sits an octave above the singer on most octave-off frames, -1 below, 0 if none."""
    both = (f0_src > 0) & (f0_out > 0)
    cents = 1200 * np.log2(f0_out[both] / f0_src[both])
    off = cents[np.abs(np.abs(cents) - 1200) <= 300]
    return 0 if not len(off) else int(np.sign(np.median(off)))


def crossfade_into(out: np.ndarray, piece: np.ndarray, start: int, fade: int) -> None:
    """Put ``piece`` into ``out`` from ``start``, ramping linearly over ``fade`` samples at each end
    that has a neighbour (the engine's joins)."""
    end = min(len(out), start + len(piece))
    piece = piece[: end - start]
    weight = np.ones(len(piece), dtype=np.float32)
    if start > 0:
        n = min(fade, len(piece))
        weight[:n] = np.linspace(0.0, 1.0, n, dtype=np.float32)
    if end < len(out):
        n = min(fade, len(piece))
        weight[len(piece) - n :] = np.minimum(weight[len(piece) - n :], np.linspace(1.0, 0.0, n, dtype=np.float32))
    out[start:end] = out[start:end] * (1 - weight) + piece * weight


class RepairLoop:
    """Re-renders a cover's weak segments, worst first, one change at a time, within a time budget.

    Args:
        meter: the quality meter (its models loaded)
        render: converts a stretch of the song with given options (``Pipeline.convert_stretch``)
        voice: what the voice has (pitch, an index)
        budget_s: the most the loop may spend, seconds
        convert_rate: the first estimate of converting, seconds per second of audio (with context)
        score_rate: the first estimate of scoring, seconds per second of audio
        reference: the voice's reference embedding
        clock: measures the time spent, seconds (tests give a clock of their own, so the budget's
            logic is tested without timing anything)
    """

    def __init__(
        self,
        meter: QualityMeter,
        render: SpanRenderer,
        voice: Voice,
        budget_s: float,
        convert_rate: float,
        score_rate: float,
        reference: list[float] | None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``convert_rate`` and ``score_rate``: the first estimates, seconds per second of audio
        converted (with context) and scored. ``clock`` measures the time spent (seconds; tests
        give a clock of their own, so the budget's logic is tested without timing anything)."""
        self.meter, self.render, self.voice = meter, render, voice
        self.budget_s, self.reference = budget_s, reference
        self.convert_rate, self.score_rate = convert_rate, score_rate
        self.clock = clock

    def estimate(self, converted_s: float, scored_s: float) -> float:
        """A candidate's estimated cost, seconds."""
        return SAFETY * (self.convert_rate * converted_s + self.score_rate * scored_s)

    def run(self, report: QualityReport, out: np.ndarray, out_rate: int, options: ConversionOptions) -> Repair:  # noqa: PLR0915 - reads best top to bottom
        """Repair ``out`` (the converted vocals, mono, changed in place) and ``report`` (its segments,
        whole-song scores, verdict and curves) with ``options`` (the first render's, pitch fixed).

        Args:
            report: the first render's quality report, updated in place
            out: the converted vocals, mono, changed in place where a candidate is kept
            out_rate: their sample rate
            options: the first render's options, pitch fixed
        """
        assert report.curves is not None
        started = self.clock()
        f0_src = np.asarray(report.curves.source_hz, dtype=np.float32)
        f0_out = np.asarray(report.curves.converted_hz, dtype=np.float32)
        duration = len(out) / out_rate
        weak = sorted(
            (i for i, s in enumerate(report.segments) if s.below),
            key=lambda i: shortfall(report.segments[i], report.thresholds),
            reverse=True,
        )
        done: list[RepairedSegment] = []
        untried = 0
        next_estimate: float | None = None
        for rank, i in enumerate(weak):
            segment = report.segments[i]
            fa, fb = frame_span(segment.start_s, segment.end_s)
            lo, hi = max(0.0, segment.start_s - CROSSFADE_S / 2), min(duration, segment.end_s + CROSSFADE_S / 2)
            direction = octave_direction(f0_src[fa:fb], f0_out[fa:fb])
            best, best_options, best_audio, best_f0 = segment, options, None, None
            tried: list[Candidate] = []
            out_of_time = False
            estimate = 0.0
            for name in ORDER:
                step = change(name, best_options, set(best.below), self.voice, direction)
                if step is None:
                    continue
                setting, candidate_options = step
                converted_s, scored_s = hi - lo + 2 * CONTEXT_S, segment.end_s - segment.start_s
                estimate = self.estimate(converted_s, scored_s)
                if self.clock() - started + estimate > self.budget_s:
                    out_of_time = True
                    break
                t0 = self.clock()
                piece = self.render(lo, hi, candidate_options)
                t1 = self.clock()
                a = round((segment.start_s - lo) * out_rate)
                audio16 = to_16k(piece[a : a + round(scored_s * out_rate)], out_rate)
                scored, f0 = self.meter.segment(segment, f0_src[fa:fb], audio16, self.reference)
                t2 = self.clock()
                seconds = t2 - t0
                self.convert_rate = max(self.convert_rate, (t1 - t0) / converted_s)
                self.score_rate = max(self.score_rate, (t2 - t1) / max(scored_s, 1e-3))
                kept = shortfall(scored, report.thresholds) < shortfall(best, report.thresholds)
                tried.append(
                    Candidate(change=name, setting=setting, below=scored.below, kept=kept, seconds=round(seconds, 3))
                )
                if kept:
                    best, best_options, best_audio, best_f0 = scored, candidate_options, piece, f0
                if not best.below:
                    break
            if best_audio is not None and best_f0 is not None:
                crossfade_into(out, best_audio, round(lo * out_rate), round(CROSSFADE_S * out_rate))
                report.segments[i] = best
                f0_out[fa:fb] = best_f0
            if tried:
                kept_settings = [c.setting for c in tried if c.kept]
                done.append(
                    RepairedSegment(
                        start_s=segment.start_s,
                        end_s=segment.end_s,
                        why=segment.below,
                        tried=tried,
                        kept=", ".join(kept_settings) if kept_settings else None,
                    )
                )
            if out_of_time:
                untried = len(weak) - rank - (1 if tried else 0)
                next_estimate = estimate
                break
        if any(s.kept for s in done):
            report.whole = self.meter.whole(f0_src, f0_out, report.segments)
            report.verdict = report.whole.verdict
            report.passed = report.verdict is Verdict.PASSED
            report.curves.converted_hz = [round(float(f), 1) for f in f0_out]
        report.repair = Repair(
            budget_s=round(self.budget_s, 3),
            spent_s=round(self.clock() - started, 3),
            segments=done,
            untried=untried,
            next_estimate_s=round(next_estimate, 3) if untried and next_estimate is not None else None,
        )
        return report.repair

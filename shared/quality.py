"""What a cover's quality report says, the thresholds it is held to, and the gate (torch-free: the
events, the API and the command line share it). The measures themselves are job/render/quality/meter.py.

Thresholds. Published objective scores for a trained RVC v2 48 kHz voice on singing are about F0
correlation 0.94, F0 RMSE 30 cents, speaker similarity 0.73 (Resemblyzer) and DNSMOS OVRL 3.1. A cover
fails the gate when, over the whole song, it falls clearly below that: F0 correlation under 0.80, F0
RMSE over 100 cents (a semitone), more than 10 % of the frames voiced in both an octave off, more than
30 % of the singer's voiced frames unvoiced in the cover, speaker similarity to the voice's reference
under 0.60, or DNSMOS OVRL under 2.5. The margins below the published figures are our choice: no
trained voice can be had here to calibrate them (docs/quality.md).

Verdicts have three outcomes: passed, below the gate, and **not measurable**. A melody score needs
at least ``MELODY_MIN_VOICED_S`` (1 s) of frames voiced in both the singer's and the cover's pitch
track: a correlation of two frames is always +-1, and one sung second is the shortest stretch over
which a pitch track's correlation and spread mean something (about 12 CREPE frames at the meter's
80 ms hop, a short phrase). A stretch with less than that is not measurable, never passed; the gate
refuses a not-measurable cover unless ``COVER_QUALITY_UNMEASURABLE=publish`` (the safe default is to
refuse: nothing unchecked is published as if it had been checked).
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field

MELODY_MIN_VOICED_S = 1.0


class Verdict(str, Enum):  # noqa: UP042 - str() of a member is its value, in messages
    PASSED = "passed"
    BELOW = "below"  # a measure is below its threshold
    NOT_MEASURABLE = "not_measurable"  # too little sung material to judge (MELODY_MIN_VOICED_S)


class Thresholds(BaseModel):
    f0_correlation_min: float = 0.80
    f0_rmse_cents_max: float = 100.0
    octave_error_share_max: float = 0.10
    unvoiced_share_max: float = 0.30
    speaker_similarity_min: float = 0.60
    dnsmos_ovrl_min: float = 2.5


THRESHOLDS = Thresholds()


class Melody(BaseModel):
    """The converted vocals' pitch against the separated vocals' (shifted by the request's pitch), on
    frames a real pitch model (torchcrepe tiny) finds voiced. Each score is None where there was too
    little material for it (``MELODY_MIN_VOICED_S``)."""

    voiced_frames: int = Field(description="frames voiced in both")
    voiced_s: float = Field(0.0, description="seconds voiced in both")
    f0_correlation: float | None = Field(None, description="correlation of log F0 on frames voiced in both")
    f0_rmse_cents: float | None = Field(None, description="RMS pitch difference, cents, frames voiced in both")
    octave_error_share: float | None = Field(None, description="share of those frames 900 to 1500 cents off")
    unvoiced_share: float | None = Field(None, description="share of the source's voiced frames unvoiced in the cover")


class Dnsmos(BaseModel):
    sig: float
    bak: float
    ovrl: float


class Scores(BaseModel):
    melody: Melody
    speaker_similarity: float | None = Field(None, description="cosine to the voice's reference embedding")
    dnsmos: Dnsmos | None = None
    below: list[str] = Field(default_factory=list, description="the measures below their thresholds")
    verdict: Verdict = Field(
        Verdict.NOT_MEASURABLE,
        description="passed, below (a measure below its threshold) or not_measurable (too little sung material)",
    )


class Segment(Scores):
    start_s: float
    end_s: float


class MixScores(BaseModel):
    loudness_lufs: float
    true_peak_dbtp: float
    clipped_share: float = Field(description="share of samples at full scale before encoding")
    silent_share: float = Field(description="share of 50 ms blocks under -60 dBFS")


class Curves(BaseModel):
    """What the report page draws (kept out of events: the page is stored beside the cover)."""

    frame_s: float
    source_hz: list[float] = Field(description="the separated vocals' F0 with the pitch shift, 0 unvoiced")
    converted_hz: list[float] = Field(description="the converted vocals' F0, 0 unvoiced")
    waveform: list[float] = Field(default_factory=list, description="the mix's peak per column, 0 to 1")
    mix_levels: list[float] = Field(
        default_factory=list, description="the mix's RMS level per column, -60 to 0 dBFS as 0 to 1"
    )
    vocals_levels: list[float] = Field(
        default_factory=list, description="the converted vocals' RMS level per column, -60 to 0 dBFS as 0 to 1"
    )
    duration_s: float


class Candidate(BaseModel):
    """One re-render of a weak segment with one setting changed from the best so far."""

    change: str = Field(description="octave, f0_method, index_rate or protect")
    setting: str = Field(description="the setting tried, e.g. 'pitch -12' or 'f0_method crepe-tiny'")
    below: list[str] = Field(description="the measures the candidate still failed")
    kept: bool = Field(description="whether it was better than the best so far (and replaced it)")
    seconds: float = Field(description="what converting and scoring it cost")


class RepairedSegment(BaseModel):
    start_s: float
    end_s: float
    why: list[str] = Field(description="the measures the segment failed before repair")
    tried: list[Candidate]
    kept: str | None = Field(None, description="the settings now in the cover; None: the first render kept")


class Repair(BaseModel):
    budget_s: float = Field(description="the time repair may take: a share of the conversion's (COVER_REPAIR_BUDGET)")
    spent_s: float
    segments: list[RepairedSegment] = Field(description="weak segments tried, worst first")
    untried: int = Field(0, description="weak segments the budget left as they were")
    next_estimate_s: float | None = Field(
        None, description="with untried segments: the estimated cost of the re-render that did not fit the budget"
    )

    def summary(self) -> str:
        replaced = [s for s in self.segments if s.kept]
        parts = [f"{s.start_s:.0f}-{s.end_s:.0f} s ({', '.join(s.why)}): {s.kept}" for s in replaced]
        head = (
            f"re-rendered {len(replaced)} of {len(self.segments) + self.untried} weak segments "
            f"in {self.spent_s:.1f} s of a {self.budget_s:.1f} s budget"
        )
        if self.untried:
            left = max(0.0, self.budget_s - self.spent_s)
            head += f"; {self.untried} left as they were: " + (
                f"the next re-render was estimated at {self.next_estimate_s:.1f} s, more than the {left:.1f} s left"
                if self.next_estimate_s is not None
                else "the budget ran out"
            )
        return head + (": " + "; ".join(parts) if parts else "")


class SingerScore(BaseModel):
    """A stretch of a duet's lead: who sings it, and how like each voice the converted stretch sounds."""

    start_s: float
    end_s: float
    voices: list[str] = Field(description="the voices given this stretch (several: unison)")
    similarity: dict[str, float | None] = Field(
        default_factory=dict,
        description="speaker similarity (cosine, Resemblyzer) of the stretch to each voice of the cover's reference",
    )
    sung_by_its_voice: bool | None = Field(
        None,
        description="whether the stretch is likest one of its own voices (None: too short or unmeasured)",
    )


class StemsUsed(BaseModel):
    """How the vocal stem was used, and where each stem's audio is (beside the report, for its players)."""

    said: str = Field(description="in words: split by which models, backing mode, de-reverb")
    backing_mode: str | None = None
    files: dict[str, str] = Field(
        default_factory=dict, description="stem name (lead, backing, room) -> file name beside the report page"
    )


class QualityReport(BaseModel):
    whole: Scores
    segments: list[Segment]
    mix: MixScores | None = None
    thresholds: Thresholds = Field(default_factory=Thresholds)
    verdict: Verdict = Field(Verdict.NOT_MEASURABLE, description="the whole song's verdict")
    passed: bool = Field(description="verdict is passed: measured, and every threshold met")
    measured_s: float = Field(
        description="what scoring cost, seconds, with the models loaded (loading them counts in the stage's time)"
    )
    repair: Repair | None = Field(None, description="what the repair loop tried, kept and why")
    made_with: list[str] = Field(
        default_factory=list, description="what shaped the cover: pitch tracker, shifts, autotune, vocal effects"
    )
    song_key: str | None = Field(
        None, description="the key autotune snapped the melody toward and where it came from (None: no autotune)"
    )
    singers: list[SingerScore] = Field(
        default_factory=list, description="a duet's stretches and their likeness to each voice (empty: one voice)"
    )
    stems: StemsUsed | None = Field(None, description="how the vocal stem was split and used")
    curves: Curves | None = Field(None, exclude=True)


def below(scores: Scores, limits: Thresholds = THRESHOLDS) -> list[str]:
    """The names of the measures ``scores`` fails (a measure that could not be taken fails nothing)."""
    m = scores.melody
    checks = {
        "f0_correlation": m.f0_correlation is not None and m.f0_correlation < limits.f0_correlation_min,
        "f0_rmse_cents": m.f0_rmse_cents is not None and m.f0_rmse_cents > limits.f0_rmse_cents_max,
        "octave_error_share": m.octave_error_share is not None and m.octave_error_share > limits.octave_error_share_max,
        "unvoiced_share": m.unvoiced_share is not None and m.unvoiced_share > limits.unvoiced_share_max,
        "speaker_similarity": scores.speaker_similarity is not None
        and scores.speaker_similarity < limits.speaker_similarity_min,
        "dnsmos_ovrl": scores.dnsmos is not None and scores.dnsmos.ovrl < limits.dnsmos_ovrl_min,
    }
    return [name for name, failed in checks.items() if failed]


def judge(scores: Scores, limits: Thresholds = THRESHOLDS) -> Scores:
    """``scores`` with its ``below`` and ``verdict`` set: below when a measure misses its threshold,
    else not measurable when the melody could not be scored, else passed."""
    failed = below(scores, limits)
    measured = scores.melody.f0_rmse_cents is not None
    verdict = Verdict.BELOW if failed else Verdict.PASSED if measured else Verdict.NOT_MEASURABLE
    return scores.model_copy(update={"below": failed, "verdict": verdict})


def settle(report: QualityReport) -> QualityReport:
    """``report`` with its verdict and ``passed`` taken from the whole song's scores."""
    return report.model_copy(update={"verdict": report.whole.verdict, "passed": report.whole.verdict is Verdict.PASSED})


def shortfall(scores: Scores, limits: Thresholds = THRESHOLDS) -> tuple[int, float]:
    """How far ``scores`` misses its thresholds, for ranking renders of one segment (lower is better):
    the number of measures below, then the sum of each one's distance past its threshold (F0 RMSE in
    units of its threshold, the rest in their own units: correlations, shares, MOS points / 4)."""
    m = scores.melody
    gaps = [
        limits.f0_correlation_min - m.f0_correlation if m.f0_correlation is not None else 0.0,
        (m.f0_rmse_cents - limits.f0_rmse_cents_max) / limits.f0_rmse_cents_max if m.f0_rmse_cents is not None else 0.0,
        m.octave_error_share - limits.octave_error_share_max if m.octave_error_share is not None else 0.0,
        m.unvoiced_share - limits.unvoiced_share_max if m.unvoiced_share is not None else 0.0,
        limits.speaker_similarity_min - scores.speaker_similarity if scores.speaker_similarity is not None else 0.0,
        (limits.dnsmos_ovrl_min - scores.dnsmos.ovrl) / 4 if scores.dnsmos is not None else 0.0,
    ]
    return len(below(scores, limits)), round(sum(max(0.0, g) for g in gaps), 6)


def refuses(quality: QualityReport | None, mode: str, accepted: bool, unmeasurable: str = "refuse") -> bool:
    """Whether the gate refuses a cover: ``mode`` is ``gate``, its request did not accept a cover
    below the gate, and the cover missed a threshold or (``unmeasurable`` ``refuse``) could not be
    measured.

    Args:
        quality: the cover's report (None: not measured, never refused)
        mode: ``COVER_QUALITY``: gate, measure or off
        accepted: the request's ``publish_below_gate``
        unmeasurable: ``COVER_QUALITY_UNMEASURABLE``: refuse or publish
    """
    if mode != "gate" or quality is None or accepted:
        return False
    return quality.verdict is Verdict.BELOW or (quality.verdict is Verdict.NOT_MEASURABLE and unmeasurable == "refuse")


def summary(report: QualityReport) -> str:
    """One line for people: the whole song's numbers, and what is below its threshold."""
    w = report.whole
    values = {
        "F0 corr": _fmt(w.melody.f0_correlation, ".2f"),
        "F0 RMSE": _fmt(w.melody.f0_rmse_cents, ".0f", " cents"),
        "octave errors": _fmt(w.melody.octave_error_share, ".0%"),
        "speaker sim": _fmt(w.speaker_similarity, ".2f"),
        "DNSMOS OVRL": _fmt(w.dnsmos.ovrl if w.dnsmos else None, ".2f"),
    }
    measured = [f"{name} {value}" for name, value in values.items() if value is not None]
    unmeasured = [name for name, value in values.items() if value is None]
    parts = measured + ([f"{', '.join(unmeasured)} not measured"] if unmeasured else [])
    verdicts = {
        Verdict.PASSED: "passes the gate",
        Verdict.BELOW: "below the gate: " + ", ".join(w.below),
        Verdict.NOT_MEASURABLE: (
            f"not measurable: {w.melody.voiced_s:.2f} s sung in both, {MELODY_MIN_VOICED_S:.0f} s needed"
        ),
    }
    return "; ".join(parts) + f" ({verdicts[report.verdict]})"


def _fmt(value: float | None, spec: str, unit: str = "") -> str | None:
    return None if value is None else format(value, spec) + unit


def refusal(report: QualityReport) -> str:
    """Why the gate refuses ``report``'s cover, in words."""
    if report.verdict is Verdict.NOT_MEASURABLE:
        return "could not be measured (too little singing to judge), and the gate refuses what it cannot check"
    return "is below the quality gate"

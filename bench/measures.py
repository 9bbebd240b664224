"""How far an approximate path's audio is from the exact path's: the measures every precision,
kernel and batching choice reports against ``COVER_PRECISION=fp32 COVER_KERNELS=reference`` (tests,
``bench/``). Each takes two equally long float arrays, the exact one first; the last two give
the quality stage's scores of the approximate output against the exact one's
(:class:`QualityView`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel

from shared.quality import Scores

if TYPE_CHECKING:
    from job.render.quality.meter import QualityMeter


def sdr_db(exact: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-distortion ratio in dB: the exact signal's energy over the difference's."""
    exact64 = np.asarray(exact, dtype=np.float64)
    error = float(np.sum((exact64 - approx) ** 2))
    return float(10 * np.log10(float(np.sum(exact64**2)) / max(error, 1e-30)))


def relative_l2(exact: np.ndarray, approx: np.ndarray) -> float:
    """``|approx - exact| / |exact|`` after removing each one's mean."""
    a = np.asarray(exact, dtype=np.float64)
    b = np.asarray(approx, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    return float(np.linalg.norm(b - a)) / max(float(np.linalg.norm(a)), 1e-30)


def correlation(exact: np.ndarray, approx: np.ndarray) -> float:
    """Pearson correlation of the two waveforms."""
    return float(np.corrcoef(np.ravel(exact), np.ravel(approx))[0, 1])


def log_spectral_distance_db(
    exact: np.ndarray, approx: np.ndarray, n_fft: int = 2048, floor_db: float = -60.0
) -> float:
    """Mean absolute difference of the log-magnitude spectra (dB) over bins within 60 dB of the peak."""
    from scipy.signal import stft

    _, _, sa = stft(exact, nperseg=n_fft, noverlap=n_fft * 3 // 4)
    _, _, sb = stft(approx, nperseg=n_fft, noverlap=n_fft * 3 // 4)
    la, lb = (20 * np.log10(np.abs(s) + 1e-9) for s in (sa, sb))
    keep = la > la.max() + floor_db
    return float(np.mean(np.abs(la[keep] - lb[keep])))


def compare(exact: np.ndarray, approx: np.ndarray) -> dict[str, float]:
    """All four measures, rounded for a results table."""
    return {
        "sdr_db": round(sdr_db(exact, approx), 2),
        "rel_l2": round(relative_l2(exact, approx), 5),
        "lsd_db": round(log_spectral_distance_db(np.ravel(exact), np.ravel(approx)), 3),
        "corr": round(correlation(exact, approx), 5),
    }


# an approximate path's output as the quality stage scores it against the exact path's
# (:func:`quality_against_exact`): the bounds the tests hold the bf16 and int8 conversions to, and
# ``bench.approximations`` the whole benchmark cover
MIN_F0_CORRELATION = 0.995  # where the exact output's melody moves (MIN_MELODY_SPREAD_CENTS)
# a steadier pitch's correlation measures the tracker's jitter, and its RMSE carries: a random-weight
# cover's buzz spreads 2.9 cents, the tests' vibrato tone 10.4 (as CREPE tiny hears its +-17 cents)
MIN_MELODY_SPREAD_CENTS = 5.0
MAX_F0_RMSE_CENTS = 5.0
MAX_SPEAKER_DROP = 0.005  # below the exact output's own similarity to its embedding (1.0 over one segment)
MAX_DNSMOS_SHIFT = 0.1  # the largest change of DNSMOS' three scores (signal, background, overall), MOS points


class QualityView(BaseModel):
    """An approximate path's output as the quality stage scores it against the exact path's
    (:func:`quality_against_exact`); None where a measure could not be taken."""

    scores: Scores | None = None  # the approximate output's whole scores, the exact output as source
    f0_corr: float | None = None
    f0_rmse: float | None = None  # cents
    f0_spread: float | None = None  # the exact output's melody on the frames voiced in both, cents (std)
    speaker: float | None = None
    speaker_drop: float | None = None  # the exact output's own similarity minus the approximate one's
    dnsmos: float | None = None  # overall, the approximate output's
    dnsmos_exact: float | None = None  # overall, the exact output's
    dnsmos_shift: float | None = None  # the largest change of the three scores (dnsmos_shift)

    def outside(self) -> list[str]:
        """The measures outside the bounds above (a measure that could not be taken counts as
        outside); empty where the approximation is within them all. The F0 correlation is held to
        its bound only where the exact output's melody spreads over :data:`MIN_MELODY_SPREAD_CENTS`
        or more: two steady pitches' correlation is that of the tracker's frame-to-frame jitter (a
        random-weight cover's buzz, 3 cents of spread, correlates at 0.94 with the same buzz 1 cent
        off), and the RMSE bound says what it would."""
        steady = self.f0_spread is not None and self.f0_spread < MIN_MELODY_SPREAD_CENTS
        checks = {
            "f0_corr": steady or (self.f0_corr is not None and self.f0_corr > MIN_F0_CORRELATION),
            "f0_rmse": self.f0_rmse is not None and self.f0_rmse < MAX_F0_RMSE_CENTS,
            "speaker": self.speaker_drop is not None and self.speaker_drop < MAX_SPEAKER_DROP,
            "dnsmos": self.dnsmos_shift is not None and self.dnsmos_shift < MAX_DNSMOS_SHIFT,
        }
        return [name for name, within in checks.items() if not within]


def dnsmos_shift(exact: Scores, approx: Scores) -> float | None:
    """The largest of the three DNSMOS scores' (signal, background, overall) absolute differences
    between an approximate path's output and the exact path's, both as the quality stage scores
    them; None where either was not measured (no sung segment)."""
    if exact.dnsmos is None or approx.dnsmos is None:
        return None
    return max(abs(getattr(approx.dnsmos, k) - getattr(exact.dnsmos, k)) for k in ("sig", "bak", "ovrl"))


class ExactScored(BaseModel):
    """The exact output as the quality stage scores it, once for every approximation compared
    with it (:func:`score_exact`)."""

    reference: list[float] | None  # its speaker embedding: the voice's reference
    own: Scores  # its whole scores against itself


def score_exact(meter: QualityMeter, exact: np.ndarray, rate: int) -> ExactScored:
    """:class:`ExactScored` of ``exact`` (mono, at ``rate``)."""
    from job.render.media.audio import to_16k

    reference = meter.embedding(to_16k(exact, rate))
    ref = reference.tolist() if reference is not None else None
    return ExactScored(reference=ref, own=meter.conversion(exact, rate, exact, rate, 0, ref).whole)


def quality_against_exact(
    meter: QualityMeter, exact: np.ndarray, approx: np.ndarray, rate: int, scored: ExactScored | None = None
) -> QualityView:
    """The quality stage's view of ``approx`` with ``exact`` (same rate, mono) as the separated
    vocals and as the voice's reference: F0 correlation and RMSE, speaker similarity (and its drop
    from the exact output's own: over several segments that is below 1), and DNSMOS of each with
    their largest difference (``dnsmos_shift``). The exact output is scored by the same stage, so
    the differences are the approximation's alone; ``scored``: that scoring, when several
    approximations are compared with one exact output (:func:`score_exact`, else made here)."""
    scored = scored or score_exact(meter, exact, rate)
    own = scored.own
    report = meter.conversion(exact, rate, approx, rate, 0, scored.reference)
    got = report.whole
    spread = None
    if report.curves is not None:  # the exact output's melody on the frames voiced in both
        exact_hz, approx_hz = np.asarray(report.curves.source_hz), np.asarray(report.curves.converted_hz)
        voiced = (exact_hz > 0) & (approx_hz > 0)
        spread = float(np.std(1200 * np.log2(exact_hz[voiced]))) if voiced.sum() > 1 else None
    return QualityView(
        scores=got,
        f0_corr=got.melody.f0_correlation,
        f0_rmse=got.melody.f0_rmse_cents,
        f0_spread=None if spread is None else round(spread, 1),
        speaker=got.speaker_similarity,
        speaker_drop=None
        if got.speaker_similarity is None or own.speaker_similarity is None
        else round(own.speaker_similarity - got.speaker_similarity, 4),
        dnsmos=got.dnsmos.ovrl if got.dnsmos else None,
        dnsmos_exact=own.dnsmos.ovrl if own.dnsmos else None,
        dnsmos_shift=dnsmos_shift(own, got),
    )

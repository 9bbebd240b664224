"""How far an approximate path's audio is from the exact path's: the measures every precision,
kernel and batching choice reports against ``COVER_PRECISION=fp32 COVER_KERNELS=reference`` (tests,
``bench/``). Each takes two equally long float arrays, the exact one first."""

from __future__ import annotations

import numpy as np


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

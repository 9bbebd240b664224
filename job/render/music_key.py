"""The song's key, heard in the instrumental, and the melody snapped toward its notes (autotune).

Key: the instrumental's chroma (librosa's STFT chroma, 12 pitch-class energies, averaged over the
song) correlated with the Krumhansl-Kessler key profiles (the published probe-tone ratings of how
well each pitch class fits a major or minor key) rotated to each of the 12 tonics; the best of the
24 correlations names the key, and its margin over the runner-up says how sure that is.

Autotune: each voiced frame's pitch moved toward the nearest note of that key's scale (natural
minor for a minor key) by ``strength`` (0: untouched, 1: on the note), in cents; unvoiced frames
stay 0. The engine applies it to the singer's melody before the voice's shift, so the cover's
notes land on the key's notes whatever the transposition by octaves or ``key_shift``.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from job.render.notes import NOTE_NAMES, pitch_class

# Krumhansl & Kessler (1982), probe-tone ratings, tonic first
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
ANALYSIS_RATE = 22050


class MusicalKey(BaseModel):
    tonic: int = Field(ge=0, le=11, description="pitch class of the tonic, 0 = C")
    mode: str = Field(pattern="^(major|minor)$")
    confidence: float = Field(description="the best key's correlation minus the runner-up's (0 to 2)")

    @property
    def name(self) -> str:
        return f"{NOTE_NAMES[self.tonic]} {self.mode}"

    @classmethod
    def parse(cls, name: str) -> MusicalKey:
        """``'A minor'``, ``'Eb major'``, ``'F# minor'`` (the option's form, already checked by its pattern)."""
        note, mode = name.split()
        return cls(tonic=pitch_class(note), mode=mode, confidence=1.0)

    def pitch_classes(self) -> np.ndarray:
        return (self.tonic + np.array(SCALES[self.mode])) % 12


ANALYSED_S = 120.0  # the middle two minutes at most: enough to hear a key, bounded in time and memory


def detect_key(audio: np.ndarray, sample_rate: int) -> MusicalKey | None:
    """The key of ``audio`` (``[channels, samples]`` or mono; its middle :data:`ANALYSED_S` at
    most), or None when it has no tonal content."""
    import librosa

    mono = np.asarray(audio)
    keep = int(ANALYSED_S * sample_rate)
    start = max(0, (mono.shape[-1] - keep) // 2)
    mono = np.asarray(mono[..., start : start + keep], dtype=np.float32)
    mono = mono.mean(axis=0) if mono.ndim == 2 else mono
    if sample_rate != ANALYSIS_RATE:
        mono = librosa.resample(mono, orig_sr=sample_rate, target_sr=ANALYSIS_RATE)
    chroma = librosa.feature.chroma_stft(y=mono, sr=ANALYSIS_RATE, n_fft=4096, hop_length=2048).mean(axis=1)
    return _best_key(chroma)


def key_of_melody(f0: np.ndarray) -> MusicalKey | None:
    """The key a melody (Hz, 0 where unvoiced) moves in: its voiced frames' pitch classes, counted."""
    voiced = np.asarray(f0)[np.asarray(f0) > 0]
    if voiced.size < 50:  # half a second of singing
        return None
    classes = np.mod(np.round(69 + 12 * np.log2(voiced / 440.0)), 12).astype(int)
    return _best_key(np.bincount(classes, minlength=12).astype(np.float64))


def _best_key(chroma: np.ndarray) -> MusicalKey | None:
    if not np.isfinite(chroma).all() or chroma.std() < 1e-6:
        return None
    scores = sorted(
        (
            (float(np.corrcoef(chroma, np.roll(profile, tonic))[0, 1]), tonic, mode)
            for mode, profile in (("major", MAJOR_PROFILE), ("minor", MINOR_PROFILE))
            for tonic in range(12)
        ),
        reverse=True,
    )
    (best, tonic, mode), (second, _, _) = scores[0], scores[1]
    return MusicalKey(tonic=tonic, mode=mode, confidence=round(best - second, 4))


def snap_to_key(f0: np.ndarray, key: MusicalKey, strength: float) -> np.ndarray:
    """``f0`` (Hz, 0 where unvoiced) with each voiced frame moved ``strength`` of the way (in
    cents) to the nearest note of ``key``'s scale."""
    if strength <= 0:
        return f0
    out = np.asarray(f0, dtype=np.float64).copy()
    voiced = out > 0
    if not voiced.any():
        return f0
    midi = 69 + 12 * np.log2(out[voiced] / 440.0)
    candidates = np.round(midi)[None, :] + np.arange(-2, 3)[:, None]  # a scale note lies within 2 semitones
    in_scale = np.isin(np.mod(candidates, 12), key.pitch_classes())
    distance = np.where(in_scale, np.abs(candidates - midi[None, :]), np.inf)
    target = candidates[np.argmin(distance, axis=0), np.arange(midi.size)]
    moved = midi + min(strength, 1.0) * (target - midi)
    out[voiced] = 440.0 * 2.0 ** ((moved - 69) / 12)
    return out.astype(np.float32)

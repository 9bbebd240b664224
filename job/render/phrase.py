"""The reference phrase: a synthetic sung phrase that every voice can sing. The quality stage
embeds a voice's rendition of it (its reference embedding) and the int8 decoder calibrates on it."""

from __future__ import annotations

import numpy as np


def reference_phrase(rate: int = 44100) -> np.ndarray:
    """The phrase a voice sings for its reference embedding when no training clips are given: an
    open vowel (harmonics shaped by /a/'s formants at 700, 1220 and 2600 Hz) on the notes A3 to E4
    and back, 0.8 s each with 5.5 Hz vibrato and 0.2 s rests: 9 s, mono, peak 0.5."""
    notes = [220.0, 246.9, 277.2, 293.7, 329.6, 293.7, 277.2, 246.9, 220.0]
    note, rest = int(0.8 * rate), int(0.2 * rate)
    t = np.arange(note) / rate
    pieces = []
    for hz in notes:
        f0 = hz * 2 ** (30 / 1200 * np.sin(2 * np.pi * 5.5 * t))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        tone = np.zeros(note)
        for k in range(1, int(5000 // hz) + 1):
            formants = sum(
                gain * np.exp(-0.5 * ((k * f0 - centre) / width) ** 2)
                for centre, width, gain in ((700, 130, 1.0), (1220, 150, 0.6), (2600, 250, 0.25))
            )
            tone += (formants + 0.02) / k * np.sin(k * phase)
        envelope = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.05)
        pieces += [tone * envelope, np.zeros(rest)]
    phrase = np.concatenate(pieces)
    return (0.5 * phrase / np.max(np.abs(phrase))).astype(np.float32)

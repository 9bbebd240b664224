"""Whole-song key change (``key_shift``): the instrumental moved by the asked semitones, measured,
its length kept to the sample; the vocals moved with it."""

from __future__ import annotations

import numpy as np
import pytest

from job.render.media.audio import MIX_SAMPLE_RATE, read_wav, write_wav
from job.render.mix.key import shift_key


def _peak_hz(audio: np.ndarray, rate: int) -> float:
    segment = audio[rate : 3 * rate] * np.hanning(2 * rate)
    size = 8 * len(segment)
    spectrum = np.abs(np.fft.rfft(segment, size))
    return float(np.fft.rfftfreq(size, 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("semitones", [-5, 2, 7])
def test_the_instrumental_moves_by_the_asked_semitones_and_keeps_its_length(tmp_path, semitones):
    t = np.arange(4 * MIX_SAMPLE_RATE + 123) / MIX_SAMPLE_RATE  # an odd length
    tone = (0.3 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)
    stem = write_wav(tmp_path / "no_vocals.wav", np.stack([tone, tone]), MIX_SAMPLE_RATE)
    moved, rate = read_wav(shift_key(stem, semitones, tmp_path / "moved.wav"))
    assert rate == MIX_SAMPLE_RATE and moved.shape == (2, len(t))  # to the sample
    cents = 1200 * np.log2(_peak_hz(moved[0], rate) / (220.0 * 2 ** (semitones / 12)))
    assert abs(cents) < 5
    assert shift_key(stem, 0, tmp_path / "unused.wav") == stem  # no shift: the stem as separated


def test_a_key_change_moves_the_converted_vocals_with_it(converter, store):
    """The engine adds key_shift to the voice's shift: the cover's pitch_shift says so."""
    from shared.model_store import ModelStore
    from shared.options import ConversionOptions
    from tests.conftest import sung_tone

    voice = converter.load_voice(ModelStore(store).voice("demo-voice"))
    x = sung_tone(1.0, 220.0)
    plain = converter.convert(x, 16000, voice, ConversionOptions(f0_method="pm", pitch=3))
    moved = converter.convert(x, 16000, voice, ConversionOptions(f0_method="pm", pitch=3, key_shift=-2))
    assert (plain.pitch_shift, moved.pitch_shift) == (3, 1)

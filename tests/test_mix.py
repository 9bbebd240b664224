"""Mixing with known stems: the true stems and an identity conversion give back the input mix."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from job.devkit import demo
from job.render.audio import MIX_SAMPLE_RATE, decode, write_wav
from job.render.fetch import probe
from job.render.ffmpeg import measure_loudness
from job.render.mix import mix
from shared.options import MixOptions, OutputFormat

SNR_DB_MIN = 40.0  # output vs. input mix, after removing the loudness gain
LOUDNESS_TOLERANCE_LU = 0.5


@pytest.fixture(scope="module")
def stems(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stems")
    vocals, inst = demo.demo_song(12.0, seed=3)
    return (
        write_wav(folder / "vocals.wav", vocals, MIX_SAMPLE_RATE),
        write_wav(folder / "no_vocals.wav", inst, MIX_SAMPLE_RATE),
        vocals + inst,
    )


def test_true_stems_and_identity_conversion_give_back_the_mix(stems, tmp_path):
    vocals, inst, original = stems
    result = mix(inst, vocals, tmp_path / "cover.wav", MixOptions(format=OutputFormat.WAV))
    out, _ = decode(result.path, MIX_SAMPLE_RATE, 2)
    assert out.shape == original.shape  # exactly as long as the input
    gain = float(np.sum(out * original) / np.sum(original * original))
    residual = out - gain * original
    snr = 10 * np.log10(np.sum((gain * original) ** 2) / np.sum(residual**2))
    assert result.normalisation == "linear"
    assert snr > SNR_DB_MIN, f"output differs from the input mix: SNR {snr:.1f} dB"


@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_loudness_target_and_true_peak_ceiling(stems, tmp_path, fmt):
    vocals, inst, _ = stems
    result = mix(inst, vocals, tmp_path / f"cover.{fmt.value}", MixOptions(format=fmt), voice_name="alto-demo")
    integrated, true_peak = measure_loudness(result.path)  # ffmpeg's own ebur128 meter
    assert integrated == pytest.approx(-14.0, abs=LOUDNESS_TOLERANCE_LU)
    assert true_peak <= -1.0 + 0.3  # lossy codecs may overshoot a little after decoding
    assert result.duration_s == pytest.approx(12.0, abs=0.06)
    tags = {k.lower(): v for k, v in probe(result.path)["format"].get("tags", {}).items()}
    if fmt is OutputFormat.OPUS:
        tags.update({k.lower(): v for k, v in probe(result.path)["stream"].get("tags", {}).items()})
    assert "ai-generated cover" in tags.get("comment", "").lower()
    assert "alto-demo" in tags.get("comment", "")


def test_mono_vocals_at_another_rate_are_aligned_to_the_instrumental(stems, tmp_path):
    _, inst, _ = stems
    vocals48 = write_wav(tmp_path / "v.wav", 0.2 * np.sin(np.arange(48000 * 11) / 48000 * 2 * np.pi * 330), 48000)
    result = mix(inst, vocals48, tmp_path / "c.flac", MixOptions(format=OutputFormat.FLAC))
    out, _ = decode(result.path, MIX_SAMPLE_RATE, 2)
    assert out.shape[1] == 12 * MIX_SAMPLE_RATE  # vocals padded to the instrumental's length
    channels = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=channels", "-of", "csv=p=0", str(result.path)],
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert channels == "2"

"""Mixing with known stems: the true stems and an identity conversion give back the input mix."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from job.devkit import demo
from job.render.fetch import probe
from job.render.media.audio import MIX_SAMPLE_RATE, decode, write_wav
from job.render.media.ffmpeg import measure_loudness
from job.render.mix.mixer import mix
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


# --- the mix as a stream -------------------------------------------------------------------------


def test_the_mix_made_a_block_at_a_time_is_the_whole_song_mix(stems, tmp_path, monkeypatch):
    """Vocals at 48 kHz are resampled block by block: every block boundary lands inside the song,
    and the result is the whole-stem polyphase resampling summed with the instrumental."""
    from scipy.signal import resample_poly

    from job.render.mix import mixer as mixing

    monkeypatch.setattr(mixing, "BLOCK", 20_000)  # 12 s in 27 blocks
    _, inst, _ = stems
    rng = np.random.default_rng(5)
    voc = (0.3 * rng.standard_normal(48000 * 13)).astype(np.float32)  # longer than the instrumental
    vocals48 = write_wav(tmp_path / "v48.wav", voc, 48000)
    options = MixOptions(vocals_gain_db=-3.0, instrumental_gain_db=2.0)
    source = mixing.MixSource(inst, vocals48, options, tmp_path / "scratch")
    try:
        streamed = np.concatenate(list(source.blocks()), axis=1)
    finally:
        source.close()
    _, instrumental = demo.demo_song(12.0, seed=3)
    whole = resample_poly(voc, 147, 160).astype(np.float32)[: instrumental.shape[-1]]
    expected = instrumental * np.float32(10 ** (2 / 20)) + whole * np.float32(10 ** (-3 / 20))
    assert streamed.shape == expected.shape
    assert np.max(np.abs(streamed - expected)) < 1e-5


def test_the_limiter_and_meters_run_a_block_at_a_time_as_over_the_whole_song(monkeypatch):
    """Block edges change nothing: the limiter's look-ahead and release, the K-weighting filters,
    the 50 ms silence blocks and the waveform's columns carry across them."""
    from job.render.mix.limiter import Limiter, limiter_gain
    from job.render.mix.loudness import LoudnessMeter, envelope_windows, integrated_lufs, peak_envelope
    from job.render.mix.meter import MixMeter, mix_scores, waveform_peaks

    vocals, inst = demo.demo_song(6.0, seed=4)
    audio = (vocals + inst) * 0.05
    audio[:, :: MIX_SAMPLE_RATE // 3] = 3.0  # sparse clicks far over full scale: hard limiting
    audio[:, 70_000:120_000] = 0.0  # a silent stretch
    audio = audio.astype(np.float32)
    ceiling = 10 ** (-1.5 / 20)
    sizes = [30_001, 4_999, 77_777]  # odd sizes: edges fall anywhere, the last block is short
    blocks, start = [], 0
    while start < audio.shape[-1]:
        size = sizes[len(blocks) % len(sizes)]
        blocks.append(audio[:, start : start + size])
        start += size
    limiter, loudness = Limiter(ceiling, MIX_SAMPLE_RATE), LoudnessMeter(MIX_SAMPLE_RATE)
    meter = MixMeter(audio.shape[-1], MIX_SAMPLE_RATE, columns=37)
    gains, envelopes = [], []
    for block, envelope, lead in envelope_windows(iter(blocks), limiter.context):
        envelopes.append(envelope[lead : lead + block.shape[-1]])
        gains.append(limiter.gains(envelope, lead, block.shape[-1]))
        loudness.add(block)
        meter.add(block)
    whole_envelope = peak_envelope(audio)
    assert np.max(np.abs(np.concatenate(envelopes) - whole_envelope)) < 1e-6
    assert np.max(np.abs(np.concatenate(gains) - limiter_gain(whole_envelope, ceiling, MIX_SAMPLE_RATE))) < 1e-6
    assert np.min(np.concatenate(gains)) < 0.5  # the limiter did work here
    assert loudness.integrated() == pytest.approx(integrated_lufs(audio, MIX_SAMPLE_RATE), abs=1e-6)
    assert meter.scores(-14, -1) == mix_scores(audio, MIX_SAMPLE_RATE, -14, -1)
    assert meter.scores(-14, -1).silent_share > 0.1
    assert meter.peaks() == waveform_peaks(audio, 37)


def test_a_cover_that_needs_no_limiting_is_encoded_once(stems, tmp_path, encodes):
    vocals, inst, _ = stems
    result = mix(inst, vocals, tmp_path / "cover.mp3")
    assert result.normalisation == "linear"
    assert len(encodes) == 1  # measured in numpy first, then one encode that was kept


@pytest.mark.parametrize("fmt", [OutputFormat.MP3, OutputFormat.OPUS, OutputFormat.M4A])
def test_a_lossy_cover_reports_what_the_codec_made_measured_while_encoding(stems, tmp_path, fmt, monkeypatch):
    vocals, inst, _ = stems
    from job.render.media import ffmpeg

    decoded_again: list = []  # the encoded file is not read back after encoding
    monkeypatch.setattr(ffmpeg, "measure_loudness", lambda *a: decoded_again.append(a))
    odd = tmp_path / "a [live] | it's: 100% ok "  # what the tee muxer's slave list would misread
    result = mix(inst, vocals, odd / f" cover (take 2) [x]|y.{fmt.value}", MixOptions(format=fmt))
    assert result.path.is_file() and result.path.name == f" cover (take 2) [x]|y.{fmt.value}"
    assert [p.name for p in odd.iterdir()] == [result.path.name]  # nothing else left beside it
    assert not decoded_again
    monkeypatch.undo()
    integrated, true_peak = measure_loudness(result.path)  # FFmpeg's meter on the finished file
    # the same within one step of the 0.1 FFmpeg prints (the copy carries a little more padding)
    assert result.loudness_lufs == pytest.approx(integrated, abs=0.1 + 1e-9)
    assert result.true_peak_dbtp == pytest.approx(true_peak, abs=0.1 + 1e-9)


def test_the_mix_holds_a_few_blocks_whatever_the_songs_length(tmp_path):
    """Four minutes of quiet stems with loud clicks (reaching -14 LUFS needs the limiter): the
    mix stage's Python-side allocations
    (numpy's included, traced) stay a few blocks' worth, far under one copy of the mix (85 MB)."""
    import tracemalloc

    from job.render.media.audio import WavWriter

    rng = np.random.default_rng(6)
    seconds, chunk = 240, MIX_SAMPLE_RATE * 10
    with (
        WavWriter(tmp_path / "inst.wav", MIX_SAMPLE_RATE, 2) as inst,
        WavWriter(tmp_path / "voc.wav", 48000, 1) as voc,
    ):
        for _ in range(seconds // 10):
            block = (0.03 * rng.standard_normal((2, chunk))).astype(np.float32)
            block[:, :: MIX_SAMPLE_RATE // 3] = 0.9
            inst.write(block)
            voc.write((0.03 * rng.standard_normal((1, 480_000))).astype(np.float32))
    tracemalloc.start()
    try:
        result = mix(tmp_path / "inst.wav", tmp_path / "voc.wav", tmp_path / "cover.flac", MixOptions(format="flac"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.normalisation == "limited"
    assert result.duration_s == pytest.approx(seconds, abs=0.05)
    whole_mix_mb = 2 * seconds * MIX_SAMPLE_RATE * 4 / 2**20
    assert peak / 2**20 < 40, f"the mix stage held {peak / 2**20:.0f} MB (one copy of the mix: {whole_mix_mb:.0f} MB)"


def test_blocks_made_ahead_come_in_order_and_a_failure_reaches_the_pass():
    from job.render.mix.side_by_side import ahead as _ahead

    made: list[int] = []

    def blocks():
        for i in range(6):
            made.append(i)
            if i == 4:
                raise OSError("the stem went away")
            yield i

    got: list[int] = []
    with pytest.raises(OSError, match="went away"):
        got.extend(_ahead(blocks(), depth=2))
    assert got == [0, 1, 2, 3]
    made.clear()
    for item in _ahead(blocks(), depth=2):  # leaving early: the worker stops after what it was asked
        if item == 1:
            break
    assert made == [0, 1, 2, 3]

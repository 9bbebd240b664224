"""The mix's measuring passes over stretches of the song side by side (job/render/mix/side_by_side.py)
against one pass over the whole song: the same loudness, true peak and probe loudness, and the same
cover out of the mix stage; the stretches' layout."""

from __future__ import annotations

import numpy as np
import pytest

from job.devkit import demo
from job.render.media.audio import MIX_SAMPLE_RATE, decode, write_wav
from job.render.mix import side_by_side
from job.render.mix.mixer import MixSource, _measure, _probe, mix
from job.render.mix.watermark import Marker
from shared.options import MixOptions, OutputFormat

RATE = MIX_SAMPLE_RATE
SECONDS = 70  # three stretches of at least 20 s
SECOND_START = 234 * 4410  # where the second of three stretches starts (tested below)


@pytest.fixture(scope="module")
def stems(tmp_path_factory):
    """A mix that must be limited (clicks at 0.9 over a quiet instrumental) with vocals at 48 kHz,
    so the stretches start where the two rates' grids meet; before the second stretch's start the
    clicks stop for a second but for one, half a second before it, whose limiting is still
    releasing when the stretch starts (what a stretch run without the song before it would miss)."""
    folder = tmp_path_factory.mktemp("side-by-side")
    _, instrumental = demo.demo_song(SECONDS, seed=9)
    instrumental *= 0.3
    instrumental[:, :: RATE // 3] = 0.9
    instrumental[:, SECOND_START - RATE : SECOND_START + RATE // 2] *= 0.3
    instrumental[:, SECOND_START - RATE // 2] = 0.99
    noise = 0.05 * np.random.default_rng(9).standard_normal(SECONDS * 48000)
    return (
        write_wav(folder / "no_vocals.wav", instrumental, RATE),
        write_wav(folder / "vocals.wav", noise.astype(np.float32), 48000),
    )


@pytest.fixture
def source(stems, tmp_path):
    source = MixSource(*stems, MixOptions(), tmp_path, Marker(11))
    yield source
    source.close()


def test_stretches_start_where_the_grids_meet_and_a_short_song_is_one(source):
    parts = side_by_side.stretches(source, 3)
    assert len(parts) == 3 and parts[0][0] == 0 and parts[1][0] == SECOND_START and parts[-1][1] == source.length
    assert all(first % 4410 == 0 and first % source.up == 0 for first, _ in parts)  # 100 ms steps, 48 kHz grid
    assert all(end - first >= 20 * RATE for first, end in parts[:-1])
    assert side_by_side.stretches(source, 1) == [(0, source.length)]
    assert len(side_by_side.stretches(source, 8)) == 3  # no stretch under 20 s


def test_the_measure_pass_side_by_side_gives_the_whole_songs_loudness_and_peak(source):
    loudness, peak = _measure(source, 1)
    side_loudness, side_peak = _measure(source, 3)
    assert side_loudness == pytest.approx(loudness, abs=1e-9)
    assert side_peak == peak  # true peak is per window: exact


def test_the_probe_pass_side_by_side_gives_the_whole_songs_limited_loudness(source):
    """The limiter's release and the loudness filters are run in before each stretch: the limited
    mix's loudness at each gain is the whole-song pass's."""
    gains = [0.0, 4.0, 9.0]
    whole = _probe(source, gains, -1.5, 1)
    side = _probe(source, gains, -1.5, 3)
    assert side == pytest.approx(whole, abs=1e-9)
    assert whole[2] - whole[0] < 9.0 - 0.5  # the limiter did work: loudness grew slower than gain


def test_the_mix_stage_makes_the_same_cover_with_its_passes_side_by_side(stems, tmp_path):
    options = MixOptions(format=OutputFormat.WAV)
    one = mix(*stems, tmp_path / "one.wav", options, watermark=11, workers=1)
    side = mix(*stems, tmp_path / "side.wav", options, watermark=11, workers=3)
    assert side.normalisation == one.normalisation == "limited"
    assert side.loudness_lufs == one.loudness_lufs and side.true_peak_dbtp == one.true_peak_dbtp
    ours, _ = decode(side.path, RATE, 2)
    theirs, _ = decode(one.path, RATE, 2)
    assert np.array_equal(ours, theirs)

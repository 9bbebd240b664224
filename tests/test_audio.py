"""Reading stems for the 16 kHz models: block by block, equal to resampling the whole file."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from job.render.media.audio import RESAMPLE_BLOCK_S, WavWriter, read_16k, read_wav, to_16k


def _write(path, seconds: float, rate: int, channels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    frames = int(seconds * rate)
    with WavWriter(path, rate, channels) as out:
        for start in range(0, frames, rate * 10):
            n = min(rate * 10, frames - start)
            out.write((0.3 * rng.standard_normal((channels, n))).astype(np.float32))
    return path


@pytest.mark.parametrize(
    ("rate", "channels", "seconds"),
    [(44100, 2, 2.5 * RESAMPLE_BLOCK_S + 0.0123), (48000, 1, RESAMPLE_BLOCK_S + 1 / 48000), (16000, 1, 3.0)],
)
def test_read_16k_equals_resampling_the_whole_file(tmp_path, rate, channels, seconds):
    path = _write(tmp_path / "a.wav", seconds, rate, channels)
    got = read_16k(path)
    whole, _ = read_wav(path)
    assert (got.frames, got.sample_rate) == (whole.shape[-1], rate)
    expected = to_16k(whole, rate)
    assert got.audio.dtype == np.float32 and got.audio.shape == expected.shape
    np.testing.assert_allclose(got.audio, expected, rtol=0, atol=1e-7)  # across the blocks' seams too


def test_read_16k_holds_a_block_not_the_file(tmp_path):
    """Two minutes of a stereo 44.1 kHz stem (42 MB): the whole-file way traces more than the file
    (its mono mix and the resampler's work), the block way the 16 kHz result and one block."""
    path = _write(tmp_path / "stem.wav", 120, 44100, 2)
    file_mb = path.stat().st_size / 2**20

    def traced(read) -> float:
        tracemalloc.start()
        try:
            read()
            return tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()

    whole = traced(lambda: to_16k(read_wav(path)[0], 44100))
    blocks = traced(lambda: read_16k(path))
    result_mb = 120 * 16000 * 4 / 2**20
    assert whole > file_mb
    assert blocks < result_mb + 0.5 * file_mb, f"read_16k traced {blocks:.0f} MB (the file: {file_mb:.0f} MB)"

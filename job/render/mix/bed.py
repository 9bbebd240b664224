"""The bed the converted lead is mixed over: the instrumental plus whatever vocals are not the
converted lead (the backing as sung, or converted; the lead's own room when kept), summed at the
mix rate in stereo, a block at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from job.render.media.audio import MIX_SAMPLE_RATE, WavReader, WavWriter, read_wav, write_wav

BLOCK = 1 << 18  # frames


def at_mix_rate(path: Path, out: Path) -> Path:
    """``path`` (any rate, mono or stereo float WAV) as 44.1 kHz stereo in ``out`` (itself when it is)."""
    audio, rate = read_wav(path)
    if rate == MIX_SAMPLE_RATE and audio.shape[0] == 2:
        return path
    if rate != MIX_SAMPLE_RATE:
        g = np.gcd(rate, MIX_SAMPLE_RATE)
        audio = resample_poly(audio, MIX_SAMPLE_RATE // g, rate // g, axis=-1).astype(np.float32)
    if audio.shape[0] == 1:
        audio = np.repeat(audio, 2, axis=0)
    return write_wav(out, audio, MIX_SAMPLE_RATE)


def bed(instrumental: Path, extras: list[Path], out: Path) -> Path:
    """``instrumental`` plus each of ``extras`` (44.1 kHz stereo float WAVs; each cut or padded to the
    instrumental's length) into ``out``; the instrumental itself when there is nothing to add."""
    if not extras:
        return instrumental
    readers = [WavReader(p) for p in (instrumental, *extras)]
    try:
        frames = readers[0].frames
        with WavWriter(out, MIX_SAMPLE_RATE, 2) as writer:
            for start in range(0, frames, BLOCK):
                end = min(frames, start + BLOCK)
                block = readers[0].read(start, end)
                for reader in readers[1:]:
                    part = reader.read(start, end)
                    block[:, : part.shape[-1]] += part
                writer.write(block)
    finally:
        for reader in readers:
            reader.close()
    return out

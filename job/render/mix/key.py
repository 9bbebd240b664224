"""Whole-song key change: the instrumental moved by a number of semitones, its tempo and length kept.

FFmpeg's ``rubberband`` filter (the Rubber Band library: a phase vocoder with transient handling,
in Debian's FFmpeg) with ``pitchq=quality`` and ``transients=mixed``: measured on a 220 Hz tone
moved up 2 semitones, these land on 246.94 Hz (0 cents off) where the defaults land 13 cents flat
and ``pitchq=quality`` with crisp transients 49 cents sharp (its phase resets disturb a steady
tone); clicks stay within 3.5 ms of where they were. The output is cut or padded to the input's
exact length, so it stays aligned with the vocals. The stem cache keeps the stems as separated;
the shifted copy lives in the render's work folder.
"""

from __future__ import annotations

from pathlib import Path

from job.render.media import ffmpeg
from job.render.media.audio import read_wav

FILTER = (
    "rubberband=pitch={ratio:.10f}:pitchq=quality:transients=mixed,"
    "apad=whole_len={frames},atrim=end_sample={frames}"  # exactly the stem's length
)


def shift_key(stem: Path, semitones: int, out: Path) -> Path:
    """``stem`` moved by ``semitones`` into ``out`` (the stem itself when 0): same rate, channels and
    length to the sample (padded or cut by FFmpeg in the same pass; nothing whole in memory)."""
    if semitones == 0:
        return stem
    frames = read_wav(stem, mmap=True)[0].shape[-1]
    chain = FILTER.format(ratio=2.0 ** (semitones / 12.0), frames=frames)
    ffmpeg.run([*ffmpeg.input_args(stem), "-af", chain, "-c:a", "pcm_f32le", "-y", str(out)])
    return out

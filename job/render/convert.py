"""Stage 3, convert: re-sing a vocals stem with a voice model (the RVC engine in :mod:`job.render.rvc`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from job.render.audio import CONTENT_SAMPLE_RATE, read_16k, write_wav
from job.render.rvc.engine import ConversionOptions, PartTimes, VoiceConverter
from shared.model_store import ResolvedVoice

__all__ = ["ConversionOptions", "ConvertedVocals", "VoiceConverter", "convert_vocals"]


class ConvertedVocals(BaseModel):
    path: Path
    sample_rate: int
    duration_s: float
    pitch_shift: int
    parts: PartTimes
    synthesised_s: float


def convert_vocals(
    converter: VoiceConverter,
    vocals: Path,
    voice: ResolvedVoice,
    out: Path,
    options: ConversionOptions | None = None,
    progress: Callable[[float], None] | None = None,
) -> ConvertedVocals:
    """Convert the WAV ``vocals`` with the resolved ``voice`` into the mono WAV ``out``."""
    source = read_16k(vocals)  # what the engine takes, read a block at a time: not the stem whole
    loaded = converter.load_voice(voice)
    frames = round(source.frames * loaded.sample_rate / source.sample_rate)
    result = converter.convert(source.audio, CONTENT_SAMPLE_RATE, loaded, options, progress, out_frames=frames)
    write_wav(out, result.audio, result.sample_rate)
    return ConvertedVocals(
        path=out,
        sample_rate=result.sample_rate,
        duration_s=len(result.audio) / result.sample_rate,
        pitch_shift=result.pitch_shift,
        parts=result.times,
        synthesised_s=result.synthesised_s,
    )

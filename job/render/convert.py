"""Stage 3, convert: re-sing a vocals stem with a voice model (the RVC engine in :mod:`job.render.rvc`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from job.render.media.audio import WavWriter, read_16k
from job.render.rvc.engine import ConversionOptions, PartTimes, VoiceConverter, prepare_input
from shared.model_store import ResolvedVoice

__all__ = ["ConversionOptions", "ConvertedVocals", "VoiceConverter", "convert_vocals"]


class ConvertedVocals(BaseModel):
    path: Path
    sample_rate: int
    duration_s: float
    pitch_shift: int
    key_change: int = 0
    parts: PartTimes
    synthesised_s: float
    shifts: list[tuple[float, float, int]] = []  # a duet's stretches (from_s, to_s) and each one's shift


def convert_vocals(
    converter: VoiceConverter,
    vocals: Path,
    voice: ResolvedVoice,
    out: Path,
    options: ConversionOptions | None = None,
    progress: Callable[[float], None] | None = None,
) -> ConvertedVocals:
    """Convert the WAV ``vocals`` with the resolved ``voice`` into the mono WAV ``out``, written as
    the conversion goes (the converted vocals are never whole in memory).

    Args:
        converter: the engine, with its shared models loaded once
        vocals: the separated vocals (a WAV at any rate)
        voice: the voice, resolved from the store
        out: the converted vocals' WAV, at the voice's rate
        options: the conversion options (defaults when None)
        progress: called with the fraction done, 0 to 1
    """
    source = read_16k(vocals)  # what the engine takes, read a block at a time: not the stem whole
    x, n_in = prepare_input(source.audio)
    loaded = converter.load_voice(voice)
    frames = round(source.frames * loaded.sample_rate / source.sample_rate)
    del source  # the conversion reads its padded, high-passed copy
    with WavWriter(out, loaded.sample_rate, 1) as writer:
        sink = lambda block: writer.write(block[None])  # noqa: E731 - mono blocks to the file
        stats = converter.convert_to(sink, x, n_in, loaded, frames, options, progress)
    return ConvertedVocals(
        path=out,
        sample_rate=stats.sample_rate,
        duration_s=stats.frames / stats.sample_rate,
        pitch_shift=stats.pitch_shift,
        key_change=stats.key_change,
        parts=stats.times,
        synthesised_s=stats.synthesised_s,
    )

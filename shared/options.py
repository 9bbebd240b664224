"""What a caller may choose about a cover: conversion knobs (the names RVC users know), separation
and mix settings, and the output formats. One home for each list.

Pure data, shared by the command line, the dispatcher and the job.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints


class F0Method(str, Enum):  # noqa: UP042 - str() of a member is its value, in messages
    RMVPE = "rmvpe"
    CREPE = "crepe"
    CREPE_TINY = "crepe-tiny"
    HARVEST = "harvest"
    PM = "pm"
    FCPE = "fcpe"


_ONE_TRACKER = "|".join(m.value for m in F0Method)  # letters, digits and "-": nothing to escape
KEY_NAME_PATTERN = "^[A-G](#|b)? (major|minor)$"
PITCH_METHOD_PATTERN = f"^({_ONE_TRACKER})(\\+({_ONE_TRACKER})){{0,3}}$"


def _one_of_each(value: str) -> str:
    """``a+b+a`` -> ``a+b``: each tracker once, in the order given (the order changes nothing)."""
    return "+".join(dict.fromkeys(str(value).split("+")))


def trackers(method: str) -> list[F0Method]:
    """The trackers a ``f0_method`` names (one, or up to four joined by '+')."""
    return [F0Method(name) for name in method.split("+")]


def _named_trackers(value: object) -> object:
    """A tracker, or trackers joined by '+', said in words when it is not (before the pattern's check)."""
    if isinstance(value, F0Method):
        return value.value
    if isinstance(value, str) and re.fullmatch(PITCH_METHOD_PATTERN, value):
        return value
    names = ", ".join(m.value for m in F0Method)
    raise ValueError(f"expected one of {names}, or up to four of them joined by '+'")


PitchMethod = Annotated[
    str,
    StringConstraints(pattern=PITCH_METHOD_PATTERN),  # first: the JSON Schema keeps the pattern
    BeforeValidator(_named_trackers),
    AfterValidator(_one_of_each),
]


class OutputFormat(str, Enum):  # noqa: UP042 - str() of a member is its value, in messages
    MP3 = "mp3"
    OPUS = "opus"
    M4A = "m4a"
    FLAC = "flac"
    WAV = "wav"


class FormatSpec(BaseModel):
    """How one output format is written and served."""

    extension: str
    content_type: str
    muxer: str = Field(description="FFmpeg's output format (-f).")
    codec: dict[str, str] = Field(description="FFmpeg's codec arguments, without the leading dash.")
    sample_rate: int
    measure: tuple[str, str] | None = Field(
        None,
        description=(
            "Where the codec changes the mix (lossy, or another rate): a streamable muxer for a copy of the "
            "encoded packets and the demuxer that reads it back, for measuring them while encoding."
        ),
    )


FORMATS: dict[OutputFormat, FormatSpec] = {
    OutputFormat.MP3: FormatSpec(
        extension="mp3",
        content_type="audio/mpeg",
        muxer="mp3",
        codec={"c:a": "libmp3lame", "q:a": "0"},
        sample_rate=44100,
        measure=("mp3", "mp3"),
    ),
    OutputFormat.OPUS: FormatSpec(
        extension="opus",
        content_type="audio/ogg",
        muxer="ogg",
        codec={"c:a": "libopus", "b:a": "160k"},
        sample_rate=48000,
        measure=("ogg", "ogg"),
    ),
    OutputFormat.M4A: FormatSpec(
        extension="m4a",
        content_type="audio/mp4",
        muxer="ipod",
        # no perceptual noise substitution: FFmpeg 5.1's native encoder made a +8.9 dBTP burst with it on a
        # dense, limited 3.2-minute mix (gone without), older iPods' decoders squeak on it, and 256 kb/s
        # has the bits to code noise as it is
        codec={"c:a": "aac", "b:a": "256k", "aac_pns": "0"},
        sample_rate=44100,
        measure=("adts", "aac"),  # MP4 needs a seekable file; ADTS streams the same AAC packets
    ),
    OutputFormat.FLAC: FormatSpec(
        extension="flac", content_type="audio/flac", muxer="flac", codec={"c:a": "flac"}, sample_rate=44100
    ),
    OutputFormat.WAV: FormatSpec(
        extension="wav", content_type="audio/wav", muxer="wav", codec={"c:a": "pcm_s24le"}, sample_rate=44100
    ),
}


def format_for(path: str, default: OutputFormat = OutputFormat.MP3) -> OutputFormat:
    """The output format a file name asks for by its extension (``default`` when it names none)."""
    suffix = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    return next((f for f, spec in FORMATS.items() if spec.extension == suffix), default)


class ConversionOptions(BaseModel):
    """The knobs RVC users know, with their usual defaults."""

    model_config = ConfigDict(extra="forbid")

    pitch: Annotated[int, Field(ge=-24, le=24)] | Literal["auto", "auto-fit"] = Field(
        0,
        description=(
            "Semitones (-24 to 24); 'auto': whole octaves toward the voice's range (the song keeps its key); "
            "'auto-fit': the semitone shift that fits the melody best into the voice's range, the instrumental "
            "moved by the same amount less whole octaves (a key change)."
        ),
    )
    f0_method: PitchMethod = Field(
        F0Method.RMVPE.value,
        description=(
            "Pitch tracker for the sung melody: rmvpe, crepe, crepe-tiny, harvest, pm or fcpe, or several joined "
            "by '+' (e.g. rmvpe+fcpe): a frame is voiced when at least half of them hear a voice, its pitch the "
            "median of their voiced estimates in cents."
        ),
    )
    index_rate: float = Field(0.75, ge=0, le=1, description="How much retrieved features replace the singer's.")
    filter_radius: int = Field(3, ge=0, le=7, description="Median-filter width for the pitch track (>= 3 applies).")
    rms_mix_rate: float = Field(0.25, ge=0, le=1, description="1: keep the output's loudness envelope; 0: the input's.")
    protect: float = Field(0.33, ge=0, le=0.5, description="Protect unvoiced consonants and breaths (0.5: off).")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the prior's noise and the NSF excitation.")
    speaker: int = Field(
        0, ge=0, le=1023, description="Speaker id, for voices trained on several (below the voice's `speakers`)."
    )
    autotune: float = Field(
        0.0,
        ge=0,
        le=1,
        description=(
            "Snap the sung notes toward the notes of the song's key: 0 off, 1 fully on the notes (voiced frames "
            "only, before the voice's shift)."
        ),
    )
    autotune_key: str | None = Field(
        None,
        pattern=KEY_NAME_PATTERN,
        description=(
            "The key autotune snaps toward, e.g. 'A minor' or 'Eb major'; unset: detected from the instrumental "
            "(from the melody itself where there is no instrumental, as in `cover convert`)."
        ),
    )
    key_shift: int = Field(
        0,
        ge=-12,
        le=12,
        description=(
            "Whole-song key change, semitones: the instrumental is pitch-shifted by it (tempo kept) and the "
            "vocals by it on top of `pitch`."
        ),
    )


class EffectsPreset(str, Enum):  # noqa: UP042 - str() of a member is its value, in messages
    NONE = "none"
    NATURAL = "natural"
    STUDIO = "studio"
    HALL = "hall"


class EffectOptions(BaseModel):
    """The converted vocals' effect chain before the mix (``job/render/mix/effects.py``): a preset,
    and any of its settings overridden one by one (unset: the preset's)."""

    effects: EffectsPreset = Field(
        EffectsPreset.NATURAL,
        description=(
            "none; natural (high-pass, gentle compression, a short room: the default); studio (de-essed, "
            "presence, firmer compression, a plate-length room); hall (a long hall)."
        ),
    )
    highpass_hz: float | None = Field(None, ge=20, le=400, description="High-pass corner, Hz (0 dB at the preset's).")
    compressor_threshold_db: float | None = Field(None, ge=-60, le=0, description="Compressor threshold, dBFS.")
    compressor_ratio: float | None = Field(None, ge=1, le=20, description="Compressor ratio (1: off).")
    reverb_s: float | None = Field(None, ge=0, le=6, description="Reverb time (RT60), seconds (0: no reverb).")
    reverb_wet: float | None = Field(None, ge=0, le=1, description="Reverb level against the dry voice, 0 to 1.")
    deesser: bool | None = Field(None, description="Tame sibilance (FFmpeg's de-esser).")
    presence_db: float | None = Field(None, ge=-12, le=12, description="Presence EQ at 3 kHz, dB.")


class BackingMode(str, Enum):  # noqa: UP042 - str() of a member is its value, in messages
    ORIGINAL = "original"
    CONVERT = "convert"
    MUTE = "mute"


class StemOptions(BaseModel):
    """What happens to the vocal stem before conversion, with the store's MDX-Net models
    (``job/render/separate/vocal_split.py``): lead and backing apart, the lead's reverb removed."""

    backing: BackingMode | None = Field(
        None,
        description=(
            "The backing vocals, split from the lead by the store's karaoke model: original (mixed back "
            "unconverted; the default when the store has a karaoke model), convert (sung by the voice, or by "
            "backing_voice), mute (left out). Unset without a karaoke model: the whole vocal stem is converted."
        ),
    )
    dereverb: bool = Field(
        False, description="Remove the lead's reverb before conversion (with the store's dereverb model)."
    )
    keep_room: bool = Field(
        False,
        description="With dereverb: add the removed reverb back after conversion (else the effects' reverb alone).",
    )
    stem_denoise: bool = Field(
        False,
        description="Run the MDX-Net models on x and -x, keeping what follows the input (less model noise, twice the "
        "time).",
    )


STEM_OPTION_NAMES = frozenset(StemOptions.model_fields)


class RequestOptions(ConversionOptions, EffectOptions, StemOptions):
    """Conversion options, the vocals' effects, the vocal stem's split and the output format: what a
    cover request may set."""

    format: OutputFormat = OutputFormat.MP3


class SeparationOptions(BaseModel):
    """How Demucs splits the song (every field changes the stems, so all are in the stem cache key)."""

    model: str = Field("htdemucs", description="Demucs model or bag name.")
    segment: float | None = Field(None, gt=0, description="Chunk length in seconds; None: the model's own.")
    overlap: float = Field(0.25, ge=0, lt=1, description="Overlap between chunks.")
    shifts: int = Field(0, ge=0, le=10, description="Random-shift averaging passes (0: deterministic).")


class MixOptions(EffectOptions):
    """How the converted vocals and the instrumental become the cover."""

    vocals_gain_db: float = Field(0.0, ge=-30, le=30, description="Gain on the converted vocals, dB.")
    instrumental_gain_db: float = Field(0.0, ge=-30, le=30, description="Gain on the instrumental, dB.")
    loudness_lufs: float = Field(-14.0, ge=-40, le=-5, description="Integrated loudness target.")
    true_peak_dbtp: float = Field(-1.0, ge=-9, le=0, description="True-peak ceiling.")
    format: OutputFormat = Field(OutputFormat.MP3, description="Output format.")

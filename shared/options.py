"""What a caller may choose about a cover: conversion knobs (the names RVC users know) and format.

Pure data, shared by the command line, the dispatcher and the job.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class F0Method(str, Enum):
    RMVPE = "rmvpe"
    CREPE = "crepe"
    CREPE_TINY = "crepe-tiny"
    HARVEST = "harvest"
    PM = "pm"


class OutputFormat(str, Enum):
    MP3 = "mp3"
    OPUS = "opus"
    M4A = "m4a"
    FLAC = "flac"
    WAV = "wav"


class ConversionOptions(BaseModel):
    """The knobs RVC users know, with their usual defaults."""

    model_config = ConfigDict(extra="forbid")

    pitch: int | Literal["auto"] = Field(0, description="Semitones, or 'auto' (whole octaves to the voice's range).")
    f0_method: F0Method = F0Method.RMVPE
    index_rate: float = Field(0.75, ge=0, le=1, description="How much retrieved features replace the singer's.")
    filter_radius: int = Field(3, ge=0, le=7, description="Median-filter width for the pitch track (>= 3 applies).")
    rms_mix_rate: float = Field(0.25, ge=0, le=1, description="1: keep the output's loudness envelope; 0: the input's.")
    protect: float = Field(0.33, ge=0, le=0.5, description="Protect unvoiced consonants and breaths (0.5: off).")
    seed: int = Field(0, description="Seed of the prior's noise and the NSF excitation.")
    speaker: int = Field(0, ge=0)


class RequestOptions(ConversionOptions):
    """Conversion options plus the output format: what a cover request may set."""

    format: OutputFormat = OutputFormat.MP3

"""Voice models: the ``voice.json`` contract (where voices live is :mod:`shared.model_store`'s business).

``GET /models`` serves :class:`VoiceInfo` exactly as stored; the command line lists it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from shared.hashing import sha256_of

VOICE_FILE = "voice.json"
MODEL_FILE = "model.pth"
INDEX_FILE = "model.index"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class FileDigest(BaseModel):
    sha256: str
    size: int


class VoiceInfo(BaseModel):
    name: str = Field(pattern=NAME_PATTERN.pattern, description="Slug used in requests and paths.")
    display_name: str
    description: str = ""
    rvc_version: Literal["v1", "v2"]
    sample_rate: int
    f0: bool = Field(description="Whether the voice uses pitch (NSF decoder).")
    has_index: bool
    suggested_pitch: int = Field(0, ge=-24, le=24, description="Semitones the voice's author suggests.")
    vocal_range_hz: tuple[float, float] | None = Field(
        None, description="Typical sung range (low, high) in Hz; used by the 'auto' pitch option."
    )
    license: str = "unknown"
    consent: str = Field("", description="Who consented to this voice being modelled, and how.")
    untrained_demo: bool = Field(False, description="True for the random-weight demo voice.")
    files: dict[str, FileDigest]

    @property
    def model_version(self) -> str:
        """Identifies the weights: the first 16 hex digits of model.pth's sha256."""
        return self.files[MODEL_FILE].sha256[:16]


def digest_of(path: Path) -> FileDigest:
    return FileDigest(sha256=sha256_of(path), size=path.stat().st_size)


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:64]
    return slug or "voice"

"""Voice models: the ``voice.json`` contract (where voices live is :mod:`shared.model_store`'s business).

``GET /models`` serves :class:`VoiceInfo` exactly as stored; the command line lists it.
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from shared.hashing import sha256_of
from shared.names import FILE_NAME_PATTERN, VOICE_NAME_PATTERN

VOICE_FILE = "voice.json"
MODEL_FILE = "model.pth"
INDEX_FILE = "model.index"
NAME_PATTERN = re.compile(VOICE_NAME_PATTERN)
FileName = Annotated[str, StringConstraints(pattern=FILE_NAME_PATTERN)]


class FileDigest(BaseModel):
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class VoiceRights(BaseModel):
    """Whose voice a model is, and on what grounds it may sing: the record a deployment requires
    (``COVER_REQUIRE_RIGHTS``) before a voice sings anything, carried into each cover's manifest."""

    model_config = ConfigDict(extra="forbid")

    voice_of: str = Field(min_length=1, max_length=200, description="Whose voice this is (a person, or what it is).")
    consented_by: str = Field(
        min_length=1, max_length=200, description="Who consented to the voice being modelled and used."
    )
    consented_on: date | None = Field(None, description="When (ISO date).")
    terms: str = Field(
        min_length=1, max_length=2000, description="Under what terms: a licence (SPDX id or name) or the agreement."
    )
    evidence: str | None = Field(
        None, max_length=500, description="Where the consent is recorded (a document id or URL), for an audit."
    )
    restrictions: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=20, description="What the voice may not be used for, e.g. 'no commercial use'."
    )


DEMO_RIGHTS = VoiceRights(
    voice_of="no person: an untrained model with random weights (the demo voice)",
    consented_by="not applicable: no person's voice",
    terms="CC0-1.0",
    restrictions=["demonstration only: it sings noise"],
)


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
        None,
        description=(
            "Typical sung range (low, high) in Hz: the 5th and 95th percentile of the voice's own singing "
            "(`cover models add --clips`) or as given (`--range`); used by the 'auto' and 'auto-fit' pitch options."
        ),
    )
    vocal_median_hz: float | None = Field(
        None, description="The median of the voice's own singing, Hz (with --clips); 'auto-fit' aims the melody at it."
    )
    license: str = Field("unknown", description="Free text, from before `rights`: kept as it was written.")
    consent: str = Field("", description="Free text, from before `rights`: kept as it was written.")
    rights: VoiceRights | None = Field(
        None,
        description="Whose voice it is, who consented, when, on what terms, the evidence, the restrictions "
        "(`cover models add --voice-of ...` or `--rights FILE.json`); required by COVER_REQUIRE_RIGHTS.",
    )
    untrained_demo: bool = Field(False, description="True for the random-weight demo voice.")
    speakers: int = Field(1, ge=1, le=1024, description="How many speakers the model was trained on.")
    reference_embedding: list[float] | None = Field(
        None,
        description="The voice's speaker embedding (Resemblyzer, 256 values), computed when it was added; the "
        "quality stage compares each cover's vocals with it.",
    )
    files: dict[FileName, FileDigest] = Field(
        description="Every file of the voice (base names only) and its digest; synced files are checked against it."
    )

    @model_validator(mode="after")
    def _names_its_files(self) -> VoiceInfo:
        """A ``voice.json`` names the model it describes, and its index exactly when it says it has one."""
        if MODEL_FILE not in self.files:
            raise ValueError(f"files must include {MODEL_FILE}")
        if self.has_index != (INDEX_FILE in self.files):
            raise ValueError(
                f"has_index is {self.has_index} but files {'lack' if self.has_index else 'hold'} {INDEX_FILE}"
            )
        return self

    @property
    def model_version(self) -> str:
        """Identifies the weights: the first 16 hex digits of model.pth's sha256."""
        return self.files[MODEL_FILE].sha256[:16]


def digest_of(path: Path) -> FileDigest:
    return FileDigest(sha256=sha256_of(path), size=path.stat().st_size)


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:64]
    return slug or "voice"

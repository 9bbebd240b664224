"""Voice models: the ``voice.json`` contract and the local store's ``voices/NAME/`` folders.

``GET /models`` serves :class:`VoiceInfo` exactly as stored; the command line lists it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from shared.errors import CoverError, ErrorCode
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
        None, description="Typical sung range (low, high) in Hz; used by the 'auto' pitch option.")
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


class LocalVoiceStore:
    """The ``voices/`` folder of a model store."""

    def __init__(self, models_dir: Path) -> None:
        self.root = Path(models_dir) / "voices"

    def folder(self, name: str) -> Path:
        return self.root / name

    def read(self, folder: Path) -> VoiceInfo:
        try:
            return VoiceInfo.model_validate_json((folder / VOICE_FILE).read_text())
        except (OSError, ValidationError) as exc:
            raise CoverError(ErrorCode.MODEL_CORRUPT, f"{folder / VOICE_FILE} is unreadable: {exc}") from None

    def list(self) -> list[VoiceInfo]:
        if not self.root.is_dir():
            return []
        return [self.read(f) for f in sorted(self.root.iterdir()) if (f / VOICE_FILE).is_file()]

    def get(self, name: str) -> tuple[VoiceInfo, Path]:
        folder = self.folder(name)
        if not NAME_PATTERN.match(name) or not (folder / VOICE_FILE).is_file():
            known = ", ".join(v.name for v in self.list()) or "none installed"
            raise CoverError(ErrorCode.VOICE_UNKNOWN, f"unknown voice '{name}' (known: {known})")
        return self.read(folder), folder

    def verify(self, name: str) -> list[str]:
        """Problems with a voice's files (empty when its hashes match)."""
        info, folder = self.get(name)
        problems = []
        for file, expected in info.files.items():
            path = folder / file
            if not path.is_file():
                problems.append(f"{file} is missing")
            elif sha256_of(path) != expected.sha256:
                problems.append(f"{file} does not match its sha256")
        return problems

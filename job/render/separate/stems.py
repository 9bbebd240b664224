"""The stem cache: separated stems kept by what determines their numbers, so a second voice on the
same song skips separation.

A cache is a :class:`shared.storage.Storage`: the bucket for the service (runners share stems), a
local folder for the command line (``COVER_STEM_CACHE_DIR``). Keys are
``stems/{audio_sha256}/{separation_key}/{vocals,no_vocals}.wav`` (the key table in
:mod:`shared.storage`). A stem pair is visible only once both files are stored; ``no_vocals`` is
written last and looked up first.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from pydantic import BaseModel

from shared.storage import Keys, Storage

log = logging.getLogger("melodia.stems")

STEM_NAMES = ("vocals", "no_vocals")


class Stems(BaseModel):
    vocals: Path
    no_vocals: Path
    sample_rate: int


class StemKey(BaseModel):
    """Everything that changes the stems' numbers: the audio, the model's files and the settings of
    the separation, and the arithmetic (precision, kernels). Not the device."""

    audio_sha256: str
    model: str
    model_sha256: str
    segment: float | None
    overlap: float
    shifts: int
    precision: str
    kernels: str

    @property
    def separation_key(self) -> str:
        settings = self.model_dump_json(exclude={"audio_sha256"})
        return hashlib.sha256(settings.encode()).hexdigest()[:16]


class StemCache:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def get(self, key: StemKey, out_dir: Path, sample_rate: int) -> Stems | None:
        """The cached stems copied into ``out_dir``, or None when they are not (all) cached."""
        paths = self.get_files(key.audio_sha256, key.separation_key, STEM_NAMES, out_dir)
        return None if paths is None else Stems(sample_rate=sample_rate, **paths)

    def put(self, key: StemKey, stems: Stems) -> None:
        self.put_files(key.audio_sha256, key.separation_key, {name: getattr(stems, name) for name in STEM_NAMES})

    def get_files(
        self, audio_sha256: str, separation_key: str, names: tuple[str, ...], out_dir: Path
    ) -> dict[str, Path] | None:
        """Stems (Demucs' pair, or those split further by ``job/render/separate/vocal_split.py``)
        copied into ``out_dir``, or None unless all are cached (the last name is written last and
        looked up first).

        Args:
            audio_sha256: the song's audio digest
            separation_key: the split's key (what made these stems)
            names: the stems' names, in the order they are written
            out_dir: where the copies go
        """
        keys = {name: Keys.stem(audio_sha256, separation_key, name) for name in names}
        if any(self.storage.head(keys[name]) is None for name in reversed(names)):
            return None
        log.info("stems from the cache: %s", keys[names[0]])
        return {name: self.storage.download(key, out_dir / f"{name}.wav") for name, key in keys.items()}

    def put_files(self, audio_sha256: str, separation_key: str, paths: dict[str, Path]) -> None:
        for name, path in paths.items():
            self.storage.upload_file(Keys.stem(audio_sha256, separation_key, name), path, "audio/wav")

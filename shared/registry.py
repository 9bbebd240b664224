"""The voice-model registry: the bucket's ``voices/`` prefix (production's source of truth) over the
local model store (the embedded default, and the cache the job loads from).

``info(name)`` reads only ``voice.json`` (what the dispatcher needs to validate a request and
compute its cover id). ``get(name)`` makes sure the voice's files are in the local store: when the
bucket holds the voice and the local copy is missing or differs, the files are downloaded into a
staging folder, each checked against the sha256 in ``voice.json``, and moved into place in one
rename; a file that does not match is refused (``model.hash_mismatch``) and nothing changes.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pydantic import ValidationError

from shared.errors import CoverError, ErrorCode
from shared.hashing import sha256_of
from shared.storage import Keys, Storage
from shared.voices import NAME_PATTERN, VOICE_FILE, LocalVoiceStore, VoiceInfo


class VoiceRegistry:
    def __init__(self, models_dir: Path, storage: Storage | None = None) -> None:
        self.local = LocalVoiceStore(models_dir)
        self.storage = storage

    def _remote(self, name: str) -> VoiceInfo | None:
        if self.storage is None or not NAME_PATTERN.match(name):
            return None
        raw = self.storage.get_bytes(Keys.voice(name, VOICE_FILE))
        if raw is None:
            return None
        try:
            return VoiceInfo.model_validate_json(raw)
        except ValidationError as exc:
            raise CoverError(ErrorCode.MODEL_CORRUPT, f"voices/{name}/{VOICE_FILE} in the bucket is invalid: {exc}") from None

    def list(self) -> list[VoiceInfo]:
        voices = {v.name: v for v in self.local.list()}
        if self.storage is not None:
            for key in self.storage.list("voices/"):
                parts = key.split("/")
                if len(parts) == 3 and parts[2] == VOICE_FILE:
                    remote = self._remote(parts[1])
                    if remote is not None:
                        voices[remote.name] = remote
        return [voices[name] for name in sorted(voices)]

    def info(self, name: str) -> VoiceInfo:
        remote = self._remote(name)
        return remote if remote is not None else self.local.get(name)[0]

    def get(self, name: str) -> tuple[VoiceInfo, Path]:
        remote = self._remote(name)
        if remote is None:
            return self.local.get(name)
        folder = self.local.folder(name)
        try:
            local_info = self.local.read(folder) if (folder / VOICE_FILE).is_file() else None
        except CoverError:
            local_info = None
        if local_info is not None and local_info.files == remote.files and not self.local.verify(name):
            return local_info, folder
        return self.sync(remote), folder

    def sync(self, info: VoiceInfo) -> VoiceInfo:
        assert self.storage is not None
        self.local.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.local.root, prefix=".sync-") as tmp:
            staged = Path(tmp) / "voice"
            for file, digest in info.files.items():
                path = self.storage.download(Keys.voice(info.name, file), staged / file)
                if sha256_of(path) != digest.sha256:
                    raise CoverError(ErrorCode.MODEL_HASH_MISMATCH,
                                     f"voices/{info.name}/{file} in the bucket does not match its sha256")
            (staged / VOICE_FILE).write_text(info.model_dump_json(indent=2))
            target = self.local.folder(info.name)
            if target.exists():
                shutil.rmtree(target)
            staged.rename(target)
        return info


def publish_voice(storage: Storage, folder: Path) -> VoiceInfo:
    """Upload a local voice folder to the bucket (voice.json last, so readers never see half a voice)."""
    info = LocalVoiceStore(folder.parent).read(folder)
    for file in info.files:
        storage.upload_file(Keys.voice(info.name, file), folder / file)
    storage.put_bytes(Keys.voice(info.name, VOICE_FILE), info.model_dump_json(indent=2).encode())
    return info

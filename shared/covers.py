"""Which cover a request asks for: its deterministic id, from the song's object, the voice and the options."""

from __future__ import annotations

from shared.errors import CoverError, ErrorCode
from shared.events import CoverCompleted, CoverRequest, cover_id
from shared.model_store import ModelStore
from shared.storage import Keys, Storage
from shared.voices import VoiceInfo


def song_identity(storage: Storage, keys: Keys, song_id: str) -> str:
    """What identifies the song's audio: its object and that object's ETag."""
    head = storage.head(keys.song(song_id))
    if head is None:
        raise CoverError(ErrorCode.INPUT_NOT_FOUND, f"song {song_id} is not in the catalog bucket")
    return f"{storage.bucket}/{head.key}@{head.etag}"


def resolve(storage: Storage, keys: Keys, models: ModelStore, request: CoverRequest) -> tuple[str, VoiceInfo]:
    """(cover id, voice) of a request, or :class:`CoverError` (unknown voice, missing song).

    Args:
        storage: the bucket
        keys: the bucket's key table
        models: the model store (the voice's ``voice.json``)
        request: the request
    """
    info = models.voice_info(request.voice_model)
    if request.options.speaker >= info.speakers:
        raise CoverError(
            ErrorCode.OPTIONS_INVALID,
            f"speaker {request.options.speaker} is out of range: voice '{info.name}' has {info.speakers}",
        )
    return cover_id(song_identity(storage, keys, request.song_id), info.name, info.model_version, request.options), info


def served(completed: CoverCompleted, storage: Storage) -> CoverCompleted:
    """A stored cover as it is served: its download URL signed now (URLs are never stored, so none
    is served after it expires)."""
    return completed.model_copy(update={"url": storage.url(completed.key)})

"""Which cover a request asks for: its deterministic id, from the song's object, the voice and the options."""

from __future__ import annotations

from shared.errors import CoverError, ErrorCode
from shared.events import CoverCompleted, CoverRequest, cast_identity, cover_id
from shared.model_store import ModelStore
from shared.storage import Keys, Storage
from shared.voices import VoiceInfo


def song_identity(storage: Storage, keys: Keys, song_id: str) -> str:
    """What identifies the song's audio: its object and that object's ETag."""
    head = storage.head(keys.song(song_id))
    if head is None:
        raise CoverError(ErrorCode.INPUT_NOT_FOUND, f"song {song_id} is not in the catalog bucket")
    return f"{storage.bucket}/{head.key}@{head.etag}"


def check_rights(infos: list[VoiceInfo]) -> None:
    """``voice.no_rights`` naming every voice without a rights record (``COVER_REQUIRE_RIGHTS``)."""
    lacking = [info.name for info in infos if info.rights is None]
    if lacking:
        raise CoverError(
            ErrorCode.VOICE_NO_RIGHTS,
            f"voice {', '.join(lacking)} has no rights record (whose voice, who consented, on what terms), which this "
            "deployment requires: add it with `cover models add ... --voice-of ... --consented-by ... --terms ...`",
        )


def resolve(
    storage: Storage, keys: Keys, models: ModelStore, request: CoverRequest, require_rights: bool = False
) -> tuple[str, VoiceInfo, dict[str, VoiceInfo]]:
    """(cover id, main voice, every further voice by name) of a request, or :class:`CoverError`
    (an unknown voice, one without a rights record where they are required, a speaker out of range,
    a missing song).

    Args:
        storage: the bucket
        keys: the bucket's key table
        models: the model store (each voice's ``voice.json``)
        request: the request
        require_rights: refuse a voice without a rights record (``COVER_REQUIRE_RIGHTS``)
    """
    infos = {name: models.voice_info(name) for name in request.voice_names()}
    if require_rights:
        check_rights(list(infos.values()))
    info = infos[request.voice_model]
    speakers = [(request.voice_model, request.options.speaker)]
    speakers += [(p.voice_model, p.options.speaker) for p in request.voices if p.options is not None]
    for name, speaker in speakers:
        if speaker >= infos[name].speakers:
            raise CoverError(
                ErrorCode.OPTIONS_INVALID,
                f"speaker {speaker} is out of range: voice '{name}' has {infos[name].speakers}",
            )
    cast = cast_identity(request, {name: i.model_version for name, i in infos.items()})
    cid = cover_id(song_identity(storage, keys, request.song_id), info.name, info.model_version, request.options, cast)
    return cid, info, {name: i for name, i in infos.items() if name != request.voice_model}


def served(completed: CoverCompleted, storage: Storage) -> CoverCompleted:
    """A stored cover as it is served: its download URL signed now (URLs are never stored, so none
    is served after it expires)."""
    return completed.model_copy(update={"url": storage.url(completed.key)})

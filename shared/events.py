"""Requests and events, as CloudEvents carried in Pub/Sub messages (binary content mode).

A message's data is the event's JSON data; its attributes carry the CloudEvents context
(``ce-specversion``, ``ce-type``, ``ce-source``, ``ce-id``, ``ce-time``, ``ce-subject``) plus plain
attributes a subscription can filter on: ``type``, ``cover_id``, ``song_id``, ``voice``.
JSON Schemas of every model here are generated into ``schemas/`` (``python -m shared.schemas``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.cast import MAX_VOICES, VoicePart
from shared.errors import CoverError, ErrorCode
from shared.names import REQUEST_ID_PATTERN, SONG_ID_MAX_LENGTH, SONG_ID_PATTERN, VOICE_NAME_PATTERN, printable
from shared.options import STEM_OPTION_NAMES, BackingMode, OutputFormat, RequestOptions, StemOptions
from shared.provenance import ProvenanceSummary
from shared.quality import QualityReport
from shared.routing import ATTRIBUTE, Runner
from shared.stages import Stage
from shared.voices import VoiceRights

SOURCE = "//melodia-cover"
PIPELINE_VERSION = "1"  # bump when a change alters rendered output for the same inputs

REQUESTED = "cover.requested"
PROGRESS = "cover.progress"
COMPLETED = "cover.completed"
FAILED = "cover.failed"


class CoverRequest(BaseModel):
    """``cover.requested`` data, and the body of ``POST /cover``."""

    model_config = ConfigDict(extra="forbid")

    song_id: str = Field(
        pattern=SONG_ID_PATTERN,
        max_length=SONG_ID_MAX_LENGTH,
        description="The Catalog's song id: /-separated segments of letters, digits, '.', '_', '-', "
        "each starting with a letter or digit (no empty, '.' or '..' segment).",
    )
    voice_model: str = Field(
        pattern=VOICE_NAME_PATTERN,
        description="A voice name, as GET /models lists them: the main voice, which sings all of the lead that "
        "`voices` does not give to another.",
    )
    options: RequestOptions = Field(default_factory=RequestOptions)
    voices: list[VoicePart] = Field(
        default_factory=list,
        max_length=MAX_VOICES,
        description="Further voices on the lead (a duet; a range given to several voices is sung in unison), each "
        "with the ranges it sings in seconds and optionally its own conversion options. Empty: voice_model sings "
        "it all.",
    )
    backing_voice: str | None = Field(
        None,
        pattern=VOICE_NAME_PATTERN,
        description="The voice that sings the backing vocals with options.backing 'convert' (unset: voice_model).",
    )
    runner: Runner | None = Field(
        None,
        description="Which runner renders it: cpu (a Cloud Run Job execution) or gpu (a GPU runner); "
        "unset: the deployment's default. Carried as the message attribute 'runner', which the "
        "subscriptions filter on; it does not change the cover.",
    )
    request_id: str | None = Field(
        None,
        pattern=REQUEST_ID_PATTERN,
        description="The caller's id for this request, echoed in every event that answers it. Unset: "
        "the dispatcher assigns one; a directly published message's ce-id (else its Pub/Sub message "
        "id) stands in.",
    )
    publish_below_gate: bool = Field(
        False,
        description="Publish the cover even when its quality scores stay below the gate's thresholds "
        "(otherwise it ends as cover.failed with code quality.gate and the scores); it does not change the cover.",
    )
    allow_no_vocals: bool = Field(
        False,
        description="Render the cover even when the song's separated vocals hold no singing (under one sung "
        "second; otherwise, under the quality gate, it ends before conversion as cover.failed with code "
        "input.no_vocals).",
    )

    @model_validator(mode="after")
    def _cast_fits(self) -> CoverRequest:
        if self.voices and self.options.pitch == "auto-fit":
            raise ValueError(
                "pitch 'auto-fit' moves the whole song's key for one voice: a duet takes a number of semitones or "
                "'auto', and key_shift for the song"
            )
        if self.backing_voice is not None and self.options.backing is not BackingMode.CONVERT:
            raise ValueError("backing_voice sings the backing only with options.backing 'convert'")
        return self

    def voice_names(self) -> list[str]:
        """Every voice the request names, the main voice first, each once."""
        named = [self.voice_model, *(p.voice_model for p in self.voices)]
        return list(dict.fromkeys([*named, *([self.backing_voice] if self.backing_voice else [])]))


REQUEST_ID_FIELD = Field(
    None, description="The id of the request this event answers (CoverRequest.request_id, its ce-id or message id)."
)


class CoverProgress(BaseModel):
    """``cover.progress``: ``accepted`` when a runner takes the request, then each stage's
    progress (its end reported once) and the whole render's (``overall``)."""

    cover_id: str
    request_id: str | None = REQUEST_ID_FIELD
    song_id: str
    voice_model: str
    stage: Stage = Field(description="The stage this event reports (shared/stages.py lists them in order).")
    progress: float = Field(ge=0, le=1, description="This stage's progress.")
    overall: float = Field(0.0, ge=0, le=1, description="The whole render's progress, across stages.")
    runner: str


class CoverCompleted(BaseModel):
    """Everything the Catalog needs to publish the cover; also stored as the cover's manifest
    (without ``request_id``, which names the request each publication answers)."""

    cover_id: str
    request_id: str | None = REQUEST_ID_FIELD
    song_id: str
    voice_model: str
    voice_version: str
    options: RequestOptions
    voices: list[VoicePart] = Field(default_factory=list, description="The further voices, as requested.")
    backing_voice: str | None = None
    voice_versions: dict[str, str] = Field(
        default_factory=dict, description="Every further voice's version (the main voice's is voice_version)."
    )
    voice_rights: dict[str, VoiceRights | None] = Field(
        default_factory=dict,
        description="Every voice of the cover and its rights record as it stood when the cover was made (None: none).",
    )
    bucket: str
    key: str
    url: str = Field(
        description="A presigned download URL, signed when the event is published or the status "
        "served (never stored); empty in the stored manifest."
    )
    format: OutputFormat
    content_type: str
    duration_s: float
    size_bytes: int
    sha256: str
    loudness_lufs: float
    true_peak_dbtp: float
    timings: dict[str, float]
    stems_cached: bool
    runner: str
    completed_at: datetime
    quality: QualityReport | None = Field(
        None, description="The cover's measured quality (docs/quality.md); absent when not measured."
    )
    provenance: ProvenanceSummary | None = Field(
        None,
        description="The cover's Content Credentials (C2PA, embedded in the file): manifest id, signer, "
        "AI-generated; absent when not signed (COVER_PROVENANCE=off).",
    )


class CoverFailed(BaseModel):
    cover_id: str | None = None
    request_id: str | None = REQUEST_ID_FIELD
    song_id: str | None = None
    voice_model: str | None = None
    code: ErrorCode
    message: str
    retryable: bool
    attempt: int = Field(ge=1)
    runner: str
    quality: QualityReport | None = Field(None, description="The scores, for code quality.gate.")


class CoverStatus(BaseModel):
    """``GET /covers/{cover_id}``."""

    cover_id: str
    state: str = Field(
        pattern="^(queued|running|stalled|completed|failed)$",
        description="stalled: running, but its runner stopped renewing its lease (gone); a redelivery takes it over",
    )
    stage: Stage | None = None
    progress: float | None = None
    overall: float | None = None
    completed: CoverCompleted | None = None
    error: CoverFailed | None = None
    updated_at: datetime


EVENT_MODELS: dict[str, type[BaseModel]] = {
    REQUESTED: CoverRequest,
    PROGRESS: CoverProgress,
    COMPLETED: CoverCompleted,
    FAILED: CoverFailed,
}


STEM_DEFAULTS = StemOptions().model_dump(mode="json")


def cover_id(
    song_identity: str,
    voice: str,
    voice_version: str,
    options: RequestOptions,
    cast: dict[str, Any] | None = None,
) -> str:
    """Deterministic id of a cover: what determines its output, hashed. The stem options at their
    defaults and an empty cast are left out, so a request that names none keeps the id it had before
    they existed.

    Args:
        song_identity: the song object's identity (bucket, key, ETag)
        voice: the voice's name
        voice_version: the voice's version (its model's sha256 prefix)
        options: the request's options
        cast: :func:`cast_identity` of the request's further voices (None or empty: one voice)
    """
    dumped = options.model_dump(mode="json")
    for name in STEM_OPTION_NAMES:
        if dumped[name] == STEM_DEFAULTS[name]:
            del dumped[name]
    identity: dict[str, Any] = {
        "song": song_identity,
        "voice": voice,
        "voice_version": voice_version,
        "options": dumped,
        "pipeline": PIPELINE_VERSION,
    }
    if cast:
        identity["cast"] = cast
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def cast_identity(request: CoverRequest, versions: dict[str, str]) -> dict[str, Any]:
    """What a request's further voices add to its cover's identity: each voice with its version, its
    ranges and its options, and the backing's voice (empty when the main voice sings everything).

    Args:
        request: the request
        versions: each named voice's version
    """
    cast: dict[str, Any] = {}
    if request.voices:
        cast["voices"] = [
            {
                "voice": part.voice_model,
                "voice_version": versions[part.voice_model],
                "ranges": [[r.start_s, r.end_s] for r in part.ranges],
                "options": None if part.options is None else part.options.model_dump(mode="json"),
            }
            for part in request.voices
        ]
    if request.backing_voice:
        cast["backing_voice"] = {"voice": request.backing_voice, "voice_version": versions[request.backing_voice]}
    return cast


def answer_event_id(kind: str, cover_id: str | None, request_id: str | None, data: bytes) -> str:
    """The ``ce-id`` of a final answer (``completed`` or ``failed``): one per cover and request id
    (before a cover id is known, per request message), the same on every runner and redelivery of
    that request, distinct across facts. The rule for consumers: deduplicate by ``ce-id``; each
    request gets its own answer even when two requests name one cover.

    Args:
        kind: ``completed`` or ``failed``
        cover_id: the cover (None when the request could not be read)
        request_id: the request's id
        data: the request message's data (identifies it when there is no cover id)
    """
    subject = cover_id or f"request-{hashlib.sha256(data).hexdigest()[:32]}"
    return f"{subject}.{kind}" + (f".{request_id}" if request_id else "")


def now() -> datetime:
    return datetime.now(UTC)


def to_message(
    event_type: str, data: BaseModel, subject: str | None = None, event_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """(data bytes, attributes) of a Pub/Sub message carrying this CloudEvent.

    Args:
        event_type: the CloudEvents type
        data: the event's data
        subject: ``ce-subject`` (the cover id)
        event_id: ``ce-id`` (default: a new one)
    """
    payload = data.model_dump(mode="json")
    attributes = {
        "ce-specversion": "1.0",
        "ce-type": event_type,
        "ce-source": SOURCE,
        "ce-id": event_id or str(uuid.uuid4()),
        "ce-time": now().isoformat(),
        "content-type": "application/json",
        "type": event_type,
    }
    if subject:
        attributes["ce-subject"] = subject
        attributes["cover_id"] = subject
    for name, field in (("song_id", "song_id"), ("voice", "voice_model")):
        if payload.get(field):
            attributes[name] = str(payload[field])
    if event_type == REQUESTED and payload.get("runner"):
        attributes[ATTRIBUTE] = str(payload["runner"])  # what the runners' subscriptions filter on
    return json.dumps(payload, separators=(",", ":")).encode(), attributes


def check_cloudevent(event_type: str | None, specversion: str | None) -> None:
    """A message on the requests topic that names its CloudEvents type must be a
    ``cover.requested`` of spec version 1.0 (a ``cover.completed`` published there by mistake is
    refused, not rendered); one that names none is taken as a request (the bare-JSON format)."""
    if event_type is not None and event_type != REQUESTED:
        raise CoverError(
            ErrorCode.OPTIONS_INVALID, f"the message is a {printable(event_type)!r} event, not {REQUESTED}"
        )
    if specversion is not None and specversion != "1.0":
        raise CoverError(
            ErrorCode.OPTIONS_INVALID, f"CloudEvents spec version {printable(specversion)!r}: 1.0 expected"
        )


def parse_request(data: bytes, attributes: Mapping[str, str] | None = None) -> CoverRequest:
    """A ``cover.requested`` payload, or :class:`CoverError` (``options.invalid``) saying what is
    wrong. ``attributes``: the message's, whose ``ce-type`` and ``ce-specversion`` are checked."""
    attributes = attributes or {}
    check_cloudevent(attributes.get("ce-type"), attributes.get("ce-specversion"))
    try:
        body: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CoverError(ErrorCode.OPTIONS_INVALID, "the request is not JSON (or nests too deeply)") from None
    if isinstance(body, dict) and "data" in body and "specversion" in body:  # structured-mode CloudEvent
        check_cloudevent(str(body.get("type")), str(body["specversion"]))
        body = body["data"]
    try:
        return CoverRequest.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise CoverError(ErrorCode.OPTIONS_INVALID, f"the request does not match the schema: {problems}") from None


class RequestIdentity(BaseModel):
    """What names a request in the events that answer it, read as far as the message allows."""

    request_id: str | None = None
    song_id: str | None = None
    voice_model: str | None = None


def request_identity(data: bytes, attributes: Mapping[str, str] | None = None, message_id: str = "") -> RequestIdentity:
    """The request id (the data's ``request_id``, else the message's ``ce-id``, else its Pub/Sub
    message id), song id and voice of a message, even of one that is not a valid request: each
    field that can be read as a short, printable string, and nothing else."""
    attributes = attributes or {}
    body: Any = None
    with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
        body = json.loads(data)
    if isinstance(body, dict) and isinstance(body.get("data"), dict) and "specversion" in body:
        body = body["data"]
    fields = body if isinstance(body, dict) else {}

    def readable(value: Any) -> str | None:
        return printable(value)[:SONG_ID_MAX_LENGTH] if isinstance(value, str) and value.strip() else None

    return RequestIdentity(
        request_id=readable(fields.get("request_id")) or readable(attributes.get("ce-id")) or readable(message_id),
        song_id=readable(fields.get("song_id")),
        voice_model=readable(fields.get("voice_model")),
    )

"""Requests and events, as CloudEvents carried in Pub/Sub messages (binary content mode).

A message's data is the event's JSON data; its attributes carry the CloudEvents context
(``ce-specversion``, ``ce-type``, ``ce-source``, ``ce-id``, ``ce-time``, ``ce-subject``) plus plain
attributes a subscription can filter on: ``type``, ``cover_id``, ``song_id``, ``voice``.
JSON Schemas of every model here are generated into ``schemas/`` (``python -m shared.schemas``).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import CoverError, ErrorCode
from shared.names import SONG_ID_MAX_LENGTH, SONG_ID_PATTERN, VOICE_NAME_PATTERN
from shared.options import OutputFormat, RequestOptions

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
    voice_model: str = Field(pattern=VOICE_NAME_PATTERN, description="A voice name, as GET /models lists them.")
    options: RequestOptions = Field(default_factory=RequestOptions)


class CoverProgress(BaseModel):
    cover_id: str
    song_id: str
    voice_model: str
    stage: str
    progress: float = Field(ge=0, le=1)
    runner: str


class CoverCompleted(BaseModel):
    """Everything the Catalog needs to publish the cover; also stored as the cover's manifest."""

    cover_id: str
    song_id: str
    voice_model: str
    voice_version: str
    options: RequestOptions
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


class CoverFailed(BaseModel):
    cover_id: str | None = None
    song_id: str | None = None
    voice_model: str | None = None
    code: ErrorCode
    message: str
    retryable: bool
    attempt: int = Field(ge=1)
    runner: str


class CoverStatus(BaseModel):
    """``GET /covers/{cover_id}``."""

    cover_id: str
    state: str = Field(pattern="^(queued|running|completed|failed)$")
    stage: str | None = None
    progress: float | None = None
    completed: CoverCompleted | None = None
    error: CoverFailed | None = None
    updated_at: datetime


EVENT_MODELS: dict[str, type[BaseModel]] = {
    REQUESTED: CoverRequest,
    PROGRESS: CoverProgress,
    COMPLETED: CoverCompleted,
    FAILED: CoverFailed,
}


def cover_id(song_identity: str, voice: str, voice_version: str, options: RequestOptions) -> str:
    """Deterministic id of a cover: what determines its output, hashed."""
    canonical = json.dumps(
        {
            "song": song_identity,
            "voice": voice,
            "voice_version": voice_version,
            "options": options.model_dump(mode="json"),
            "pipeline": PIPELINE_VERSION,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def failure_event_id(cover_id: str | None, data: bytes) -> str:
    """The ``ce-id`` of a final ``cover.failed``: one per cover (or, before a cover id is known, per
    request message), the same on every runner and redelivery, distinct across facts."""
    if cover_id:
        return f"{cover_id}.failed"
    return f"request-{hashlib.sha256(data).hexdigest()[:32]}.failed"


def now() -> datetime:
    return datetime.now(UTC)


def to_message(
    event_type: str, data: BaseModel, subject: str | None = None, event_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """(data bytes, attributes) of a Pub/Sub message carrying this CloudEvent."""
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
    return json.dumps(payload, separators=(",", ":")).encode(), attributes


def parse_request(data: bytes) -> CoverRequest:
    """A ``cover.requested`` payload, or :class:`CoverError` (``options.invalid``) saying what is wrong."""
    try:
        body: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CoverError(ErrorCode.OPTIONS_INVALID, "the request is not JSON (or nests too deeply)") from None
    if isinstance(body, dict) and "data" in body and "specversion" in body:  # structured-mode CloudEvent
        body = body["data"]
    try:
        return CoverRequest.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise CoverError(ErrorCode.OPTIONS_INVALID, f"the request does not match the schema: {problems}") from None

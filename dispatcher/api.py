"""The HTTP API's contract: its answer models and its OpenAPI 3.1 document, generated from the same
pydantic models as the JSON Schemas in ``schemas/`` (so the two cannot disagree).

    python -m dispatcher.api          # write schemas/openapi.json
    python -m dispatcher.api --check  # exit 1 if it drifts from the models

The dispatcher serves the same document at ``GET /openapi.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from shared.events import CoverCompleted, CoverRequest, CoverStatus
from shared.provenance import Verification
from shared.voices import VoiceInfo

COVER_ID_PATTERN = r"^[0-9a-f]{32}$"
MAX_REQUEST_BYTES = 64 * 1024  # a request body; its Pub/Sub message stays far under the 10 MB limit
OPENAPI_FILE = Path(__file__).resolve().parent.parent / "schemas" / "openapi.json"
PROBLEM_TYPE = "application/problem+json"


class Problem(BaseModel):
    """RFC 7807 problem details, with the stable error ``code``."""

    type: str
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    code: str = Field(description="Stable error code (docs/api.md, 'Limits and errors').")


class Accepted(BaseModel):
    """``POST /cover``: 202 when queued, 200 with the cover when it exists already."""

    cover_id: str = Field(pattern=COVER_ID_PATTERN)
    request_id: str = Field(description="This request's id, echoed by every event that answers it.")
    state: str = Field(pattern="^(queued|completed)$")
    status_url: str
    completed: CoverCompleted | None = None


class ModelList(BaseModel):
    models: list[VoiceInfo]


class Health(BaseModel):
    ok: bool


class PushMessage(BaseModel):
    data: str = ""
    message_id: str = Field("", alias="messageId")
    attributes: dict[str, str] = Field(default_factory=dict)


class PushEnvelope(BaseModel):
    """What a Pub/Sub push subscription POSTs to the ``trigger`` function."""

    message: PushMessage
    subscription: str = ""


def _problems(*statuses: int) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/Problem"}
    return {str(s): {"description": "problem details", "content": {PROBLEM_TYPE: {"schema": ref}}} for s in statuses}


COVER_ID_PARAMETER = {
    "name": "cover_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": COVER_ID_PATTERN},
}


def _json_answer(model: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}},
    }


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the ``http`` function."""
    _, defs = models_json_schema(
        [
            (m, "validation" if m is CoverRequest else "serialization")
            for m in (CoverRequest, Accepted, CoverStatus, ModelList, Health, Problem, Verification)
        ],
        ref_template="#/components/schemas/{model}",
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "melodia-cover",
            "version": "1",
            "description": "AI covers. Errors are application/problem+json with a stable `code`.",
        },
        "paths": {
            "/cover": {
                "post": {
                    "operationId": "requestCover",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/CoverRequest"},
                                "example": {"song_id": "song-1", "voice_model": "demo-voice", "options": {"pitch": 0}},
                            }
                        },
                    },
                    "responses": {
                        "202": _json_answer("Accepted", "queued"),
                        "200": _json_answer("Accepted", "the cover exists already"),
                        **_problems(400, 403, 404, 413, 415, 503),
                    },
                }
            },
            "/covers/{cover_id}": {
                "get": {
                    "operationId": "getCover",
                    "parameters": [COVER_ID_PARAMETER],
                    "responses": {"200": _json_answer("CoverStatus", "the cover's state"), **_problems(404)},
                }
            },
            "/covers/{cover_id}/report": {
                "get": {
                    "operationId": "getCoverReport",
                    "parameters": [COVER_ID_PARAMETER],
                    "responses": {
                        "200": {
                            "description": "the quality report page: HTML, its player playing /covers/{cover_id}/audio",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        },
                        **_problems(404),
                    },
                }
            },
            "/covers/{cover_id}/provenance": {
                "get": {
                    "operationId": "getCoverProvenance",
                    "parameters": [COVER_ID_PARAMETER],
                    "responses": {
                        "200": _json_answer(
                            "Verification",
                            "the stored cover's Content Credentials checked now: status verified, untrusted, tampered "
                            "or none, and what they say (voices with their rights, song, verdict)",
                        ),
                        **_problems(404),
                    },
                }
            },
            "/covers/{cover_id}/audio": {
                "get": {
                    "operationId": "getCoverAudio",
                    "parameters": [COVER_ID_PARAMETER],
                    "responses": {
                        "302": {
                            "description": "the published cover: redirects to its URL, signed now",
                            "headers": {"Location": {"schema": {"type": "string", "format": "uri"}}},
                        },
                        **_problems(404),
                    },
                }
            },
            "/models": {
                "get": {
                    "operationId": "listModels",
                    "parameters": [
                        {
                            "name": "embeddings",
                            "in": "query",
                            "required": False,
                            "description": "true: include each voice's reference embedding (256 numbers)",
                            "schema": {"type": "boolean", "default": False},
                        }
                    ],
                    "responses": {"200": _json_answer("ModelList", "every voice")},
                }
            },
            "/healthz": {"get": {"operationId": "health", "responses": {"200": _json_answer("Health", "alive")}}},
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "responses": {"200": {"description": "this document", "content": {"application/json": {}}}},
                }
            },
        },
        "components": {"schemas": defs["$defs"]},
    }


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    if "--check" in argv:
        if not OPENAPI_FILE.is_file() or OPENAPI_FILE.read_text() != render():
            print("schema drift: schemas/openapi.json (run python -m dispatcher.api)")
            return 1
        return 0
    OPENAPI_FILE.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

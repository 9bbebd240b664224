"""The published JSON Schemas (the Catalog's contract) match the models."""

from __future__ import annotations

import json

import jsonschema
import pytest

from shared import schemas
from shared.events import CoverRequest, to_message


def test_schema_files_match_the_models():
    assert schemas.main(["--check"]) == 0, "run: python -m shared.schemas"


def test_a_drifted_schema_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(schemas, "SCHEMA_DIR", tmp_path)
    schemas.main([])
    (tmp_path / "cover.completed.schema.json").write_text("{}\n")
    assert schemas.main(["--check"]) == 1


def test_a_request_message_validates_against_its_published_schema():
    data, attributes = to_message("cover.requested", CoverRequest(song_id="s-1", voice_model="v"), subject="abc")
    schema = json.loads((schemas.SCHEMA_DIR / "cover.requested.schema.json").read_text())
    jsonschema.validate(json.loads(data), schema)
    assert attributes["ce-type"] == attributes["type"] == "cover.requested" and attributes["cover_id"] == "abc"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"song_id": "s-1"}, schema)


def test_the_openapi_document_matches_the_models():
    from dispatcher import api

    assert api.main(["--check"]) == 0, "run: python -m dispatcher.api"
    document = api.document()
    assert document["openapi"] == "3.1.0"
    request_schema = document["components"]["schemas"]["CoverRequest"]
    published = json.loads((schemas.SCHEMA_DIR / "cover.requested.schema.json").read_text())
    assert request_schema["properties"]["song_id"] == published["properties"]["song_id"]

"""Voices published to the bucket reach a runner's local store, verified by their hashes."""

from __future__ import annotations

import pytest

from job import demo
from shared.errors import CoverError, ErrorCode
from shared.registry import VoiceRegistry, publish_voice
from shared.storage import Keys, LocalStorage


@pytest.fixture()
def bucket(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    demo.write_voice(tmp_path / "src" / "soprano", name="soprano", size="tiny")
    publish_voice(storage, tmp_path / "src" / "soprano")
    return storage


def test_a_bucket_voice_is_synced_on_demand_and_reused(bucket, tmp_path):
    registry = VoiceRegistry(tmp_path / "cache", bucket)
    assert [v.name for v in registry.list()] == ["soprano"]
    assert registry.info("soprano").name == "soprano"
    assert not (tmp_path / "cache" / "voices" / "soprano").exists()  # info reads voice.json only
    info, folder = registry.get("soprano")
    assert (folder / "model.pth").is_file() and not registry.local.verify("soprano")
    mtime = (folder / "model.pth").stat().st_mtime_ns
    registry.get("soprano")
    assert (folder / "model.pth").stat().st_mtime_ns == mtime  # same hashes: no download


def test_a_file_that_does_not_match_its_hash_is_refused(bucket, tmp_path):
    bucket.put_bytes(Keys.voice("soprano", "model.index"), b"tampered", "application/octet-stream")
    registry = VoiceRegistry(tmp_path / "cache", bucket)
    with pytest.raises(CoverError) as info:
        registry.get("soprano")
    assert info.value.code is ErrorCode.MODEL_HASH_MISMATCH
    assert not (tmp_path / "cache" / "voices" / "soprano").exists()


def test_unknown_everywhere(bucket, tmp_path):
    with pytest.raises(CoverError) as info:
        VoiceRegistry(tmp_path / "cache", bucket).info("nobody")
    assert info.value.code is ErrorCode.VOICE_UNKNOWN

"""The model store: voices and base models published to the bucket reach a runner's local store,
verified by their hashes; nothing half-synced is ever used; a missing model says how to get it."""

from __future__ import annotations

import json
import shutil

import pytest

from job.devkit import demo
from shared.errors import CoverError, ErrorCode
from shared.model_store import ModelStore
from shared.storage import Keys, LocalStorage


@pytest.fixture
def bucket(tmp_path):
    storage = LocalStorage(tmp_path / "bucket")
    demo.write_voice(tmp_path / "src" / "voices" / "soprano", name="soprano", size="tiny")
    ModelStore(tmp_path / "src", storage).publish_voice(tmp_path / "src" / "voices" / "soprano")
    return storage


def test_a_bucket_voice_is_synced_on_demand_and_reused(bucket, tmp_path):
    models = ModelStore(tmp_path / "cache", bucket)
    assert [v.name for v in models.voices()] == ["soprano"]
    assert models.voice_info("soprano").name == "soprano"
    assert not (tmp_path / "cache" / "voices" / "soprano").exists()  # voice_info reads voice.json only
    voice = models.voice("soprano")
    assert voice.model_path.is_file() and not models.verify_voice("soprano")
    mtime = voice.model_path.stat().st_mtime_ns
    models.voice("soprano")
    assert voice.model_path.stat().st_mtime_ns == mtime  # same hashes: no download


def test_a_voice_file_that_does_not_match_its_hash_is_refused(bucket, tmp_path):
    bucket.put_bytes(Keys.voice("soprano", "model.index"), b"tampered", "application/octet-stream")
    with pytest.raises(CoverError) as info:
        ModelStore(tmp_path / "cache", bucket).voice("soprano")
    assert info.value.code is ErrorCode.MODEL_HASH_MISMATCH
    assert not (tmp_path / "cache" / "voices" / "soprano").exists()


def test_unknown_everywhere(bucket, tmp_path):
    with pytest.raises(CoverError) as info:
        ModelStore(tmp_path / "cache", bucket).voice_info("nobody")
    assert info.value.code is ErrorCode.VOICE_UNKNOWN


@pytest.fixture
def pushed(store, tmp_path):
    """The tiny test store pushed to a bucket (a local folder here; the S3 server in test_service)."""
    storage = LocalStorage(tmp_path / "bucket")
    manifest = ModelStore(store, storage).push()
    return storage, manifest


def test_push_then_sync_fills_an_empty_store_with_the_same_files(store, pushed, tmp_path):
    storage, manifest = pushed
    assert {"separation/htdemucs.yaml", "base/rmvpe.pt", "base/hubert/config.json"} <= set(manifest.files)
    assert json.loads(storage.get_bytes(Keys.models_manifest()) or b"{}")["files"].keys() == manifest.files.keys()
    assert storage.head(Keys.voice(demo.DEMO_VOICE, "voice.json")) is not None
    local = ModelStore(tmp_path / "runner", storage)
    report = local.sync()
    assert sorted(report.downloaded) == sorted(manifest.files)
    assert local.manifest() == manifest  # byte for byte, by sha256
    assert local.pitch_model().is_file() and local.content_encoder().is_dir()
    assert local.sync().downloaded == []  # nothing changed: nothing downloaded


def test_a_corrupted_base_model_is_refused_and_nothing_is_half_synced(pushed, tmp_path):
    storage, _ = pushed
    storage.put_bytes(Keys.model("base/rmvpe.pt"), b"corrupted weights", "application/octet-stream")
    local = ModelStore(tmp_path / "runner", storage)
    with pytest.raises(CoverError) as info:
        local.sync()
    assert info.value.code is ErrorCode.MODEL_HASH_MISMATCH and "base/rmvpe.pt" in info.value.message
    assert list(local.base_files()) == []  # not even the files that did match were moved in
    assert [p.name for p in (tmp_path / "runner").iterdir()] == []  # the staging folder is gone


def test_a_changed_file_is_replaced_and_a_stale_one_removed(store, pushed, tmp_path):
    storage, _ = pushed
    local = ModelStore(tmp_path / "runner", storage)
    local.sync()
    (local.root / "base" / "rmvpe.pt").write_bytes(b"edited by hand")
    (local.separation_dir / "0000dead-beef.th").write_bytes(b"a stale package")
    report = local.sync()
    assert report.downloaded == ["base/rmvpe.pt"] and report.removed == ["separation/0000dead-beef.th"]
    assert local.manifest() == ModelStore(store).manifest()


def test_a_manifest_naming_a_file_outside_the_store_is_refused(pushed, tmp_path):
    storage, manifest = pushed
    evil = manifest.model_copy(deep=True)
    evil.files["../../outside.txt"] = evil.files["base/rmvpe.pt"]
    storage.put_bytes(Keys.models_manifest(), evil.model_dump_json().encode())
    with pytest.raises(CoverError) as info:
        ModelStore(tmp_path / "runner" / "models", storage).sync()
    assert info.value.code is ErrorCode.MODEL_CORRUPT
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "runner").exists()


def test_a_missing_model_names_the_file_and_how_to_get_it(store, tmp_path):
    partial = tmp_path / "models"
    shutil.copytree(store / "separation", partial / "separation")
    with pytest.raises(CoverError) as info:
        ModelStore(partial).pitch_model()
    assert info.value.code is ErrorCode.MODEL_MISSING
    assert str(partial / "base" / "rmvpe.pt") in info.value.message and "cover models pull" in info.value.message

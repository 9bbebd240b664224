"""The bucket lifecycle (shared/lifecycle.py): S3's configuration on moto's server, the local
storage pruned."""

from __future__ import annotations

import json
import os
import time
import uuid

import boto3

from shared.lifecycle import apply, main, rules
from shared.settings import Settings
from shared.storage import LocalStorage, make_storage

DAY = 86400


def test_the_default_ages_expire_only_the_means_to_a_cover():
    chosen = {rule.prefix: rule.days for rule in rules(Settings().lifecycle_days)}
    assert chosen == {"stems/": 30, "analysis/": 30, "claims/": 2, "status/": 30, "reports/": 180}
    assert not any(prefix.startswith(("covers/", "manifests/", "songs/", "models/", "voices/")) for prefix in chosen)
    assert {rule.prefix for rule in rules({"stems/": 0, "claims/": 1})} == {"claims/"}  # 0 keeps for ever


def test_an_s3_bucket_gets_the_rules_as_its_lifecycle_configuration(s3, monkeypatch, capsys):
    client = boto3.client(
        "s3", endpoint_url=s3, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    bucket, queue = f"life-{uuid.uuid4().hex[:8]}", f"queue-{uuid.uuid4().hex[:8]}"
    for name in (bucket, queue):
        client.create_bucket(Bucket=name)
    env = {"STORAGE": "s3", "BUCKET": bucket, "QUEUE_BUCKET": queue, "S3_ENDPOINT": s3, "S3_REGION": "us-east-1"}
    for name, value in {**env, "S3_ACCESS_KEY_ID": "test", "S3_SECRET_ACCESS_KEY": "test"}.items():
        monkeypatch.setenv(f"COVER_{name}", value)
    monkeypatch.setenv("COVER_LIFECYCLE_DAYS", json.dumps({"stems/": 10, "reports/": 0}))
    assert main([]) == 0
    configured = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    expiring = {r["Filter"]["Prefix"]: r["Expiration"]["Days"] for r in configured if "Expiration" in r}
    assert expiring == {"stems/": 10}
    assert any(r.get("AbortIncompleteMultipartUpload", {}).get("DaysAfterInitiation") == 1 for r in configured)
    queued = client.get_bucket_lifecycle_configuration(Bucket=queue)["Rules"]
    assert {r["Filter"]["Prefix"]: r["Expiration"]["Days"] for r in queued if "Expiration" in r} == {"status/": 7}
    assert bucket in capsys.readouterr().out


def test_the_local_storage_deletes_what_is_older_than_its_prefix_s_age(tmp_path):
    storage = make_storage(Settings(storage="local", storage_dir=tmp_path))
    assert isinstance(storage, LocalStorage)
    now = time.time()
    ages = {"stems/a/b/vocals.wav": 31, "stems/c/d/vocals.wav": 29, "claims/x/000000.json": 3, "covers/x.mp3": 400}
    for key, days in ages.items():
        storage.put_bytes(key, b"x")
        os.utime(storage.root / key, (now - days * DAY, now - days * DAY))
    assert apply(storage, rules({"stems/": 30, "claims/": 2}), now=now) == 2
    left = {str(p.relative_to(storage.root)) for p in storage.root.rglob("*") if p.is_file()}
    assert left == {"stems/c/d/vocals.wav", "covers/x.mp3"}

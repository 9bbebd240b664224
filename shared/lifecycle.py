"""How long the bucket keeps what is only a means to a cover (stems, claims, status objects,
reports), as bucket lifecycle rules.

    python -m shared.lifecycle            # apply COVER_LIFECYCLE_DAYS to the bucket(s)
    python -m shared.lifecycle --dry-run  # print the rules only

Covers, their manifests, songs, models and voices are never expired by it. On an S3 API bucket
(Cloudflare R2) the rules are the bucket's lifecycle configuration, which the storage applies by
itself from then on (R2 needs a token with Admin Read & Write for this one call: docs/operations.md,
"Deploy from zero"); the queue bucket, where one is set, keeps its 'queued' markers
``COVER_LIFECYCLE_QUEUE_DAYS``. On the local storage the same ages are applied once, now: files older
than their prefix's age are deleted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from pydantic import BaseModel, Field

from shared.settings import Settings
from shared.storage import LocalStorage, S3Storage, Storage, make_storage

ABORT_UPLOADS_DAYS = 1  # multipart uploads a crashed runner left behind


class Rule(BaseModel):
    prefix: str = Field(description="Objects under this prefix ...")
    days: int = Field(ge=1, description="... are deleted this many days after they were last written.")


def rules(days: dict[str, int]) -> list[Rule]:
    """The rules for ``{prefix: days}``; 0 keeps that prefix for ever."""
    return [Rule(prefix=prefix, days=age) for prefix, age in sorted(days.items()) if age > 0]


def s3_configuration(chosen: list[Rule]) -> dict[str, Any]:
    """The S3 ``LifecycleConfiguration`` of ``chosen``, plus aborting stale multipart uploads."""
    expire = [
        {
            "ID": f"expire-{rule.prefix.strip('/')}",
            "Filter": {"Prefix": rule.prefix},
            "Status": "Enabled",
            "Expiration": {"Days": rule.days},
        }
        for rule in chosen
    ]
    abort = {
        "ID": "abort-stale-uploads",
        "Filter": {"Prefix": ""},
        "Status": "Enabled",
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_UPLOADS_DAYS},
    }
    return {"Rules": [*expire, abort]}


def apply(storage: Storage, chosen: list[Rule], now: float | None = None) -> int:
    """Apply ``chosen`` to ``storage``: the bucket's lifecycle configuration on S3 (returns 0), or on
    the local storage delete what is older now (returns how many files were deleted)."""
    if isinstance(storage, S3Storage):
        storage.client.put_bucket_lifecycle_configuration(
            Bucket=storage.bucket, LifecycleConfiguration=s3_configuration(chosen)
        )
        return 0
    assert isinstance(storage, LocalStorage)
    now = time.time() if now is None else now
    deleted = 0
    for rule in chosen:
        folder = storage.root / rule.prefix
        for path in folder.rglob("*") if folder.is_dir() else []:
            if path.is_file() and now - path.stat().st_mtime > rule.days * 86400:
                path.unlink()
                deleted += 1
    return deleted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.lifecycle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the rules, change nothing")
    args = parser.parse_args(argv)
    settings = Settings()
    plans = [(make_storage(settings), rules(settings.lifecycle_days))]
    if settings.queue_bucket:
        plans.append((make_storage(settings, queue=True), rules({"status/": settings.lifecycle_queue_days})))
    for storage, chosen in plans:
        print(json.dumps({"bucket": storage.bucket, "rules": [rule.model_dump() for rule in chosen]}))
        if not args.dry_run:
            deleted = apply(storage, chosen)
            print(f"applied to {storage.bucket}" + (f" ({deleted} files deleted)" if deleted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

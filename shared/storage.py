"""Object storage behind one interface: a local folder (the embedded default) or an S3 API bucket
(Cloudflare R2 in production), through boto3.

Readers never see a partial object: S3 makes an object visible only when its upload completes;
the local store writes a temporary file and renames it into place. ``put_bytes(if_absent=True)``
is a conditional create (S3 ``If-None-Match: *``; ``link()`` locally): exactly one writer wins.

Keys (all under the bucket):

| what | key |
| --- | --- |
| source songs (the Catalog's) | ``songs/{song_id}`` (``COVER_SONG_KEY_TEMPLATE``) |
| cached stems (content-addressed, see below) | ``stems/{audio_sha256}/{separation_key}/{vocals,no_vocals}.wav`` |
| the vocals' analysis (HuBERT features, pitch; by chunk) | ``analysis/{content,pitch}/{digest}.npy`` |
| covers | ``covers/{cover_id}.{ext}`` |
| per-cover manifests (the completed event's data) | ``manifests/{cover_id}.json`` |
| per-cover status (queued / running / failed) | ``status/{cover_id}.json`` |
| render claims | ``claims/{cover_id}/{generation:06d}.json`` |
| voice models | ``voices/{name}/{model.pth, model.index, voice.json}`` |
| base models (separation, HuBERT, RMVPE), manifest | ``models/{path in the store}``, ``models/manifest.json`` |

``separation_key`` is the first 16 hex digits of the sha256 of every setting that changes the stems'
numbers: the separation model's name and the sha256 of its files, segment, overlap, shifts, the
resolved precision (fp32/bf16) and the kernels (:class:`job.render.separate.stems.StemKey`). The device is
not part of it, so CPU and GPU runners with the same precision share stems; a model swap changes it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from pydantic import BaseModel

from shared.errors import CoverError, ErrorCode
from shared.settings import Settings


class ObjectInfo(BaseModel):
    key: str
    size: int
    etag: str


class Keys:
    def __init__(self, song_template: str = "songs/{song_id}") -> None:
        self.song_template = song_template

    def song(self, song_id: str) -> str:
        return self.song_template.format(song_id=song_id)

    @staticmethod
    def stem(audio_sha256: str, separation_key: str, name: str) -> str:
        return f"stems/{audio_sha256}/{separation_key}/{name}.wav"

    @staticmethod
    def analysis(kind: str, digest: str) -> str:
        return f"analysis/{kind}/{digest}.npy"

    @staticmethod
    def cover(cover_id: str, ext: str) -> str:
        return f"covers/{cover_id}.{ext}"

    @staticmethod
    def manifest(cover_id: str) -> str:
        return f"manifests/{cover_id}.json"

    @staticmethod
    def report(cover_id: str) -> str:
        return f"reports/{cover_id}.html"

    @staticmethod
    def status(cover_id: str) -> str:
        return f"status/{cover_id}.json"

    @staticmethod
    def claim(cover_id: str, generation: int) -> str:
        return f"claims/{cover_id}/{generation:06d}.json"

    @staticmethod
    def voice(name: str, file: str) -> str:
        return f"voices/{name}/{file}"

    @staticmethod
    def model(relative: str) -> str:
        return f"models/{relative}"

    @staticmethod
    def models_manifest() -> str:
        return "models/manifest.json"


class Storage(ABC):
    bucket: str

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None: ...

    @abstractmethod
    def download(self, key: str, path: Path) -> Path: ...

    @abstractmethod
    def upload_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> ObjectInfo: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/json", if_absent: bool = False) -> bool:
        """Write ``data``; with ``if_absent``, only if no object has the key (returns False then).

        Args:
            key: the object's key
            data: its bytes
            content_type: its media type
            if_absent: write only if no object has the key
        """

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def url(self, key: str) -> str: ...


class LocalStorage(Storage):
    def __init__(self, root: Path, bucket: str = "local") -> None:
        self.root = Path(root)
        self.bucket = bucket
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not str(path).startswith(str(self.root.resolve()) + os.sep):
            raise CoverError(ErrorCode.OPTIONS_INVALID, f"key escapes the storage root: {key}")
        return path

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        if not path.is_file():
            return None
        stat = path.stat()
        return ObjectInfo(key=key, size=stat.st_size, etag=f"{stat.st_mtime_ns:x}-{stat.st_size:x}")

    def download(self, key: str, path: Path) -> Path:
        source = self._path(key)
        if not source.is_file():
            raise CoverError(ErrorCode.INPUT_NOT_FOUND, f"no object {key} in storage")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
        return path

    def _temp(self, key: str) -> tuple[Path, Path]:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=target.parent)
        os.close(fd)
        return target, Path(tmp)

    def upload_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> ObjectInfo:
        target, tmp = self._temp(key)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        info = self.head(key)
        assert info is not None
        return info

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/json", if_absent: bool = False) -> bool:
        target, tmp = self._temp(key)
        try:
            tmp.write_bytes(data)
            if if_absent:
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, target)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def list(self, prefix: str) -> list[str]:
        base = self.root
        return sorted(
            str(p.relative_to(base))
            for p in base.glob(f"{prefix}**/*")
            if p.is_file() and not p.name.startswith(".part-")
        )

    def url(self, key: str) -> str:
        return self._path(key).as_uri()


class S3Storage(Storage):
    """Storage in an S3 bucket (Cloudflare R2 in production) through boto3.

    Args:
        bucket: the bucket
        endpoint: the S3 endpoint (R2's account URL; None: AWS)
        region: the region (``auto`` for R2)
        access_key: the access key id (None: the environment's credentials)
        secret_key: the secret access key
        url_expiry_s: how long a signed URL is valid
    """

    def __init__(
        self,
        bucket: str,
        endpoint: str | None,
        region: str,
        access_key: str | None,
        secret_key: str | None,
        url_expiry_s: int = 7 * 24 * 3600,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.url_expiry_s = url_expiry_s
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32),
        )

    def _missing(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in ("404", "NoSuchKey", "NotFound")

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            meta = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if self._missing(exc):
                return None
            raise
        return ObjectInfo(key=key, size=int(meta["ContentLength"]), etag=meta["ETag"].strip('"'))

    def download(self, key: str, path: Path) -> Path:
        from botocore.exceptions import ClientError

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, key, str(path))
        except ClientError as exc:
            if self._missing(exc):
                raise CoverError(ErrorCode.INPUT_NOT_FOUND, f"no object {key} in bucket {self.bucket}") from None
            raise
        return path

    def upload_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> ObjectInfo:
        self.client.upload_file(str(path), self.bucket, key, ExtraArgs={"ContentType": content_type})
        info = self.head(key)
        assert info is not None
        return info

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/json", if_absent: bool = False) -> bool:
        from botocore.exceptions import ClientError

        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, **extra)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            return body
        except ClientError as exc:
            if self._missing(exc):
                return None
            raise

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def url(self, key: str) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.url_expiry_s
        )
        return url


def make_storage(settings: Settings, *, queue: bool = False) -> Storage:
    """The covers bucket, or (``queue``) the bucket of the API's 'queued' markers: ``queue_bucket``
    with its own keys where set, else the covers bucket."""
    bucket = (settings.queue_bucket if queue else None) or settings.bucket
    if settings.storage == "s3":
        key_id, secret = settings.s3_access_key_id, settings.s3_secret_access_key
        if queue and settings.queue_bucket and settings.queue_s3_access_key_id:
            key_id, secret = settings.queue_s3_access_key_id, settings.queue_s3_secret_access_key
        return S3Storage(
            bucket,
            settings.s3_endpoint,
            settings.s3_region,
            key_id.get_secret_value() if key_id else None,
            secret.get_secret_value() if secret else None,
            settings.url_expiry_s,
        )
    own_folder = queue and settings.queue_bucket
    return LocalStorage(settings.storage_dir / bucket if own_folder else settings.storage_dir, bucket)

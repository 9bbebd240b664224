"""The model store: where every model lives, whether it is there, and how it gets there.

One class owns the whole layout, locally and in the bucket. Nothing else spells a model path.

| what | local path (under ``COVER_MODELS_DIR``) | bucket key |
| --- | --- | --- |
| separation (Demucs' layout) | ``separation/{NAME}.yaml``, ``separation/{SIG}-{SHA}.th`` | ``models/separation/`` |
| MDX-Net models (optional) | ``separation/mdx/{karaoke,dereverb}.{onnx,json}`` | ``models/separation/mdx/`` |
| content encoder (HuBERT) | ``base/hubert/{config.json, model.safetensors}`` | ``models/base/hubert/`` |
| pitch model (RMVPE) | ``base/rmvpe.pt`` | ``models/base/rmvpe.pt`` |
| the FCPE pitch model (optional: ``f0_method=fcpe``) | ``base/fcpe.pt`` | ``models/base/fcpe.pt`` |
| the base models' manifest | — | ``models/manifest.json`` (sha256, size per file) |
| voices (``voice.json``: sha256 per file) | ``voices/{name}/{model.pth,model.index,voice.json}`` | ``voices/{name}/`` |
| derived files (the int8 decoders) | ``derived/{kind}/{name}`` | ``models/derived/{kind}/{name}`` (+ ``.json``) |

Provisioning: :meth:`ModelStore.push` uploads a local store (``cover models push``); the manifest and
each ``voice.json`` are written last, so a reader never sees a manifest naming files that are not
there yet. :meth:`ModelStore.sync` (every runner at start, and ``cover models pull``) makes the
local base models equal to the bucket's: files missing or different are downloaded into a staging
folder, every one is checked against its sha256, and only when all match are they moved into place;
a file that does not match is refused with ``model.hash_mismatch`` and nothing changes. Voices sync
on first use (:meth:`ModelStore.voice`), with the same checks against their ``voice.json``.

A derived file is built by the first runner that needs it and shared through the bucket
(:meth:`ModelStore.share_derived`: the file, then its digest); the next runner downloads it
(:meth:`ModelStore.fetch_derived`) instead of building it again, checked against that digest. Its
name carries everything it was built from (e.g. the voice's sha256, the recipe, ONNX Runtime's
version). The bucket is a shortcut there, never a failure: a missing, unreadable or mismatched
file is built locally, as without a bucket.

Pure Python (no torch): the dispatcher reads ``voice.json`` through it too.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from shared.errors import CoverError, ErrorCode
from shared.hashing import sha256_of
from shared.logs import fields
from shared.storage import Keys, Storage
from shared.voices import INDEX_FILE, MODEL_FILE, NAME_PATTERN, VOICE_FILE, FileDigest, VoiceInfo, digest_of

log = logging.getLogger("melodia.models")
M = TypeVar("M", bound=BaseModel)

SEPARATION_DIR = "separation"
CONTENT_ENCODER_DIR = "base/hubert"
PITCH_MODEL_FILE = "base/rmvpe.pt"
FCPE_MODEL_FILE = "base/fcpe.pt"
MDX_DIR = "separation/mdx"  # {kind}.onnx and {kind}.json (job/render/separate/mdx_params.py)
VOICES_DIR = "voices"
DERIVED_DIR = "derived"  # built from the models, shared through the bucket (never synced, never pruned)
BASE_DIRS = (SEPARATION_DIR, "base")  # what `models/` in the bucket mirrors
GET_MODELS = (
    "get it with `cover models pull` (from the bucket's models/ prefix), "
    "or write the random-weight demo models with `cover demo`"
)


class StoreManifest(BaseModel):
    """``models/manifest.json``: every base-model file (path relative to the store) and its digest."""

    files: dict[str, FileDigest]


class SyncReport(BaseModel):
    downloaded: list[str] = []
    unchanged: list[str] = []
    removed: list[str] = []


class ResolvedVoice(BaseModel):
    """A voice resolved once per request: its ``voice.json`` and the local folder holding its files."""

    info: VoiceInfo
    folder: Path

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def index_path(self) -> Path | None:
        return self.folder / INDEX_FILE if self.info.has_index else None


class ModelStore:
    """The local model folder, over the bucket's ``models/`` and ``voices/`` prefixes when ``storage`` is given."""

    def __init__(self, root: Path, storage: Storage | None = None) -> None:
        self.root = Path(root)
        self.storage = storage

    # --- layout and presence -------------------------------------------------------------------
    @property
    def separation_dir(self) -> Path:
        return self.root / SEPARATION_DIR

    @property
    def voices_dir(self) -> Path:
        return self.root / VOICES_DIR

    def derived(self, kind: str, name: str) -> Path:
        """Where a file built from the models is kept (``kind``: e.g. ``decoder-int8``)."""
        return self.root / DERIVED_DIR / kind / name

    def voice_folder(self, name: str) -> Path:
        return self.voices_dir / name

    # --- derived files -------------------------------------------------------------------------
    @staticmethod
    def _derived_key(kind: str, name: str) -> str:
        """The bucket key of :meth:`derived` ``(kind, name)`` (its digest: the same key + ``.json``)."""
        return Keys.model(f"{DERIVED_DIR}/{kind}/{name}")

    def fetch_derived(self, kind: str, name: str) -> Path | None:
        """:meth:`derived` ``(kind, name)`` from the bucket, where another runner shared it and it
        matches its digest; None otherwise (no bucket, not there, unreadable, mismatched: the
        caller builds it)."""
        if self.storage is None:
            return None
        target, key = self.derived(kind, name), self._derived_key(kind, name)
        try:
            digest = self._bucket_json(self.storage, f"{key}.json", FileDigest)
            if digest is None:
                return None
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
                path = self.storage.download(key, Path(tmp) / name)
                if not _matches(path, digest):
                    log.warning("derived file unlike its digest", extra=fields(event="derived.mismatch", key=key))
                    return None
                os.replace(path, target)
        except Exception as exc:  # noqa: BLE001 - a shortcut, never a failure
            log.warning("derived file not fetched", extra=fields(event="derived.unreadable", key=key, error=str(exc)))
            return None
        log.info("derived file fetched from the bucket", extra=fields(event="derived.fetched", key=key))
        return target

    def share_derived(self, kind: str, name: str) -> None:
        """Upload :meth:`derived` ``(kind, name)``, built here, for other runners: the file, then its
        digest (a reader never sees a digest whose file is not there). A failure is logged only."""
        if self.storage is None:
            return
        path, key = self.derived(kind, name), self._derived_key(kind, name)
        try:
            self.storage.upload_file(key, path)
            self.storage.put_bytes(f"{key}.json", digest_of(path).model_dump_json().encode())
        except Exception as exc:  # noqa: BLE001 - the next runner builds it too
            log.warning("derived file not shared", extra=fields(event="derived.not_shared", key=key, error=str(exc)))

    def missing(self, what: str, path: Path, alternative: str = "") -> CoverError:
        """``model.missing``, naming the file and how to get it."""
        advice = f"{GET_MODELS}{', ' + alternative if alternative else ''}"
        return CoverError(ErrorCode.MODEL_MISSING, f"{what} is missing: {path} is not in the model store; {advice}")

    def content_encoder(self) -> Path:
        """The HuBERT folder (a transformers folder, or one holding fairseq's ``hubert_base.pt``)."""
        path = self.root / CONTENT_ENCODER_DIR
        if not path.is_dir() or not any(path.iterdir()):
            raise self.missing("the content encoder (HuBERT)", path)
        return path

    def pitch_model(self) -> Path:
        path = self.root / PITCH_MODEL_FILE
        if not path.is_file():
            raise self.missing("the pitch model (RMVPE)", path)
        return path

    def fcpe_model(self) -> Path:
        path = self.root / FCPE_MODEL_FILE
        if not path.is_file():
            raise self.missing("the FCPE pitch model", path, "or `cover models fetch fcpe`")
        return path

    def mdx_model(self, kind: str) -> tuple[Path, Path] | None:
        """The MDX-Net model of ``kind`` (``karaoke``, ``dereverb``): its ``.onnx`` and its ``.json``
        (parameters), or None when the store has none (those stems are then not split)."""
        onnx, info = self.mdx_paths(kind)
        return (onnx, info) if onnx.is_file() and info.is_file() else None

    def mdx_paths(self, kind: str) -> tuple[Path, Path]:
        return self.root / MDX_DIR / f"{kind}.onnx", self.root / MDX_DIR / f"{kind}.json"

    def base_files(self) -> Iterator[Path]:
        for folder in BASE_DIRS:
            base = self.root / folder
            if base.is_dir():
                yield from sorted(p for p in base.rglob("*") if p.is_file() and not p.name.startswith("."))

    def manifest(self) -> StoreManifest:
        """The local base models' manifest (what :meth:`push` publishes)."""
        return StoreManifest(files={p.relative_to(self.root).as_posix(): digest_of(p) for p in self.base_files()})

    # --- provisioning --------------------------------------------------------------------------
    def _bucket(self) -> Storage:
        if self.storage is None:
            raise CoverError(ErrorCode.OPTIONS_INVALID, "no bucket configured (set COVER_STORAGE=s3 and its settings)")
        return self.storage

    def _bucket_json(self, storage: Storage, key: str, model: type[M]) -> M | None:
        raw = storage.get_bytes(key)
        if raw is None:
            return None
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise CoverError(ErrorCode.MODEL_CORRUPT, f"{key} in the bucket is invalid: {exc}") from None

    def remote_manifest(self) -> StoreManifest | None:
        return self._bucket_json(self._bucket(), Keys.models_manifest(), StoreManifest)

    def push(self) -> StoreManifest:
        """Upload the local base models and voices to the bucket; manifests last."""
        bucket = self._bucket()
        manifest = self.manifest()
        remote = self.remote_manifest()
        for rel, digest in manifest.files.items():
            if remote is None or remote.files.get(rel) != digest:
                bucket.upload_file(Keys.model(rel), self.root / rel)
        bucket.put_bytes(Keys.models_manifest(), manifest.model_dump_json(indent=2).encode())
        for info in self.local_voices():
            self.publish_voice(self.voice_folder(info.name))
        return manifest

    def sync(self, prune: bool = True) -> SyncReport:
        """Make the local base models equal to the bucket's manifest (nothing to do without one).

        Every file that is missing or differs is downloaded to a staging folder and checked; only
        when every one matches its sha256 are they moved into place. With ``prune``, local base files
        the manifest does not name are removed (a stale Demucs package could otherwise be loaded)."""
        remote = self.remote_manifest()
        report = SyncReport()
        if remote is None:
            return report
        for rel in remote.files:
            _inside(self.root, rel)
        wanted = {rel: d for rel, d in remote.files.items() if not _matches(self.root / rel, d)}
        report.unchanged = sorted(set(remote.files) - set(wanted))
        if wanted:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.root, prefix=".sync-") as tmp:
                staged = Path(tmp)
                for rel, digest in wanted.items():
                    path = self._bucket().download(Keys.model(rel), staged / rel)
                    if not _matches(path, digest):
                        raise CoverError(
                            ErrorCode.MODEL_HASH_MISMATCH,
                            f"{Keys.model(rel)} in the bucket does not match its sha256 in "
                            f"{Keys.models_manifest()}; nothing was synced",
                        )
                for rel in wanted:
                    target = self.root / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staged / rel, target)
            report.downloaded = sorted(wanted)
        if prune:
            for path in list(self.base_files()):
                rel = path.relative_to(self.root).as_posix()
                if rel not in remote.files:
                    path.unlink()
                    report.removed.append(rel)
        log.info(
            "models synced: %d downloaded, %d unchanged, %d removed",
            len(report.downloaded),
            len(report.unchanged),
            len(report.removed),
        )
        return report

    # --- voices --------------------------------------------------------------------------------
    def _read_voice(self, folder: Path) -> VoiceInfo:
        try:
            return VoiceInfo.model_validate_json((folder / VOICE_FILE).read_text())
        except (OSError, ValidationError) as exc:
            raise CoverError(ErrorCode.MODEL_CORRUPT, f"{folder / VOICE_FILE} is unreadable: {exc}") from None

    def local_voices(self) -> list[VoiceInfo]:
        if not self.voices_dir.is_dir():
            return []
        return [self._read_voice(f) for f in sorted(self.voices_dir.iterdir()) if (f / VOICE_FILE).is_file()]

    def _remote_voice(self, name: str) -> VoiceInfo | None:
        if self.storage is None or not NAME_PATTERN.match(name):
            return None
        return self._bucket_json(self.storage, Keys.voice(name, VOICE_FILE), VoiceInfo)

    def _local_voice(self, name: str) -> VoiceInfo:
        folder = self.voice_folder(name)
        if not NAME_PATTERN.match(name) or not (folder / VOICE_FILE).is_file():
            known = ", ".join(v.name for v in self.voices()) or "none installed"
            raise CoverError(ErrorCode.VOICE_UNKNOWN, f"unknown voice '{name}' (known: {known})")
        return self._read_voice(folder)

    def voices(self) -> list[VoiceInfo]:
        """Every usable voice, local and in the bucket (the bucket's ``voice.json`` wins). A voice
        whose ``voice.json`` is broken is logged and left out, so one bad file hides only itself."""
        found: dict[str, VoiceInfo] = {}
        if self.voices_dir.is_dir():
            for folder in sorted(self.voices_dir.iterdir()):
                if (folder / VOICE_FILE).is_file():
                    self._collect(found, folder.name, partial(self._read_voice, folder))
        if self.storage is not None:
            for key in self.storage.list(f"{VOICES_DIR}/"):
                parts = key.split("/")
                if len(parts) == 3 and parts[2] == VOICE_FILE:
                    self._collect(found, parts[1], partial(self._remote_voice, parts[1]))
        return [found[name] for name in sorted(found)]

    @staticmethod
    def _collect(found: dict[str, VoiceInfo], name: str, read: Callable[[], VoiceInfo | None]) -> None:
        try:
            info = read()
        except CoverError as error:
            log.warning("voice %r left out: %s", name, error.message)
            return
        if info is not None:
            found[info.name] = info

    def voice_info(self, name: str) -> VoiceInfo:
        """A voice's ``voice.json`` only (what a request's cover id needs): the bucket's, else the local one."""
        remote = self._remote_voice(name)
        return remote if remote is not None else self._local_voice(name)

    def voice(self, name: str) -> ResolvedVoice:
        """A voice by name with its files in the local store (see :meth:`localise`)."""
        return self.localise(self.voice_info(name))

    def localise(self, info: VoiceInfo) -> ResolvedVoice:
        """The voice ``info`` describes, with its files in the local store: used as they are when
        they match ``info``'s hashes, else synced from the bucket (each file checked)."""
        folder = self.voice_folder(info.name)
        try:
            local = self._read_voice(folder) if (folder / VOICE_FILE).is_file() else None
        except CoverError:
            local = None
        problems = (
            ["voice.json differs"] if local is None or local.files != info.files else self.verify_voice(info.name)
        )
        if problems:
            if self._remote_voice(info.name) is None:
                raise CoverError(ErrorCode.MODEL_HASH_MISMATCH, f"voice '{info.name}': {'; '.join(problems)}")
            self._sync_voice(info)
        return ResolvedVoice(info=info, folder=folder)

    def _sync_voice(self, info: VoiceInfo) -> None:
        bucket = self._bucket()
        self.voices_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.voices_dir, prefix=".sync-") as tmp:
            staged = Path(tmp) / "voice"
            for file, digest in info.files.items():
                path = bucket.download(Keys.voice(info.name, file), staged / file)
                if not _matches(path, digest):
                    raise CoverError(
                        ErrorCode.MODEL_HASH_MISMATCH,
                        f"voices/{info.name}/{file} in the bucket does not match its sha256",
                    )
            (staged / VOICE_FILE).write_text(info.model_dump_json(indent=2))
            target = self.voice_folder(info.name)
            if target.exists():
                shutil.rmtree(target)
            staged.rename(target)

    def publish_voice(self, folder: Path) -> VoiceInfo:
        """Upload a local voice folder to the bucket (``voice.json`` last, so readers never see half a voice)."""
        bucket = self._bucket()
        info = self._read_voice(folder)
        for file in info.files:
            bucket.upload_file(Keys.voice(info.name, file), folder / file)
        bucket.put_bytes(Keys.voice(info.name, VOICE_FILE), info.model_dump_json(indent=2).encode())
        return info

    def keep_reference(self, info: VoiceInfo, embedding: list[float]) -> bool:
        """Write a reference embedding computed at a cover into a local voice's ``voice.json``, so the
        next process need not compute it. Only for a voice that is not in the bucket (the bucket's
        ``voice.json`` is the truth there: ``cover models add`` computes it before publishing) and whose
        local files are still the ones ``info`` describes. Whether it was written."""
        folder = self.voice_folder(info.name)
        try:
            local = self._read_voice(folder)
        except CoverError:
            return False
        if local.files != info.files or local.reference_embedding or self._remote_voice(info.name) is not None:
            return False
        updated = local.model_copy(update={"reference_embedding": embedding})
        staged = folder / f".{VOICE_FILE}.tmp"
        try:
            staged.write_text(updated.model_dump_json(indent=2))
            staged.replace(folder / VOICE_FILE)
        except OSError as exc:
            log.warning("voice %r: reference embedding not kept: %s", info.name, exc)
            return False
        return True

    def verify_voice(self, name: str) -> list[str]:
        """Problems with a local voice's files (empty when every hash matches)."""
        info = self._local_voice(name)
        folder = self.voice_folder(name)
        problems = []
        for file, expected in info.files.items():
            path = folder / file
            if not path.is_file():
                problems.append(f"{file} is missing")
            elif sha256_of(path) != expected.sha256:
                problems.append(f"{file} does not match its sha256")
        return problems


def _matches(path: Path, digest: FileDigest) -> bool:
    return path.is_file() and path.stat().st_size == digest.size and sha256_of(path) == digest.sha256


def _inside(root: Path, rel: str) -> Path:
    """``root / rel``, refusing a manifest entry that would land outside the base-model folders."""
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts or not parts or parts[0] not in BASE_DIRS:
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{Keys.models_manifest()} names a file outside the store: {rel!r}")
    return root / rel

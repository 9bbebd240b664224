"""The job's request handler: one ``cover.requested`` message in, one cover and one answer out.

Every entry point (a Cloud Run Job execution, the GPU runner's subscriber, the local stack) calls
:meth:`Worker.handle`. It answers ACK (done: completed, or failed for good with ``cover.failed``)
or RETRY (let Pub/Sub / Cloud Run deliver it again: another runner holds the cover, or a
retryable error). Idempotent: a cover that exists is answered from its manifest, so duplicate
deliveries give the same ``cover.completed`` (same event id, same content).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from enum import Enum
from pathlib import Path

from job.claims import Claim
from job.convert import convert_vocals
from job.mix import MixOptions, mix
from job.pipeline import Pipeline
from job.separate import SeparationOptions
from shared.bus import EventBus
from shared.covers import resolve
from shared.errors import CoverError, ErrorCode
from shared.events import (COMPLETED, FAILED, PROGRESS, CoverCompleted, CoverFailed, CoverProgress, CoverRequest,
                           CoverStatus, now, parse_request)
from shared.hashing import sha256_of
from shared.options import ConversionOptions
from shared.settings import Settings
from shared.storage import Keys, Storage, make_storage
from shared.registry import VoiceRegistry
from shared.voices import VoiceInfo

log = logging.getLogger("melodia.worker")

CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "m4a": "audio/mp4", "flac": "audio/flac", "wav": "audio/wav"}


class Outcome(str, Enum):
    ACK = "ack"
    RETRY = "retry"


class Worker:
    def __init__(self, settings: Settings, storage: Storage | None = None, bus: EventBus | None = None,
                 pipeline: Pipeline | None = None) -> None:
        self.settings = settings
        self.storage = storage or make_storage(settings)
        self.bus = bus or EventBus(settings)
        self.keys = Keys(settings.song_key_template)
        self.voices = VoiceRegistry(settings.models_dir, self.storage)
        self._pipeline = pipeline

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:  # models load once per process, then stay
            self._pipeline = Pipeline(self.settings)
        return self._pipeline

    # --- status and events ---------------------------------------------------------------------
    def _status(self, cid: str, state: str, **fields) -> None:
        status = CoverStatus(cover_id=cid, state=state, updated_at=now(), **fields)
        self.storage.put_bytes(Keys.status(cid), status.model_dump_json().encode())

    def _fail(self, error: CoverError, request: CoverRequest | None, cid: str | None, attempt: int) -> Outcome:
        failed = CoverFailed(cover_id=cid, song_id=request.song_id if request else None,
                             voice_model=request.voice_model if request else None, code=error.code,
                             message=error.message, retryable=error.retryable, attempt=attempt,
                             runner=self.settings.runner)
        self.bus.publish_event(FAILED, failed, cid, event_id=f"{cid or 'request'}.failed.{attempt}.{time.time_ns()}")
        if cid:
            self._status(cid, "failed", error=failed)
        log.warning(json.dumps({"event": "cover.failed", "cover_id": cid, "code": error.code.value,
                                "message": error.message}))
        return Outcome.ACK

    def _publish_completed(self, completed: CoverCompleted) -> None:
        self.bus.publish_event(COMPLETED, completed, completed.cover_id, event_id=f"{completed.cover_id}.completed")

    # --- the request ---------------------------------------------------------------------------
    def handle(self, data: bytes, attempt: int = 1) -> Outcome:
        request: CoverRequest | None = None
        cid: str | None = None
        claim: Claim | None = None
        try:
            request = parse_request(data)
            cid, info = resolve(self.storage, self.keys, self.voices, request)
            existing = self.storage.get_bytes(Keys.manifest(cid))
            if existing is not None:
                self._publish_completed(CoverCompleted.model_validate_json(existing))
                return Outcome.ACK
            self.voices.get(info.name)  # sync the voice's files from the bucket when it is newer there
            claim = Claim(self.storage, cid, self.settings.runner, self.settings.lease_s)
            if not claim.acquire():
                log.info(json.dumps({"event": "cover.busy", "cover_id": cid}))
                time.sleep(self.settings.busy_retry_s)
                return Outcome.RETRY
            completed = self._render_claimed(request, cid, info, claim)
            if not self.storage.put_bytes(Keys.manifest(cid), completed.model_dump_json().encode(), if_absent=True):
                completed = CoverCompleted.model_validate_json(self.storage.get_bytes(Keys.manifest(cid)) or b"")
            self._status(cid, "completed", completed=completed)
            self._publish_completed(completed)
            return Outcome.ACK
        except CoverError as error:
            if claim is not None:
                claim.release()
            if error.retryable and attempt < self.settings.max_attempts:
                return Outcome.RETRY
            return self._fail(error, request, cid, attempt)
        except Exception as exc:  # noqa: BLE001 - a worker loop must survive anything one request does
            log.exception("render failed")
            if claim is not None:
                claim.release()
            if attempt < self.settings.max_attempts:
                return Outcome.RETRY
            return self._fail(CoverError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"), request, cid, attempt)

    def _render_claimed(self, request: CoverRequest, cid: str, info: VoiceInfo, claim: Claim) -> CoverCompleted:
        stop = threading.Event()
        lost = threading.Event()

        def keep_lease() -> None:
            while not stop.wait(self.settings.lease_s / 3):
                if not claim.renew():
                    lost.set()
                    return

        renewer = threading.Thread(target=keep_lease, daemon=True)
        renewer.start()
        try:
            return self.render(request, cid, info, lost)
        finally:
            stop.set()

    def render(self, request: CoverRequest, cid: str, info: VoiceInfo, lost: threading.Event | None = None) -> CoverCompleted:
        pipeline = self.pipeline
        last = {"t": 0.0}

        def progress(stage: str, fraction: float) -> None:
            if lost is not None and lost.is_set():
                raise CoverError(ErrorCode.INTERNAL, "another runner took this cover over", retryable=True)
            if fraction < 1.0 and time.monotonic() - last["t"] < 2.0:
                return
            last["t"] = time.monotonic()
            self.bus.publish_event(PROGRESS, CoverProgress(cover_id=cid, song_id=request.song_id,
                                                           voice_model=request.voice_model, stage=stage,
                                                           progress=round(fraction, 3), runner=self.settings.runner), cid)
            self._status(cid, "running", stage=stage, progress=round(fraction, 3))

        options = request.options
        timings: dict[str, float] = {}
        with pipeline.workdir() as work:
            start = time.perf_counter()
            local = self.storage.download(self.keys.song(request.song_id), work / "download" / "song")
            song = pipeline.fetch(local, work / "fetch")
            timings["fetch"] = time.perf_counter() - start
            progress("fetch", 1.0)

            start = time.perf_counter()
            separation = SeparationOptions(device=self.settings.device)
            separator_hash = hashlib.sha256(separation.model_dump_json().encode()).hexdigest()[:16]
            stem_keys = {name: Keys.stem(song.sha256, separator_hash, name) for name in ("vocals", "no_vocals")}
            stems_dir = work / "stems"
            cached = all(self.storage.head(k) is not None for k in stem_keys.values())
            if cached:
                for name, key in stem_keys.items():
                    self.storage.download(key, stems_dir / f"{name}.wav")
            else:
                stems = pipeline.separate(song, stems_dir, separation, lambda f: progress("separate", f))
                for name, key in stem_keys.items():
                    self.storage.upload_file(key, getattr(stems, name), "audio/wav")
            timings["separate"] = time.perf_counter() - start
            progress("separate", 1.0)

            start = time.perf_counter()
            conversion = ConversionOptions(**options.model_dump(exclude={"format"}))
            converted = convert_vocals(pipeline.converter, stems_dir / "vocals.wav", info.name,
                                       work / "converted.wav", conversion, lambda f: progress("convert", f))
            timings["convert"] = time.perf_counter() - start

            start = time.perf_counter()
            ext = options.format.value
            mixed = mix(stems_dir / "no_vocals.wav", converted.path, work / f"cover.{ext}",
                        MixOptions(format=options.format), voice_name=info.name,
                        title=f"{request.song_id} ({info.display_name} cover)")
            timings["mix"] = time.perf_counter() - start
            progress("mix", 1.0)

            start = time.perf_counter()
            key = Keys.cover(cid, ext)
            digest = sha256_of(mixed.path)
            stored = self.storage.upload_file(key, Path(mixed.path), CONTENT_TYPES[ext])
            timings["upload"] = time.perf_counter() - start
        return CoverCompleted(
            cover_id=cid, song_id=request.song_id, voice_model=info.name, voice_version=info.model_version,
            options=options, bucket=self.storage.bucket, key=key, url=self.storage.url(key), format=options.format,
            content_type=CONTENT_TYPES[ext], duration_s=mixed.duration_s, size_bytes=stored.size, sha256=digest,
            loudness_lufs=mixed.loudness_lufs, true_peak_dbtp=mixed.true_peak_dbtp,
            timings={k: round(v, 3) for k, v in timings.items()}, stems_cached=cached, runner=self.settings.runner,
            completed_at=now())

"""The job's request handler: one ``cover.requested`` message in, one cover and one answer out.

Every entry point (a Cloud Run Job execution, the GPU runner's subscriber, the local stack) calls
:meth:`Worker.handle`. It answers ACK (done: completed, or failed for good with ``cover.failed``),
RETRY (a retryable error: let Pub/Sub / Cloud Run deliver it again) or BUSY (another runner holds
the cover: the caller waits, holding the message, and asks again; a busy round is never a delivery
attempt). Idempotent: a cover that exists is answered from its manifest, so duplicate deliveries
give the same ``cover.completed`` (same event id, same content).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from enum import Enum
from pathlib import Path

from job.render.pipeline import Cast, CastPart, CoverOptions, CoverResult, Pipeline
from job.render.separate.stems import StemCache
from job.render.timing import StageTimer
from job.render.workfolder import work_folder
from job.service.progress import ProgressReporter
from shared.bus import EventBus
from shared.claims import Claim, keep_renewed
from shared.covers import resolve, served
from shared.errors import CoverError, ErrorCode, QualityGateError, no_space
from shared.events import (
    COMPLETED,
    FAILED,
    PROGRESS,
    CoverCompleted,
    CoverFailed,
    CoverProgress,
    CoverRequest,
    CoverStatus,
    RequestIdentity,
    answer_event_id,
    now,
    parse_request,
    request_identity,
)
from shared.hashing import sha256_of
from shared.logs import fields
from shared.model_store import ModelStore, ResolvedVoice
from shared.options import FORMATS, ConversionOptions, EffectOptions, MixOptions, StemOptions
from shared.quality import QualityReport, refusal, refuses, summary
from shared.settings import Settings
from shared.stages import Stage
from shared.storage import Keys, Storage, make_storage

log = logging.getLogger("melodia.worker")
HOLD_LIMIT_S = 600.0  # a held render (failpoint hold:STAGE:PATH) goes on after this even unreleased


def _abort_if_lost(lost: threading.Event | None) -> None:
    """Stop a render whose claim's lease was lost: another runner may have taken the cover over."""
    if lost is not None and lost.is_set():
        raise CoverError(ErrorCode.INTERNAL, "this render's lease was lost (see lease.lost)", retryable=True)


class Outcome(str, Enum):  # noqa: UP042 - str() of a member is its value, in messages
    ACK = "ack"
    RETRY = "retry"
    BUSY = "busy"  # another runner holds the cover: wait and ask again, not a failure


class Worker:
    """Answers ``cover.requested`` messages: one cover and one final event each.

    Args:
        settings: the runner's settings
        storage: the bucket (default: from the settings)
        bus: the events topic (default: from the settings)
        pipeline: the pipeline (default: made on first use, with the bucket's stem cache)
        one_cover: this process answers one request and ends (``python -m job run``): the pipeline
            lets go of each stage's models once they have done their part (``Pipeline.one_cover``)
    """

    def __init__(
        self,
        settings: Settings,
        storage: Storage | None = None,
        bus: EventBus | None = None,
        pipeline: Pipeline | None = None,
        one_cover: bool = False,
    ) -> None:
        self.settings = settings
        self.one_cover = one_cover
        self.storage = storage or make_storage(settings)
        self.bus = bus or EventBus(settings)
        self.keys = Keys(settings.song_key_template)
        self.models = ModelStore(settings.models_dir, self.storage)
        self._pipeline = pipeline
        self._models_synced = False
        self._lock = threading.Lock()  # requests in flight share the pipeline and the model store
        self.busy_until = 0.0  # after a BUSY answer: when the holder's lease lapses unless renewed

    def prepare(self) -> None:
        """Sync the base models from the bucket (once per process), before the first request."""
        with self._lock:
            if not self._models_synced:
                self.models.sync()
                self._models_synced = True

    @property
    def pipeline(self) -> Pipeline:
        with self._lock:
            if self._pipeline is None:  # models load once per process, then stay
                self._pipeline = Pipeline(self.settings, self.models, StemCache(self.storage), one_cover=self.one_cover)
            return self._pipeline

    def _failpoint(self, stage: Stage, cid: str) -> None:
        """Tests only: ``COVER_FAILPOINT=after:STAGE`` kills this process when STAGE reports;
        ``raise:STAGE`` fails the render there with a retryable error; ``hold:STAGE:PATH`` holds the
        render there until the file PATH exists (a render as long as a test needs, on a short song)."""
        failpoint = self.settings.failpoint or ""
        if failpoint.startswith(f"hold:{stage.value}:"):
            release = Path(failpoint.split(":", 2)[2])
            log.warning("failpoint: holding the render", extra=fields(event="failpoint", stage=stage, cover_id=cid))
            deadline = time.monotonic() + HOLD_LIMIT_S
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        if self.settings.failpoint == f"after:{stage.value}":
            log.warning("failpoint: killing this process", extra=fields(event="failpoint", stage=stage, cover_id=cid))
            os.kill(os.getpid(), signal.SIGKILL)
        if self.settings.failpoint == f"raise:{stage.value}":
            raise CoverError(ErrorCode.INTERNAL, f"failpoint: the render fails after {stage.value}", retryable=True)

    # --- status and events ---------------------------------------------------------------------
    def _status(self, cid: str, state: str, **fields) -> None:
        status = CoverStatus(cover_id=cid, state=state, updated_at=now(), **fields)
        self.storage.put_bytes(Keys.status(cid), status.model_dump_json().encode())

    def _fail(
        self,
        error: CoverError,
        request: CoverRequest | None,
        cid: str | None,
        attempt: int,
        data: bytes,
        identity: RequestIdentity,
    ) -> Outcome:
        failed = CoverFailed(
            cover_id=cid,
            request_id=identity.request_id,
            song_id=request.song_id if request else identity.song_id,
            voice_model=request.voice_model if request else identity.voice_model,
            code=error.code,
            message=error.message,
            retryable=error.retryable,
            attempt=attempt,
            runner=self.settings.runner,
            quality=getattr(error, "report", None),
        )
        self.bus.publish_event(FAILED, failed, cid, event_id=answer_event_id("failed", cid, identity.request_id, data))
        if cid:
            self._status(cid, "failed", error=failed)
        log.warning(
            error.message,
            extra=fields(
                event="cover.failed",
                cover_id=cid,
                code=error.code.value,
                song_id=failed.song_id,
                voice=failed.voice_model,
                attempt=attempt,
                request_id=identity.request_id,
            ),
        )
        return Outcome.ACK

    def _publish_completed(self, completed: CoverCompleted, request_id: str | None) -> None:
        """Publish the cover (as stored, its URL signed now) as the answer to ``request_id``: the
        same ``ce-id`` on every replay of that request."""
        answer = served(completed, self.storage).model_copy(update={"request_id": request_id})
        event_id = answer_event_id("completed", completed.cover_id, request_id, b"")
        self.bus.publish_event(COMPLETED, answer, completed.cover_id, event_id=event_id)

    # --- the request ---------------------------------------------------------------------------
    def handle(
        self, data: bytes, attempt: int = 1, attributes: Mapping[str, str] | None = None, message_id: str = ""
    ) -> Outcome:
        """Answer one request message (``attributes``: its Pub/Sub attributes; ``message_id``: its
        Pub/Sub id, the request's id of last resort).

        Args:
            data: the message's data (the request's JSON)
            attempt: this delivery's attempt, from the platform that retries
            attributes: its Pub/Sub attributes
            message_id: its Pub/Sub id, the request's id of last resort
        """
        identity = request_identity(data, attributes, message_id)
        request: CoverRequest | None = None
        cid: str | None = None
        claim: Claim | None = None
        try:
            request = parse_request(data, attributes)
            cid, info, others = resolve(self.storage, self.keys, self.models, request, self.settings.require_rights)
            existing = self.storage.get_bytes(Keys.manifest(cid))
            if existing is not None:
                stored = CoverCompleted.model_validate_json(existing)
                self._gate(stored.quality, request)  # published for another request that accepted it
                self._publish_completed(stored, identity.request_id)
                return Outcome.ACK
            self.prepare()
            with self._lock:
                voice = self.models.localise(info)  # the voice's files, synced from the bucket when they differ
                cast = self._cast(request, {name: self.models.localise(i) for name, i in others.items()})
            claim = Claim(self.storage, cid, self.settings.runner, self.settings.lease_s)
            if not claim.acquire():
                self.busy_until = claim.held_until
                log.info("another runner holds this cover", extra=fields(event="cover.busy", cover_id=cid))
                return Outcome.BUSY
            completed = self._render_claimed(request, cid, voice, claim, identity.request_id, cast)
            if not self.storage.put_bytes(Keys.manifest(cid), completed.model_dump_json().encode(), if_absent=True):
                completed = CoverCompleted.model_validate_json(self.storage.get_bytes(Keys.manifest(cid)) or b"")
            self._status(cid, "completed", completed=completed)
            self._publish_completed(completed, identity.request_id)
            return Outcome.ACK
        except Exception as exc:
            error = exc if isinstance(exc, CoverError) else no_space(exc)
            if error is None:
                log.exception("render failed", extra=fields(event="cover.error", cover_id=cid))
                error = CoverError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            if claim is not None:
                self._release(claim)
            if error.retryable and attempt < self.settings.max_attempts:
                log.info(
                    "retry later",
                    extra=fields(event="cover.retry", cover_id=cid, code=error.code.value, attempt=attempt),
                )
                return Outcome.RETRY
            return self._fail(error, request, cid, attempt, data, identity)

    def _store_report(self, cid: str, request: CoverRequest, result: CoverResult, content_type: str) -> None:
        """The report page, as ``reports/{cover_id}.html``: with the cover in its player when the cover
        will be published, without it when the gate refuses it."""
        if result.quality is None:
            return
        from job.render.quality.report_page import render_page

        refused = refuses(
            result.quality, self.settings.quality, request.publish_below_gate, self.settings.quality_unmeasurable
        )
        page = render_page(
            result.quality,
            f"{request.song_id} ({request.voice_model} cover)",
            None if refused else "audio",  # the page is served at /covers/{id}/report: /covers/{id}/audio
            content_type,
            published=not refused,
        )
        self.storage.put_bytes(Keys.report(cid), page.encode(), content_type="text/html; charset=utf-8")

    def _gate(self, quality: QualityReport | None, request: CoverRequest) -> None:
        """Refuse a cover below the quality gate unless the request accepts it (quality.gate)."""
        if not refuses(quality, self.settings.quality, request.publish_below_gate, self.settings.quality_unmeasurable):
            return
        assert quality is not None
        raise QualityGateError(f"the cover {refusal(quality)}: {summary(quality)}", quality)

    @staticmethod
    def _release(claim: Claim) -> None:
        """Give the claim up; when the storage refuses (it may be what failed), the lease lapses by
        itself within ``lease_s``."""
        try:
            claim.release()
        except Exception as exc:  # noqa: BLE001 - the answer to the request matters more
            log.warning(
                "claim not released",
                extra=fields(event="claim.release_failed", cover_id=claim.cover_id, error=str(exc)[:200]),
            )

    @staticmethod
    def _cast(request: CoverRequest, voices: dict[str, ResolvedVoice]) -> Cast:
        """The request's further voices, resolved (``voices``: by name, the main voice excluded)."""
        parts = [
            CastPart(
                voice=voices[p.voice_model],
                ranges=[(r.start_s, r.end_s) for r in p.ranges],
                options=p.options,
            )
            for p in request.voices
            if p.voice_model != request.voice_model
        ]
        return Cast(parts=parts, backing_voice=voices.get(request.backing_voice or ""))

    def _render_claimed(
        self,
        request: CoverRequest,
        cid: str,
        voice: ResolvedVoice,
        claim: Claim,
        request_id: str | None,
        cast: Cast | None = None,
    ) -> CoverCompleted:
        stop = threading.Event()
        lost = threading.Event()
        renewer = threading.Thread(target=keep_renewed, args=(claim, stop, lost), daemon=True)
        renewer.start()
        try:
            return self.render(request, cid, voice, lost, request_id, cast)
        finally:
            stop.set()

    def render(
        self,
        request: CoverRequest,
        cid: str,
        voice: ResolvedVoice,
        lost: threading.Event | None = None,
        request_id: str | None = None,
        cast: Cast | None = None,
    ) -> CoverCompleted:
        """Download the song, render it, upload the cover; the completed event's data.

        Args:
            request: the request
            cid: its cover id
            voice: the voice, resolved
            lost: set when the claim's lease is lost: the render stops at its next progress report
            request_id: the id the events answer
            cast: the further voices, resolved (None: the main voice sings everything)
        """
        reporter = ProgressReporter(
            CoverProgress(
                cover_id=cid,
                request_id=request_id,
                song_id=request.song_id,
                voice_model=request.voice_model,
                stage=Stage.ACCEPTED,
                progress=0.0,
                overall=0.0,
                runner=self.settings.runner,
            ),
            publish=lambda event: self.bus.publish_soon(PROGRESS, event, cid),
            status=lambda event: self._status(
                cid, "running", stage=event.stage, progress=event.progress, overall=event.overall
            ),
        )

        def progress(stage: Stage, fraction: float) -> None:
            _abort_if_lost(lost)
            if reporter(stage, fraction):
                self._failpoint(stage, cid)

        progress(Stage.ACCEPTED, 0.0)
        options = request.options
        spec = FORMATS[options.format]
        cover_options = CoverOptions(
            conversion=ConversionOptions(**options.model_dump(include=set(ConversionOptions.model_fields))),
            mix=MixOptions(format=options.format, **options.model_dump(include=set(EffectOptions.model_fields))),
            stems=StemOptions(**options.model_dump(include=set(StemOptions.model_fields))),
            allow_no_vocals=request.allow_no_vocals,
        )
        timer = StageTimer()
        with work_folder(self.settings.work_dir) as work:
            with timer(Stage.DOWNLOAD):
                song = self.storage.download(self.keys.song(request.song_id), work / "song")
            progress(Stage.DOWNLOAD, 1.0)
            result = self.pipeline.render(
                song,
                voice,
                work / f"cover.{spec.extension}",
                cover_options,
                progress,
                work=work,
                title=f"{request.song_id} ({voice.info.display_name} cover)",
                discard_song=True,  # our download: on Cloud Run's in-memory disk it is memory
                cast=cast,
                song_label=request.song_id,
            )
            self._store_report(cid, request, result, spec.content_type)
            self._gate(result.quality, request)  # before the cover is stored: a refused cover is never visible
            key = Keys.cover(cid, spec.extension)
            with timer(Stage.UPLOAD):
                digest = sha256_of(result.output)
                stored = self.storage.upload_file(key, result.output, spec.content_type)
            progress(Stage.UPLOAD, 1.0)
        download, upload = (timer.seconds(stage) for stage in (Stage.DOWNLOAD, Stage.UPLOAD))
        timings = {Stage.DOWNLOAD.value: download, **result.timings, Stage.UPLOAD.value: upload}  # in stage order
        return CoverCompleted(
            cover_id=cid,
            song_id=request.song_id,
            voice_model=voice.name,
            voice_version=voice.info.model_version,
            options=options,
            voices=request.voices,
            backing_voice=request.backing_voice,
            voice_rights={v.name: v.info.rights for v in [voice, *_further(cast)]},
            voice_versions={v.name: v.info.model_version for v in _further(cast)},
            bucket=self.storage.bucket,
            key=key,
            url="",  # signed when served, never stored (shared.covers.served)
            format=options.format,
            content_type=spec.content_type,
            duration_s=result.mix.duration_s,
            size_bytes=stored.size,
            sha256=digest,
            loudness_lufs=result.mix.loudness_lufs,
            true_peak_dbtp=result.mix.true_peak_dbtp,
            timings={k: round(v, 3) for k, v in timings.items()},
            stems_cached=result.stems_cached,
            runner=self.settings.runner,
            completed_at=now(),
            quality=result.quality,
            provenance=result.provenance,
        )


def _further(cast: Cast | None) -> list[ResolvedVoice]:
    """A cast's further voices: on the lead, then the backing's."""
    if cast is None:
        return []
    return [p.voice for p in cast.parts] + ([cast.backing_voice] if cast.backing_voice else [])

"""functions-framework functions: ``http`` (the API), ``trigger`` (Pub/Sub push -> Cloud Run Job)
and ``unanswered`` (Pub/Sub push of dead letters and failed executions -> their answer).

    functions-framework --source dispatcher/main.py --target http --port 8080
    functions-framework --source dispatcher/main.py --target trigger --port 8081
    functions-framework --source dispatcher/main.py --target unanswered --port 8082

API: ``POST /cover``, ``GET /models``, ``GET /covers/{cover_id}``, ``GET /covers/{cover_id}/report``,
``GET /covers/{cover_id}/provenance``,
``GET /covers/{cover_id}/audio``, ``GET /healthz``, ``GET /openapi.json`` (the contract,
:mod:`dispatcher.api`). Every error is
``application/problem+json`` (RFC 7807) with a stable ``code``: the codes of :mod:`shared.errors`,
``route.unknown`` (404), ``route.method_not_allowed`` (405), ``request.too_large`` (413, bodies
over 64 KiB), ``request.unsupported_media_type`` (415), ``cover.unknown`` (404), ``report.unknown`` (404).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import functions_framework
from flask import Request, Response, g
from pydantic import BaseModel, ValidationError

from dispatcher.api import (
    COVER_ID_PATTERN,
    MAX_REQUEST_BYTES,
    PROBLEM_TYPE,
    Accepted,
    Health,
    ModelList,
    Problem,
    PushEnvelope,
    document,
)
from shared.bus import EventBus
from shared.claims import lease_expiry
from shared.covers import resolve, served
from shared.errors import CoverError, ErrorCode
from shared.events import (
    FAILED,
    CoverCompleted,
    CoverFailed,
    CoverStatus,
    answer_event_id,
    now,
    parse_request,
    request_identity,
)
from shared.logs import fields, set_trace, setup_logging
from shared.model_store import ModelStore
from shared.provenance import check_format, verify
from shared.quality import refuses
from shared.routing import routed_to
from shared.settings import Settings
from shared.storage import Keys, Storage, make_storage

if TYPE_CHECKING:
    from dispatcher.executions import Executions
    from dispatcher.local_jobs import LocalJobs
    from dispatcher.unanswered import Unanswered

log = logging.getLogger("melodia.dispatcher")
setup_logging()

_STATUS_FOR = {
    ErrorCode.VOICE_UNKNOWN: 404,
    ErrorCode.INPUT_NOT_FOUND: 404,
    ErrorCode.OPTIONS_INVALID: 400,
    ErrorCode.VOICE_NO_RIGHTS: 403,  # the deployment's policy refuses it, whatever the request says
}


class Services:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.storage: Storage = make_storage(settings)  # read only: the API's keys may not write
        # the one thing the API writes: 'queued' markers (a bucket of their own where configured)
        self.queue: Storage = make_storage(settings, queue=True) if settings.queue_bucket else self.storage
        self.bus = EventBus(settings)
        self.keys = Keys(settings.song_key_template)
        self.models = ModelStore(settings.models_dir, self.storage)
        self.jobs_client: Any = None
        self._local_jobs: LocalJobs | None = None
        self._unanswered: Unanswered | None = None
        self._executions: Executions | None = None

    def jobs(self) -> Any:  # run_v2.JobsClient (the library ships no type information)
        if self.jobs_client is None:
            from google.cloud import run_v2

            self.jobs_client = run_v2.JobsClient()
        return self.jobs_client

    def executions(self) -> Executions:
        if self._executions is None:
            from dispatcher.executions import executions

            self._executions = executions(self.settings)
        return self._executions

    def unanswered(self) -> Unanswered:
        if self._unanswered is None:
            from dispatcher.unanswered import Unanswered

            self._unanswered = Unanswered(self.storage, self.keys, self.models, self.bus, self.executions())
        return self._unanswered

    def local_jobs(self) -> LocalJobs:
        if self._local_jobs is None:
            from dispatcher.local_jobs import LocalJobs

            self._local_jobs = LocalJobs(self.settings)
        return self._local_jobs


@lru_cache(maxsize=1)
def services() -> Services:
    return Services(Settings())


def _json(body: Any, status: int = 200, content_type: str = "application/json") -> Response:
    return Response(json.dumps(body, default=str), status=status, content_type=content_type)


def _model(body: BaseModel, status: int = 200) -> Response:
    return Response(body.model_dump_json(), status=status, content_type="application/json")


def problem(status: int, code: ErrorCode | str, detail: str) -> Response:
    code_value = code.value if isinstance(code, ErrorCode) else code
    body = Problem(
        type=f"https://melodia-cover.dev/errors/{code_value}",
        title=code_value.replace(".", " "),
        status=status,
        detail=detail,
        code=code_value,
    )
    return Response(body.model_dump_json(), status=status, content_type=PROBLEM_TYPE)


def _submit(request: Request) -> Response:  # noqa: PLR0911 - reads best top to bottom
    svc = services()
    if request.mimetype != "application/json":
        return problem(415, "request.unsupported_media_type", "the body must be application/json")
    if (request.content_length or 0) > MAX_REQUEST_BYTES:
        return problem(413, "request.too_large", f"a request body is at most {MAX_REQUEST_BYTES} bytes")
    body = request.stream.read(MAX_REQUEST_BYTES + 1)
    if len(body) > MAX_REQUEST_BYTES:
        return problem(413, "request.too_large", f"a request body is at most {MAX_REQUEST_BYTES} bytes")
    try:
        cover_request = parse_request(body)
        check_format(cover_request.options.format.value, svc.settings.provenance)
        cid, _, _ = resolve(svc.storage, svc.keys, svc.models, cover_request, svc.settings.require_rights)
        # every request gets an id that its events echo, and a runner (shared/routing.py)
        routed = cover_request.model_copy(
            update={
                "request_id": cover_request.request_id or uuid.uuid4().hex,
                "runner": cover_request.runner or svc.settings.default_runner,
            }
        )
    except CoverError as error:
        return problem(_STATUS_FOR.get(error.code, 400), error.code, error.message)
    g.access.update(cover_id=cid, request_id=routed.request_id)
    manifest = svc.storage.get_bytes(Keys.manifest(cid))
    status_url = f"{svc.settings.public_base_url.rstrip('/')}/covers/{cid}"
    stored = CoverCompleted.model_validate_json(manifest) if manifest is not None else None
    gate = (svc.settings.quality, routed.publish_below_gate, svc.settings.quality_unmeasurable)
    if stored is not None and not refuses(stored.quality, *gate):
        completed = served(stored, svc.storage)
        completed = completed.model_copy(update={"request_id": routed.request_id})
        return _model(
            Accepted(
                cover_id=cid,
                request_id=str(routed.request_id),
                state="completed",
                status_url=status_url,
                completed=completed,
            )
        )
    queued = CoverStatus(cover_id=cid, state="queued", updated_at=now())
    svc.queue.put_bytes(Keys.status(cid), queued.model_dump_json().encode(), if_absent=True)
    try:
        g.access["message_id"] = svc.bus.publish_request(routed, cid)
    except Exception as exc:
        log.exception("publish failed")
        return problem(503, ErrorCode.INTERNAL, f"could not queue the request: {type(exc).__name__}")
    return _model(Accepted(cover_id=cid, request_id=str(routed.request_id), state="queued", status_url=status_url), 202)


def _unknown_id(cid: str) -> Response | None:
    """A 404 for a path whose cover id cannot be one (never looked up), else None."""
    if re.match(COVER_ID_PATTERN, cid):
        return None
    return problem(404, "cover.unknown", "a cover id is 32 hexadecimal digits")


def _cover_status(cid: str) -> Response:
    svc = services()
    if (refused := _unknown_id(cid)) is not None:
        return refused
    manifest = svc.storage.get_bytes(Keys.manifest(cid))
    if manifest is not None:
        completed = served(CoverCompleted.model_validate_json(manifest), svc.storage)
        return _model(
            CoverStatus(cover_id=cid, state="completed", completed=completed, updated_at=completed.completed_at)
        )
    raw = svc.storage.get_bytes(Keys.status(cid))
    if raw is None and svc.queue is not svc.storage:
        raw = svc.queue.get_bytes(Keys.status(cid))  # no runner has it yet
    if raw is None:
        return problem(404, "cover.unknown", f"no cover {cid}")
    status = CoverStatus.model_validate_json(raw)
    if status.state == "running":  # the lease is the heartbeat: lapsed means the runner is gone
        expiry = lease_expiry(svc.storage, cid)
        if expiry is not None and expiry < time.time():
            status = status.model_copy(update={"state": "stalled"})
    return _model(status)


def _cover_report(cid: str) -> Response:
    """The cover's quality report page (self-contained HTML), stored by its runner."""
    svc = services()
    if (refused := _unknown_id(cid)) is not None:
        return refused
    page = svc.storage.get_bytes(Keys.report(cid))
    if page is None:
        return problem(404, "report.unknown", f"no quality report for {cid} (yet)")
    return Response(page, status=200, content_type="text/html; charset=utf-8")


def _published(cid: str) -> CoverCompleted | Response:
    """A published cover's stored manifest, or the problem answer (an id that is not one, 404)."""
    if (refused := _unknown_id(cid)) is not None:
        return refused
    manifest = services().storage.get_bytes(Keys.manifest(cid))
    if manifest is None:
        return problem(404, "cover.unknown", f"no published cover {cid}")
    return CoverCompleted.model_validate_json(manifest)


def _cover_audio(cid: str) -> Response:
    """The cover itself: a redirect to its URL signed now (the report page's player plays this, so
    a page kept for days still plays; signed URLs are never stored)."""
    stored = _published(cid)
    if isinstance(stored, Response):
        return stored
    completed = served(stored, services().storage)
    answer = Response(status=302)
    answer.headers["Location"] = completed.url
    answer.headers["Cache-Control"] = "no-store"  # the signature expires; ask again each time
    return answer


def _cover_provenance(cid: str) -> Response:
    """The published cover's Content Credentials, checked now against the deployment's trusted
    certificates (``COVER_TRUSTED_CERTS``): the cover is read from the bucket into a temporary file."""
    import tempfile
    from pathlib import Path

    svc = services()
    completed = _published(cid)
    if isinstance(completed, Response):
        return completed
    with tempfile.TemporaryDirectory() as tmp:
        local = svc.storage.download(completed.key, Path(tmp) / Path(completed.key).name)
        found = verify(local, svc.settings.trusted_certs or "")
    return _model(found.model_copy(update={"file": completed.key}))


def _models(request: Request) -> Response:
    """The voices; each one's 256-number reference embedding only with ``?embeddings=true``."""
    voices = services().models.voices()
    if request.args.get("embeddings", "").lower() not in ("true", "1"):
        voices = [v.model_copy(update={"reference_embedding": None}) for v in voices]
    return _model(ModelList(models=voices))


# Cloud Run's limit on one environment variable's value is 32 KiB (the Admin API's EnvVar); a request
# is far smaller (its fields are bounded): this leaves the rest of the override room
MAX_LAUNCHED_REQUEST_BYTES = 16 * 1024


def _not_found(_: Exception) -> Response:
    """What the framework's router answers itself (a path it cannot route, e.g. one holding a line
    break: ``/covers/x%0A``), in problem+json like every other answer."""
    return problem(404, "route.unknown", "not an endpoint")


def _install_framework_handlers() -> None:
    """functions-framework loads this module inside its Flask app's context: the app's own 404 and
    405 pages become problem+json there too."""
    from flask import current_app, has_app_context

    if has_app_context():
        current_app.register_error_handler(404, _not_found)
        current_app.register_error_handler(
            405, lambda _: problem(405, "route.method_not_allowed", "the method is not allowed here")
        )


_install_framework_handlers()

ROUTES: dict[str, dict[str, Callable[[Request], Response]]] = {
    "/cover": {"POST": _submit},
    "/models": {"GET": _models},
    "/healthz": {"GET": lambda _: _model(Health(ok=True))},
    "/openapi.json": {"GET": lambda _: _json(document())},
}


@functions_framework.http
def http(request: Request) -> Response:
    """The API. Every answer that is not a success is problem+json, whatever went wrong; each
    request writes one access log line (``http.request``: method, path, status, latency, and the
    cover id, request id and Pub/Sub message id where the request has them)."""
    started = time.monotonic()
    g.access = {}
    answer = _route(request)
    log.info(
        "request",
        extra=fields(
            event="http.request",
            method=request.method,
            path=request.path[:200],
            status=answer.status_code,
            latency_ms=round((time.monotonic() - started) * 1000, 1),
            **g.access,
        ),
    )
    return answer


def _route(request: Request) -> Response:
    path = request.path.rstrip("/") or "/"
    try:
        set_trace(request.headers.get("X-Cloud-Trace-Context"), services().settings.project)
        if path.startswith("/covers/"):
            g.access["cover_id"] = path.split("/")[2][:64]
        if path.startswith("/covers/") and path.count("/") == 2:
            handlers: dict[str, Callable[[Request], Response]] = {
                "GET": lambda _: _cover_status(path.removeprefix("/covers/"))
            }
        elif path.startswith("/covers/") and path.endswith("/report") and path.count("/") == 3:
            handlers = {"GET": lambda _: _cover_report(path.split("/")[2])}
        elif path.startswith("/covers/") and path.endswith("/provenance") and path.count("/") == 3:
            handlers = {"GET": lambda _: _cover_provenance(path.split("/")[2])}
        elif path.startswith("/covers/") and path.endswith("/audio") and path.count("/") == 3:
            handlers = {"GET": lambda _: _cover_audio(path.split("/")[2])}
        else:
            handlers = ROUTES.get(path, {})
        if not handlers:
            return problem(404, "route.unknown", f"{path[:100]} is not an endpoint")
        handler = handlers.get(request.method)
        if handler is None:
            answer = problem(405, "route.method_not_allowed", f"{request.method} is not allowed on {path[:100]}")
            answer.headers["Allow"] = ", ".join(handlers)
            return answer
        return handler(request)
    except Exception:
        log.exception("request failed")
        return problem(500, ErrorCode.INTERNAL, "the request failed on our side; it is safe to retry")


GOOGLE_ISSUERS = ("accounts.google.com", "https://accounts.google.com")


def _verify_push(request: Request, settings: Settings) -> Response | None:
    """With ``COVER_PUSH_AUDIENCE`` set, a push must carry Pub/Sub's OIDC token for that audience,
    issued by Google (and, with ``COVER_PUSH_SERVICE_ACCOUNT``, for that verified service account):
    401 otherwise (403 for another account), so nobody else can start job executions."""
    if not settings.push_audience:
        return None
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return problem(401, "auth.missing", "a push must carry its OIDC token")
    try:
        from google.auth.transport import requests as google_requests
        from google.oauth2 import id_token

        claims = id_token.verify_token(
            header.removeprefix("Bearer "),
            google_requests.Request(),
            audience=settings.push_audience,
            certs_url=settings.push_certs_url,
        )
    except Exception as exc:  # noqa: BLE001 - any failure to verify is a refusal
        log.warning("push refused", extra=fields(event="push.refused", reason=type(exc).__name__))
        return problem(401, "auth.invalid", "the push token is not valid for this function")
    if claims.get("iss") not in GOOGLE_ISSUERS:
        return problem(401, "auth.invalid", "the push token was not issued by Google")
    account = settings.push_service_account
    if account and (claims.get("email") != account or not claims.get("email_verified")):
        return problem(403, "auth.forbidden", "the push token names another service account")
    return None


def _pushed(request: Request) -> tuple[PushEnvelope | None, bytes]:
    """A push's envelope and its message's data; (None, the body, at most 64 KiB) when the body is
    not a Pub/Sub envelope with base64 data."""
    try:
        envelope = PushEnvelope.model_validate_json(request.get_data())
        return envelope, base64.b64decode(envelope.message.data, validate=True)
    except (ValidationError, ValueError):
        return None, request.get_data()[:MAX_REQUEST_BYTES]


def _run_job(svc: Services, overrides: dict[str, str]) -> str:
    """One execution of the Cloud Run Job with ``overrides`` in its container's environment."""
    from google.cloud import run_v2

    overrides_type = run_v2.RunJobRequest.Overrides
    job_request = run_v2.RunJobRequest(
        name=svc.settings.cloud_run_job,
        overrides=overrides_type(
            container_overrides=[
                overrides_type.ContainerOverride(
                    env=[run_v2.EnvVar(name=name, value=value) for name, value in overrides.items()]
                )
            ]
        ),
    )
    operation = svc.jobs().run_job(request=job_request)
    metadata = getattr(operation, "metadata", None)
    return str(getattr(metadata, "name", "") or svc.settings.cloud_run_job)


@functions_framework.http
def trigger(request: Request) -> Response:
    """Pub/Sub push of ``cover.requested`` -> one Cloud Run Job execution with the request in its env.

    2xx only once the execution was accepted, so Pub/Sub redelivers otherwise (and the subscription's
    dead-letter policy catches what keeps failing). With ``COVER_MAX_EXECUTIONS`` running already,
    429 ``executions.at_capacity``: the request waits in its subscription for Pub/Sub's next push.
    A message that is not a valid request is answered with ``cover.failed`` here and acknowledged:
    no execution is spent on it.
    """
    svc = services()
    settings = svc.settings
    refused = _verify_push(request, settings)
    if refused is not None:
        return refused
    envelope, data = _pushed(request)
    attributes, message_id = (envelope.message.attributes, envelope.message.message_id) if envelope else ({}, "")
    if settings.serves and routed_to(attributes, settings.default_runner) != settings.serves:
        log.info(  # only where the filter is not applied (the emulator): a GPU runner's request
            "not routed here", extra=fields(event="request.not_routed_here", message_id=message_id)
        )
        return Response(status=204)
    who = request_identity(data, attributes, message_id)  # what every answer to this push names
    try:
        if envelope is None:
            raise CoverError(ErrorCode.OPTIONS_INVALID, "the push is not a Pub/Sub envelope with base64 data")
        # the request as the job reads it: re-written as compact UTF-8 JSON of the fields it gave
        # (whatever encoding and padding it came in), and small enough for an environment override
        launched = parse_request(data, attributes).model_dump_json(exclude_unset=True)
        if len(launched.encode()) > MAX_LAUNCHED_REQUEST_BYTES:
            raise CoverError(
                ErrorCode.OPTIONS_INVALID,
                f"the request is {len(launched.encode())} bytes as JSON; at most {MAX_LAUNCHED_REQUEST_BYTES} "
                "can be handed to a job execution",
            )
    except CoverError as error:  # it can never be processed: answer it, and acknowledge it
        failed = CoverFailed(
            **who.model_dump(), code=error.code, message=error.message, retryable=False, attempt=1, runner="trigger"
        )
        svc.bus.publish_event(FAILED, failed, None, event_id=answer_event_id("failed", None, who.request_id, data))
        return Response(status=204)
    if settings.max_executions and svc.executions().running() >= settings.max_executions:
        log.info(  # Pub/Sub pushes it again with its backoff; the request waits in the subscription
            "at the execution bound", extra=fields(event="execution.deferred", request_id=who.request_id)
        )
        answer = problem(429, "executions.at_capacity", f"{settings.max_executions} job executions are running")
        answer.headers["Retry-After"] = "30"
        return answer
    overrides = {"COVER_REQUEST": launched, "COVER_REQUEST_ID": who.request_id or ""}
    try:
        local = settings.job_launcher == "local"
        execution = svc.local_jobs().launch(overrides) if local else _run_job(svc, overrides)
    except Exception as exc:  # noqa: BLE001 - any failure means: not accepted, let Pub/Sub retry
        log.warning("run_job failed", extra=fields(event="run_job.failed", error=str(exc)[:300]))
        return problem(503, ErrorCode.INTERNAL, f"the job execution was not accepted: {type(exc).__name__}")
    log.info(
        "job execution started",
        extra=fields(event="execution.started", execution=execution, request_id=who.request_id),
    )
    return Response(status=204)


@functions_framework.http
def unanswered(request: Request) -> Response:
    """Pub/Sub push of what the platform ended without an answer -> that request's one answer.

    A dead-lettered request (Pub/Sub's dead-letter attributes) or a failed job execution's signal
    (a log entry naming the execution): :mod:`dispatcher.unanswered`. 204 once answered (or when
    there is nothing to answer); 503 when the answer could not be published, so Pub/Sub pushes it
    again.
    """
    svc = services()
    refused = _verify_push(request, svc.settings)
    if refused is not None:
        return refused
    from dispatcher.unanswered import DEAD_LETTER_SOURCE

    envelope, data = _pushed(request)
    if envelope is None:
        log.warning("not a push", extra=fields(event="unanswered.not_a_push"))
        return Response(status=204)  # nothing to answer, and nothing a redelivery would change
    attributes = envelope.message.attributes
    try:
        if DEAD_LETTER_SOURCE in attributes:
            svc.unanswered().dead_lettered(data, attributes, envelope.message.message_id)
        else:
            try:
                entry = json.loads(data)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                svc.unanswered().execution_signal(entry)
    except Exception as exc:
        log.exception("not answered", extra=fields(event="unanswered.failed"))
        return problem(503, ErrorCode.INTERNAL, f"the answer was not published: {type(exc).__name__}")
    return Response(status=204)

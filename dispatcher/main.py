"""functions-framework functions: ``http`` (the API) and ``trigger`` (Pub/Sub push -> Cloud Run Job).

    functions-framework --source dispatcher/main.py --target http --port 8080
    functions-framework --source dispatcher/main.py --target trigger --port 8081

API: ``POST /cover``, ``GET /models``, ``GET /covers/{cover_id}``, ``GET /healthz``. Errors are
``application/problem+json`` (RFC 7807) with the stable ``code`` of :mod:`shared.errors`.
"""

from __future__ import annotations

import base64
import json
import logging
from functools import lru_cache
from typing import Any

import functions_framework
from flask import Request, Response

from shared.bus import EventBus
from shared.covers import resolve
from shared.errors import CoverError, ErrorCode
from shared.events import FAILED, CoverCompleted, CoverFailed, CoverStatus, now, parse_request
from shared.model_store import ModelStore
from shared.settings import Settings
from shared.storage import Keys, Storage, make_storage

log = logging.getLogger("melodia.dispatcher")

_STATUS_FOR = {ErrorCode.VOICE_UNKNOWN: 404, ErrorCode.INPUT_NOT_FOUND: 404, ErrorCode.OPTIONS_INVALID: 400}


class Services:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.storage: Storage = make_storage(settings)
        self.bus = EventBus(settings)
        self.keys = Keys(settings.song_key_template)
        self.models = ModelStore(settings.models_dir, self.storage)
        self.jobs_client: Any = None

    def jobs(self):
        if self.jobs_client is None:
            from google.cloud import run_v2

            self.jobs_client = run_v2.JobsClient()
        return self.jobs_client


@lru_cache(maxsize=1)
def services() -> Services:
    return Services(Settings())


def _json(body: Any, status: int = 200, content_type: str = "application/json") -> Response:
    return Response(json.dumps(body, default=str), status=status, content_type=content_type)


def problem(status: int, code: ErrorCode | str, detail: str) -> Response:
    code_value = code.value if isinstance(code, ErrorCode) else code
    return _json(
        {
            "type": f"https://melodia-cover.dev/errors/{code_value}",
            "title": code_value.replace(".", " "),
            "status": status,
            "detail": detail,
            "code": code_value,
        },
        status,
        "application/problem+json",
    )


def _submit(request: Request) -> Response:
    svc = services()
    try:
        cover_request = parse_request(request.get_data())
        cid, _ = resolve(svc.storage, svc.keys, svc.models, cover_request)
    except CoverError as error:
        return problem(_STATUS_FOR.get(error.code, 400), error.code, error.message)
    manifest = svc.storage.get_bytes(Keys.manifest(cid))
    status_url = f"{svc.settings.public_base_url.rstrip('/')}/covers/{cid}"
    if manifest is not None:
        return _json(
            {"cover_id": cid, "state": "completed", "status_url": status_url, "completed": json.loads(manifest)}, 200
        )
    queued = CoverStatus(cover_id=cid, state="queued", updated_at=now())
    svc.storage.put_bytes(Keys.status(cid), queued.model_dump_json().encode(), if_absent=True)
    try:
        svc.bus.publish_request(cover_request, cid)
    except Exception as exc:
        log.exception("publish failed")
        return problem(503, ErrorCode.INTERNAL, f"could not queue the request: {type(exc).__name__}")
    return _json({"cover_id": cid, "state": "queued", "status_url": status_url}, 202)


def _cover_status(cid: str) -> Response:
    svc = services()
    manifest = svc.storage.get_bytes(Keys.manifest(cid))
    if manifest is not None:
        completed = CoverCompleted.model_validate_json(manifest)
        status = CoverStatus(cover_id=cid, state="completed", completed=completed, updated_at=completed.completed_at)
        return _json(status.model_dump(mode="json"))
    raw = svc.storage.get_bytes(Keys.status(cid))
    if raw is None:
        return problem(404, "cover.unknown", f"no cover {cid}")
    return _json(json.loads(raw))


@functions_framework.http
def http(request: Request) -> Response:
    path = request.path.rstrip("/") or "/"
    if path == "/cover" and request.method == "POST":
        return _submit(request)
    if path == "/models" and request.method == "GET":
        return _json({"models": [v.model_dump(mode="json") for v in services().models.voices()]})
    if path.startswith("/covers/") and request.method == "GET":
        return _cover_status(path.removeprefix("/covers/"))
    if path == "/healthz":
        return _json({"ok": True})
    return problem(404, "route.unknown", f"{request.method} {request.path} is not an endpoint")


@functions_framework.http
def trigger(request: Request) -> Response:
    """Pub/Sub push of ``cover.requested`` -> one Cloud Run Job execution with the request in its env.

    2xx only once the execution was accepted, so Pub/Sub redelivers otherwise (and the subscription's
    dead-letter policy catches what keeps failing). A message that is not a valid request is answered
    with ``cover.failed`` here and acknowledged: no execution is spent on it.
    """
    svc = services()
    envelope = request.get_json(silent=True) or {}
    message = envelope.get("message") or {}
    try:
        data = base64.b64decode(message.get("data", ""), validate=True)
    except (ValueError, TypeError):
        data = b""
    try:
        parse_request(data)
    except CoverError as error:
        failed = CoverFailed(code=error.code, message=error.message, retryable=False, attempt=1, runner="trigger")
        svc.bus.publish_event(FAILED, failed, None, event_id=f"{message.get('messageId', 'unknown')}.failed")
        return Response(status=204)
    from google.cloud import run_v2

    overrides_type = run_v2.RunJobRequest.Overrides
    job_request = run_v2.RunJobRequest(
        name=svc.settings.cloud_run_job,
        overrides=overrides_type(
            container_overrides=[
                overrides_type.ContainerOverride(env=[run_v2.EnvVar(name="COVER_REQUEST", value=data.decode())])
            ]
        ),
    )
    try:
        svc.jobs().run_job(request=job_request)
    except Exception as exc:  # noqa: BLE001 - any failure means: not accepted, let Pub/Sub retry
        log.warning(json.dumps({"event": "run_job.failed", "error": str(exc)[:300]}))
        return problem(503, ErrorCode.INTERNAL, f"the job execution was not accepted: {type(exc).__name__}")
    return Response(status=204)

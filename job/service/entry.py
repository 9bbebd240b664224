"""Entry points over :class:`job.service.worker.Worker`.

* ``python -m job run``: one request from ``COVER_REQUEST`` (JSON of ``cover.requested`` data), as
  a Cloud Run Job execution gets it from the trigger's override or from
  ``gcloud run jobs execute cover-job --update-env-vars COVER_REQUEST='{...}'``. Exit status 0 when
  the request is finished (completed, or failed for good after publishing ``cover.failed``),
  1 when a retry can help (Cloud Run retries the task).
* ``python -m job serve``: the GPU runner, a long-running streaming-pull subscriber on
  ``COVER_REQUESTS_SUBSCRIPTION``: one render at a time, models kept loaded, lease extension by the
  client library while a render runs, graceful stop on SIGTERM (the render in hand finishes).
  Outbound connections only.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from job.service.worker import Outcome, Worker
from shared.errors import CoverError
from shared.logs import fields, setup_logging
from shared.settings import Settings

log = logging.getLogger("melodia.runner")


def run_once(settings: Settings) -> int:
    raw = os.environ.get("COVER_REQUEST")
    if not raw:
        log.error("COVER_REQUEST is not set: nothing to render", extra=fields(event="request.missing"))
        return 2
    attempt = int(os.environ.get("CLOUD_RUN_TASK_ATTEMPT", "0")) + 1
    outcome = Worker(settings).handle(raw.encode(), attempt)
    return 0 if outcome is Outcome.ACK else 1


def serve(settings: Settings, stop: threading.Event | None = None) -> None:
    from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # namespace package, untyped
    from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler

    worker = Worker(settings)
    worker.prepare()  # the base models, synced from the bucket before the first request
    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(settings.project, settings.requests_subscription)
    attempts: dict[str, int] = {}
    stop = stop or threading.Event()

    def callback(message) -> None:
        attempts[message.message_id] = attempts.get(message.message_id, 0) + 1
        attempt = message.delivery_attempt or attempts[message.message_id]
        outcome = worker.handle(message.data, attempt)
        if outcome is Outcome.ACK:
            message.ack()
            attempts.pop(message.message_id, None)
        else:
            message.nack()

    flow = pubsub_v1.types.FlowControl(max_messages=1, max_lease_duration=4 * 3600)
    scheduler = ThreadScheduler(ThreadPoolExecutor(max_workers=1))
    future = subscriber.subscribe(path, callback, flow_control=flow, scheduler=scheduler)
    log.info("runner started", extra=fields(event="runner.started", subscription=path, runner=settings.runner))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            if future.done():
                future.result()  # surface a broken stream
    finally:
        future.cancel()  # stops pulling; the render in hand completes and is acked
        scheduler.shutdown(await_msg_callbacks=True)
        subscriber.close()
        log.info("runner stopped", extra=fields(event="runner.stopped", runner=settings.runner))


def main(argv: list[str] | None = None) -> int:
    setup_logging("INFO")
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "run"
    settings = Settings()
    if command == "run":
        return run_once(settings)
    if command == "serve":
        try:
            serve(settings)
        except CoverError as error:  # the runner cannot work at all (its models do not sync)
            log.error(error.message, extra=fields(event="runner.failed", code=error.code.value))
            return 1
        return 0
    print("usage: python -m job [run|serve]", file=sys.stderr)
    return 2

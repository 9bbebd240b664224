"""Entry points over :class:`job.service.worker.Worker`.

* ``python -m job run``: one request from ``COVER_REQUEST`` (JSON of ``cover.requested`` data; its
  id from ``COVER_REQUEST_ID`` when the data carries none), as
  a Cloud Run Job execution gets it from the trigger's override or from
  ``gcloud run jobs execute cover-job --update-env-vars COVER_REQUEST='{...}'``. Exit status 0 when
  the request is finished (completed, or failed for good after publishing ``cover.failed``),
  1 when a retry can help (Cloud Run retries the task). While another runner holds the cover, the
  task waits (up to ``COVER_BUSY_WAIT_MAX_S``) and takes over when that runner's lease lapses.
* ``python -m job serve``: the GPU runner, a long-running streaming-pull subscriber on
  ``COVER_REQUESTS_SUBSCRIPTION``: up to ``COVER_IN_FLIGHT`` requests at once (the heavy stages
  take turns on the device), models kept loaded, lease extension by the client library while a
  render runs (a request for a cover another runner renders waits on its runner, leased, and is
  answered from the stored cover: no busy round spends a delivery attempt), a ``runner.health``
  line every ``COVER_HEALTH_INTERVAL_S``, graceful stop on SIGTERM (every request in hand
  finishes; one waiting on another runner goes back to Pub/Sub). Outbound connections only.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from job.service.worker import Outcome, Worker
from shared.bus import subscriber_client
from shared.errors import CoverError
from shared.logs import fields, setup_logging
from shared.routing import routed_to
from shared.settings import Settings

log = logging.getLogger("melodia.runner")


def run_once(settings: Settings) -> int:
    raw = os.environ.get("COVER_REQUEST")
    if not raw:
        log.error("COVER_REQUEST is not set: nothing to render", extra=fields(event="request.missing"))
        return 2
    attempt = int(os.environ.get("CLOUD_RUN_TASK_ATTEMPT", "0")) + 1
    # the trigger passes the pushed message's ce-id (else its message id) as COVER_REQUEST_ID
    request_id = os.environ.get("COVER_REQUEST_ID", "")
    worker = Worker(settings, one_cover=True)  # this task renders one cover, then the process ends
    attributes = {"ce-id": request_id} if request_id else None
    deadline = time.monotonic() + settings.busy_wait_max_s
    while True:
        outcome = worker.handle(raw.encode(), attempt, attributes)
        if outcome is not Outcome.BUSY or time.monotonic() >= deadline:
            break
        # A task cannot hand its request back, and a busy round is not a failure: wait here while
        # the holder renews its lease, and take over once it lapses (or answer from the stored cover)
        time.sleep(_busy_wait(worker, settings))
    return 0 if outcome is Outcome.ACK else 1


class RunnerHealth:
    """What a runner has in hand and has done, logged every ``health_interval_s`` as ``runner.health``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = self.done = self.retried = 0
        self._lock = threading.Lock()

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def finished(self, outcome: Outcome) -> None:
        with self._lock:
            self.in_flight -= 1
            if outcome is Outcome.ACK:
                self.done += 1
            else:
                self.retried += 1

    def line(self) -> dict:
        with self._lock:
            line = {"in_flight": self.in_flight, "limit": self.limit, "done": self.done, "retried": self.retried}
        return {**line, **gpu_memory()}


def gpu_memory() -> dict:
    """GPU memory in MiB (in use, reserved by torch's allocator, peak in use, the card's total), or
    nothing without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {}
    mib = 2**20
    return {
        "gpu_allocated_mib": round(torch.cuda.memory_allocated() / mib),
        "gpu_reserved_mib": round(torch.cuda.memory_reserved() / mib),
        "gpu_peak_mib": round(torch.cuda.max_memory_allocated() / mib),
        "gpu_total_mib": round(torch.cuda.get_device_properties(0).total_memory / mib),
    }


def _busy_wait(worker: Worker, settings: Settings) -> float:
    """How long to wait before looking again at a cover another runner holds: until its lease would
    lapse unless renewed, at most ``busy_retry_s``, at least 0.2 s."""
    return max(0.2, min(settings.busy_retry_s, worker.busy_until - time.time() + 0.1))


def serve(settings: Settings, stop: threading.Event | None = None) -> None:  # noqa: PLR0915 - reads best top to bottom
    """Pull requests until ``stop`` (or SIGTERM / SIGINT), holding up to ``in_flight`` at once.

    On stop, pulling ends and every request in hand is rendered, answered and acknowledged before
    the process exits; messages the client library had not handed over go back to Pub/Sub."""
    from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # namespace package, untyped
    from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler

    from job.render.compute import heavy_slots, requests_in_flight, resolve_device

    worker = Worker(settings)
    worker.prepare()  # the base models, synced from the bucket before the first request
    device = resolve_device(settings.device)
    limit = requests_in_flight(settings.in_flight, device)
    health = RunnerHealth(limit)
    subscriber = subscriber_client()
    path = subscriber.subscription_path(settings.project, settings.requests_subscription)
    attempts: dict[str, int] = {}  # deliveries seen here per message
    attempts_lock = threading.Lock()
    stop = stop or threading.Event()

    def take_slot() -> bool:
        """A render slot, waited for; False once the runner is stopping (nothing new starts then)."""
        while not slots.acquire(timeout=0.5):
            if stop.is_set():
                return False
        if stop.is_set():
            slots.release()
            return False
        return True

    def callback(message) -> None:
        key = message.message_id
        if settings.serves and routed_to(message.attributes, settings.default_runner) != settings.serves:
            log.info(  # only where the filter is not applied (the emulator): not this runner's request
                "not routed here",
                extra=fields(event="request.not_routed_here", message_id=key, serves=settings.serves),
            )
            message.ack()
            return
        if not take_slot():  # stopping: a message that has not started goes back to Pub/Sub
            message.nack()
            return
        with attempts_lock:
            attempts[key] = attempts.get(key, 0) + 1
            attempt = message.delivery_attempt or attempts[key]
        health.started()
        outcome = Outcome.RETRY
        try:
            try:
                outcome = worker.handle(message.data, attempt, dict(message.attributes), message.message_id)
            finally:
                slots.release()
            # Another runner renders this cover: wait here (the client library keeps the message leased)
            # and answer from the stored cover, or take over once the holder's lease lapses. Handing the
            # message back would spend one of Pub/Sub's delivery attempts per look, and a long render
            # would dead-letter a request that only had to wait (issue 29). The wait holds no render
            # slot: a request for another cover renders meanwhile (issue 32).
            while outcome is Outcome.BUSY and not stop.wait(_busy_wait(worker, settings)):
                with slots:
                    outcome = worker.handle(message.data, attempt, dict(message.attributes), message.message_id)
        except Exception:  # e.g. the answer could not be published: deliver it again
            log.exception("request not answered", extra=fields(event="request.unanswered", message_id=key))
        finally:
            health.finished(outcome)
        if outcome is Outcome.ACK:
            message.ack()
            with attempts_lock:
                attempts.pop(key, None)
        else:  # a retry, or a wait cut short by stopping: back to Pub/Sub
            message.nack()

    # ``limit`` renders at once (the slots); one message more is leased, so that a request waiting on
    # a cover another runner renders never keeps a request for another cover from a free slot
    slots = threading.BoundedSemaphore(limit)
    flow = pubsub_v1.types.FlowControl(
        max_messages=limit + 1,
        max_lease_duration=4 * 3600,
        # each extension short, so a dead runner's message comes back soon (not after the client's
        # p99-based extension, which grows to minutes with long renders)
        max_duration_per_lease_extension=round(settings.message_lease_extension_s),
    )
    scheduler = ThreadScheduler(ThreadPoolExecutor(max_workers=limit + 1, thread_name_prefix="render"))
    future = subscriber.subscribe(path, callback, flow_control=flow, scheduler=scheduler)
    log.info(
        "runner started",
        extra=fields(
            event="runner.started",
            pid=os.getpid(),
            subscription=path,
            runner=settings.runner,
            in_flight=limit,
            heavy_slots=heavy_slots(settings.heavy_slots, device),
        ),
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    next_health = time.monotonic()  # the first health line at once, then every health_interval_s
    try:
        while True:
            if time.monotonic() >= next_health:
                next_health = time.monotonic() + settings.health_interval_s
                log.info("runner health", extra=fields(event="runner.health", runner=settings.runner, **health.line()))
            if stop.wait(0.5):
                break
            if future.done():
                future.result()  # surface a broken stream
    finally:
        log.info("runner stopping", extra=fields(event="runner.stopping", runner=settings.runner, **health.line()))
        future.cancel()  # stops pulling; the renders in hand complete and are acked
        scheduler.shutdown(await_msg_callbacks=True)
        subscriber.close()
        log.info("runner stopped", extra=fields(event="runner.stopped", runner=settings.runner, **health.line()))


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

"""The event bus: Pub/Sub topics for requests and events (the emulator when PUBSUB_EMULATOR_HOST is set)."""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from functools import cached_property
from typing import Any

from pydantic import BaseModel

from shared.events import REQUESTED, CoverRequest, to_message
from shared.logs import fields
from shared.settings import Settings

log = logging.getLogger("melodia.bus")
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def subscriber_client() -> Any:  # pubsub_v1.SubscriberClient
    """A subscriber that receives what Pub/Sub may carry (10 MB messages), on the emulator too: the
    client library opens the emulator's channel with gRPC's default 4 MB receive limit (its channel
    to Google has none), and one larger message then stops the whole subscription's stream, every
    message behind it held (an 8 MB message delayed a GPU runner's requests 60 to 180 s, again and again)."""
    from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # namespace package, untyped

    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not host:
        return pubsub_v1.SubscriberClient()
    import grpc  # type: ignore[import-untyped]  # grpcio ships no type information
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    channel = grpc.insecure_channel(host, options=UNLIMITED)
    return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))


class EventBus:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def publisher(self) -> Any:  # pubsub_v1.PublisherClient (the library ships no type information)
        from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # namespace package, untyped

        return pubsub_v1.PublisherClient()

    def topic(self, name: str) -> str:
        return f"projects/{self.settings.project}/topics/{name}"

    def publish_request(self, request: CoverRequest, cover_id: str | None = None, timeout_s: float = 30.0) -> str:
        data, attributes = to_message(REQUESTED, request, subject=cover_id)
        message_id: str = self.publisher.publish(self.topic(self.settings.requests_topic), data, **attributes).result(
            timeout_s
        )
        return message_id

    def publish_event(
        self,
        event_type: str,
        data: BaseModel,
        cover_id: str | None,
        event_id: str | None = None,
        timeout_s: float | None = None,
    ) -> str:
        """Publish and wait until Pub/Sub has it: a final answer (completed, failed) is retried
        through an outage for up to ``publish_deadline_s`` (the client library retries UNAVAILABLE
        with backoff meanwhile), then raises.

        Args:
            event_type: ``cover.progress``, ``cover.completed`` or ``cover.failed``
            data: the event's data
            cover_id: the subject (and a filterable attribute)
            event_id: the ``ce-id`` (default: a new one)
            timeout_s: how long to wait (default: ``publish_deadline_s``)
        """
        payload, attributes = to_message(event_type, data, subject=cover_id, event_id=event_id)
        future = self.publisher.publish(self.topic(self.settings.events_topic), payload, **attributes)
        message_id: str = future.result(timeout_s or self.settings.publish_deadline_s)
        log.info("event published", extra=fields(event=event_type, cover_id=cover_id, message_id=message_id))
        return message_id

    def publish_soon(self, event_type: str, data: BaseModel, cover_id: str | None) -> None:
        """Publish without waiting (progress): the render never stalls on Pub/Sub; a progress event
        that cannot be delivered is logged and dropped (the status object still has it)."""
        payload, attributes = to_message(event_type, data, subject=cover_id)
        future = self.publisher.publish(self.topic(self.settings.events_topic), payload, **attributes)

        def done(outcome: Future[str]) -> None:
            error = outcome.exception()
            if error is not None:
                log.warning(
                    "event dropped",
                    extra=fields(event="event.dropped", type=event_type, cover_id=cover_id, error=str(error)[:200]),
                )

        future.add_done_callback(done)

"""Replay dead letters: publish the requests kept on the dead-letter subscription to the requests
topic again, once the cause is fixed (docs/operations.md, "Replay dead letters").

    python -m dispatcher.replay [--limit 100] [--dry-run]

Each dead letter was already answered ``cover.failed`` ``request.dead_lettered`` (``retryable:
true``). A replayed request keeps its data and attributes (its request id, its route), minus the
attributes Pub/Sub added when it dead-lettered it, so its new answer names the same request and
supersedes that retryable failure. A message is acknowledged on the dead-letter subscription only
once its copy is published; ``--dry-run`` lists what would be replayed and leaves every message
there.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pydantic import BaseModel

from shared.bus import EventBus, subscriber_client
from shared.events import request_identity
from shared.settings import Settings

DEAD_LETTER_PREFIX = "CloudPubSubDeadLetter"


class Replayed(BaseModel):
    message_id: str
    request_id: str | None
    deliveries: str | None
    republished_as: str | None = None


def replay(
    settings: Settings, subscription: str, limit: int, dry_run: bool = False, wait_s: float = 10.0
) -> list[Replayed]:
    """Republish up to ``limit`` messages of ``subscription`` (a name in ``settings.project``) to
    the requests topic; acknowledge each once it is published (none with ``dry_run``). Stops at
    ``limit`` or at a pull that finds nothing within ``wait_s``.

    Args:
        settings: the project and the requests topic
        subscription: where the dead letters are kept
        limit: at most this many
        dry_run: list them, replay nothing
        wait_s: how long a pull waits for a message
    """

    subscriber: Any = subscriber_client()
    bus = EventBus(settings)
    path = subscriber.subscription_path(settings.project, subscription)
    done: list[Replayed] = []
    while len(done) < limit:
        response = subscriber.pull(subscription=path, max_messages=min(100, limit - len(done)), timeout=wait_s)
        if not response.received_messages:
            break
        for received in response.received_messages:
            message = received.message
            attributes = {k: v for k, v in message.attributes.items() if not k.startswith(DEAD_LETTER_PREFIX)}
            item = Replayed(
                message_id=message.message_id,
                request_id=request_identity(message.data, attributes, message.message_id).request_id,
                deliveries=message.attributes.get(f"{DEAD_LETTER_PREFIX}SourceDeliveryCount"),
            )
            if not dry_run:
                topic = bus.topic(settings.requests_topic)
                item.republished_as = bus.publisher.publish(topic, message.data, **attributes).result(30)
                subscriber.acknowledge(subscription=path, ack_ids=[received.ack_id])
            done.append(item)
        if dry_run:
            ack_ids = [r.ack_id for r in response.received_messages]
            subscriber.modify_ack_deadline(subscription=path, ack_ids=ack_ids, ack_deadline_seconds=0)
            break
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dispatcher.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--subscription", default="cover-requests-dead-letter-inspect", help="where dead letters are kept"
    )
    parser.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    parser.add_argument("--dry-run", action="store_true", help="list them, replay nothing")
    parser.add_argument("--wait", type=float, default=10.0, help="seconds a pull waits for a message (default 10)")
    args = parser.parse_args(argv)
    for item in replay(Settings(), args.subscription, args.limit, args.dry_run, args.wait):
        print(json.dumps(item.model_dump()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

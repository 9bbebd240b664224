"""Answers for the requests the platform ended, not our code (the ``unanswered`` function).

Two signals reach it, each a Pub/Sub push:

* a request **dead-lettered** by Pub/Sub after its delivery attempts (the dead-letter topic's
  subscription): answered ``cover.failed`` ``request.dead_lettered``;
* a **job execution that failed** (Cloud Run's log entries for the job, through a log sink; locally
  the launcher's own): when the execution is over, failed, and its request has no answer, answered
  ``cover.failed`` ``job.execution_failed`` (a task killed for memory or by its timeout on its last
  attempt publishes nothing itself).

Either way, a cover that was stored after all is answered ``cover.completed``. Each answer has the
``ce-id`` a runner's own answer to that request would have (:func:`shared.events.answer_event_id`),
so one that a runner did publish is deduplicated by the Catalog: every request ends in exactly one
answer, whoever ends it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from dispatcher.executions import Executions
from shared.bus import EventBus
from shared.claims import lease_expiry
from shared.covers import resolve, served
from shared.errors import CoverError, ErrorCode
from shared.events import (
    COMPLETED,
    FAILED,
    CoverCompleted,
    CoverFailed,
    CoverStatus,
    answer_event_id,
    now,
    parse_request,
    request_identity,
)
from shared.logs import fields
from shared.model_store import ModelStore
from shared.storage import Keys, Storage

log = logging.getLogger("melodia.unanswered")

DEAD_LETTER_SOURCE = "CloudPubSubDeadLetterSourceSubscription"  # set by Pub/Sub on what it dead-letters
DEAD_LETTER_COUNT = "CloudPubSubDeadLetterSourceDeliveryCount"
EXECUTION_LABEL = "run.googleapis.com/execution_name"  # on Cloud Run's log entries for a job's tasks
RUNNER = "platform"  # the runner named in these answers


class Answered(BaseModel):
    """What the function did with one signal (logged, and the tests read it)."""

    action: str  # "failed", "completed", "ignored"
    reason: str
    request_id: str | None = None
    cover_id: str | None = None


class Unanswered:
    """Answers dead-lettered requests and failed executions.

    Args:
        storage: the bucket (the stored cover or status of the request's cover)
        keys: the bucket's key table
        models: the model store (to name the request's cover)
        bus: the events topic
        executions: where an execution's state and request are read
    """

    def __init__(self, storage: Storage, keys: Keys, models: ModelStore, bus: EventBus, executions: Executions) -> None:
        self.storage = storage
        self.keys = keys
        self.models = models
        self.bus = bus
        self.executions = executions

    def dead_lettered(self, data: bytes, attributes: Mapping[str, str], message_id: str) -> Answered:
        """A request Pub/Sub dead-lettered (``attributes``: the original's plus Pub/Sub's own)."""
        deliveries = int(attributes.get(DEAD_LETTER_COUNT, "0") or 0)
        source = attributes.get(DEAD_LETTER_SOURCE, "?")
        return self._answer(
            data,
            attributes,
            message_id,
            ErrorCode.REQUEST_DEAD_LETTERED,
            f"the request was not answered in {deliveries} deliveries on {source}; it is safe to send it again",
            max(1, deliveries),
        )

    def execution_signal(self, entry: Mapping[str, Any]) -> Answered:
        """A log entry (or the local launcher's signal) naming an execution of the job."""
        labels = entry.get("labels") or {}
        name = labels.get(EXECUTION_LABEL) if isinstance(labels, dict) else None
        if not isinstance(name, str) or not name:
            return Answered(action="ignored", reason="the signal names no execution")
        state = self.executions.get(name)
        if state is None:
            return Answered(action="ignored", reason=f"no execution {name}")
        if not state.finished or state.succeeded:  # a retry is coming, or the request answered itself
            return Answered(action="ignored", reason=f"execution {name} is running or succeeded")
        raw = state.env.get("COVER_REQUEST", "")
        request_id = state.env.get("COVER_REQUEST_ID", "")
        return self._answer(
            raw.encode(),
            {"ce-id": request_id} if request_id else {},
            "",
            ErrorCode.JOB_EXECUTION_FAILED,
            f"the job execution {name} failed after {state.attempts} attempts without answering (a task killed "
            "by the platform: out of memory, or its time limit); it is safe to send the request again",
            max(1, state.attempts),
        )

    def _cover_id(self, data: bytes, attributes: Mapping[str, str]) -> str | None:
        try:
            cid, _, _ = resolve(self.storage, self.keys, self.models, parse_request(data, attributes))
        except CoverError:
            return None
        return cid

    def _answer(
        self,
        data: bytes,
        attributes: Mapping[str, str],
        message_id: str,
        code: ErrorCode,
        message: str,
        attempt: int,
    ) -> Answered:
        identity = request_identity(data, attributes, message_id)
        cid = self._cover_id(data, attributes)
        stored = self.storage.get_bytes(Keys.manifest(cid)) if cid else None
        if cid and stored is not None:  # rendered after all: its answer, as its runner would give it
            answer = served(CoverCompleted.model_validate_json(stored), self.storage)
            answer = answer.model_copy(update={"request_id": identity.request_id})
            event_id = answer_event_id("completed", cid, identity.request_id, b"")
            self.bus.publish_event(COMPLETED, answer, cid, event_id=event_id)
            return self._logged(
                Answered(action="completed", reason=code.value, request_id=identity.request_id, cover_id=cid)
            )
        failed = CoverFailed(
            cover_id=cid,
            request_id=identity.request_id,
            song_id=identity.song_id,
            voice_model=identity.voice_model,
            code=code,
            message=message,
            retryable=True,
            attempt=attempt,
            runner=RUNNER,
        )
        self.bus.publish_event(FAILED, failed, cid, event_id=answer_event_id("failed", cid, identity.request_id, data))
        expiry = lease_expiry(self.storage, cid) if cid else None
        if cid and (expiry is None or expiry < time.time()):  # not while another request renders it
            status = CoverStatus(cover_id=cid, state="failed", error=failed, updated_at=now())
            self.storage.put_bytes(Keys.status(cid), status.model_dump_json().encode())
        done = Answered(action="failed", reason=code.value, request_id=identity.request_id, cover_id=cid)
        return self._logged(done)

    @staticmethod
    def _logged(answered: Answered) -> Answered:
        log.info("request answered for the platform", extra=fields(event="request.answered", **answered.model_dump()))
        return answered

"""Render claims: a lease on a cover id, so two runners never render one cover at once.

A claim is a generation object ``claims/{cover_id}/{generation}.json`` created with a conditional
write (exactly one creator wins each generation). Its holder renews it by rewriting its own object
with a later expiry. A claim whose expiry has passed (its runner crashed) is taken over by creating
the next generation; the old holder notices the newer generation at its next renewal and stops.

The lease doubles as the render's heartbeat: a holder renews every third of the lease, so a claim
past its expiry means its runner is gone (``GET /covers/{id}`` then says ``stalled``, see
:func:`lease_expiry`). Torch-free: the dispatcher reads claims too.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

from shared.logs import fields
from shared.storage import Keys, Storage

log = logging.getLogger("melodia.claims")


class Claim:
    """A render's claim on a cover: a conditional create in the bucket, renewed while it renders.

    Args:
        storage: where the claim objects live (the bucket)
        cover_id: the cover claimed
        runner: who claims it (logged and stored in the claim)
        lease_s: how long a claim holds without renewal
    """

    def __init__(self, storage: Storage, cover_id: str, runner: str, lease_s: float) -> None:
        self.storage = storage
        self.cover_id = cover_id
        self.runner = runner
        self.lease_s = lease_s
        self.token = uuid.uuid4().hex
        self.generation: int | None = None
        self.held_until = 0.0  # after a refused acquire: when the holder's lease lapses (epoch s)

    def _generations(self) -> list[int]:
        prefix = f"claims/{self.cover_id}/"
        return sorted(
            int(k[len(prefix) :].split(".")[0])
            for k in self.storage.list(prefix)
            if k[len(prefix) :].split(".")[0].isdigit()
        )

    def _body(self, expires_at: float) -> bytes:
        return json.dumps({"runner": self.runner, "token": self.token, "expires_at": expires_at}).encode()

    def acquire(self) -> bool:
        generations = self._generations()
        latest = generations[-1] if generations else -1
        if latest >= 0:
            raw = self.storage.get_bytes(Keys.claim(self.cover_id, latest))
            held = json.loads(raw) if raw else {"expires_at": 0}
            if held["expires_at"] > time.time():
                self.held_until = float(held["expires_at"])
                return False
        generation = latest + 1
        if self.storage.put_bytes(
            Keys.claim(self.cover_id, generation), self._body(time.time() + self.lease_s), if_absent=True
        ):
            self.generation = generation
            return True
        return False

    def renew(self) -> bool:
        """Extend the lease; False when another runner has taken the cover over."""
        if self.generation is None or any(g > self.generation for g in self._generations()):
            return False
        self.storage.put_bytes(Keys.claim(self.cover_id, self.generation), self._body(time.time() + self.lease_s))
        return True

    def release(self) -> None:
        if self.generation is not None and not any(g > self.generation for g in self._generations()):
            self.storage.put_bytes(Keys.claim(self.cover_id, self.generation), self._body(0.0))
        self.generation = None


def lease_expiry(storage: Storage, cover_id: str) -> float | None:
    """When the latest claim on ``cover_id`` lapses (epoch seconds), or None when there is none."""
    claim = Claim(storage, cover_id, runner="", lease_s=0)
    generations = claim._generations()
    if not generations:
        return None
    raw = storage.get_bytes(Keys.claim(cover_id, generations[-1]))
    try:
        return float(json.loads(raw or b"{}")["expires_at"])
    except (ValueError, KeyError, TypeError):
        return None


def keep_renewed(claim: Claim, stop: threading.Event, lost: threading.Event) -> None:
    """Renew ``claim`` every third of its lease until ``stop``. When a renewal fails (another
    runner took the cover over, or the storage refused), say so in the log and set ``lost``: the
    render checks it at its next progress report and stops there."""
    while not stop.wait(claim.lease_s / 3):
        try:
            renewed = claim.renew()
            reason = "another runner took the cover over"
        except Exception as exc:  # noqa: BLE001 - any failure: the lease can no longer be trusted
            renewed, reason = False, f"{type(exc).__name__}: {str(exc)[:200]}"
        if not renewed:
            log.warning("render lease lost", extra=fields(event="lease.lost", cover_id=claim.cover_id, reason=reason))
            lost.set()
            return

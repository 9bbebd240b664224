"""Render claims on their own: a live lease blocks, a lapsed one is taken over by the next
generation, and the old holder learns it lost the cover at its next renewal."""

from __future__ import annotations

import json
import threading
import time

import pytest

from shared.claims import Claim
from shared.storage import Keys, LocalStorage


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(tmp_path / "bucket")


def test_a_live_claim_blocks_another_runner_until_it_is_released(storage):
    first, second = Claim(storage, "c1", "a", lease_s=60), Claim(storage, "c1", "b", lease_s=60)
    assert first.acquire()
    assert not second.acquire()
    assert first.renew()  # still ours
    first.release()
    assert second.acquire() and second.generation == 1  # a new generation, not the released one


def test_a_lapsed_claim_is_taken_over_and_the_old_holder_stops_renewing(storage):
    crashed = Claim(storage, "c2", "crashed", lease_s=0.2)
    assert crashed.acquire() and crashed.generation == 0
    rescuer = Claim(storage, "c2", "rescuer", lease_s=60)
    assert not rescuer.acquire()  # not yet lapsed
    time.sleep(0.3)
    assert rescuer.acquire() and rescuer.generation == 1
    assert not crashed.renew()  # a newer generation exists: the old render must stop
    crashed.release()  # and its release leaves the rescuer's claim alone
    held = json.loads(storage.get_bytes(Keys.claim("c2", 1)) or b"{}")
    assert held["runner"] == "rescuer" and held["expires_at"] > time.time()
    assert rescuer.renew()


def test_renewal_moves_the_expiry_forward(storage):
    claim = Claim(storage, "c3", "a", lease_s=0.5)
    assert claim.acquire()
    first = json.loads(storage.get_bytes(Keys.claim("c3", 0)) or b"{}")["expires_at"]
    time.sleep(0.3)
    assert claim.renew()
    assert json.loads(storage.get_bytes(Keys.claim("c3", 0)) or b"{}")["expires_at"] > first
    time.sleep(0.3)  # past the first expiry, within the renewed one
    assert not Claim(storage, "c3", "b", lease_s=1).acquire()


def test_of_many_racing_runners_exactly_one_wins(storage):
    claims = [Claim(storage, "c4", f"r{i}", lease_s=60) for i in range(8)]
    barrier = threading.Barrier(len(claims))
    won: list[bool] = [False] * len(claims)

    def race(i: int) -> None:
        barrier.wait()
        won[i] = claims[i].acquire()

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(claims))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(won) == 1


class RefusingStorage(LocalStorage):
    """A bucket that stops accepting writes (as when the S3 endpoint goes away mid-render)."""

    refusing = False

    def put_bytes(self, key, data, content_type="application/json", if_absent=False):
        if self.refusing:
            raise ConnectionError("the storage endpoint refused the connection")
        return super().put_bytes(key, data, content_type, if_absent)


def test_a_renewal_the_storage_refuses_is_logged_and_stops_the_render(tmp_path, caplog):
    from shared.claims import keep_renewed

    storage = RefusingStorage(tmp_path / "bucket")
    claim = Claim(storage, "c3", "a", lease_s=0.3)
    assert claim.acquire()
    stop, lost = threading.Event(), threading.Event()
    renewer = threading.Thread(target=keep_renewed, args=(claim, stop, lost))
    renewer.start()
    time.sleep(0.35)
    assert not lost.is_set()  # renewals go through while the storage answers
    storage.refusing = True
    assert lost.wait(2.0)  # the render learns at its next progress report
    renewer.join(2.0)
    assert not renewer.is_alive()
    assert any(
        getattr(r, "fields", {}).get("event") == "lease.lost" and "ConnectionError" in r.fields["reason"]
        for r in caplog.records
    )


def test_the_lease_says_when_its_runner_is_gone(storage):
    from shared.claims import lease_expiry

    assert lease_expiry(storage, "c4") is None
    claim = Claim(storage, "c4", "a", lease_s=60)
    assert claim.acquire()
    assert lease_expiry(storage, "c4") > time.time() + 50
    storage.put_bytes(Keys.claim("c4", 0), json.dumps({"runner": "a", "expires_at": time.time() - 1}).encode())
    assert lease_expiry(storage, "c4") < time.time()

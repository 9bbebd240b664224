"""Faults on the production path, each ending with the request completed exactly once or failed with
one ``cover.failed``, a final status, and nothing half-written visible.

Real parts throughout: ``python -m job run`` processes as Cloud Run task attempts (the attempt
number in ``CLOUD_RUN_TASK_ATTEMPT``), moto's S3 server, the Pub/Sub emulator, and a loopback TCP
proxy (tests/tcp_proxy.py) that takes S3 or Pub/Sub away from the worker mid-render.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from service_stack import FAST, _check_against_bucket, of_type
from tcp_proxy import TcpProxy

from job.devkit import demo
from job.devkit.stack import start_pubsub_emulator, stop
from job.render.media.audio import write_wav
from shared.events import COMPLETED, FAILED
from shared.stages import Stage
from tests.conftest import FULL_SWEEPS

pytestmark = pytest.mark.slow

LEASE = {"COVER_LEASE_S": "3", "COVER_BUSY_RETRY_S": "1"}


def run_job(stack, request: dict, attempt: int, prefix: tuple[str, ...] = (), timeout: float = 300, **env: str):
    """One Cloud Run task attempt of ``request`` (``prefix``: a launcher such as ``prlimit``; never a
    ``preexec_fn``, whose Python code in the forked child meets the worker's gRPC threads' fork
    handlers: seen to abort the child with "epoll_wait error: Bad file descriptor")."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "job", "run"],
        env={
            **stack.env,
            **LEASE,
            "COVER_REQUEST": json.dumps(request),
            "CLOUD_RUN_TASK_ATTEMPT": str(attempt),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def keys(stack, prefix: str) -> list[str]:
    listing = stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix=prefix)
    return [item["Key"] for item in listing.get("Contents", [])]


def status_of(stack) -> dict:
    (key,) = keys(stack, "status/")
    return json.loads(stack.s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read())


# the stages a runner reports with the quality stage off (as in the stack: random-weight voices)
STAGES = [s.value for s in Stage if s not in (Stage.QUALITY, Stage.REPAIR)]
# make test kills mid-render (the stems made, nothing converted) and at the last report (the cover
# uploaded, its manifest not; the first, accepted, is test_a_retry_waits_while_the_claim_is_live's);
# .ci/run kills after every stage (COVER_TEST_FULL=1)
KILL_POINTS = STAGES if FULL_SWEEPS else [Stage.SEPARATE.value, Stage.UPLOAD.value]


def latest_status(stack, log: str) -> dict:
    """The status object of the cover a job's log names."""
    (cid,) = set(re.findall(r'"cover_id": "([0-9a-f]{32})"', log))
    return json.loads(stack.s3.get_object(Bucket=stack.bucket, Key=f"status/{cid}.json")["Body"].read())


def request_for(tag: str) -> dict:
    return {"song_id": "song-1", "voice_model": demo.DEMO_VOICE, "options": FAST, "request_id": tag}


def assert_completed_once(stack, request_id: str) -> dict:
    events = stack.events(lambda got: of_type(got, COMPLETED), timeout=120)
    events += stack.events(lambda got: False, timeout=3)  # and nothing after it
    completed = of_type(events, COMPLETED)
    assert len(completed) == 1 and not of_type(events, FAILED), [t for t, _ in events]
    assert completed[0]["request_id"] == request_id
    _check_against_bucket(stack, completed[0])
    assert status_of(stack)["state"] == "completed"
    assert len(keys(stack, "covers/")) == len(keys(stack, "manifests/")) == 1  # the cover and its manifest
    return completed[0]


@pytest.mark.sweep
def test_a_task_killed_at_each_stage_boundary_is_taken_over_by_the_retry(stack):
    """For each stage, a request whose first attempt dies (SIGKILL) right after reporting that
    stage's end; Cloud Run's retry takes the cover over once the dead attempt's lease lapses and
    completes it, once. Two requests at a time (the two cores)."""

    def crash_then_retry(stage: str) -> None:
        request = {**request_for(f"killed-after-{stage}"), "options": {**FAST, "pitch": STAGES.index(stage)}}
        first = run_job(stack, request, 0, COVER_FAILPOINT=f"after:{stage}")
        assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
        status = status_by_request[stage] = latest_status(stack, first.stderr)
        assert status["state"] == "running" and status["stage"] == stage
        cid = status["cover_id"]
        assert not keys(stack, f"manifests/{cid}")  # nothing a Catalog could take for a cover
        if stage != "upload":
            assert not keys(stack, f"covers/{cid}")
        second = run_job(stack, request, 1)
        assert second.returncode == 0, second.stderr[-2000:]
        assert len(keys(stack, f"claims/{cid}/")) == 2  # the dead attempt's claim, and the takeover's

    status_by_request: dict[str, dict] = {}
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(crash_then_retry, KILL_POINTS))
    events = stack.events(lambda got: len(of_type(got, COMPLETED)) >= len(KILL_POINTS), timeout=120)
    events += stack.events(lambda got: False, timeout=3)  # and nothing after them
    assert not of_type(events, FAILED)
    completed = {c["request_id"]: c for c in of_type(events, COMPLETED)}
    assert len(completed) == len(of_type(events, COMPLETED)) == len(KILL_POINTS)  # one answer per request
    for stage in KILL_POINTS:
        answer = completed[f"killed-after-{stage}"]
        assert answer["cover_id"] == status_by_request[stage]["cover_id"]
        _check_against_bucket(stack, answer)
    assert len(keys(stack, "covers/")) == len(keys(stack, "manifests/")) == len(KILL_POINTS)


def test_a_retry_waits_while_the_claim_is_live_then_takes_over(stack, tmp_path):
    """Busy is not a failure on the Cloud Run path either: the retry finds a claim that is still
    live, waits (no exit, no attempt spent; it looks every second) and takes over once the claim
    lapses. The test lapses the claim itself once the retry has looked twice (event-driven: no
    wait on the clock, whatever the process's start costs)."""
    request = request_for("live-claim")
    assert run_job(stack, request, 0, COVER_FAILPOINT="after:accepted").returncode == -signal.SIGKILL
    (claim_key,) = keys(stack, "claims/")
    claim = json.loads(stack.s3.get_object(Bucket=stack.bucket, Key=claim_key)["Body"].read())

    def set_expiry(at: float) -> None:
        body = json.dumps({**claim, "expires_at": at})
        stack.s3.put_object(Bucket=stack.bucket, Key=claim_key, Body=body)

    set_expiry(time.time() + 600)  # as if the dead attempt had renewed it just now
    log = tmp_path / "retry.log"
    env = {**stack.env, **LEASE, "COVER_REQUEST": json.dumps(request), "CLOUD_RUN_TASK_ATTEMPT": "1"}
    with log.open("w") as sink:
        second = subprocess.Popen([sys.executable, "-m", "job", "run"], env=env, stderr=sink, text=True)
    try:
        deadline = time.monotonic() + 180
        while log.read_text().count('"cover.busy"') < 2:
            assert second.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        set_expiry(time.time())  # the holder stops renewing
        assert second.wait(300) == 0, log.read_text()[-2000:]
    finally:
        second.kill()
    assert_completed_once(stack, request["request_id"])
    assert len(keys(stack, "claims/")) == 2  # the dead attempt's claim, and the takeover's


def test_s3_gone_in_the_middle_of_the_upload(stack):
    """S3 stops answering the moment the cover's upload starts (the proxy cuts it before the body
    arrives) and comes back 15 s later: the attempt fails with a retryable error, leaves no object,
    and the retry completes the cover once."""
    proxy = TcpProxy(int(stack.env["COVER_S3_ENDPOINT"].rsplit(":", 1)[1]))
    proxy.cut_when(f"PUT /{stack.bucket}/covers/".encode())
    endpoint = {"COVER_S3_ENDPOINT": f"http://127.0.0.1:{proxy.port}"}
    request = request_for("s3-cut")

    def bring_back() -> None:
        while not proxy.cuts:
            time.sleep(0.1)
        time.sleep(15)
        proxy.restore()

    threading.Thread(target=bring_back, daemon=True).start()
    first = run_job(stack, request, 0, **endpoint)
    assert proxy.cuts == 1
    assert first.returncode == 1, first.stderr[-2000:]  # a retry can help
    assert not keys(stack, "covers/")  # nothing half-written
    while proxy.down:
        time.sleep(0.5)
    second = run_job(stack, request, 1, **endpoint)
    assert second.returncode == 0, second.stderr[-2000:]
    assert_completed_once(stack, request["request_id"])


def test_pubsub_restarted_while_a_render_runs(stack, tmp_path):
    """The worker's Pub/Sub (an emulator of its own behind the proxy) is stopped while the render
    runs and a new emulator with the same topics takes its place 10 s later: the render goes on
    (progress is not waited for) and its ``cover.completed`` goes out once, to the new emulator."""
    from google.cloud import pubsub_v1

    old, host = start_pubsub_emulator(tmp_path / "pubsub-1.log")
    proxy = TcpProxy(int(host.rsplit(":", 1)[1]))
    topics = {"requests": stack.env["COVER_REQUESTS_TOPIC"], "events": stack.env["COVER_EVENTS_TOPIC"]}

    def topology(emulator_host: str) -> tuple[pubsub_v1.SubscriberClient, str]:
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator_host
        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        for name in topics.values():
            publisher.create_topic(name=publisher.topic_path(stack.project, name))
        catalog = subscriber.subscription_path(stack.project, "catalog")
        subscriber.create_subscription(name=catalog, topic=publisher.topic_path(stack.project, topics["events"]))
        return subscriber, catalog

    topology(host)
    request = request_for("pubsub-restart")
    env = {**stack.env, **LEASE, "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{proxy.port}"}
    env.update(COVER_REQUEST=json.dumps(request), CLOUD_RUN_TASK_ATTEMPT="0")
    job = subprocess.Popen(
        [sys.executable, "-m", "job", "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    new = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not keys(stack, "status/"):
            time.sleep(0.2)
        assert status_of(stack)["state"] == "running"
        proxy.outage()
        stop(old)  # the emulator is gone, and everything it held
        time.sleep(10)
        new, new_host = start_pubsub_emulator(tmp_path / "pubsub-2.log")
        subscriber, catalog = topology(new_host)
        proxy.retarget(int(new_host.rsplit(":", 1)[1]))
        proxy.restore()
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, output[-2000:]
        stack.subscriber, stack.catalog_sub = subscriber, catalog
        assert_completed_once(stack, request["request_id"])
    finally:
        job.kill()
        stop(old)
        if new is not None:
            stop(new)
        os.environ["PUBSUB_EMULATOR_HOST"] = stack.env["PUBSUB_EMULATOR_HOST"]


def _file_size_limit(limit: int) -> tuple[str, ...]:
    """util-linux's ``prlimit`` setting RLIMIT_FSIZE on the command it starts."""
    return ("prlimit", f"--fsize={limit}:{limit}")


def test_a_work_folder_out_of_space_fails_with_its_code_on_the_last_attempt(stack):
    """A file-size limit (RLIMIT_FSIZE, what a full disk looks like to a writer) below the stems'
    size: each attempt fails with ``work.no_space``, retryable; the last publishes it once."""
    request = request_for("no-space")
    limit = _file_size_limit(1_000_000)  # the song (5 s) fits, a decoded stem does not
    first = run_job(stack, request, 0, prefix=limit, COVER_MAX_ATTEMPTS="2")
    assert first.returncode == 1, first.stderr[-2000:]
    assert '"work.no_space"' in first.stderr
    last = run_job(stack, request, 1, prefix=limit, COVER_MAX_ATTEMPTS="2")
    assert last.returncode == 0, last.stderr[-2000:]
    events = stack.events(lambda got: of_type(got, FAILED), timeout=60)
    events += stack.events(lambda got: False, timeout=3)
    (failed,) = of_type(events, FAILED)
    assert failed["code"] == "work.no_space" and failed["retryable"] and failed["attempt"] == 2
    assert failed["request_id"] == "no-space" and failed["song_id"] == "song-1"
    assert status_of(stack)["state"] == "failed"
    assert not keys(stack, "covers/") and not keys(stack, "manifests/")


@pytest.mark.sweep
@pytest.mark.skipif(
    not FULL_SWEEPS,
    reason="two job processes, 45 to 50 s on 2 cores: .ci/run's full pass (make test-full) runs it; make test "
    "keeps the limit's own tests (test_fetch, test_hostile_input)",
)
def test_a_song_at_the_duration_limit_renders_and_one_past_it_fails_once(stack, tmp_path):
    vocals, inst = demo.demo_song(6.0)
    song = np.clip(vocals + inst, -1, 1)
    limit = {"COVER_MAX_DURATION_S": "5"}
    stack.put_song("at-limit", write_wav(tmp_path / "at.wav", song[:, : 5 * 44100], 44100))
    stack.put_song("past-limit", write_wav(tmp_path / "past.wav", song[:, : int(5.2 * 44100)], 44100))
    at = {**request_for("at-limit"), "song_id": "at-limit"}
    assert run_job(stack, at, 0, **limit).returncode == 0
    assert_completed_once(stack, "at-limit")
    past = {**request_for("past-limit"), "song_id": "past-limit"}
    assert run_job(stack, past, 0, **limit).returncode == 0  # failed for good: no retry
    events = stack.events(lambda got: of_type(got, FAILED), timeout=60)
    (failed,) = of_type(events, FAILED)
    assert failed["code"] == "input.too_long" and not failed["retryable"] and failed["song_id"] == "past-limit"
    assert "5 s" in failed["message"]
    states = [
        json.loads(stack.s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read())["state"]
        for key in keys(stack, "status/")
    ]
    assert sorted(states) == ["completed", "failed"]

"""The rehearsal stack (``make serve``: ``python -m job.devkit.stack``) in the production topology,
driven only through its documented interfaces: the API over HTTP, the topics, the bucket.

The stack runs against this session's emulator and moto's S3 server, with topics and a bucket of the
test's own. The kill is the one fault injected from outside: a job execution's task process,
found by the pid the trigger logs for each attempt.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
import requests
from service_stack import FAST, _check_against_bucket, of_type

from job.devkit import demo
from job.devkit.stack import free_port, start, stop
from shared.events import COMPLETED, FAILED
from tests.conftest import run_cover

pytestmark = pytest.mark.slow
# the leases of the stack's runners, short here; REHEARSAL_LEASE_S=60 REHEARSAL_LEASE_EXTENSION_S=30
# measure the production defaults (the claim on a cover; the Pub/Sub lease extension of a GPU runner)
LEASE_S = float(os.environ.get("REHEARSAL_LEASE_S", "10"))
LEASE_EXTENSION_S = os.environ.get("REHEARSAL_LEASE_EXTENSION_S", "10")


def _log_lines(path) -> list[dict]:
    lines = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


@pytest.fixture
def rehearsal(stack, tmp_path, request):
    """The stack as ``make serve`` runs it; ``@pytest.mark.stack_env(NAME=VALUE, ...)`` adds to the
    environment every process of it gets (``{tmp}`` in a value: the test's own folder),
    ``@pytest.mark.stack_args(...)`` to its command line."""
    marker = request.node.get_closest_marker("stack_env")
    args = request.node.get_closest_marker("stack_args")
    port = free_port()
    gpu_subscription = f"gpu-{uuid.uuid4().hex[:8]}"
    env = {
        **stack.env,
        "COVER_REQUESTS_SUBSCRIPTION": gpu_subscription,
        "COVER_WORK_DIR": str(tmp_path / "work"),
        "COVER_LEASE_S": str(LEASE_S),
        "COVER_MESSAGE_LEASE_EXTENSION_S": LEASE_EXTENSION_S,
        "COVER_BUSY_RETRY_S": "1",
        **{name: value.format(tmp=tmp_path) for name, value in (marker.kwargs if marker else {}).items()},
    }
    log = tmp_path / "stack.out"
    proc = start(
        [
            sys.executable,
            "-m",
            "job.devkit.stack",
            "--port",
            str(port),
            "--emulator",
            env["PUBSUB_EMULATOR_HOST"],
            *(args.args if args else ()),
        ],
        log,
        env,
    )
    deadline = time.monotonic() + 240
    while "melodia-cover is up" not in log.read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    banner = log.read_text()
    assert "melodia-cover is up" in banner, banner[-3000:]
    stack.catalog_sub = stack.subscriber.subscription_path(stack.project, f"{env['COVER_EVENTS_TOPIC']}-catalog")
    assert stack.catalog_sub.rsplit("/", 1)[1] in banner and env["PUBSUB_EMULATOR_HOST"] in banner
    yield proc, f"http://127.0.0.1:{port}", tmp_path / "work" / "stack-logs"
    stop(proc)


def _post(url: str, pitch: int, runner: str | None) -> dict:
    body = {"song_id": "song-1", "voice_model": demo.DEMO_VOICE, "options": {**FAST, "pitch": pitch}}
    answer = requests.post(f"{url}/cover", json={**body, **({"runner": runner} if runner else {})}, timeout=30)
    assert answer.status_code == 202, answer.text
    return answer.json()


def test_each_request_takes_exactly_one_path_push_trigger_job_or_gpu_runner(stack, rehearsal):
    """Requests for cpu, gpu and neither each take their own path, rendered once; a second request
    for the GPU cover, arriving while it renders, gets its own answer from that one render, and
    nothing is dead-lettered (the stack's subscriptions dead-letter after 5 deliveries, and the
    unanswered function would answer a dead letter)."""
    proc, url, logs = rehearsal
    paths = {"cpu": "cloud-run-job", "gpu": "gpu-runner"}
    accepted = {runner or "default": _post(url, pitch, runner) for pitch, runner in ((0, "cpu"), (3, "gpu"), (5, None))}
    gpu_cover = accepted["gpu"]["cover_id"]
    events = stack.events(lambda got: any(e["cover_id"] == gpu_cover for e in of_type(got, "cover.progress")))
    again = _post(url, 3, "gpu")
    assert again["cover_id"] == gpu_cover and again["request_id"] != accepted["gpu"]["request_id"]
    events += stack.events(lambda got: len(of_type(got, COMPLETED)) >= 4, timeout=300)
    events += stack.events(lambda got: False, timeout=5)  # nothing more: no request reached both paths
    completed = {c["request_id"]: c for c in of_type(events, COMPLETED)}
    assert len(of_type(events, COMPLETED)) == 4 and not of_type(events, FAILED)
    assert completed[again["request_id"]]["cover_id"] == gpu_cover
    for route, answer in accepted.items():
        event = completed[answer["request_id"]]
        assert event["cover_id"] == answer["cover_id"]
        assert event["runner"] == paths["cpu" if route == "default" else route]  # the default runner is cpu
        _check_against_bucket(stack, event)
        claims = stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix=f"claims/{answer['cover_id']}/")
        assert claims["KeyCount"] == 1  # rendered once, by the path it was routed to
        assert requests.get(answer["status_url"], timeout=30).json()["state"] == "completed"
    # the emulator ignores filters: each path saw the other's requests and let them be
    trigger = _log_lines(logs / "trigger.log")
    assert sum(line.get("event") == "execution.started" for line in trigger) == 2
    assert sum(line.get("event") == "request.not_routed_here" for line in trigger) == 2
    runner = _log_lines(logs / "gpu-runner.log")
    assert sum(line.get("event") == "request.not_routed_here" for line in runner) == 2
    assert not [line for line in _log_lines(logs / "unanswered.log") if line.get("event") == "request.answered"]
    assert proc.poll() is None


def _separating(cid: str):
    """``until`` for Stack.events: the cover's separation has begun."""

    def until(got) -> bool:
        return any(e["cover_id"] == cid and e["stage"] == "separate" for e in of_type(got, "cover.progress"))

    return until


def _kill_and_time_the_takeovers(
    stack, pids: dict[str, int], timeout: float, release: Path
) -> tuple[list, dict[str, float]]:
    """SIGKILL each cover's renderer (``{cover_id: pid}``), held mid-render by the failpoint
    ``hold:STAGE:release``, then let the takeovers through (``release`` made); the events until
    every cover completes, and for each the seconds from the kill to the first progress event of
    whoever took its request up."""
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    release.touch()

    def restarted(event, cid: str) -> bool:
        return event["cover_id"] == cid and event["stage"] == "accepted" and _sent_at(event) > killed_at

    def done(got) -> bool:
        progress, completed = of_type(got, "cover.progress"), {e["cover_id"] for e in of_type(got, COMPLETED)}
        return all(cid in completed and any(restarted(e, cid) for e in progress) for cid in pids)

    events = stack.events(done, timeout=timeout)
    events += stack.events(lambda got: False, timeout=3)
    progress = of_type(events, "cover.progress")
    return events, {cid: min(_sent_at(e) for e in progress if restarted(e, cid)) - killed_at for cid in pids}


def _sent_at(event: dict) -> float:
    return datetime.fromisoformat(event["_attributes"]["ce-time"]).timestamp()


@pytest.mark.stack_env(
    COVER_FAILPOINT="raise:separate", COVER_MAX_ATTEMPTS="99", COVER_JOB_TASK_TIMEOUT_S="2", COVER_JOB_MAX_RETRIES="1"
)
def test_what_the_platform_ends_gets_one_cover_failed(stack, rehearsal):
    """Two requests the platform ends, each answered once by the unanswered function:

    * GPU path: a runner that retries for ever (its attempt limit set above the subscription's 5
      deliveries, every render failing after separation): Pub/Sub dead-letters the request after 5
      deliveries -> request.dead_lettered;
    * CPU path: every attempt of the execution runs past the task timeout and the launcher kills it
      (as Cloud Run kills a task out of time or memory: the task publishes nothing; a task is still
      importing at 2 s) -> the failed execution's signal -> job.execution_failed."""
    proc, url, logs = rehearsal
    dead = _post(url, 2, "gpu")
    killed = _post(url, 4, "cpu")
    events = stack.events(lambda got: len(of_type(got, FAILED)) >= 2, timeout=240)
    events += stack.events(lambda got: False, timeout=5)  # one answer each, no more
    failed = {f["request_id"]: f for f in of_type(events, FAILED)}
    assert len(of_type(events, FAILED)) == 2 and not of_type(events, COMPLETED)
    lettered = failed[dead["request_id"]]
    assert lettered["code"] == "request.dead_lettered" and lettered["retryable"] is True
    assert lettered["cover_id"] == dead["cover_id"] and lettered["attempt"] == 5
    assert "5 deliveries" in lettered["message"]
    runner = _log_lines(logs / "gpu-runner.log")
    assert sum(line.get("event") == "cover.retry" for line in runner) == 5  # the runner saw five deliveries
    assert requests.get(dead["status_url"], timeout=30).json()["state"] == "failed"
    ended = failed[killed["request_id"]]
    assert ended["code"] == "job.execution_failed" and ended["cover_id"] == killed["cover_id"]
    assert ended["attempt"] == 2
    trigger = _log_lines(logs / "trigger.log")
    assert [line["attempt"] for line in trigger if line.get("event") == "execution.attempt_timed_out"] == [0, 1]
    assert sum(line.get("event") == "execution.failed" for line in trigger) == 1
    assert proc.poll() is None


# The emulator may go on delivering a killed subscriber's message to its dead stream for up to ~100 s,
# each delivery spending one of the subscription's attempts (Pub/Sub sees the stream close): with the
# deployed 5 attempts the request can be dead-lettered before the new runner is handed it (a clean
# clone's run on a slow host saw it, 2026-12-06). 20 attempts outlast that hold at a 10 s lease.
@pytest.mark.stack_args("--dead-letter-attempts", "20")
@pytest.mark.stack_env(COVER_FAILPOINT="hold:separate:{tmp}/release-the-held-renders")
def test_renders_killed_mid_separation_are_taken_over_by_the_retry_and_by_another_gpu_runner(
    stack, rehearsal, tmp_path
):
    """A Cloud Run task's process and the GPU runner, each SIGKILLed in the middle of separation:
    the stack reports the failed attempt, Cloud Run's retry (the local launcher's) takes its cover
    over once the lease lapses; the stack starts another GPU runner, which Pub/Sub hands the request
    to once the dead runner's last lease extension runs out (COVER_MESSAGE_LEASE_EXTENSION_S, 10 s
    here, 30 s deployed; the emulator can add its hold of a dead stream's message, up to ~100 s).
    Each request completes once. Prints the time from each kill to the takeover's first progress
    event. Both renders are held at separation until the kills (a tiny model's render on a fast CPU
    had finished before the test's kill arrived: nothing to take over)."""
    proc, url, logs = rehearsal
    job, gpu = _post(url, 7, "cpu"), _post(url, 9, "gpu")
    separating = [_separating(answer["cover_id"]) for answer in (job, gpu)]
    stack.events(lambda got: all(until(got) for until in separating), timeout=240)
    (attempt,) = [line for line in _log_lines(logs / "trigger.log") if line.get("event") == "execution.attempt"]
    (runner,) = [line for line in _log_lines(logs / "gpu-runner.log") if line.get("event") == "runner.started"]
    pids = {job["cover_id"]: attempt["pid"], gpu["cover_id"]: runner["pid"]}
    events, takeovers = _kill_and_time_the_takeovers(stack, pids, 360, tmp_path / "release-the-held-renders")
    job_s, gpu_s = takeovers[job["cover_id"]], takeovers[gpu["cover_id"]]
    print(
        f"\ntakeover after the kill: the job's retry {job_s:.1f} s, "
        f"another GPU runner {gpu_s:.1f} s (lease {LEASE_S:g} s)"
    )
    completed = {c["request_id"]: c for c in of_type(events, COMPLETED)}
    assert len(of_type(events, COMPLETED)) == 2 and not of_type(events, FAILED)
    assert completed[job["request_id"]]["runner"] == "cloud-run-job"
    assert completed[gpu["request_id"]]["runner"] == "gpu-runner"
    for answer in completed.values():
        _check_against_bucket(stack, answer)
    trigger = _log_lines(logs / "trigger.log")
    failed = [line for line in trigger if line.get("event") == "execution.attempt_failed"]
    assert [(f["attempt"], f["status"]) for f in failed] == [(0, -signal.SIGKILL)]  # reported
    assert [line["attempt"] for line in trigger if line.get("event") == "execution.attempt"] == [0, 1]
    assert any(line.get("event") == "execution.succeeded" for line in trigger)
    assert job_s < LEASE_S + 30  # the lease, and a task's start
    # a lost GPU runner's request restarts once its short lease extension runs out, not after the
    # client's p99-based one (minutes): within two minutes on Pub/Sub; the emulator's hold adds up to ~100 s
    assert gpu_s < float(LEASE_EXTENSION_S) + 140
    assert proc.poll() is None  # the stack lives on
    assert requests.get(job["status_url"], timeout=30).json()["state"] == "completed"


@pytest.mark.stack_env(COVER_QUALITY="gate")
def test_the_readme_s_service_example_ends_in_completed(stack, rehearsal):
    """The README's `curl -X POST` against `make serve`, its body as written, under the default
    quality gate: the demo's random-weight models are let through as the README says, and the
    request ends in completed."""
    proc, url, _ = rehearsal
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = readme.split("make serve\ncurl -s -X POST http://127.0.0.1:8080/cover", 1)[1]
    body = json.loads(example.split("-d '", 1)[1].split("'", 1)[0])
    answer = requests.post(f"{url}/cover", json=body, timeout=30)
    assert answer.status_code == 202, answer.text
    cid = answer.json()["cover_id"]
    events = stack.events(lambda got: any(e["cover_id"] == cid for e in of_type(got, COMPLETED) + of_type(got, FAILED)))
    assert [e["cover_id"] for e in of_type(events, COMPLETED)] == [cid], of_type(events, FAILED)
    assert requests.get(answer.json()["status_url"], timeout=30).json()["state"] == "completed"
    # it comes back with Content Credentials that `cover verify` accepts, and the event says so
    (completed,) = of_type(events, COMPLETED)
    assert completed["provenance"]["ai_generated"] is True and completed["provenance"]["development"] is True
    cover = stack.tmp / f"readme-cover.{completed['format']}"
    cover.write_bytes(stack.s3.get_object(Bucket=completed["bucket"], Key=completed["key"])["Body"].read())
    checked = run_cover(["verify", str(cover), "--json"], dict(os.environ))
    assert (
        checked.returncode == 0
        and json.loads(checked.stdout)["summary"]["manifest_id"] == completed["provenance"]["manifest_id"]
    )
    assert proc.poll() is None

"""The event-driven service against real parts: the Pub/Sub emulator, moto's S3 server on 127.0.0.1,
functions-framework on a real port, and `python -m job serve` workers as separate processes."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from service_stack import FAST, ROOT, _check_against_bucket, assert_matches_schema, of_type, run_job_here

from job.devkit import demo
from job.devkit.stack import stop
from job.render import credentials
from shared.events import COMPLETED, FAILED, REQUESTED, CoverRequest, to_message
from shared.provenance import verify
from shared.settings import Settings
from tests.conftest import FULL_SWEEPS

pytestmark = pytest.mark.slow  # the emulator, an S3 server and worker processes: minutes


def test_post_cover_to_completed_event(stack):
    # the runners sign with this machine's development key; the API trusts its CA, as a deployment's
    # API trusts the production CA (COVER_TRUSTED_CERTS)
    trusted = credentials.identity(None, None, None, Settings().state_dir).trusted_pem
    stack.start_worker("cpu-1")
    url = stack.start_dispatcher(COVER_TRUSTED_CERTS=trusted)
    answer = requests.post(f"{url}/cover", json={"song_id": "song-1", "voice_model": demo.DEMO_VOICE, "options": FAST})
    assert answer.status_code == 202, answer.text
    cover_id, request_id = answer.json()["cover_id"], answer.json()["request_id"]
    assert answer.json()["status_url"].endswith(f"/covers/{cover_id}")
    events = stack.events(lambda got: of_type(got, COMPLETED))
    completed = of_type(events, COMPLETED)
    assert len(completed) == 1 and completed[0]["cover_id"] == cover_id
    assert completed[0]["request_id"] == request_id  # the answer names the request it answers
    progress = sorted(of_type(events, "cover.progress"), key=lambda p: p["_attributes"]["ce-time"])
    assert {p["request_id"] for p in progress} == {request_id}
    assert progress[0]["stage"] == "accepted" and progress[0]["overall"] == 0.0  # the runner took it
    overall = [p["overall"] for p in progress]
    assert overall == sorted(overall) and overall[-1] == 1.0  # one fraction across the stages
    ends = [p["stage"] for p in progress if p["progress"] == 1.0]
    assert sorted(ends) == sorted(set(ends)) and {"download", "separate", "convert", "mix", "upload"} <= set(ends)
    assert completed[0]["_attributes"]["cover_id"] == cover_id and completed[0]["_attributes"]["voice"] == "demo-voice"
    assert of_type(events, "cover.progress")  # stage events came first
    _check_against_bucket(stack, completed[0])
    # the cover carries Content Credentials that the check accepts, and the event says so
    summary = completed[0]["provenance"]
    assert summary["ai_generated"] is True and summary["manifest_id"].startswith("urn:c2pa:")
    cover = stack.tmp / "from-bucket.mp3"
    cover.write_bytes(stack.s3.get_object(Bucket=stack.bucket, Key=completed[0]["key"])["Body"].read())
    found = verify(cover, trusted)
    assert found.status.value == "verified" and found.summary.manifest_id == summary["manifest_id"]
    assert found.song["id"] == "song-1" and found.voices[0]["name"] == demo.DEMO_VOICE
    checked = requests.get(f"{url}/covers/{cover_id}/provenance")  # the API checks the stored file now
    assert checked.status_code == 200 and checked.json()["status"] == "verified", checked.text
    assert checked.json()["summary"]["manifest_id"] == summary["manifest_id"]
    status = requests.get(f"{url}/covers/{cover_id}").json()
    assert status["state"] == "completed" and status["completed"]["sha256"] == completed[0]["sha256"]
    # the report page's player: the cover behind a redirect signed now
    audio = requests.get(f"{url}/covers/{cover_id}/audio", allow_redirects=False)
    assert audio.status_code == 302 and audio.headers["Cache-Control"] == "no-store"
    body = requests.get(audio.headers["Location"]).content
    assert hashlib.sha256(body).hexdigest() == completed[0]["sha256"]
    missing = requests.get(f"{url}/covers/{'0' * 32}/audio")
    assert missing.status_code == 404 and missing.json()["code"] == "cover.unknown"
    again = requests.post(f"{url}/cover", json={"song_id": "song-1", "voice_model": demo.DEMO_VOICE, "options": FAST})
    assert again.status_code == 200 and again.json()["completed"]["key"] == completed[0]["key"]
    models = requests.get(f"{url}/models").json()["models"]
    assert models[0]["name"] == demo.DEMO_VOICE and models[0]["untrained_demo"] is True
    # one access log line per request, with the ids an operator follows a request by
    lines = [json.loads(x) for x in (stack.tmp / "dispatcher.log").read_text().splitlines() if x.startswith("{")]
    access = [line for line in lines if line.get("event") == "http.request"]
    assert [(a["method"], a["status"]) for a in access] == [
        ("POST", 202),
        ("GET", 200),  # the provenance
        ("GET", 200),
        ("GET", 302),
        ("GET", 404),
        ("POST", 200),
        ("GET", 200),
    ]
    queued = access[0]
    assert (queued["cover_id"], queued["request_id"]) == (cover_id, request_id) and queued["message_id"]
    assert all(a["latency_ms"] >= 0 and a["path"].startswith("/") for a in access)


def _voice_without_rights(stack) -> str:
    """A voice in the bucket whose voice.json has no rights record (the demo voice's, renamed)."""
    local = Path(stack.env["COVER_MODELS_DIR"]) / "voices" / demo.DEMO_VOICE / "voice.json"
    info = json.loads(local.read_text())  # the runners' local store: the bucket holds no voices here
    info.update(name="norights", rights=None)
    stack.s3.put_object(Bucket=stack.bucket, Key="voices/norights/voice.json", Body=json.dumps(info).encode())
    return "norights"


def test_dispatcher_answers_problem_json(stack):
    url = stack.start_dispatcher(COVER_REQUIRE_RIGHTS="true", COVER_PROVENANCE="required")
    unlicensed = _voice_without_rights(stack)
    cases = [
        (  # the deployment requires Content Credentials, which opus cannot carry
            json.dumps({"song_id": "song-1", "voice_model": demo.DEMO_VOICE, "options": {"format": "opus"}}).encode(),
            400,
            "options.invalid",
        ),
        (  # the deployment requires a rights record: refused before anything is queued
            json.dumps({"song_id": "song-1", "voice_model": unlicensed}).encode(),
            403,
            "voice.no_rights",
        ),
        (b"{not json", 400, "options.invalid"),
        (json.dumps({"song_id": "song-1"}).encode(), 400, "options.invalid"),
        (json.dumps({"song_id": "song-1", "voice_model": "nobody"}).encode(), 404, "voice.unknown"),
        (  # every voice of a duet is known, or none of it is queued
            json.dumps(
                {
                    "song_id": "song-1",
                    "voice_model": demo.DEMO_VOICE,
                    "voices": [{"voice_model": "nobody", "ranges": [{"from": 1, "to": 2}]}],
                }
            ).encode(),
            404,
            "voice.unknown",
        ),
        (
            json.dumps(
                {
                    "song_id": "song-1",
                    "voice_model": demo.DEMO_VOICE,
                    "voices": [{"voice_model": demo.DEMO_VOICE, "ranges": [{"from": 2, "to": 1}]}],
                }
            ).encode(),
            400,
            "options.invalid",
        ),
        (json.dumps({"song_id": "nope", "voice_model": demo.DEMO_VOICE}).encode(), 404, "input.not_found"),
        (b"[" * 100_000 + b"]" * 100_000, 413, "request.too_large"),
        (b"[" * 30_000 + b"]" * 30_000, 400, "options.invalid"),  # nesting deeper than the parser goes
        (
            json.dumps({"song_id": "x/../../covers/a.mp3", "voice_model": demo.DEMO_VOICE}).encode(),
            400,
            "options.invalid",
        ),
    ]
    for body, status, code in cases:
        answer = requests.post(f"{url}/cover", data=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == status and answer.headers["Content-Type"] == "application/problem+json"
        assert answer.json()["code"] == code and answer.json()["status"] == status
    odd = [
        ("post", "/cover", {"data": b"song_id=1", "headers": {"Content-Type": "text/plain"}}, 415),
        ("get", "/cover", {}, 405),
        ("delete", "/models", {}, 405),
        ("get", "/nowhere", {}, 404),
        ("get", "/covers/unknown", {}, 404),
        ("get", "/covers/../../etc/passwd", {}, 404),
        ("get", "/covers/" + "0" * 32, {}, 404),
        ("get", "/covers/%00", {}, 404),
        ("put", "/openapi.json", {}, 405),
    ]
    for method, path, kwargs, status in odd:
        answer = requests.request(method, f"{url}{path}", **kwargs)
        assert answer.status_code == status, (method, path, answer.text)
        assert answer.headers["Content-Type"] == "application/problem+json", (method, path)
    assert requests.get(f"{url}/cover").headers["Allow"] == "POST"
    # one broken voice.json hides only itself
    stack.s3.put_object(Bucket=stack.bucket, Key="voices/broken/voice.json", Body=b"{not json")
    models = requests.get(f"{url}/models")
    assert models.status_code == 200 and [m["name"] for m in models.json()["models"]] == [demo.DEMO_VOICE, unlicensed]
    assert models.json()["models"][0]["rights"]["voice_of"].startswith("no person")  # the demo's record
    assert requests.get(f"{url}/openapi.json").json()["openapi"] == "3.1.0"


def test_the_served_api_keeps_its_published_contract(stack):
    """schemathesis against GET /openapi.json: generated requests, bounded in number; no 5xx, and
    every answer's status, content type and body as the document says."""
    url = stack.start_dispatcher()
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{url}/openapi.json",
            "--checks",
            checks,
            "--max-examples",
            "25",
            "--seed",
            "1",
            "--request-timeout",
            "30",
            "--generation-deterministic",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**stack.env, "NO_COLOR": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    operations = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", proc.stdout)
    assert operations and operations[1] == operations[2] == operations[3] != "0", proc.stdout[-2000:]
    assert cases and int(cases[1]) == int(cases[2]) > 100, proc.stdout[-2000:]


def test_catalog_publishing_directly_and_duplicates_with_two_workers(stack):
    stack.start_worker("cpu-1")
    stack.start_worker("cpu-2")
    request = CoverRequest(song_id="song-1", voice_model=demo.DEMO_VOICE, options=FAST)
    data, attributes = to_message(REQUESTED, request)
    for _ in range(2):  # at-least-once delivery, seen twice
        stack.publish_request(data, attributes)
    events = stack.events(lambda got: len(of_type(got, COMPLETED)) >= 2, timeout=240)
    completed = of_type(events, COMPLETED)
    assert len(completed) == 2
    first, second = ({k: v for k, v in c.items() if k != "_attributes"} for c in completed)
    # the same answer, not two renders; only the download URL is signed anew at each publication
    assert {k: v for k, v in first.items() if k != "url"} == {k: v for k, v in second.items() if k != "url"}
    assert completed[0]["_attributes"]["ce-id"] == completed[1]["_attributes"]["ce-id"]
    cover_id = first["cover_id"]
    claims = stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix=f"claims/{cover_id}/").get("KeyCount", 0)
    assert claims == 1  # one claim: one render
    _check_against_bucket(stack, first)


def test_a_second_request_for_a_cover_being_rendered_waits_without_spending_delivery_attempts(stack):
    """A GPU runner on a subscription with Pub/Sub's dead-letter policy (5 attempts) gets a request
    for a cover that another runner (here a Cloud Run task) is rendering. It waits, keeping the
    message leased, and answers from the stored cover: both requests get their cover.completed and
    nothing is dead-lettered (a runner that handed the busy message back spent an attempt a look).
    The wait holds none of the runner's render slots: a request for another song sent with it is
    rendered meanwhile and answered before the first render ends (a failpoint holds that render after
    separation until the test releases it, so a short song makes a render as long as the test needs)."""
    from job.devkit.stack import start
    from job.render.media.audio import write_wav

    vocals, inst = demo.demo_song(6.0)
    stack.put_song("song-held", write_wav(stack.tmp / "song-held.wav", np.clip(vocals + inst, -1, 1), 44100))
    dead_letter, kept = stack.dead_letter_topic()
    subscription = stack.subscription(stack.requests_topic, f"gpu-dl-{uuid.uuid4().hex[:6]}", dead_letter=dead_letter)
    first, second = (
        CoverRequest(song_id="song-held", voice_model=demo.DEMO_VOICE, options=FAST, request_id=f"request-{n}")
        for n in (1, 2)
    )
    release = stack.tmp / "release-the-held-render"
    holder = {
        **stack.env,
        "COVER_RUNNER": "cloud-run-job",
        "COVER_REQUEST": first.model_dump_json(),
        "COVER_FAILPOINT": f"hold:separate:{release}",
    }
    stack.procs.append(start([sys.executable, "-m", "job", "run"], stack.tmp / "job.log", holder))
    stack.start_worker("gpu-1", COVER_REQUESTS_SUBSCRIPTION=subscription.rsplit("/", 1)[1], COVER_BUSY_RETRY_S="1")
    rendering = stack.events(lambda got: any(d.get("stage") == "separate" for d in of_type(got, "cover.progress")))
    unrelated = CoverRequest(song_id="song-1", voice_model=demo.DEMO_VOICE, options=FAST, request_id="request-3")
    stack.publish_request(*to_message(REQUESTED, second))
    stack.publish_request(*to_message(REQUESTED, unrelated))
    events = rendering + stack.events(lambda got: len(of_type(got, COMPLETED)) >= 1, timeout=240)
    log = stack.tmp / "gpu-1.log"
    deadline = time.monotonic() + 60
    while '"cover.busy"' not in log.read_text() and time.monotonic() < deadline:  # request-2 meets the held render
        time.sleep(0.5)
    busy = '"cover.busy"' in log.read_text()
    release.touch()
    events += stack.events(lambda got: len(of_type(got, COMPLETED)) >= 2, timeout=240)
    order = [c["request_id"] for c in of_type(events, COMPLETED)]
    completed = {c["request_id"]: c for c in of_type(events, COMPLETED)}
    assert set(completed) == {"request-1", "request-2", "request-3"} and not of_type(events, FAILED)
    assert order.index("request-3") < order.index("request-1"), order  # rendered while request-2 waited
    assert completed["request-1"]["cover_id"] == completed["request-2"]["cover_id"]
    assert completed["request-2"]["runner"] == "cloud-run-job"  # rendered once, by the task
    assert busy  # the runner did meet the render in progress,
    assert '"cover.completed"' in log.read_text()  # kept the message and answered it from the stored cover
    assert not stack.subscriber.pull(subscription=kept, max_messages=10, timeout=3).received_messages


def test_the_api_writes_nothing_to_the_covers_bucket_when_its_queue_has_a_bucket_of_its_own(stack):
    """Deployed, the API holds read-only keys for the covers bucket: with ``COVER_QUEUE_BUCKET`` its
    one write, the 'queued' marker, goes to a bucket of its own, and the status still reads queued
    until a runner takes the request."""
    queue = f"{stack.bucket}-queue"
    stack.s3.create_bucket(Bucket=queue)
    url = stack.start_dispatcher(COVER_QUEUE_BUCKET=queue)
    before = {o["Key"] for o in stack.s3.list_objects_v2(Bucket=stack.bucket).get("Contents", [])}
    body = {"song_id": "song-1", "voice_model": demo.DEMO_VOICE, "options": FAST}
    answer = requests.post(f"{url}/cover", json=body, timeout=30)
    assert answer.status_code == 202, answer.text
    after = {o["Key"] for o in stack.s3.list_objects_v2(Bucket=stack.bucket).get("Contents", [])}
    assert after == before  # nothing written where covers, models and voices live
    cid = answer.json()["cover_id"]
    assert stack.s3.head_object(Bucket=queue, Key=f"status/{cid}.json")
    assert requests.get(answer.json()["status_url"], timeout=30).json()["state"] == "queued"


def test_dead_letters_are_replayed_to_the_requests_topic_under_their_own_request_id(stack, monkeypatch):
    """A request dead-lettered for real (5 deliveries, none answered) and kept: the replay tool lists
    it without touching it (--dry-run), then publishes it again with its own attributes (not
    Pub/Sub's dead-letter ones) and acknowledges the kept copy."""
    from dispatcher.replay import main as replay_main

    dead_letter, kept = stack.dead_letter_topic()
    source = stack.subscription(stack.requests_topic, f"dl-source-{uuid.uuid4().hex[:6]}", dead_letter=dead_letter)
    replayed_to = stack.subscription(stack.requests_topic, f"replayed-{uuid.uuid4().hex[:6]}")
    request = CoverRequest(song_id="song-1", voice_model=demo.DEMO_VOICE, request_id="request-dl")
    stack.publish_request(*to_message(REQUESTED, request))
    for _ in range(5):  # a runner that never answers
        got = stack.subscriber.pull(subscription=source, max_messages=1, timeout=10).received_messages
        stack.subscriber.modify_ack_deadline(subscription=source, ack_ids=[got[0].ack_id], ack_deadline_seconds=0)
    # the emulator forwards to the dead-letter topic when it would deliver a sixth time
    assert not stack.subscriber.pull(subscription=source, max_messages=1, timeout=5).received_messages
    stack.subscriber.acknowledge(  # what reached the plain subscription before: not a replay
        subscription=replayed_to,
        ack_ids=[
            m.ack_id
            for m in stack.subscriber.pull(subscription=replayed_to, max_messages=5, timeout=10).received_messages
        ],
    )
    for name in ("PUBSUB_EMULATOR_HOST", "COVER_PROJECT", "COVER_REQUESTS_TOPIC"):
        monkeypatch.setenv(name, stack.env[name])
    args = ["--subscription", kept.rsplit("/", 1)[1], "--wait", "3"]
    import contextlib
    import io

    def run(*extra: str) -> list[dict]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert replay_main([*args, *extra]) == 0
        return [json.loads(line) for line in out.getvalue().splitlines()]

    (listed,) = run("--dry-run")
    assert listed["request_id"] == "request-dl" and listed["deliveries"] == "5" and listed["republished_as"] is None
    (done,) = run()
    assert done["republished_as"]
    (again,) = stack.subscriber.pull(subscription=replayed_to, max_messages=5, timeout=10).received_messages
    attributes = dict(again.message.attributes)
    assert json.loads(again.message.data)["request_id"] == "request-dl" and attributes["ce-type"] == REQUESTED
    assert not any(name.startswith("CloudPubSubDeadLetter") for name in attributes)
    assert run() == []  # the kept copy was acknowledged


def test_killed_worker_leaves_nothing_visible_and_the_redelivery_completes(stack):
    # held at separation until killed: a tiny model's render on a fast CPU can end before the kill
    doomed = stack.start_worker("doomed", COVER_LEASE_S="4", COVER_FAILPOINT=f"hold:separate:{stack.tmp / 'never'}")
    request = CoverRequest(song_id="song-1", voice_model=demo.DEMO_VOICE, options=FAST)
    stack.publish_request(*to_message(REQUESTED, request))
    stack.events(lambda got: any(d.get("stage") == "separate" for d in of_type(got, "cover.progress")), timeout=180)
    os.killpg(doomed.pid, signal.SIGKILL)  # in the middle of the render
    doomed.wait(10)
    assert stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix="covers/").get("KeyCount", 0) == 0
    stack.start_worker("rescuer", COVER_LEASE_S="4")
    # the emulator may hold a killed stream's message ~100 s before redelivering it; then a render
    events = stack.events(lambda got: of_type(got, COMPLETED), timeout=480)
    completed = of_type(events, COMPLETED)
    assert len(completed) == 1 and completed[0]["runner"] == "rescuer"
    _check_against_bucket(stack, completed[0])


def test_bad_messages_fail_with_their_own_code_once(stack, tmp_path):
    stack.start_worker("cpu-1", COVER_REQUIRE_RIGHTS="true")
    unlicensed = _voice_without_rights(stack)
    text = tmp_path / "notes.txt"
    text.write_text("this is a text file, not a song\n" * 50)
    stack.put_song("text-song", text)
    bad = {
        "options.invalid": [b"\x00not json at all", json.dumps({"song": "x"}).encode()],
        "voice.unknown": [json.dumps({"song_id": "song-1", "voice_model": "nobody"}).encode()],
        "voice.no_rights": [json.dumps({"song_id": "song-1", "voice_model": unlicensed, "options": FAST}).encode()],
        "input.not_found": [json.dumps({"song_id": "missing", "voice_model": demo.DEMO_VOICE}).encode()],
        "input.not_audio": [
            json.dumps({"song_id": "text-song", "voice_model": demo.DEMO_VOICE, "options": FAST}).encode()
        ],
    }
    message_ids = [stack.publish_request(payload) for payloads in bad.values() for payload in payloads]
    # a valid request's data under another event's attributes (published to the wrong topic): refused
    valid, attributes = to_message(REQUESTED, CoverRequest(song_id="song-1", voice_model=demo.DEMO_VOICE))
    stack.publish_request(valid, {**attributes, "ce-type": COMPLETED, "type": COMPLETED})
    bad["options.invalid"].append(valid)
    message_ids.append(attributes["ce-id"])
    events = stack.events(lambda got: len(of_type(got, FAILED)) >= 7, timeout=180)
    # watched past the worker subscription's 10 s ack deadline: a message not acked would come back
    events += stack.events(lambda got: False, timeout=12)
    failed = of_type(events, FAILED)
    codes = sorted(f["code"] for f in failed)
    assert codes == sorted(c for c, payloads in bad.items() for _ in payloads)
    assert all(f["retryable"] is False and f["attempt"] == 1 and f["message"] for f in failed)
    for event in failed:
        assert_matches_schema(FAILED, event)
    # every failure names its request (its ce-id, else its message id), and its song and voice if readable
    assert sorted(f["request_id"] for f in failed) == sorted(message_ids)
    unknown_voice = next(f for f in failed if f["code"] == "voice.unknown")
    assert (unknown_voice["song_id"], unknown_voice["voice_model"]) == ("song-1", "nobody")
    assert next(f for f in failed if f["code"] == "input.not_found")["song_id"] == "missing"
    # refused by the rights policy before any work: no progress, nothing in the bucket for it
    assert not [e for e in of_type(events, "cover.progress") if e["voice_model"] == unlicensed]


def test_second_voice_reuses_the_cached_stems(stack, store, tmp_path):
    own = tmp_path / "models"
    own.mkdir()
    os.symlink(store / "base", own / "base")
    shutil.copytree(store / "separation", own / "separation")
    demo.write_voice(own / "voices" / "alto", name="alto", size="tiny", seed=1)
    demo.write_voice(own / "voices" / "tenor", name="tenor", size="tiny", seed=2)
    first = stack.start_worker("cpu-1", COVER_MODELS_DIR=str(own))
    stack.publish_request(json.dumps({"song_id": "song-1", "voice_model": "alto", "options": FAST}).encode())
    done = of_type(stack.events(lambda got: of_type(got, COMPLETED)), COMPLETED)
    assert done[0]["stems_cached"] is False
    for kind in ("content", "pitch"):  # the vocals' analysis is in the bucket for the next voice too
        assert stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix=f"analysis/{kind}/").get("KeyCount", 0) > 0
    stop(first)
    for package in (own / "separation").glob("*.th"):  # from here on, loading Demucs would fail (its
        package.write_bytes(b"damaged")  # checksum no longer matches), while the cache key stays the same
    # a fresh subscription: the emulator holds a cancelled stream's next message for ~100 s
    second_sub = stack.subscription(stack.requests_topic, f"workers-b-{uuid.uuid4().hex[:6]}")
    stack.start_worker("cpu-2", COVER_MODELS_DIR=str(own), COVER_REQUESTS_SUBSCRIPTION=second_sub.rsplit("/", 1)[1])
    duet = [{"voice_model": "alto", "ranges": [{"from": 1.0, "to": 3.0}]}]  # and alto sings 1 to 3 s of it
    stack.publish_request(
        json.dumps({"song_id": "song-1", "voice_model": "tenor", "options": FAST, "voices": duet}).encode()
    )
    events = stack.events(lambda got: of_type(got, COMPLETED) or of_type(got, FAILED))
    assert not of_type(events, FAILED), of_type(events, FAILED)
    second = of_type(events, COMPLETED)[0]
    assert second["voice_model"] == "tenor" and second["stems_cached"] is True
    assert second["voices"] == [{**duet[0], "options": None}] and set(second["voice_versions"]) == {"alto"}
    assert set(second["voice_rights"]) == {"tenor", "alto"} and second["voice_rights"]["alto"]["terms"] == "CC0-1.0"
    assert second["sha256"] != done[0]["sha256"]


@pytest.mark.sweep
@pytest.mark.skipif(
    not FULL_SWEEPS,
    reason="three runner processes syncing every model, 50 to 90 s on 2 cores: .ci/run's full pass (make test-full) "
    "runs it; make test keeps the sync's own tests (test_model_store)",
)
def test_a_runner_with_an_empty_model_folder_syncs_from_the_bucket_and_refuses_a_corrupted_file(stack, store, tmp_path):
    """The bucket holds models/ (with its manifest) and voices/, filled by `cover models push`; a
    runner starting from an empty model folder syncs them, checks every hash, and renders."""
    push = subprocess.run(
        [sys.executable, "-m", "job.cli.main", "models", "push", "--json"],
        env={**stack.env, "COVER_MODELS_DIR": str(store)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert push.returncode == 0, push.stderr
    keys = {o["Key"] for o in stack.s3.list_objects_v2(Bucket=stack.bucket, MaxKeys=1000)["Contents"]}
    assert {k.split("/")[0] for k in keys} == {"models", "voices", "songs"}
    assert "models/manifest.json" in keys and f"voices/{demo.DEMO_VOICE}/voice.json" in keys

    empty = tmp_path / "runner-models"
    stack.start_worker("fresh", COVER_MODELS_DIR=str(empty))
    stack.publish_request(json.dumps({"song_id": "song-1", "voice_model": demo.DEMO_VOICE, "options": FAST}).encode())
    events = stack.events(lambda got: of_type(got, COMPLETED) or of_type(got, FAILED))
    assert not of_type(events, FAILED), of_type(events, FAILED)
    _check_against_bucket(stack, of_type(events, COMPLETED)[0])
    synced = sorted(p.relative_to(empty).as_posix() for p in empty.rglob("*") if p.is_file())
    manifest = json.loads(stack.s3.get_object(Bucket=stack.bucket, Key="models/manifest.json")["Body"].read())
    assert set(manifest["files"]) <= set(synced) and f"voices/{demo.DEMO_VOICE}/model.pth" in synced

    # the bucket's pitch model is corrupted: a runner starting empty refuses it and uses nothing
    stack.s3.put_object(Bucket=stack.bucket, Key="models/base/rmvpe.pt", Body=b"corrupted")
    other = tmp_path / "other-models"
    request = json.dumps({"song_id": "song-1", "voice_model": demo.DEMO_VOICE, "options": {**FAST, "seed": 9}})
    proc = subprocess.run(
        [sys.executable, "-m", "job", "run"],
        env={**stack.env, "COVER_MODELS_DIR": str(other), "COVER_REQUEST": request},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]  # failed for good: no Cloud Run retry
    failed = of_type(stack.events(lambda got: of_type(got, FAILED)), FAILED)
    assert failed[0]["code"] == "model.hash_mismatch" and "base/rmvpe.pt" in failed[0]["message"]
    assert not [p for p in other.rglob("*") if p.is_file()]  # nothing half-synced
    serve = subprocess.run(
        [sys.executable, "-m", "job", "serve"],
        env={**stack.env, "COVER_MODELS_DIR": str(other)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert serve.returncode == 1 and "model.hash_mismatch" in serve.stderr  # a GPU runner will not start


@pytest.fixture(scope="session")
def dispatcher_venv() -> Path:
    """The HTTP functions' environment (tests/dispatcher_venv.py: core dependencies only)."""
    from tests.dispatcher_venv import ensure

    return ensure()


def test_the_dispatcher_imports_and_answers_without_torch(stack, dispatcher_venv):
    """The HTTP functions install only the core dependencies: no torch, numpy or demucs there."""
    for heavy in ("torch", "numpy", "demucs", "transformers"):
        probe = subprocess.run([str(dispatcher_venv / "python"), "-c", f"import {heavy}"], capture_output=True)
        assert probe.returncode != 0, f"{heavy} is installed in the dispatcher's environment"
    # the `cover` command installed without the job's dependencies says what to install
    cli = subprocess.run(
        [str(dispatcher_venv / "cover"), "make", "song.mp3", "--voice", "v", "-o", "o.mp3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 2 and "pip install 'melodia-cover[job]'" in cli.stderr and "Traceback" not in cli.stderr
    url = stack.start_dispatcher(dispatcher_venv)
    assert requests.get(f"{url}/healthz").json() == {"ok": True}
    assert [m["name"] for m in requests.get(f"{url}/models").json()["models"]] == [demo.DEMO_VOICE]
    answer = requests.post(f"{url}/cover", json={"song_id": "song-1", "voice_model": demo.DEMO_VOICE})
    assert answer.status_code == 202, answer.text
    cover_id = answer.json()["cover_id"]
    assert requests.get(f"{url}/covers/{cover_id}").json()["state"] == "queued"
    bad = requests.post(f"{url}/cover", json={"song_id": "song-1", "voice_model": "nobody"})
    assert bad.status_code == 404 and bad.headers["Content-Type"] == "application/problem+json"
    queued = stack.subscriber.pull(subscription=stack.worker_sub, max_messages=1, timeout=30)
    assert queued.received_messages[0].message.attributes["cover_id"] == cover_id


class FakeJobsClient:
    """Stands in for run_v2.JobsClient: the Cloud Run Admin API has no emulator, so the trigger is
    tested at the client boundary (the request it builds, and what it answers when the call fails)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls = []

    def run_job(self, request):
        self.calls.append(request)
        if self.fail:
            raise RuntimeError("PERMISSION_DENIED: run.jobs.run")
        return object()


def _serve_trigger(stack, client, executions=None):
    """The trigger function in-process (to hold the fake client, and ``executions`` where given),
    served over HTTP on a real port."""
    import threading

    import functions_framework
    from werkzeug.serving import make_server

    from dispatcher import main as dispatcher_main

    for key, value in stack.env.items():
        if key.startswith("COVER_") or key == "PUBSUB_EMULATOR_HOST":
            os.environ[key] = value
    app = functions_framework.create_app(target="trigger", source=str(ROOT / "dispatcher/main.py"))
    # functions-framework loads the source as its own module: hand the fake to that module's services
    loaded = [
        m
        for m in list(sys.modules.values())
        if getattr(m, "__file__", None) == str(ROOT / "dispatcher/main.py") and hasattr(m, "services")
    ]
    for module in {id(m): m for m in [*loaded, dispatcher_main]}.values():
        module.services.cache_clear()
        module.services().jobs_client = client
        if executions is not None:
            module.services()._executions = executions
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


def test_trigger_starts_a_job_execution_with_the_request(stack):
    client = FakeJobsClient()
    server, url = _serve_trigger(stack, client)
    try:
        data = json.dumps({"song_id": "song-1", "voice_model": demo.DEMO_VOICE}).encode()
        envelope = {
            "message": {"data": base64.b64encode(data).decode(), "messageId": "1"},
            "subscription": "projects/p/subscriptions/trigger",
        }
        assert requests.post(url, json=envelope).status_code == 204
        call = client.calls[0]
        assert call.name == "projects/melodia-local/locations/europe-west1/jobs/cover-job"
        env = {e.name: e.value for e in call.overrides.container_overrides[0].env}
        assert json.loads(env["COVER_REQUEST"]) == json.loads(data)
        assert env["COVER_REQUEST_ID"] == "1"  # no request_id or ce-id: the message id names it
        client.fail = True
        assert requests.post(url, json=envelope).status_code == 503  # Pub/Sub will redeliver
        garbage = {"message": {"data": base64.b64encode(b"nope").decode(), "messageId": "2"}}
        assert requests.post(url, json=garbage).status_code == 204  # answered with cover.failed instead
        for malformed in ([1, 2], {"message": {"data": "not base64!"}}, "text", {"message": 5}):
            assert requests.post(url, json=malformed).status_code == 204  # acknowledged: it can never work
        assert len(client.calls) == 2
        assert requests.post(url, json=garbage).status_code == 204  # the same message again
        failed = of_type(stack.events(lambda got: len(of_type(got, FAILED)) >= 6, timeout=60), FAILED)
        assert {f["code"] for f in failed} == {"options.invalid"}
        ids = [f["_attributes"]["ce-id"] for f in failed]
        assert ids.count(ids[0]) == 2 and len(set(ids)) == 5  # one id per fact, stable across redelivery
        assert [f["request_id"] for f in failed].count("2") == 2  # the garbage names its message
    finally:
        server.shutdown()


def test_the_trigger_hands_the_job_a_compact_utf8_request_whatever_came_in(stack):
    """A valid request in UTF-16 or UTF-32 (JSON allows them; ``data.decode()`` once answered 500,
    redelivered for ever) or padded with whitespace to 200 KiB (once past the launcher's argument
    limit, acknowledged and lost) starts an execution with the request as compact UTF-8 JSON. The
    largest request the schema admits stays far under what an execution's override may hold."""
    from dispatcher.main import MAX_LAUNCHED_REQUEST_BYTES
    from shared.events import CoverRequest

    longest = CoverRequest(
        song_id="/".join(["s" * 39] * 5)[:200],
        voice_model="v" * 64,
        request_id="r" * 128,
        options={"pitch": -24, "index_rate": 0.123456789, "f0_method": "crepe-tiny", "speaker": 1023},
        runner="gpu",
        publish_below_gate=True,
        allow_no_vocals=True,
    )
    assert len(longest.model_dump_json().encode()) < MAX_LAUNCHED_REQUEST_BYTES // 4
    client = FakeJobsClient()
    server, url = _serve_trigger(stack, client)
    try:
        request = {"song_id": "song-1", "voice_model": demo.DEMO_VOICE, "request_id": "wide"}
        text = json.dumps(request)
        bodies = [text.encode("utf-16"), text.encode("utf-32"), (text + " " * 200 * 1024).encode()]
        for i, data in enumerate(bodies):
            envelope = {"message": {"data": base64.b64encode(data).decode(), "messageId": f"w{i}"}}
            assert requests.post(url, json=envelope).status_code == 204
        assert len(client.calls) == 3
        for call in client.calls:
            launched = {e.name: e.value for e in call.overrides.container_overrides[0].env}["COVER_REQUEST"]
            assert json.loads(launched) == request and len(launched.encode()) < 200
    finally:
        server.shutdown()


def test_a_path_the_framework_cannot_route_is_answered_in_problem_json():
    """``/covers/x%0A``: a line break the framework's router does not match; its own HTML 404 page
    is replaced by problem+json (as is its 405)."""
    import functions_framework

    app = functions_framework.create_app(target="http", source=str(ROOT / "dispatcher/main.py"))
    client = app.test_client()
    for path in ("/covers/x%0A", "/covers/x%0A/report"):
        answer = client.get(path)
        assert answer.status_code == 404 and answer.content_type == "application/problem+json", path
        assert answer.get_json()["code"] == "route.unknown"


def test_the_trigger_starts_no_execution_beyond_its_bound_and_lets_the_request_wait(stack, monkeypatch):
    """With COVER_MAX_EXECUTIONS running (counted through the Admin API: a fake, nothing real runs
    here), a push is answered 429 and no execution starts; Pub/Sub pushes it again later (its retry
    policy's backoff) and once one has finished, it starts."""
    from google.cloud import run_v2

    from dispatcher.executions import CloudRunExecutions
    from shared.settings import Settings

    class FakeExecutionsList:
        def __init__(self) -> None:
            self.running = 2

        def list_executions(self, request):
            done = {"seconds": 1_800_000_000}
            executions = [run_v2.Execution(), run_v2.Execution(completion_time=done)] + [run_v2.Execution()] * (
                self.running - 1
            )

            class Pager:
                pages = iter([run_v2.ListExecutionsResponse(executions=executions)])

            return Pager()

    monkeypatch.setenv("COVER_MAX_EXECUTIONS", "2")  # undone after the test: other triggers have no bound
    client, listing = FakeJobsClient(), FakeExecutionsList()
    server, url = _serve_trigger(stack, client, CloudRunExecutions(Settings(), listing))
    try:
        data = json.dumps({"song_id": "song-1", "voice_model": demo.DEMO_VOICE}).encode()
        envelope = {"message": {"data": base64.b64encode(data).decode(), "messageId": "7"}}
        held = requests.post(url, json=envelope)
        assert held.status_code == 429 and held.json()["code"] == "executions.at_capacity"
        assert held.headers["Retry-After"] and not client.calls
        listing.running = 1
        assert requests.post(url, json=envelope).status_code == 204 and len(client.calls) == 1
    finally:
        server.shutdown()


def test_the_trigger_verifies_the_push_token_when_configured(stack, monkeypatch):
    """Pub/Sub's OIDC token, checked as Google's would be, with our own key and a loopback
    certificate endpoint standing in for Google's (no traffic leaves the machine)."""
    import datetime as dt
    import http.server
    import threading

    import google.auth.crypt
    import google.auth.jwt
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    def keypair():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
        now_ = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now_ - dt.timedelta(days=1))
            .not_valid_after(now_ + dt.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return pem, cert.public_bytes(serialization.Encoding.PEM).decode()

    (good_key, good_cert), (other_key, _) = keypair(), keypair()
    certs = json.dumps({"k1": good_cert}).encode()

    class Certs(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(certs)

        def log_message(self, *args):
            pass

    cert_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Certs)
    threading.Thread(target=cert_server.serve_forever, daemon=True).start()
    audience, account = "https://trigger.example/push", "push@melodia-test.iam.gserviceaccount.com"
    stack.env.update(
        {
            "COVER_PUSH_AUDIENCE": audience,
            "COVER_PUSH_SERVICE_ACCOUNT": account,
            "COVER_PUSH_CERTS_URL": f"http://127.0.0.1:{cert_server.server_address[1]}/certs",
        }
    )
    for name in ("COVER_PUSH_AUDIENCE", "COVER_PUSH_SERVICE_ACCOUNT", "COVER_PUSH_CERTS_URL"):
        monkeypatch.setenv(name, stack.env[name])

    def token(key=good_key, **claims):
        now_ = int(time.time())
        payload = {
            "iss": "https://accounts.google.com",
            "aud": audience,
            "email": account,
            "email_verified": True,
            "sub": "1",
            "iat": now_,
            "exp": now_ + 300,
            **claims,
        }
        signer = google.auth.crypt.RSASigner.from_string(key, key_id="k1")
        return {"Authorization": "Bearer " + google.auth.jwt.encode(signer, payload).decode()}

    client = FakeJobsClient()
    server, url = _serve_trigger(stack, client)
    try:
        data = json.dumps({"song_id": "song-1", "voice_model": demo.DEMO_VOICE}).encode()
        envelope = {"message": {"data": base64.b64encode(data).decode(), "messageId": "9"}}
        refused = [
            ({}, 401),
            (token(aud="https://elsewhere.example/"), 401),
            (token(key=other_key), 401),
            (token(iss="https://evil.example"), 401),
            (token(exp=int(time.time()) - 600), 401),
            (token(email="intruder@evil.iam.gserviceaccount.com"), 403),
            (token(email_verified=False), 403),
        ]
        for headers, status in refused:
            answer = requests.post(url, json=envelope, headers=headers)
            assert answer.status_code == status and answer.headers["Content-Type"] == "application/problem+json"
        assert client.calls == []  # nothing was started by a refused push
        assert requests.post(url, json=envelope, headers=token()).status_code == 204
        assert len(client.calls) == 1
    finally:
        server.shutdown()
        cert_server.shutdown()


def test_a_burst_of_1000_requests_loses_none(stack):
    url = stack.start_dispatcher()
    probe_sub = stack.subscription(stack.requests_topic, f"probe-{uuid.uuid4().hex[:6]}", ack_deadline=60)
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=32, pool_maxsize=32)
    session.mount("http://", adapter)

    def post(i: int) -> tuple[int, float, str]:
        start = time.perf_counter()
        answer = session.post(
            f"{url}/cover", json={"song_id": "song-1", "voice_model": demo.DEMO_VOICE, "options": {**FAST, "seed": i}}
        )
        return answer.status_code, time.perf_counter() - start, answer.json().get("cover_id", "")

    started = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(post, range(1000)))
    elapsed = time.perf_counter() - started
    latencies = sorted(r[1] for r in results)
    print(
        f"\nburst: 1000 requests in {elapsed:.1f} s = {1000 / elapsed:.0f} req/s; "
        f"p50 {latencies[499] * 1000:.0f} ms, p99 {latencies[989] * 1000:.0f} ms"
    )
    assert all(status == 202 for status, _, _ in results)
    expected = {cid for _, _, cid in results}
    assert len(expected) == 1000
    seen: set[str] = set()
    stack.events(
        lambda got: seen.update(d["_attributes"].get("cover_id", "") for _, d in got) or expected <= seen,
        timeout=180,
        subscription=probe_sub,
    )
    assert expected <= seen


def test_cloud_run_job_entry_point_reads_the_request_from_its_environment(stack):
    """`python -m job run`, as a Cloud Run Job execution started by the trigger (or by hand with
    `gcloud run jobs execute --update-env-vars COVER_REQUEST=...`) runs it."""
    good = json.dumps({"song_id": "song-1", "voice_model": demo.DEMO_VOICE, "options": FAST})
    for request in (good, "not json"):
        proc = run_job_here({**stack.env, "COVER_REQUEST": request})
        assert proc.returncode == 0, proc.stderr[-2000:]  # finished either way: no Cloud Run retry
    events = stack.events(lambda got: of_type(got, COMPLETED) and of_type(got, FAILED))
    _check_against_bucket(stack, of_type(events, COMPLETED)[0])
    assert of_type(events, FAILED)[0]["code"] == "options.invalid"
    assert run_job_here({**stack.env, "COVER_REQUEST": ""}).returncode == 2


def test_a_runner_holds_its_in_flight_limit_and_finishes_them_when_stopped(stack):
    """``COVER_IN_FLIGHT=2``: two requests render at once (the second starts before the first is
    done), a third waits; SIGTERM stops pulling, both requests in hand complete, the process exits
    0 having started nothing more, and the health line reports what it held."""
    runner = stack.start_worker("gpu-1", COVER_IN_FLIGHT="2", COVER_HEALTH_INTERVAL_S="1")
    requests_ = [
        CoverRequest(song_id="song-1", voice_model=demo.DEMO_VOICE, options={**FAST, "pitch": pitch})
        for pitch in (0, 3, 5)
    ]
    for request in requests_:
        stack.publish_request(*to_message(REQUESTED, request))

    def started(got) -> set[str]:
        return {d["cover_id"] for d in of_type(got, "cover.progress")}

    events = stack.events(lambda got: len(started(got)) >= 2 or of_type(got, COMPLETED), timeout=240)
    assert len(started(events)) == 2 and not of_type(events, COMPLETED)  # two at once, the third waiting
    time.sleep(2.5)  # a health line or two while both render
    runner.send_signal(signal.SIGTERM)
    events += stack.events(lambda got: len(of_type(got, COMPLETED)) >= 2, timeout=240)
    assert runner.wait(120) == 0
    events += stack.events(lambda got: False, timeout=5)
    completed = {c["cover_id"] for c in of_type(events, COMPLETED)}
    assert completed == started(events) and len(completed) == 2  # what it held, and nothing after the stop
    log = (stack.tmp / "gpu-1.log").read_text()
    health = [json.loads(line) for line in log.splitlines() if '"runner.health"' in line]
    assert health and max(h["in_flight"] for h in health) == 2 and all(h["limit"] == 2 for h in health)
    assert '"runner.stopped"' in log


def _matches(filter_: str, attributes: dict[str, str]) -> bool:
    """Pub/Sub's filter language for the two forms shared/routing.py writes, as Google documents
    it (``attributes.KEY = "VALUE"``; ``NOT`` of it, which a message without KEY also matches).
    A stand-in: the emulator accepts a subscription's filter but does not apply it (seen here:
    both filtered subscriptions received every message)."""
    negated = filter_.startswith("NOT ")
    found = re.fullmatch(r'attributes\.(\w+) = "([^"]*)"', filter_.removeprefix("NOT "))
    assert found, f"not a form this stand-in knows: {filter_}"
    equal = attributes.get(found[1]) == found[2]
    return not equal if negated else equal


@pytest.mark.parametrize("default", ["cpu", "gpu"])
def test_every_request_reaches_exactly_one_runner_by_its_runner_attribute(stack, default):
    """Requests through the API (naming a runner or not) and published directly (with the
    attribute or without) carry the attribute the subscriptions filter on, and the filters of
    infra/main.tf (shared/routing.py) send each to exactly one runner, the one it names or the
    default."""
    from shared.routing import subscription_filters

    url = stack.start_dispatcher(COVER_DEFAULT_RUNNER=default)
    expected: dict[int, str] = {}  # the request's pitch -> the runner that must receive it
    for pitch, runner in enumerate(["gpu", "cpu", None]):
        body = {"song_id": "song-1", "voice_model": demo.DEMO_VOICE, "options": {"pitch": pitch}}
        answer = requests.post(f"{url}/cover", json={**body, **({"runner": runner} if runner else {})})
        assert answer.status_code == 202, answer.text
        expected[pitch] = runner or default
    for pitch, runner in ((3, "gpu"), (4, "cpu"), (5, None)):  # direct publishers, with and without it
        request = CoverRequest(song_id="song-1", voice_model=demo.DEMO_VOICE, options={"pitch": pitch}, runner=runner)
        stack.publish_request(*to_message(REQUESTED, request))
        expected[pitch] = runner or default
    got: dict[int, dict[str, str]] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(got) < len(expected):
        response = stack.subscriber.pull(subscription=stack.worker_sub, max_messages=20, timeout=10)
        if response.received_messages:
            stack.subscriber.acknowledge(
                subscription=stack.worker_sub, ack_ids=[m.ack_id for m in response.received_messages]
            )
        for item in response.received_messages:
            got[json.loads(item.message.data)["options"]["pitch"]] = dict(item.message.attributes)
    assert sorted(got) == sorted(expected)
    filters = subscription_filters(default)  # type: ignore[arg-type]
    for pitch, attributes in got.items():
        receivers = [runner for runner, filter_ in filters.items() if _matches(filter_, attributes)]
        assert receivers == [expected[pitch]], (pitch, attributes.get("runner"), receivers)
    assert {got[p].get("runner") for p in (0, 1, 2)} == {"gpu", "cpu", default}  # the API always sets it
    assert "runner" not in got[5]  # a direct publisher may leave it out


def _unusable_work_dir(stack) -> str:
    """A work folder that cannot be made (a file is in its place): every render fails with an
    error a retry might fix, as on a runner whose disk is full."""
    blocker = stack.tmp / "work-is-a-file"
    blocker.write_text("not a folder")
    return str(blocker / "work")


def test_the_last_cloud_run_attempt_publishes_cover_failed_and_a_final_status(stack):
    request = json.dumps({"song_id": "song-1", "voice_model": demo.DEMO_VOICE, "options": FAST})
    env = {
        **stack.env,
        "COVER_REQUEST": request,
        "COVER_WORK_DIR": _unusable_work_dir(stack),
        "COVER_MAX_ATTEMPTS": "4",
    }
    codes = []
    for attempt in range(4):  # CLOUD_RUN_TASK_ATTEMPT counts from 0; max_retries 3 gives 4 attempts
        codes.append(run_job_here({**env, "CLOUD_RUN_TASK_ATTEMPT": str(attempt)}).returncode)
    assert codes == [1, 1, 1, 0]  # retry, retry, retry, finished: Cloud Run stops either way
    failed = of_type(stack.events(lambda got: of_type(got, FAILED), timeout=60), FAILED)
    assert len(failed) == 1 and failed[0]["attempt"] == 4 and failed[0]["code"] == "internal"
    status = json.loads(
        stack.s3.get_object(Bucket=stack.bucket, Key=f"status/{failed[0]['cover_id']}.json")["Body"].read()
    )
    assert status["state"] == "failed"


def test_the_last_delivery_to_a_runner_publishes_cover_failed_once(stack):
    stack.start_worker("gpu-1", COVER_WORK_DIR=_unusable_work_dir(stack), COVER_MAX_ATTEMPTS="3")
    request = CoverRequest(song_id="song-1", voice_model=demo.DEMO_VOICE, options=FAST)
    stack.publish_request(*to_message(REQUESTED, request))
    events = stack.events(lambda got: of_type(got, FAILED), timeout=120)
    events += stack.events(lambda got: False, timeout=15)  # nothing more: the message was acknowledged
    failed = of_type(events, FAILED)
    assert len(failed) == 1 and failed[0]["attempt"] == 3 and failed[0]["retryable"] is True


def test_a_render_whose_runner_is_gone_shows_as_stalled(stack):
    """The lease is the heartbeat: a running cover whose claim lapsed (its runner stopped renewing
    it) is answered as stalled until a redelivery takes it over."""
    from shared.events import CoverStatus, now

    url = stack.start_dispatcher()
    cid = "ab" * 16
    running = CoverStatus(cover_id=cid, state="running", stage="separate", progress=0.4, updated_at=now())
    stack.s3.put_object(Bucket=stack.bucket, Key=f"status/{cid}.json", Body=running.model_dump_json().encode())
    for expires_at, state in ((time.time() + 60, "running"), (time.time() - 1, "stalled")):
        claim = {"runner": "gpu-1", "token": "t", "expires_at": expires_at}
        stack.s3.put_object(Bucket=stack.bucket, Key=f"claims/{cid}/000000.json", Body=json.dumps(claim).encode())
        answer = requests.get(f"{url}/covers/{cid}")
        assert answer.status_code == 200 and answer.json()["state"] == state
        assert answer.json()["stage"] == "separate"  # where it stopped


def test_a_message_over_4_mb_does_not_stop_a_runner_s_subscription(emulator):
    """Pub/Sub carries messages up to 10 MB; the client library opens the emulator's channel with
    gRPC's 4 MB receive limit, and one larger message stopped the whole stream (nothing behind it
    arrived). The runners' subscriber (shared.bus.subscriber_client) receives both, as in Google Cloud."""
    import threading
    import uuid

    from google.cloud import pubsub_v1

    from shared.bus import subscriber_client

    name = f"big-{uuid.uuid4().hex[:8]}"
    publisher, subscriber = pubsub_v1.PublisherClient(), subscriber_client()
    topic, subscription = f"projects/melodia-local/topics/{name}", f"projects/melodia-local/subscriptions/{name}"
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic)
    publisher.publish(topic, b"x" * 8_000_000).result(timeout=30)
    publisher.publish(topic, b"a request behind it").result(timeout=30)
    got, both = [], threading.Event()

    def take(message):
        got.append(len(message.data))
        message.ack()
        if len(got) == 2:
            both.set()

    future = subscriber.subscribe(subscription, take)
    try:
        assert both.wait(60), f"received {got}"
    finally:
        future.cancel()
    assert sorted(got) == [19, 8_000_000]

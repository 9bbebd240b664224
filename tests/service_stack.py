"""The service's test stack: the Pub/Sub emulator, moto's S3 server on 127.0.0.1, a bucket and
topics of one test's own, and the dispatcher and workers as processes (fixtures in conftest.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import jsonschema
import numpy as np
import pytest
from in_process import run_main

from job.devkit import demo
from job.devkit.stack import free_port, start, start_pubsub_emulator, start_s3, stop, wait_for_port
from shared.events import COMPLETED

ROOT = Path(__file__).resolve().parent.parent
FAST = {"f0_method": "pm", "format": "mp3"}


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    proc, host = start_pubsub_emulator(tmp_path_factory.mktemp("logs") / "pubsub.log")
    os.environ["PUBSUB_EMULATOR_HOST"] = host
    yield host
    stop(proc)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    proc, endpoint = start_s3(tmp_path_factory.mktemp("logs") / "s3.log")
    yield endpoint
    stop(proc)


class Stack:
    """One test's topics, subscriptions, bucket, dispatcher and workers."""

    def __init__(self, emulator: str, s3: str, models: Path, tmp: Path) -> None:
        from google.cloud import pubsub_v1

        tag = uuid.uuid4().hex[:8]
        self.tmp = tmp
        self.project = "melodia-test"
        self.bucket = f"covers-{tag}"
        self.publisher = pubsub_v1.PublisherClient()
        self.subscriber = pubsub_v1.SubscriberClient()
        self.requests_topic = self.publisher.topic_path(self.project, f"cover-requests-{tag}")
        self.events_topic = self.publisher.topic_path(self.project, f"cover-events-{tag}")
        for topic in (self.requests_topic, self.events_topic):
            self.publisher.create_topic(name=topic)
        self.worker_sub = self.subscription(self.requests_topic, f"workers-{tag}")
        self.catalog_sub = self.subscription(self.events_topic, f"catalog-{tag}")
        self.s3 = boto3.client(
            "s3", endpoint_url=s3, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
        )
        self.s3.create_bucket(Bucket=self.bucket)
        self.env = {
            **os.environ,
            "PUBSUB_EMULATOR_HOST": emulator,
            "COVER_STORAGE": "s3",
            "COVER_BUCKET": self.bucket,
            "COVER_S3_ENDPOINT": s3,
            "COVER_S3_REGION": "us-east-1",
            "COVER_S3_ACCESS_KEY_ID": "test",
            "COVER_S3_SECRET_ACCESS_KEY": "test",
            "COVER_PROJECT": self.project,
            "COVER_REQUESTS_TOPIC": self.requests_topic.rsplit("/", 1)[1],
            "COVER_EVENTS_TOPIC": self.events_topic.rsplit("/", 1)[1],
            "COVER_EXECUTIONS_TOPIC": f"cover-executions-ended-{tag}",
            "COVER_REQUESTS_SUBSCRIPTION": self.worker_sub.rsplit("/", 1)[1],
            "COVER_MODELS_DIR": str(models),
            "COVER_WORK_DIR": str(tmp / "work"),
            "COVER_BUSY_RETRY_S": "1",
            "COVER_MESSAGE_LEASE_EXTENSION_S": "10",  # a killed runner's message comes back within ~10 s
            "COVER_LOG_LEVEL": "INFO",
            "COVER_QUALITY": "off",  # random-weight voices; the quality stage and its gate have tests of their own
        }
        self.procs: list[subprocess.Popen] = []
        self.url = ""

    def subscription(
        self, topic: str, name: str, ack_deadline: int = 10, filter_: str = "", dead_letter: str | None = None
    ) -> str:
        """A subscription; with ``dead_letter`` (a topic), Pub/Sub's policy of 5 delivery attempts."""
        path = self.subscriber.subscription_path(self.project, name)
        request = {"name": path, "topic": topic, "ack_deadline_seconds": ack_deadline, "filter": filter_}
        if dead_letter:
            request["dead_letter_policy"] = {"dead_letter_topic": dead_letter, "max_delivery_attempts": 5}
        self.subscriber.create_subscription(request=request)
        return path

    def dead_letter_topic(self) -> tuple[str, str]:
        """A dead-letter topic of this test's own and a subscription that keeps what reaches it."""
        topic = self.publisher.topic_path(self.project, f"dead-letter-{uuid.uuid4().hex[:8]}")
        self.publisher.create_topic(name=topic)
        return topic, self.subscription(topic, f"{topic.rsplit('/', 1)[1]}-keep")

    def put_song(self, song_id: str, path: Path) -> None:
        self.s3.upload_file(str(path), self.bucket, f"songs/{song_id}")

    def start_dispatcher(self, bin_dir: Path | None = None, **env: str) -> str:
        port = free_port()
        cmd = [
            str((bin_dir or Path(sys.executable).parent) / "functions-framework"),
            "--source",
            str(ROOT / "dispatcher/main.py"),
            "--target",
            "http",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ]
        full = {**self.env, "COVER_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}", "PYTHONPATH": str(ROOT), **env}
        self.procs.append(start(cmd, self.tmp / "dispatcher.log", full))
        wait_for_port(port, 60, self.procs[-1])
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def start_worker(self, name: str, **env: str) -> subprocess.Popen:
        full = {**self.env, "COVER_RUNNER": name, **env}
        proc = start([sys.executable, "-m", "job", "serve"], self.tmp / f"{name}.log", full)
        self.procs.append(proc)
        return proc

    def publish_request(self, data: bytes, attributes: dict[str, str] | None = None) -> str:
        """Publish to the requests topic; the Pub/Sub message id."""
        return self.publisher.publish(self.requests_topic, data, **(attributes or {})).result(30)

    def events(self, until, timeout: float = 240.0, subscription: str | None = None) -> list[tuple[str, dict]]:
        """Pull (synchronously) from the Catalog's subscription until ``until(events)`` holds."""
        got: list[tuple[str, dict]] = []
        deadline = time.monotonic() + timeout
        sub = subscription or self.catalog_sub
        while time.monotonic() < deadline and not until(got):
            wait = max(1.0, min(10.0, deadline - time.monotonic()))  # a quiet topic costs no more than asked
            response = self.subscriber.pull(subscription=sub, max_messages=50, timeout=wait, return_immediately=False)
            if response.received_messages:
                self.subscriber.acknowledge(subscription=sub, ack_ids=[m.ack_id for m in response.received_messages])
            for item in response.received_messages:
                got.append(
                    (
                        item.message.attributes["ce-type"],
                        {**json.loads(item.message.data), "_attributes": dict(item.message.attributes)},
                    )
                )
        return got

    def close(self) -> None:
        for proc in self.procs:
            stop(proc)


def run_job_here(env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -m job run``, as a Cloud Run task runs it, in this process: the entry point's
    ``main`` with ``env`` as the whole environment (as Google's Cloud Run job samples test theirs).
    Kills and resource limits need a process of their own (tests/test_faults.py)."""
    from job.service.entry import main

    return run_main(main, ["run"], env)


def of_type(events, kind):
    return [data for t, data in events if t == kind]


@pytest.fixture
def stack(emulator, s3, store, tmp_path):
    stack = Stack(emulator, s3, store, tmp_path)
    vocals, inst = demo.demo_song(5.0)
    from job.render.media.audio import write_wav

    stack.put_song("song-1", write_wav(tmp_path / "song.wav", np.clip(vocals + inst, -1, 1), 44100))
    yield stack
    stack.close()


def assert_matches_schema(event_type: str, event: dict) -> None:
    """The event's data validates against its published JSON Schema (what the Catalog codes against)."""
    schema = json.loads((ROOT / "schemas" / f"{event_type}.schema.json").read_text())
    jsonschema.validate({k: v for k, v in event.items() if k != "_attributes"}, schema)


def _check_against_bucket(stack: Stack, completed: dict) -> None:
    assert_matches_schema(COMPLETED, completed)
    body = stack.s3.get_object(Bucket=completed["bucket"], Key=completed["key"])["Body"].read()
    assert len(body) == completed["size_bytes"]
    assert hashlib.sha256(body).hexdigest() == completed["sha256"]
    assert completed["format"] == "mp3" and completed["duration_s"] == pytest.approx(5.0, abs=0.1)
    assert completed["loudness_lufs"] == pytest.approx(-14.0, abs=0.5)

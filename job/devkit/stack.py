"""The local stack: the Pub/Sub emulator, storage, the dispatcher and a worker on this machine.

``make serve`` (``python -m job.devkit.stack``) starts them all on 127.0.0.1 with the embedded local
storage, puts the demo song in the catalog as ``songs/demo``, prints how to ``curl`` the API, and
stops everything (each service's whole process group) on Ctrl-C. The tests use the same helpers to
start the emulator and moto's S3 server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session, so that stopping it stops every child (gcloud's java too)."""
    handle = open(log, "ab")  # noqa: SIM115 - the child writes to it for its whole life
    return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def start_pubsub_emulator(log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = start(
        [
            "gcloud",
            "beta",
            "emulators",
            "pubsub",
            "start",
            f"--host-port=127.0.0.1:{port}",
            "--project=melodia-test",
            "--quiet",
        ],
        log,
    )
    wait_for_port(port, 90, proc)
    return proc, f"127.0.0.1:{port}"


def start_s3(log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    proc = start([str(moto), "-H", "127.0.0.1", "-p", str(port)], log)
    wait_for_port(port, 60, proc)
    return proc, f"http://127.0.0.1:{port}"


def create_topics(project: str, requests_topic: str, events_topic: str, worker_subscription: str) -> None:
    from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # namespace package, untyped

    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    for topic in (requests_topic, events_topic):
        publisher.create_topic(name=publisher.topic_path(project, topic))
    subscriber.create_subscription(
        name=subscriber.subscription_path(project, worker_subscription),
        topic=publisher.topic_path(project, requests_topic),
        ack_deadline_seconds=60,
    )
    subscriber.create_subscription(
        name=subscriber.subscription_path(project, "catalog"), topic=publisher.topic_path(project, events_topic)
    )


def main() -> int:
    import signal as signals

    from job.devkit import demo
    from shared.settings import Settings
    from shared.storage import LocalStorage

    settings = Settings()
    logs = settings.work_dir / "stack-logs"
    logs.mkdir(parents=True, exist_ok=True)
    print("preparing demo models and song ...", flush=True)
    demo.write_models(settings.models_dir)
    song = demo.write_demo_song(settings.work_dir / "demo-song.wav")
    LocalStorage(settings.storage_dir).upload_file("songs/demo", song, "audio/wav")
    emulator, host = start_pubsub_emulator(logs / "pubsub.log")
    os.environ["PUBSUB_EMULATOR_HOST"] = host
    create_topics(settings.project, settings.requests_topic, settings.events_topic, settings.requests_subscription)
    env = {**os.environ, "COVER_STORAGE": "local", "PUBSUB_EMULATOR_HOST": host}
    port = int(os.environ.get("PORT", "8080"))
    root = Path(__file__).resolve().parents[2]
    dispatcher = start(
        [
            str(Path(sys.executable).parent / "functions-framework"),
            "--source",
            str(root / "dispatcher" / "main.py"),
            "--target",
            "http",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        logs / "dispatcher.log",
        {**env, "PYTHONPATH": str(root)},
    )
    worker = start([sys.executable, "-m", "job", "serve"], logs / "worker.log", {**env, "COVER_RUNNER": "local-worker"})
    procs = [worker, dispatcher, emulator]
    try:
        wait_for_port(port, 60, dispatcher)
        print(
            f"""
melodia-cover is up (logs in {logs}):
  curl -s -X POST http://127.0.0.1:{port}/cover -H 'Content-Type: application/json' \\
       -d '{{"song_id": "demo", "voice_model": "{demo.DEMO_VOICE}"}}'
  curl -s http://127.0.0.1:{port}/covers/COVER_ID
  curl -s http://127.0.0.1:{port}/models
Pub/Sub emulator: PUBSUB_EMULATOR_HOST={host}, project {settings.project}, requests topic
  {settings.requests_topic}, events topic {settings.events_topic}; one request by hand, as a Cloud Run task:
  PUBSUB_EMULATOR_HOST={host} COVER_STORAGE=local \\
  COVER_REQUEST='{{"song_id": "demo", "voice_model": "{demo.DEMO_VOICE}"}}' python -m job run
covers land in {settings.storage_dir}/covers/; Ctrl-C stops everything.""",
            flush=True,
        )
        stopped = False

        def on_signal(*_):
            nonlocal stopped
            stopped = True

        signals.signal(signals.SIGTERM, on_signal)
        signals.signal(signals.SIGINT, on_signal)
        while not stopped and all(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        for proc in procs:
            stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

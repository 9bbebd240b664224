"""The local stack: the Pub/Sub emulator, storage, the dispatcher and a worker on this machine.

``make serve`` (``python -m job.devkit.stack``) starts the production topology on 127.0.0.1
(:class:`Rehearsal`) with the configured storage (the embedded local folder by default), puts the
demo song in the catalog as ``songs/demo``, prints how to reach everything, and stops everything
(each service's whole process group) on Ctrl-C. The tests use the same helpers to
start the emulator and moto's S3 server.
"""

from __future__ import annotations

import contextlib
import json
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
    return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)  # noqa: S603 - an argument list, never a shell


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


CATALOG_FILTER = 'attributes.type = "cover.completed" OR attributes.type = "cover.failed"'


class Rehearsal:
    """The production topology on loopback (the default of ``make serve``).

    * the public API (``dispatcher/main.py`` ``http``) on ``port``;
    * the push trigger (``trigger``) on ``trigger_port``, fed by the emulator's **push** subscription
      ``{requests_topic}-cpu`` and starting each job execution as child processes with Cloud Run's task
      environment, retried up to ``COVER_JOB_MAX_RETRIES`` (``dispatcher/local_jobs.py``);
    * a GPU runner (``python -m job serve``; on the CPU when there is no GPU) pulling its own
      subscription ``COVER_REQUESTS_SUBSCRIPTION``; restarted when it dies;
    * a Catalog subscription ``{events_topic}-catalog`` filtered on completed and failed events;
    * the answers for what the platform ends (``unanswered``) on ``answers_port``: both request
      subscriptions dead-letter to ``{requests_topic}-dead-letter`` after ``dead_letter_attempts``
      deliveries, pushed to it from ``{requests_topic}-dead-letter-answer``; the local launcher
      signals each failed execution on ``COVER_EXECUTIONS_TOPIC``, pushed to it from
      ``{executions_topic}-answer``.

    The subscriptions carry the filters of ``shared/routing.py``. The emulator accepts filters but
    does not apply them, so each consumer also checks the route (``COVER_SERVES``) and acknowledges
    what is not its own: every request is rendered by exactly one of the two paths.

    Args:
        settings: the stack's settings (storage, topics, project)
        logs: the folder every process's log goes to
        port: the API's port
        trigger_port: the push trigger's port
        emulator: a running Pub/Sub emulator's ``HOST:PORT`` (default: start one)
        answers_port: the ``unanswered`` function's port (0: any free one)
        dead_letter_attempts: Pub/Sub's delivery attempts before a request is dead-lettered (5 to 100)
    """

    def __init__(
        self,
        settings,
        logs: Path,
        port: int,
        trigger_port: int,
        emulator: str | None = None,
        answers_port: int = 0,
        dead_letter_attempts: int = 5,
    ) -> None:
        from shared.routing import subscription_filters

        self.settings = settings
        self.logs = logs
        self.port = port
        self.trigger_port = trigger_port
        self.emulator_host = emulator
        self.filters = subscription_filters(settings.default_runner)
        self.push_subscription = f"{settings.requests_topic}-cpu"
        self.catalog_subscription = f"{settings.events_topic}-catalog"
        self.answers_port = answers_port or free_port()
        self.dead_letter_topic = f"{settings.requests_topic}-dead-letter"
        self.dead_letter_attempts = dead_letter_attempts
        self.procs: dict[str, subprocess.Popen] = {}
        self.root = Path(__file__).resolve().parents[2]

    def _env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "PUBSUB_EMULATOR_HOST": str(self.emulator_host),
            "PYTHONPATH": str(self.root),
            "COVER_PUBLIC_BASE_URL": f"http://127.0.0.1:{self.port}",
            **extra,
        }

    def _function(self, target: str, port: int, **env: str) -> subprocess.Popen:
        framework = Path(sys.executable).parent / "functions-framework"
        cmd = [str(framework), "--source", str(self.root / "dispatcher" / "main.py"), "--target", target]
        return start([*cmd, "--host", "127.0.0.1", "--port", str(port)], self.logs / f"{target}.log", self._env(**env))

    def _gpu_runner(self) -> subprocess.Popen:
        env = self._env(
            COVER_SERVES="gpu",
            COVER_RUNNER=os.environ.get("COVER_RUNNER", "gpu-runner"),
            # as Terraform sets it (gpu_max_delivery_attempts), unless the environment says otherwise
            COVER_MAX_ATTEMPTS=os.environ.get("COVER_MAX_ATTEMPTS", str(self.dead_letter_attempts)),
        )
        return start([sys.executable, "-m", "job", "serve"], self.logs / "gpu-runner.log", env)

    def _topology(self) -> None:
        """The topics and subscriptions (kept when they exist: an emulator shared with other work)."""
        from google.api_core.exceptions import AlreadyExists
        from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # namespace package, untyped

        s = self.settings
        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        requests_topic = publisher.topic_path(s.project, s.requests_topic)
        events_topic = publisher.topic_path(s.project, s.events_topic)
        dead_letter_topic = publisher.topic_path(s.project, self.dead_letter_topic)
        executions_topic = publisher.topic_path(s.project, s.executions_topic)
        for topic in (requests_topic, events_topic, dead_letter_topic, executions_topic):
            with contextlib.suppress(AlreadyExists):
                publisher.create_topic(name=topic)
        dead_letter = {"dead_letter_topic": dead_letter_topic, "max_delivery_attempts": self.dead_letter_attempts}
        answers = {"push_endpoint": f"http://127.0.0.1:{self.answers_port}/"}
        subscriptions = [
            {
                "name": subscriber.subscription_path(s.project, self.push_subscription),
                "topic": requests_topic,
                "ack_deadline_seconds": 60,
                "filter": self.filters["cpu"],
                "push_config": {"push_endpoint": f"http://127.0.0.1:{self.trigger_port}/"},
                "dead_letter_policy": dead_letter,
            },
            {
                "name": subscriber.subscription_path(s.project, s.requests_subscription),
                "topic": requests_topic,
                "ack_deadline_seconds": 60,
                "filter": self.filters["gpu"],
                "dead_letter_policy": dead_letter,
            },
            {
                "name": subscriber.subscription_path(s.project, self.catalog_subscription),
                "topic": events_topic,
                "filter": CATALOG_FILTER,
            },
            {
                "name": subscriber.subscription_path(s.project, f"{self.dead_letter_topic}-answer"),
                "topic": dead_letter_topic,
                "push_config": answers,
            },
            {
                "name": subscriber.subscription_path(s.project, f"{s.executions_topic}-answer"),
                "topic": executions_topic,
                "push_config": answers,
            },
        ]
        for subscription in subscriptions:
            with contextlib.suppress(AlreadyExists):
                subscriber.create_subscription(request=subscription)

    def start(self) -> None:
        if self.emulator_host is None:
            self.procs["emulator"], self.emulator_host = start_pubsub_emulator(self.logs / "pubsub.log")
        os.environ["PUBSUB_EMULATOR_HOST"] = self.emulator_host
        self._topology()
        self.procs["http"] = self._function("http", self.port)
        self.procs["trigger"] = self._function(
            "trigger",
            self.trigger_port,
            COVER_JOB_LAUNCHER="local",
            COVER_SERVES="cpu",
            COVER_RUNNER=os.environ.get("COVER_JOB_RUNNER", "cloud-run-job"),
        )
        self.procs["unanswered"] = self._function("unanswered", self.answers_port, COVER_JOB_LAUNCHER="local")
        self.procs["gpu-runner"] = self._gpu_runner()
        wait_for_port(self.port, 60, self.procs["http"])
        wait_for_port(self.trigger_port, 60, self.procs["trigger"])
        wait_for_port(self.answers_port, 60, self.procs["unanswered"])

    def banner(self) -> str:
        s = self.settings
        # the demo's models have random weights: let through what the quality gate would stop
        request = json.dumps(
            {"song_id": "demo", "voice_model": "VOICE", "publish_below_gate": True, "allow_no_vocals": True}
        )
        return f"""
melodia-cover is up, in the production topology (logs in {self.logs}):
  API        http://127.0.0.1:{self.port}   (POST /cover, GET /covers/ID, GET /models, GET /openapi.json)
  trigger    http://127.0.0.1:{self.trigger_port}   push subscription {self.push_subscription}: each request
             routed to "cpu" runs as a job execution (python -m job run, Cloud Run's task env,
             up to {s.job_max_retries} retries)
  GPU runner python -m job serve on subscription {s.requests_subscription} (requests routed to "gpu")
  answers    http://127.0.0.1:{self.answers_port}   requests dead-lettered after {self.dead_letter_attempts} deliveries
             ({self.dead_letter_topic}) and failed executions ({s.executions_topic}) get cover.failed
  Pub/Sub    PUBSUB_EMULATOR_HOST={self.emulator_host}, project {s.project}, topics {s.requests_topic} and
             {s.events_topic}; the Catalog's subscription {self.catalog_subscription} ({CATALOG_FILTER})
  default runner for requests that name none: {s.default_runner}

  curl -s -X POST http://127.0.0.1:{self.port}/cover -H 'Content-Type: application/json' \\
       -d '{request}'
  (the demo's models have random weights: the request lets what the quality gate would stop through)
  curl -s http://127.0.0.1:{self.port}/covers/COVER_ID
  one request by hand, as a Cloud Run task:
  PUBSUB_EMULATOR_HOST={self.emulator_host} COVER_STORAGE={s.storage} \\
  COVER_REQUEST='{request}' \\
  {sys.executable} -m job run
Ctrl-C stops everything."""

    def watch(self, stopped) -> None:
        """Until ``stopped()``: a GPU runner that dies is reported and started again; a function or the
        emulator that dies ends the stack."""
        while not stopped():
            runner = self.procs["gpu-runner"]
            if runner.poll() is not None:
                print(f"the GPU runner exited with {runner.returncode}; starting it again", flush=True)
                self.procs["gpu-runner"] = self._gpu_runner()
            for name, proc in self.procs.items():
                if name != "gpu-runner" and proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}: stopping the stack", flush=True)
                    return
            time.sleep(0.5)

    def stop(self) -> None:
        for name in ("gpu-runner", "trigger", "unanswered", "http", "emulator"):
            if name in self.procs:
                stop(self.procs[name])


def main(argv: list[str] | None = None) -> int:
    import argparse
    import signal as signals

    from job.devkit import demo
    from shared.settings import Settings
    from shared.storage import make_storage

    parser = argparse.ArgumentParser(prog="python -m job.devkit.stack", description=Rehearsal.__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")), help="the API's port")
    parser.add_argument("--trigger-port", type=int, default=0, help="the push trigger's port (0: any free one)")
    parser.add_argument("--emulator", help="use this running Pub/Sub emulator (HOST:PORT) instead of starting one")
    parser.add_argument(
        "--dead-letter-attempts",
        type=int,
        default=5,
        choices=range(5, 101),
        metavar="5..100",
        help="Pub/Sub's delivery attempts before a request is dead-lettered (default 5, as deployed)",
    )
    args = parser.parse_args(argv)
    settings = Settings()
    logs = settings.work_dir / "stack-logs"
    logs.mkdir(parents=True, exist_ok=True)
    print("preparing demo models and song ...", flush=True)
    demo.write_models(settings.models_dir)
    song = demo.write_demo_song(settings.work_dir / "demo-song.wav")
    make_storage(settings).upload_file("songs/demo", song, "audio/wav")
    rehearsal = Rehearsal(
        settings,
        logs,
        args.port,
        args.trigger_port or free_port(),
        args.emulator,
        dead_letter_attempts=args.dead_letter_attempts,
    )
    stopped = False

    def on_signal(*_):
        nonlocal stopped
        stopped = True

    signals.signal(signals.SIGTERM, on_signal)
    signals.signal(signals.SIGINT, on_signal)
    try:
        rehearsal.start()
        print(rehearsal.banner().replace("VOICE", demo.DEMO_VOICE), flush=True)  # tests wait for its first line
        rehearsal.watch(lambda: stopped)
    finally:
        rehearsal.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``unanswered`` function's reading of executions (its answers run on the rehearsal stack:
tests/test_rehearsal.py)."""

from __future__ import annotations

import json

import pytest
from google.cloud import run_v2

from dispatcher.executions import CloudRunExecutions, ExecutionState, LocalExecutions
from dispatcher.unanswered import EXECUTION_LABEL, Unanswered
from shared.settings import Settings

JOB = "projects/p/locations/europe-west1/jobs/cover-job"


class FakeExecutionsClient:
    """A fake of Cloud Run's Admin API (nothing here can run it): answers get_execution with a real
    ``run_v2.Execution`` message, as the client library returns it."""

    def __init__(self, execution: run_v2.Execution) -> None:
        self.execution = execution
        self.asked: list[str] = []

    def get_execution(self, name: str) -> run_v2.Execution:
        self.asked.append(name)
        return self.execution


def test_an_execution_is_read_from_the_admin_api_with_the_request_its_trigger_gave_it():
    env = [
        run_v2.EnvVar(name="COVER_REQUEST", value='{"song_id": "s"}'),
        run_v2.EnvVar(name="COVER_REQUEST_ID", value="r1"),
    ]
    execution = run_v2.Execution(
        task_count=1,
        failed_count=1,
        retried_count=3,
        completion_time={"seconds": 1_800_000_000},
        template=run_v2.TaskTemplate(containers=[run_v2.Container(env=env)]),
    )
    client = FakeExecutionsClient(execution)
    state = CloudRunExecutions(Settings(cloud_run_job=JOB), client).get("cover-job-x1")
    assert client.asked == [f"{JOB}/executions/cover-job-x1"]
    assert state == ExecutionState(
        name="cover-job-x1",
        finished=True,
        succeeded=False,
        attempts=4,
        env={"COVER_REQUEST": '{"song_id": "s"}', "COVER_REQUEST_ID": "r1"},
    )
    running = CloudRunExecutions(Settings(cloud_run_job=JOB), FakeExecutionsClient(run_v2.Execution(task_count=1)))
    assert running.get("cover-job-x2").finished is False


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"textPayload": "Container called exit(1)."}, "names no execution"),
        ({"labels": {EXECUTION_LABEL: "cover-job-gone"}}, "no execution cover-job-gone"),
        ({"labels": {EXECUTION_LABEL: "cover-job-running"}}, "running or succeeded"),
        ({"labels": {EXECUTION_LABEL: "cover-job-done"}}, "running or succeeded"),
    ],
)
def test_a_signal_for_an_execution_that_may_still_answer_is_left_alone(tmp_path, entry, reason):
    """A retried attempt, a success, or an execution it cannot find: nothing is published (the bus
    and the bucket are not even there to be used)."""
    settings = Settings(work_dir=tmp_path, job_launcher="local")
    records = LocalExecutions(settings).folder
    records.mkdir(parents=True)
    for name, finished, succeeded in (("cover-job-running", False, False), ("cover-job-done", True, True)):
        state = ExecutionState(name=name, finished=finished, succeeded=succeeded, attempts=1, env={})
        (records / f"{name}.json").write_text(json.dumps(state.model_dump()))
    answered = Unanswered(None, None, None, None, LocalExecutions(settings)).execution_signal(entry)  # type: ignore[arg-type]
    assert answered.action == "ignored" and reason in answered.reason


def test_the_local_launcher_s_last_attempt_knows_it_is_the_last(monkeypatch, tmp_path):
    """The rehearsal's launcher makes job_max_retries + 1 attempts and tells each attempt so
    (COVER_MAX_ATTEMPTS, as Terraform sets it in the job): with 4 attempts but the default 5, a
    retryable failure was never answered. Each attempt here is a real child process that reports
    what it was told and fails."""
    import subprocess
    import sys

    from dispatcher import local_jobs
    from dispatcher.local_jobs import LocalJobs
    from shared.settings import Settings

    told: list[tuple[str, str]] = []
    real = subprocess.Popen

    def attempt(cmd, env, cwd):
        told.append((env["COVER_MAX_ATTEMPTS"], env["CLOUD_RUN_TASK_ATTEMPT"]))
        return real([sys.executable, "-c", "raise SystemExit(1)"], env=env, cwd=cwd)

    monkeypatch.setattr(local_jobs.subprocess, "Popen", attempt)
    launcher = LocalJobs(Settings(job_max_retries=3, max_attempts=5, executions_topic="", work_dir=tmp_path))
    launcher._execute("cover-job-test", {"COVER_REQUEST": "{}"})
    assert told == [("4", "0"), ("4", "1"), ("4", "2"), ("4", "3")]


def test_the_local_launcher_runs_at_most_its_slots_at_once(monkeypatch, tmp_path):
    """Eight requests at once no longer start eight job processes: with two slots, two attempts
    run at a time and the rest wait (each a real child process, here one that sleeps)."""
    import subprocess
    import sys
    import threading
    import time

    from dispatcher import local_jobs
    from dispatcher.local_jobs import LocalJobs
    from shared.settings import Settings

    alive, most, lock = [0], [0], threading.Lock()
    real = subprocess.Popen

    class Counted:
        def __init__(self, cmd, env, cwd):
            self.proc = real([sys.executable, "-c", "import time; time.sleep(0.4)"], env=env, cwd=cwd)
            self.pid = self.proc.pid
            with lock:
                alive[0] += 1
                most[0] = max(most[0], alive[0])

        def wait(self, timeout=None):
            code = self.proc.wait(timeout)
            with lock:
                alive[0] -= 1
            return code

        def kill(self):
            self.proc.kill()

    monkeypatch.setattr(local_jobs.subprocess, "Popen", Counted)
    launcher = LocalJobs(Settings(local_job_slots=2, executions_topic="", work_dir=tmp_path))
    names = [launcher.launch({"COVER_REQUEST": "{}"}) for _ in range(6)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(
        (launcher.records / f"{n}.json").exists() and '"finished":true' in (launcher.records / f"{n}.json").read_text()
        for n in names
    ):
        time.sleep(0.1)
    assert most[0] == 2

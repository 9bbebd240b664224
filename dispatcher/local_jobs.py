"""The trigger's local launcher (``COVER_JOB_LAUNCHER=local``, the rehearsal stack of ``make serve``).

A Cloud Run Job execution, played by child processes: each attempt is ``python -m job run`` with the
environment Cloud Run gives a task (``CLOUD_RUN_JOB``, ``CLOUD_RUN_EXECUTION``,
``CLOUD_RUN_TASK_INDEX``, ``CLOUD_RUN_TASK_COUNT``, ``CLOUD_RUN_TASK_ATTEMPT`` counted from 0) plus the
trigger's overrides (``COVER_REQUEST``, ``COVER_REQUEST_ID``). An attempt that exits non-zero or dies
(a crash, a kill; one that runs past ``COVER_JOB_TASK_TIMEOUT_S`` is killed, as Cloud Run's task
timeout does) is retried at once, up to ``COVER_JOB_MAX_RETRIES`` times, as Cloud Run retries a
task; then the execution has failed, which is logged (``execution.failed``) and signalled on
``COVER_EXECUTIONS_TOPIC`` with a message shaped as Cloud Run's log entry (what the log sink
forwards in Google Cloud), for the ``unanswered`` function. Each execution's state is kept in
``{work_dir}/executions/{name}.json`` (what the Admin API tells in Google Cloud:
:class:`dispatcher.executions.LocalExecutions`). Each attempt's pid is logged
(``execution.attempt``), its output goes to the trigger's.

Executions run at most ``COVER_LOCAL_JOB_SLOTS`` at a time (0: one per 2 GiB of the machine's
memory, an attempt's process takes about 0.75 GB); the others wait for a slot, as executions wait
for Cloud Run's resources, accepted and not finished (eight requests once started eight processes
and 6.3 GB at once).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from dispatcher.executions import ExecutionState, local_records
from shared.bus import EventBus
from shared.logs import fields
from shared.settings import Settings

log = logging.getLogger("melodia.local_jobs")
ROOT = Path(__file__).resolve().parents[1]


def job_slots(settings: Settings) -> int:
    """How many local executions run at once (``COVER_LOCAL_JOB_SLOTS``; 0: one per 2 GiB of memory)."""
    if settings.local_job_slots:
        return settings.local_job_slots
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, memory // (2 * 2**30))


class LocalJobs:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.job = settings.cloud_run_job.rsplit("/", 1)[-1]
        self.records = local_records(settings)
        self.records.mkdir(parents=True, exist_ok=True)
        self.slots = threading.BoundedSemaphore(job_slots(settings))

    def _record(self, state: ExecutionState) -> None:
        path = self.records / f"{state.name}.json"
        path.with_suffix(".tmp").write_text(state.model_dump_json())
        path.with_suffix(".tmp").replace(path)

    def _signal_failed(self, execution: str) -> None:
        """What Cloud Run's log sink forwards for a failed execution, on the executions topic."""
        entry = {
            "logName": f"projects/{self.settings.project}/logs/run.googleapis.com%2Fvarlog%2Fsystem",
            "resource": {"type": "cloud_run_job", "labels": {"job_name": self.job}},
            "labels": {"run.googleapis.com/execution_name": execution},
            "severity": "ERROR",
            "textPayload": f"Execution {execution} has failed to complete.",
        }
        bus = EventBus(self.settings)
        bus.publisher.publish(bus.topic(self.settings.executions_topic), json.dumps(entry).encode()).result(30)

    def launch(self, overrides: dict[str, str]) -> str:
        """Start an execution in the background (as the Admin API accepts one); its name."""
        execution = f"{self.job}-{uuid.uuid4().hex[:5]}"
        threading.Thread(target=self._execute, args=(execution, overrides), name=execution, daemon=True).start()
        return execution

    def _execute(self, execution: str, overrides: dict[str, str]) -> None:
        self._record(ExecutionState(name=execution, finished=False, succeeded=False, attempts=0, env=overrides))
        with self.slots:  # queued, accepted and not finished, until a slot is free
            self._attempts(execution, overrides)

    def _attempts(self, execution: str, overrides: dict[str, str]) -> None:
        attempts = self.settings.job_max_retries + 1
        state = ExecutionState(name=execution, finished=False, succeeded=False, attempts=0, env=overrides)
        for attempt in range(attempts):
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                **overrides,
                "CLOUD_RUN_JOB": self.job,
                "CLOUD_RUN_EXECUTION": execution,
                "CLOUD_RUN_TASK_INDEX": "0",
                "CLOUD_RUN_TASK_COUNT": "1",
                "CLOUD_RUN_TASK_ATTEMPT": str(attempt),
                # as Terraform sets it in the job (max_retries + 1): the last attempt knows it is the last
                # and publishes cover.failed; a larger value would leave a retryable failure unanswered
                "COVER_MAX_ATTEMPTS": str(attempts),
            }
            proc = subprocess.Popen([sys.executable, "-m", "job", "run"], env=env, cwd=ROOT)
            log.info(
                "task attempt started",
                extra=fields(event="execution.attempt", execution=execution, attempt=attempt, pid=proc.pid),
            )
            status = self._wait(proc, execution, attempt)
            state = state.model_copy(update={"attempts": attempt + 1})
            if status == 0:
                self._record(state.model_copy(update={"finished": True, "succeeded": True}))
                log.info("execution succeeded", extra=fields(event="execution.succeeded", execution=execution))
                return
            log.warning(  # a crash of the worker is reported here; the trigger carries on
                "task attempt failed",
                extra=fields(event="execution.attempt_failed", execution=execution, attempt=attempt, status=status),
            )
        self._record(state.model_copy(update={"finished": True}))
        log.error(
            "execution failed: no retries left",
            extra=fields(event="execution.failed", execution=execution, attempts=attempts),
        )
        try:
            self._signal_failed(execution)
        except Exception as exc:  # noqa: BLE001 - logged; Cloud Run's own signal is a log line too
            log.warning(
                "execution signal not sent", extra=fields(event="execution.signal_failed", error=str(exc)[:200])
            )

    def _wait(self, proc: subprocess.Popen[bytes], execution: str, attempt: int) -> int:
        """The attempt's exit status; one that runs past the task timeout is killed (SIGKILL)."""
        try:
            return proc.wait(self.settings.job_task_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning(
                "task attempt timed out: killing it",
                extra=fields(event="execution.attempt_timed_out", execution=execution, attempt=attempt),
            )
            proc.kill()
            return proc.wait()

"""The trigger's local launcher (``COVER_JOB_LAUNCHER=local``, the rehearsal stack of ``make serve``).

A Cloud Run Job execution, played by child processes: each attempt is ``python -m job run`` with the
environment Cloud Run gives a task (``CLOUD_RUN_JOB``, ``CLOUD_RUN_EXECUTION``,
``CLOUD_RUN_TASK_INDEX``, ``CLOUD_RUN_TASK_COUNT``, ``CLOUD_RUN_TASK_ATTEMPT`` counted from 0) plus the
trigger's overrides (``COVER_REQUEST``, ``COVER_REQUEST_ID``). An attempt that exits non-zero or dies
(a crash, a kill) is retried at once, up to ``COVER_JOB_MAX_RETRIES`` times, as Cloud Run retries a
task; then the execution has failed, which is logged (``execution.failed``) and is not the end of
the trigger. Each attempt's pid is logged (``execution.attempt``), its output goes to the trigger's.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from shared.logs import fields
from shared.settings import Settings

log = logging.getLogger("melodia.local_jobs")
ROOT = Path(__file__).resolve().parents[1]


class LocalJobs:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.job = settings.cloud_run_job.rsplit("/", 1)[-1]

    def launch(self, overrides: dict[str, str]) -> str:
        """Start an execution in the background (as the Admin API accepts one); its name."""
        execution = f"{self.job}-{uuid.uuid4().hex[:5]}"
        threading.Thread(target=self._execute, args=(execution, overrides), name=execution, daemon=True).start()
        return execution

    def _execute(self, execution: str, overrides: dict[str, str]) -> None:
        attempts = self.settings.job_max_retries + 1
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
            }
            proc = subprocess.Popen([sys.executable, "-m", "job", "run"], env=env, cwd=ROOT)
            log.info(
                "task attempt started",
                extra=fields(event="execution.attempt", execution=execution, attempt=attempt, pid=proc.pid),
            )
            status = proc.wait()
            if status == 0:
                log.info("execution succeeded", extra=fields(event="execution.succeeded", execution=execution))
                return
            log.warning(  # a crash of the worker is reported here; the trigger carries on
                "task attempt failed",
                extra=fields(event="execution.attempt_failed", execution=execution, attempt=attempt, status=status),
            )
        log.error(
            "execution failed: no retries left",
            extra=fields(event="execution.failed", execution=execution, attempts=attempts),
        )

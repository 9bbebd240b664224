"""What a job execution was asked to do and how it ended: Cloud Run's Admin API, or the local
launcher's records (the rehearsal stack).

The `unanswered` function reads an execution when something signals that it failed (in Google Cloud
a log sink forwards Cloud Run's log entries for the job; locally the launcher publishes its own). The
signal only wakes it: whether the execution is over, whether it failed and which request it ran
come from here, so a signal sent early, twice or for a retried attempt changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from shared.settings import Settings

RUNNING_PAGE = 100


class ExecutionState(BaseModel):
    """One job execution, as far as answering its request needs."""

    name: str = Field(description="The execution's short name (the log entries' execution_name).")
    finished: bool = Field(description="No task is running or will be retried.")
    succeeded: bool = Field(description="Every task succeeded (a finished request answered itself).")
    attempts: int = Field(ge=0, description="Task attempts made.")
    env: dict[str, str] = Field(description="The container's environment: the trigger's COVER_REQUEST override.")


class Executions(Protocol):
    def get(self, name: str) -> ExecutionState | None:
        """The execution ``name`` (short), or None when there is none."""

    def running(self) -> int:
        """Executions of the job not finished yet."""


class CloudRunExecutions:
    """Executions of the job ``settings.cloud_run_job`` through the Admin API (``run.executions.get``)."""

    def __init__(self, settings: Settings, client: Any = None) -> None:
        self.job = settings.cloud_run_job
        self._client = client

    def client(self) -> Any:  # run_v2.ExecutionsClient (the library ships no type information)
        if self._client is None:
            from google.cloud import run_v2

            self._client = run_v2.ExecutionsClient()
        return self._client

    def get(self, name: str) -> ExecutionState | None:
        from google.api_core.exceptions import NotFound

        try:
            execution = self.client().get_execution(name=f"{self.job}/executions/{name}")
        except NotFound:
            return None
        containers = list(execution.template.containers)
        env = {var.name: var.value for var in containers[0].env} if containers else {}
        return ExecutionState(
            name=name,
            finished=bool(execution.completion_time),
            succeeded=execution.succeeded_count >= max(1, execution.task_count),
            attempts=execution.retried_count + max(1, execution.task_count),
            env=env,
        )

    def running(self) -> int:
        """Counted on the newest page of executions (RUNNING_PAGE): more than that many running at
        once is beyond any bound this deployment sets."""
        page = self.client().list_executions(request={"parent": self.job, "page_size": RUNNING_PAGE}).pages
        first = next(iter(page), None)
        return sum(not execution.completion_time for execution in first.executions) if first else 0


class LocalExecutions:
    """The local launcher's records: ``{work_dir}/executions/{name}.json``, one per execution,
    rewritten as it goes (:mod:`dispatcher.local_jobs`)."""

    def __init__(self, settings: Settings) -> None:
        self.folder = local_records(settings)

    def get(self, name: str) -> ExecutionState | None:
        path = self.folder / f"{Path(name).name}.json"
        return ExecutionState.model_validate(json.loads(path.read_text())) if path.exists() else None

    def running(self) -> int:
        states = (ExecutionState.model_validate_json(path.read_text()) for path in self.folder.glob("*.json"))
        return sum(not state.finished for state in states)


def local_records(settings: Settings) -> Path:
    return settings.work_dir / "executions"


def executions(settings: Settings) -> Executions:
    return LocalExecutions(settings) if settings.job_launcher == "local" else CloudRunExecutions(settings)

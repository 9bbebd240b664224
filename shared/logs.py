"""Structured logs in Cloud Logging's JSON shape, one formatter for every entry point.

Each line on standard error is one JSON object: ``severity`` (Cloud Logging's names), ``message``,
``logger``, ``time``, the record's fields (``cover_id``, ``request_id``, ``event``, ``code``...),
``logging.googleapis.com/trace`` when a request carried a trace, and ``stack_trace`` for exceptions.
Cloud Run and Cloud Functions turn such lines into structured entries.

    log.info("cover completed", extra=fields(cover_id=cid, event="cover.completed"))
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import warnings
from datetime import UTC, datetime
from typing import Any

SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}
TRACE_KEY = "logging.googleapis.com/trace"
# notices about our dependencies' own code that no user can act on, left out of every log
QUIETED_WARNINGS = (
    "pkg_resources is deprecated",  # librosa 0.9 imports it, once per process; pinned by setuptools<81
)

trace_context: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace", default=None)


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for a log call: structured fields of the entry (None values are left out)."""
    return {"fields": {k: v for k, v in values.items() if v is not None}}


def set_trace(header: str | None, project: str) -> None:
    """Remember the trace of the request in hand, from ``X-Cloud-Trace-Context: TRACE/SPAN;o=1``."""
    trace = (header or "").split("/", 1)[0].strip()
    trace_context.set(f"projects/{project}/traces/{trace}" if trace else None)


class CloudJsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": SEVERITY.get(record.levelno, "DEFAULT"),
            "message": record.getMessage(),
            "logger": record.name,
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            **getattr(record, "fields", {}),
        }
        trace = trace_context.get()
        if trace:
            entry[TRACE_KEY] = trace
        if record.exc_info:
            entry["stack_trace"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(default_level: str = "INFO") -> None:
    """Every log line as Cloud Logging JSON on standard error, at ``COVER_LOG_LEVEL``."""
    handler = logging.StreamHandler()
    handler.setFormatter(CloudJsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("COVER_LOG_LEVEL", default_level))
    logging.captureWarnings(True)  # Python's warnings (a library's DeprecationWarning) as JSON lines too
    for notice in QUIETED_WARNINGS:
        warnings.filterwarnings("ignore", message=notice)

"""Logs are Cloud Logging JSON, one object a line, from every entry point."""

from __future__ import annotations

import json
import logging

from service_stack import run_job_here

from shared.logs import TRACE_KEY, CloudJsonFormatter, fields, set_trace


def test_a_record_becomes_one_cloud_logging_entry():
    logger = logging.getLogger("melodia.test")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys as system

        record = logger.makeRecord(
            "melodia.test",
            logging.ERROR,
            __file__,
            1,
            "render failed for %s",
            ("x",),
            system.exc_info(),
            extra=fields(cover_id="c1", request_id="r1", song_id=None),
        )
    set_trace("105445aa7843bc8bf206b12000100000/1;o=1", "melodia-prod")
    try:
        entry = json.loads(CloudJsonFormatter().format(record))
    finally:
        set_trace(None, "melodia-prod")
    assert entry["severity"] == "ERROR" and entry["message"] == "render failed for x"
    assert entry["cover_id"] == "c1" and entry["request_id"] == "r1" and "song_id" not in entry
    assert entry[TRACE_KEY] == "projects/melodia-prod/traces/105445aa7843bc8bf206b12000100000"
    assert "ValueError: boom" in entry["stack_trace"]


def test_the_job_entry_point_logs_json_lines(tmp_path):
    """`python -m job run` with no request (its ``main``, in this process): what it logs is JSON a
    line (the runner's own log)."""
    env = {
        "COVER_MODELS_DIR": str(tmp_path),
        "COVER_STORAGE_DIR": str(tmp_path / "bucket"),
        "PATH": "/usr/bin:/bin",
        "COVER_REQUEST": "",
        "COVER_LOG_LEVEL": "DEBUG",
    }
    proc = run_job_here(env)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    assert any(e["severity"] == "ERROR" and e.get("event") == "request.missing" for e in entries), proc.stderr
    assert all(e["severity"] in ("DEBUG", "INFO", "WARNING", "ERROR") and "message" in e for e in entries)

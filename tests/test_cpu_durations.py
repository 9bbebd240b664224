"""``--cpu-durations`` (tests/cpu_durations.py), the list the suite's cuts are chosen from: it
counts a test's own CPU time and its child processes', and ranks by their sum."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SAMPLE = """
import subprocess, sys, time

def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

CHILD = "import time\\nend = time.process_time() + 0.6\\nwhile time.process_time() < end: pass"

def test_in_a_child_process():
    subprocess.run([sys.executable, "-c", CHILD], check=True)

def test_in_the_worker():
    burn(0.3)

def test_waiting():
    time.sleep(0.5)
"""


def test_the_list_ranks_by_cpu_time_and_counts_child_processes(tmp_path: Path):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    tests = Path(__file__).resolve().parent
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "cpu_durations", "--cpu-durations=3", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tests), "PATH": "/usr/bin:/bin", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    listed = out.split("most CPU-costly tests", 1)[1].splitlines()[1:4]
    assert [line.rsplit("::", 1)[1] for line in listed] == [
        "test_in_a_child_process",
        "test_in_the_worker",
        "test_waiting",  # half a second of wall time, no CPU
    ], out
    child = float(listed[0].split("processes ", 1)[1].split(")", 1)[0])
    assert child >= 0.5, listed[0]

"""The deploy files agree with what the tests install (Docker cannot run here: these checks stand in)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_image_installs_exactly_the_core_and_job_pins_before_its_source(tmp_path):
    dockerfile = (ROOT / "Dockerfile").read_text()
    program = re.search(r'python -c "(.*?)" > /tmp/requirements.txt', dockerfile, re.S)
    assert program, "the dependency step is gone"
    code = program[1].replace("\\\n", "")
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    listed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert listed.stdout.splitlines() == project["dependencies"] + project["optional-dependencies"]["job"]
    lines = dockerfile.splitlines()
    install = next(i for i, line in enumerate(lines) if "-r /tmp/requirements.txt" in line)
    first_source = next(i for i, line in enumerate(lines) if re.match(r"COPY (shared|job|dispatcher) ", line))
    assert install < first_source  # a code change does not reinstall torch

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


def test_the_cpu_image_takes_the_cpu_build_of_torch_and_the_gpu_image_the_cuda_build():
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = dict(
        re.findall(r"^FROM (\S+) AS (\S+)", dockerfile, re.M)[i][::-1] for i in range(dockerfile.count(" AS "))
    )
    assert stages["cpu"] == stages["gpu"] == "app" and stages["app"] == "deps-${TORCH}"
    cpu_stage = dockerfile.split("FROM base AS deps-cpu", 1)[1].split("FROM ", 1)[0]
    cuda_stage = dockerfile.split("FROM base AS deps-cuda", 1)[1].split("FROM ", 1)[0]
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in cpu_stage
    assert "download.pytorch.org" not in cuda_stage  # PyPI's Linux wheel: the CUDA build
    assert re.search(r"^ARG TORCH=cpu$", dockerfile, re.M)  # the default build is the CPU one


def _terraform() -> dict:
    import hcl2

    with (ROOT / "infra" / "main.tf").open() as file:
        return hcl2.load(file)


def _resources(tf: dict, kind: str) -> dict:
    """``{name: body}`` of the resources of one kind (python-hcl2 keeps the labels' quotes)."""
    return {
        name.strip('"'): body
        for block in tf["resource"]
        for label, bodies in block.items()
        if label.strip('"') == kind
        for name, body in bodies.items()
        if name != "__is_block__"
    }


def test_the_subscriptions_route_with_shared_routings_filters_for_either_default():
    """infra/main.tf writes the filters of shared/routing.py for both defaults, the trigger's and
    the GPU runners' subscriptions use them, and the dispatcher learns the default."""
    from shared.routing import subscription_filters

    tf = _terraform()
    local = next(block for block in tf["locals"] if "runner_filters" in block)["runner_filters"]
    for default in ("cpu", "gpu"):
        found = re.search(rf'{default} = \{{cpu = "(.*?)", gpu = "(.*?)"\}}', local)
        assert found, local
        written = {"cpu": found[1].replace('\\"', '"'), "gpu": found[2].replace('\\"', '"')}
        assert written == subscription_filters(default)  # type: ignore[arg-type]
    subscriptions = _resources(tf, "google_pubsub_subscription")
    assert subscriptions["trigger"]["filter"] == "${local.runner_filters.cpu}"
    assert subscriptions["gpu"]["filter"] == "${local.runner_filters.gpu}"
    env = next(block for block in tf["locals"] if "common_env" in block)["common_env"]
    assert env["COVER_DEFAULT_RUNNER"] == "${var.default_runner}"


def test_each_path_s_attempt_limit_is_the_platform_s():
    """The job's last Cloud Run attempt and the GPU subscription's last delivery are the worker's
    last attempt, so that attempt publishes cover.failed."""
    tf = _terraform()
    job = _resources(tf, "google_cloud_run_v2_job")["cover"]
    task = job["template"][0]["template"][0]
    assert task["max_retries"] == "${var.job_max_retries}"
    env = {e["name"].strip('"'): e["value"] for e in task["containers"][0]["env"] if "value" in e}
    assert env["COVER_MAX_ATTEMPTS"] == "${tostring(var.job_max_retries + 1)}"
    gpu = _resources(tf, "google_pubsub_subscription")["gpu"]
    assert gpu["dead_letter_policy"][0]["max_delivery_attempts"] == "${var.gpu_max_delivery_attempts}"
    output = next(block['"gpu_runner_env"'] for block in tf["output"] if '"gpu_runner_env"' in block)
    assert output["value"]["COVER_MAX_ATTEMPTS"] == "${tostring(var.gpu_max_delivery_attempts)}"

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


def test_terraform_keeps_remote_state_and_plans_on_a_new_project():
    tf = _terraform()
    block = tf["terraform"][0]
    assert block["required_version"].strip('"').startswith(">=")
    assert '"gcs"' in block["backend"][0]  # remote state: cloudbuild.yaml passes its bucket
    build = (ROOT / "cloudbuild.yaml").read_text()
    assert build.count("-backend-config=bucket=${_TF_STATE_BUCKET}") == 2  # bootstrap and deploy
    text = (ROOT / "infra" / "main.tf").read_text()
    # for_each keys must be known before apply: no set built from resource attributes
    assert not re.search(r"toset\(\[[^\]]*google_", text)
    assert {"pubsub.googleapis.com", "run.googleapis.com", "artifactregistry.googleapis.com"} <= set(
        re.findall(r'"([a-z]+\.googleapis\.com)"', text)
    )
    assert "cover" in _resources(tf, "google_artifact_registry_repository")
    assert "--build-arg=TORCH=cuda" in build.split("id: image-gpu", 1)[1].split("- id:", 1)[0]


def test_each_identity_can_do_only_its_part():
    """The public API only queues requests (and reads the bucket); only the trigger may run the
    job; only runners write covers and progress."""
    tf = _terraform()
    functions = _resources(tf, "google_cloudfunctions2_function")
    assert functions["http"]["service_config"][0]["service_account_email"].endswith("dispatcher.email}")
    assert functions["trigger"]["service_config"][0]["service_account_email"].endswith("trigger.email}")
    runs = _resources(tf, "google_cloud_run_v2_job_iam_member")
    assert [r["member"] for r in runs.values()] == ['"serviceAccount:${google_service_account.trigger.email}"']
    acts = _resources(tf, "google_service_account_iam_member")
    assert all("trigger.email" in r["member"] for r in acts.values())
    text = (ROOT / "infra" / "main.tf").read_text()
    events = text.split('resource "google_pubsub_topic_iam_member" "event_publishers"', 1)[1].split("\n}", 1)[0]
    assert "dispatcher" not in events and "local.accounts.job" in events
    secrets = text.split('resource "google_secret_manager_secret_iam_member" "readers"', 1)[1].split("\n}", 1)[0]
    assert '"trigger"' not in secrets  # the trigger never touches the bucket


def test_every_setting_the_code_needs_in_production_is_set_where_it_runs():
    tf = _terraform()
    env = next(block for block in tf["locals"] if "common_env" in block)["common_env"]
    common = set(env)
    shared = {"COVER_STORAGE", "COVER_BUCKET", "COVER_S3_ENDPOINT", "COVER_PROJECT"}
    assert shared <= common
    functions = _resources(tf, "google_cloudfunctions2_function")
    http = functions["http"]["service_config"][0]
    assert "COVER_PUBLIC_BASE_URL" in http["environment_variables"] and "COVER_DEFAULT_RUNNER" in common
    assert {s["key"].strip('"') for s in http["secret_environment_variables"]} == {
        "COVER_S3_ACCESS_KEY_ID",
        "COVER_S3_SECRET_ACCESS_KEY",
    }
    assert "COVER_CLOUD_RUN_JOB" in common  # the trigger's target
    trigger_env = functions["trigger"]["service_config"][0]["environment_variables"]
    for name in ("COVER_PUSH_AUDIENCE", "COVER_PUSH_SERVICE_ACCOUNT", "COVER_SERVES"):
        assert name in trigger_env, name  # the push token is checked, for the audience Pub/Sub is given
    push = _resources(tf, "google_pubsub_subscription")["trigger"]["push_config"][0]["oidc_token"][0]
    assert push["audience"] == "${local.push_audience}" and "local.push_audience" in trigger_env
    assert push["service_account_email"].strip('"${}') == "google_service_account.pusher.email"
    task = _resources(tf, "google_cloud_run_v2_job")["cover"]["template"][0]["template"][0]
    names = {e["name"].strip('"') for e in task["containers"][0]["env"]}
    assert {"COVER_S3_ACCESS_KEY_ID", "COVER_S3_SECRET_ACCESS_KEY", "COVER_MAX_ATTEMPTS"} <= names
    limits = task["containers"][0]["resources"][0]["limits"]
    assert limits == {"cpu": '"2"', "memory": '"4Gi"'}  # the measured 2.8 GB peak fits


def test_every_subscription_never_expires():
    """Pub/Sub deletes a subscription idle for 31 days unless its expiration policy says never
    (an empty ttl): the on-demand GPU path's first, after which its requests would be dropped."""
    subscriptions = _resources(_terraform(), "google_pubsub_subscription")
    assert len(subscriptions) >= 4
    for name, body in subscriptions.items():
        policy = body.get("expiration_policy")
        assert policy and policy[0]["ttl"] in ("", '""'), f"{name} may expire"  # python-hcl2 keeps quotes


def test_the_events_have_the_catalogs_subscription_and_the_catalog_its_grants():
    """A topic without a subscription discards its messages: the answers get the Catalog's
    subscription (completed and failed), and the Catalog may call the API, publish requests and
    read that subscription, and nothing else."""
    tf = _terraform()
    subscriptions = _resources(tf, "google_pubsub_subscription")
    on_events = [b for b in subscriptions.values() if "google_pubsub_topic.events" in b["topic"]]
    assert len(on_events) == 1
    assert "cover.completed" in on_events[0]["filter"] and "cover.failed" in on_events[0]["filter"]
    catalog = '"serviceAccount:${var.catalog_service_account}"'
    granted = {
        (kind, body["role"].strip('"'))
        for kind in (
            "google_cloud_run_service_iam_member",
            "google_pubsub_topic_iam_member",
            "google_pubsub_subscription_iam_member",
        )
        for body in _resources(tf, kind).values()
        if body["member"] == catalog
    }
    assert granted == {
        ("google_cloud_run_service_iam_member", "roles/run.invoker"),
        ("google_pubsub_topic_iam_member", "roles/pubsub.publisher"),
        ("google_pubsub_subscription_iam_member", "roles/pubsub.subscriber"),
    }
    invoke = next(b for b in _resources(tf, "google_cloud_run_service_iam_member").values() if b["member"] == catalog)
    assert "cloudfunctions2_function.http" in invoke["service"]
    publish = next(b for b in _resources(tf, "google_pubsub_topic_iam_member").values() if b["member"] == catalog)
    assert "google_pubsub_topic.requests" in publish["topic"]


def test_the_trigger_may_run_the_job_with_overrides_and_not_change_it():
    runs = _resources(_terraform(), "google_cloud_run_v2_job_iam_member")
    assert [r["role"].strip('"') for r in runs.values()] == ["roles/run.jobsExecutorWithOverrides"]
    assert "roles/run.developer" not in (ROOT / "infra" / "main.tf").read_text()


def test_every_build_names_what_it_deploys_and_makes_its_archive_with_what_its_image_has():
    """Manual builds (``gcloud builds submit``) have no $SHORT_SHA: tags and the function source are
    named after $BUILD_ID, which every build has; the slim Cloud SDK image has python3, not zip."""
    import yaml

    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    text = (ROOT / "cloudbuild.yaml").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "SHORT_SHA" not in code and "$BUILD_ID" in code
    for image in build["images"]:
        assert image.endswith("-$BUILD_ID")
    env = dict(item.split("=", 1) for item in build["options"]["env"])
    assert env["TF_VAR_image"] in build["images"] and env["TF_VAR_source_object"].endswith("-$BUILD_ID.zip")
    assert "TF_VAR_catalog_service_account" in env
    (source,) = [s for s in build["steps"] if s["id"] == "function-source"]
    script = source["args"][-1]
    assert "cloud-sdk:slim" in source["name"] and not re.search(r"^\s*zip ", script, re.M)
    assert "python3 -m zipfile -c" in script

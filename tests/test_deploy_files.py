"""The deploy files agree with what the tests install (Docker cannot run here: these checks stand in)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from shared.events import CoverRequest
from shared.settings import Settings

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
    """Every ``infra/*.tf`` file, merged as Terraform reads them (one module)."""
    import hcl2

    merged: dict = {}
    for path in sorted((ROOT / "infra").glob("*.tf")):
        with path.open() as file:
            for kind, blocks in hcl2.load(file).items():
                merged.setdefault(kind, []).extend(blocks)
    return merged


def _text() -> str:
    return "\n".join(path.read_text() for path in sorted((ROOT / "infra").glob("*.tf")))


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
    # the CPU path: a push turned away at the execution bound (429) spends a delivery attempt, so the
    # trigger's subscription allows Pub/Sub's most, and the trigger knows its bound
    trigger = _resources(tf, "google_pubsub_subscription")["trigger"]
    assert trigger["dead_letter_policy"][0]["max_delivery_attempts"] == "${var.trigger_max_delivery_attempts}"
    variables = {name.strip('"'): body for block in tf["variable"] for name, body in block.items()}
    assert variables["trigger_max_delivery_attempts"]["default"] == 100
    trigger_env = _resources(tf, "google_cloudfunctions2_function")["trigger"]["service_config"][0]
    assert "COVER_MAX_EXECUTIONS" in str(trigger_env["environment_variables"])
    output = next(block['"gpu_runner_env"'] for block in tf["output"] if '"gpu_runner_env"' in block)
    assert output["value"]["COVER_MAX_ATTEMPTS"] == "${tostring(var.gpu_max_delivery_attempts)}"


def test_terraform_keeps_remote_state_and_plans_on_a_new_project():
    tf = _terraform()
    block = tf["terraform"][0]
    assert block["required_version"].strip('"').startswith(">=")
    assert '"gcs"' in block["backend"][0]  # remote state: cloudbuild.yaml passes its bucket
    build = (ROOT / "cloudbuild.yaml").read_text()
    assert build.count("-backend-config=bucket=${_TF_STATE_BUCKET}") == 2  # bootstrap and deploy
    text = _text()
    # for_each keys must be known before apply: no set built from resource attributes
    assert not re.search(r"toset\(\[[^\]]*google_", text)
    assert {"pubsub.googleapis.com", "run.googleapis.com", "artifactregistry.googleapis.com"} <= set(
        re.findall(r'"([a-z]+\.googleapis\.com)"', text)
    )
    assert "cover" in _resources(tf, "google_artifact_registry_repository")
    assert "--build-arg=TORCH=cuda" in build.split("id: image-gpu", 1)[1].split("- id:", 1)[0]


def test_each_identity_can_do_only_its_part():
    """The public API only queues requests (and reads the bucket); only the trigger may run the
    job, the unanswered function only read its executions; only runners write covers and progress."""
    tf = _terraform()
    functions = _resources(tf, "google_cloudfunctions2_function")
    assert functions["http"]["service_config"][0]["service_account_email"].endswith("dispatcher.email}")
    assert functions["trigger"]["service_config"][0]["service_account_email"].endswith("trigger.email}")
    assert functions["unanswered"]["service_config"][0]["service_account_email"].endswith("unanswered.email}")
    runs = {
        r["member"].strip('"${}').split(".")[1]: r["role"]
        for r in _resources(tf, "google_cloud_run_v2_job_iam_member").values()
    }
    assert runs == {"trigger": '"roles/run.jobsExecutorWithOverrides"', "unanswered": '"roles/run.viewer"'}
    acts = _resources(tf, "google_service_account_iam_member")
    assert acts["trigger_acts_as_job"]["member"].endswith('trigger.email}"')
    federated = acts["gpu_runners_federated"]  # GPU runners sign in with a token of their host's issuer
    assert federated["role"].strip('"') == "roles/iam.workloadIdentityUser"
    assert (
        "gpu_runner.name" in federated["service_account_id"]
        and "/subject/${var.gpu_runner_oidc_subject}" in federated["member"]
    )
    assert set(acts) == {"trigger_acts_as_job", "gpu_runners_federated"}
    text = _text()
    events = text.split('resource "google_pubsub_topic_iam_member" "event_publishers"', 1)[1].split("\n}", 1)[0]
    assert "dispatcher" not in events and "local.accounts.job" in events
    assert "trigger" not in str(_r2_keys(tf))  # the trigger never touches the bucket


def _r2_keys(tf: dict) -> dict:
    return _unquoted(next(block for block in tf["locals"] if "r2_keys" in block)["r2_keys"])


def _unquoted(value):
    """python-hcl2 keeps string literals' quotes: without them, all the way down."""
    if isinstance(value, dict):
        return {_unquoted(k): _unquoted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unquoted(v) for v in value]
    return value.strip('"') if isinstance(value, str) else value


def test_no_write_credential_is_reachable_from_the_api():
    """The internet-facing API holds the covers bucket's read-only key and the queue bucket's key;
    the writer key (models, voices, covers) reaches only the runners and the unanswered function."""
    tf = _terraform()
    keys = {name: (body["prefix"], set(body["readers"])) for name, body in _r2_keys(tf).items()}
    assert keys == {
        "writer": ("cover-r2", {"job", "gpu_runner", "unanswered"}),
        "reader": ("cover-r2-read", {"dispatcher", "build"}),
        "queue": ("cover-r2-queue", {"dispatcher"}),
    }
    http = _resources(tf, "google_cloudfunctions2_function")["http"]["service_config"][0]
    secrets = _unquoted(http["dynamic"][0])["secret_environment_variables"]["for_each"]
    assert secrets == {
        "COVER_S3_ACCESS_KEY_ID": "reader-access-key-id",
        "COVER_S3_SECRET_ACCESS_KEY": "reader-secret-access-key",
        "COVER_QUEUE_S3_ACCESS_KEY_ID": "queue-access-key-id",
        "COVER_QUEUE_S3_SECRET_ACCESS_KEY": "queue-secret-access-key",
    }
    assert "COVER_QUEUE_BUCKET" in http["environment_variables"]
    variables = {name.strip('"'): body for block in tf["variable"] for name, body in block.items()}
    assert variables["queue_bucket"]["default"] != variables["bucket"]["default"]
    # nothing that runs a revision before its secrets are readable
    for kind, name in (
        ("google_cloud_run_v2_job", "cover"),
        ("google_cloudfunctions2_function", "http"),
        ("google_cloudfunctions2_function", "unanswered"),
    ):
        assert "google_secret_manager_secret_iam_member.readers" in str(_resources(tf, kind)[name]["depends_on"]), name


def test_every_setting_the_code_needs_in_production_is_set_where_it_runs():
    tf = _terraform()
    env = next(block for block in tf["locals"] if "common_env" in block)["common_env"]
    common = set(env)
    shared = {"COVER_STORAGE", "COVER_BUCKET", "COVER_S3_ENDPOINT", "COVER_PROJECT"}
    assert shared <= common
    functions = _resources(tf, "google_cloudfunctions2_function")
    http = functions["http"]["service_config"][0]
    assert "COVER_PUBLIC_BASE_URL" in http["environment_variables"] and "COVER_DEFAULT_RUNNER" in common
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
    memory_gb = int(limits["memory"].strip('"').removesuffix("Gi")) * 2**30 / 1e9
    # the measured peak of the longest song accepted (15 minutes: 4.1 GB, work folder in memory), with headroom
    assert Settings().max_duration_s == 900 and memory_gb >= 1.25 * 4.1 and limits["cpu"] == '"2"'


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
    assert runs["trigger_runs_job"]["role"].strip('"') == "roles/run.jobsExecutorWithOverrides"
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


def test_what_the_platform_ends_reaches_the_unanswered_function():
    """Dead letters and the job's failed executions (its system log entries of severity ERROR,
    through a log sink allowed to publish) are pushed, with Pub/Sub's OIDC token, to the function
    that answers them; it may read executions and publish answers."""
    tf = _terraform()
    (pushes,) = [b for b in _resources(tf, "google_pubsub_subscription").values() if "unanswered_sources" in str(b)]
    sources = next(block for block in tf["locals"] if "unanswered_sources" in block)["unanswered_sources"]
    assert {v.strip('"${}') for v in sources.values()} == {
        "google_pubsub_topic.dead_letter.id",
        "google_pubsub_topic.executions.id",
    }
    push = pushes["push_config"][0]
    assert "cloudfunctions2_function.unanswered" in push["push_endpoint"]
    assert push["oidc_token"][0]["audience"] == "${local.unanswered_audience}"
    function = _resources(tf, "google_cloudfunctions2_function")["unanswered"]
    assert function["build_config"][0]["entry_point"].strip('"') == "unanswered"
    assert "local.unanswered_audience" in function["service_config"][0]["environment_variables"]
    assert function["service_config"][0]["ingress_settings"].strip('"') == "ALLOW_INTERNAL_ONLY"
    (sink,) = _resources(tf, "google_logging_project_sink").values()
    assert "google_pubsub_topic.executions.id" in sink["destination"]
    for clause in ('resource.type=\\"cloud_run_job\\"', "run.googleapis.com/varlog/system", "severity>=ERROR"):
        assert clause in str(sink["filter"]), clause
    publishers = _resources(tf, "google_pubsub_topic_iam_member")
    assert "executions_ended.writer_identity" in publishers["sink_publishes_executions"]["member"]
    assert "unanswered" in str(publishers["event_publishers"]["for_each"])
    from dispatcher.unanswered import EXECUTION_LABEL

    assert EXECUTION_LABEL == "run.googleapis.com/execution_name"  # the label Cloud Run puts on a job's entries


def test_operators_get_metrics_alerts_a_dashboard_and_an_uptime_check():
    tf = _terraform()
    metrics = {b["name"].strip('"') for b in _resources(tf, "google_logging_metric").values()}
    assert {"cover/answers", "cover/failures", "cover/platform_answers", "cover/tasks_killed_for_memory"} <= metrics
    policies = _resources(tf, "google_monitoring_alert_policy")
    assert policies["any_event"]["for_each"] == "${local.any_event_alerts}"
    text = str(policies) + str(next(block for block in tf["locals"] if "any_event_alerts" in block))
    for watched in (
        "google_pubsub_subscription.dead_letter_inspect.name",  # the dead-letter backlog
        "num_undelivered_messages",
        "oldest_unacked_message_age",
        "run.googleapis.com/job/completed_execution_count",
        "google_logging_metric.killed_for_memory.name",
        "quality.gate",
        "uptime_check/check_passed",
    ):
        assert watched in text, watched
    limits = next(block for block in tf["locals"] if "oldest_unacked_limits" in block)["oldest_unacked_limits"]
    for subscription in ("trigger", "gpu", "catalog_events"):
        assert any(f"google_pubsub_subscription.{subscription}.name" in key for key in limits), subscription
    assert len(_resources(tf, "google_monitoring_dashboard")) == 1
    (check,) = _resources(tf, "google_monitoring_uptime_check_config").values()
    http_check = check["http_check"][0]
    assert (
        http_check["path"].strip('"') == "/healthz"
        and http_check["service_agent_authentication"][0]["type"].strip('"') == "OIDC_TOKEN"
    )
    invokers = _resources(tf, "google_cloud_run_service_iam_member")
    assert "gcp-sa-monitoring-notification" in invokers["uptime_invokes_api"]["member"]


def test_the_gpu_runner_takes_its_credentials_from_a_private_file_not_the_command_line(tmp_path):
    env_file = tmp_path / "runner.env"
    env_file.write_text("# the runner's settings\nCOVER_PROJECT=from-file\nCOVER_BUCKET=covers\n")
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COVER_RUNNER_ENV": str(env_file), "PYTHON": "/nonexistent"}

    def start() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "infra" / "gpu-runner.sh")], env=base, capture_output=True, text=True)

    env_file.chmod(0o644)
    refused = start()
    assert refused.returncode == 2 and "chmod 600" in refused.stderr  # others could read the keys
    env_file.chmod(0o600)
    read = start()  # COVER_PROJECT and COVER_BUCKET came from the file: it gets as far as Python
    assert read.returncode == 2 and "Python 3.11 is needed" in read.stderr, read.stderr
    env_file.write_text("COVER_PROJECT=p\nrm -rf /=1\n")
    assert "is not a variable name" in start().stderr  # lines are read as data, never run


def test_the_function_source_exports_every_entry_point_terraform_deploys():
    import yaml

    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    (source,) = [s for s in build["steps"] if s["id"] == "function-source"]
    exported = re.search(r"from dispatcher\.main import ([\w, ]+)", source["args"][-1])
    assert exported
    entry_points = {
        body["build_config"][0]["entry_point"].strip('"')
        for body in _resources(_terraform(), "google_cloudfunctions2_function").values()
    }
    assert entry_points == {"http", "trigger", "unanswered"}
    assert entry_points <= {name.strip() for name in exported[1].split(",")}
    import dispatcher.main as functions

    assert all(callable(getattr(functions, name)) for name in entry_points)


def test_the_cpu_image_bakes_the_bucket_s_base_models_and_builds_on_the_last_build_s_layers():
    """An execution starts with the base models in the image (the bucket's manifest decides what;
    the start-up sync fetches only what changed since); each image builds from the previous one's
    cached layers."""
    import yaml

    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    steps = {s["id"]: s for s in build["steps"]}
    order = list(steps)
    assert order.index("image-cpu") < order.index("models") < order.index("image-cpu-models") < order.index("push")
    models = steps["models"]
    assert models["name"] == "cover-job:cpu-bare" and models["args"][:3] == ["models", "pull", "--base-only"]
    secrets = {s["env"]: s["versionName"] for s in build["availableSecrets"]["secretManager"]}
    assert set(models["secretEnv"]) == set(secrets) and all("cover-r2-read-" in v for v in secrets.values())
    assert "--build-arg=MODELS=build-models" in steps["image-cpu-models"]["args"]
    assert build["images"][0].endswith("cpu-$BUILD_ID")
    for step in ("image-cpu", "image-gpu"):
        assert "--cache-from=" in str(steps[step]["args"]), step
    assert "COPY --chown=cover ${MODELS} /models" in (ROOT / "Dockerfile").read_text()


def _runbook_command() -> str:
    text = (ROOT / "docs" / "operations.md").read_text()
    block = text.split("<!-- tested: tests/test_deploy_files.py parses this command with the real gcloud CLI -->", 1)[1]
    return block.split("```bash\n", 1)[1].split("```", 1)[0].strip()


def _sandboxed_gcloud(command: str) -> subprocess.CompletedProcess:
    """``command`` run by the real gcloud CLI in a network namespace of its own with a loopback
    stand-in of the Admin API (tests/gcloud_sandbox.py): nothing can leave this machine."""
    sandbox = ROOT / "tests" / "gcloud_sandbox.py"
    return subprocess.run(
        ["unshare", "-rnm", sys.executable, str(sandbox), command], capture_output=True, text=True, timeout=120
    )


def test_the_runbook_s_manual_run_reaches_cloud_run_with_the_request_whole():
    """The documented `gcloud run jobs execute` line, parsed by the real gcloud CLI: the request's
    JSON arrives whole as COVER_REQUEST; the same line without gcloud's `^@^` escaping is refused
    (gcloud splits it at its commas), as the issue reproduced."""
    import shutil

    assert shutil.which("gcloud") and shutil.which("unshare"), "make setup installs the Cloud SDK"
    command = _runbook_command()
    assert command.startswith("gcloud run jobs execute cover-job")
    sent = _sandboxed_gcloud(command)
    assert sent.returncode == 0, sent.stderr[-2000:]
    (run,) = [json.loads(line) for line in sent.stdout.splitlines() if line.startswith("{")]
    assert run["path"].endswith("/jobs/cover-job:run")
    (override,) = run["body"]["overrides"]["containerOverrides"]
    env = {e["name"]: e["value"] for e in override["env"]}
    request = json.loads(env["COVER_REQUEST"])
    assert request == {"song_id": "songs-1", "voice_model": "demo-voice", "options": {"pitch": 2}}
    CoverRequest.model_validate(request)  # and it is a request the job accepts
    naive = _sandboxed_gcloud(command.replace("'^@^COVER_REQUEST=", "'COVER_REQUEST="))
    assert naive.returncode != 0 and "Bad syntax for dict arg" in naive.stderr


def test_the_deployment_refuses_voices_without_a_rights_record_where_requests_enter_and_renders_run():
    """COVER_REQUIRE_RIGHTS is on for the API, the job and the GPU runners (off by default: the demo)."""
    tf = _terraform()
    common = next(block for block in tf["locals"] if "common_env" in block)["common_env"]
    assert common["COVER_REQUIRE_RIGHTS"].strip('"') == "true"
    http = _resources(tf, "google_cloudfunctions2_function")["http"]["service_config"][0]["environment_variables"]
    assert "local.common_env" in http  # the API's environment is merged over common_env
    gpu = next(block['"gpu_runner_env"'] for block in tf["output"] if '"gpu_runner_env"' in block)["value"]
    assert gpu["COVER_REQUIRE_RIGHTS"].strip('"') == "true"
    assert Settings().require_rights is False


def test_the_signing_key_is_a_secret_only_the_renderers_read_and_the_job_takes_from_secret_manager():
    tf = _terraform()
    secrets = _resources(tf, "google_secret_manager_secret")
    assert {"signing"} <= set(secrets)
    signing_readers = next(block for block in tf["locals"] if "signing_readers" in block)["signing_readers"]
    assert "job" in str(signing_readers) and "gpu_runner" in str(signing_readers)
    assert "dispatcher" not in str(signing_readers) and "unanswered" not in str(signing_readers)
    task = _resources(tf, "google_cloud_run_v2_job")["cover"]["template"][0]["template"][0]
    container = task["containers"][0]
    dynamic_envs = [d['"env"'] for d in container.get("dynamic", []) if '"env"' in d]  # python-hcl2 keeps quotes
    from_secrets = [e for e in dynamic_envs if "signing" in str(e.get("content", ""))]
    assert from_secrets and "COVER_SIGNING_KEY" in str(from_secrets[0]["for_each"])
    assert "google_secret_manager_secret_iam_member.signers" in str(
        _resources(tf, "google_cloud_run_v2_job")["cover"]["depends_on"]
    )
    common = next(block for block in tf["locals"] if "common_env" in block)["common_env"]
    assert common["COVER_PROVENANCE"].strip('"') == "required" and "COVER_SIGNING_KEY" not in common
    assert Settings().provenance == "sign"  # locally: signed with the development key, opus said

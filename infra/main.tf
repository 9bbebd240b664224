# melodia-cover on Google Cloud (Pub/Sub, Cloud Run Job, Cloud Functions gen2) with Cloudflare R2.
#   terraform -chdir=infra init && terraform -chdir=infra apply -var project=PROJECT -var image=IMAGE
terraform {
  required_version = ">= 1.6"
  required_providers {
    google = { source = "hashicorp/google", version = "~> 6.0" }
  }
  # Remote state in a GCS bucket made once by hand (versioned):
  #   terraform -chdir=infra init -backend-config="bucket=STATE_BUCKET"
  # cloudbuild.yaml passes _TF_STATE_BUCKET, so every build applies against the same state.
  backend "gcs" {
    prefix = "melodia-cover"
  }
}

variable "project" { type = string }
variable "region" {
  type    = string
  default = "europe-west1"
}
variable "image" {
  type        = string
  description = "The job image (Dockerfile target cpu), e.g. REGION-docker.pkg.dev/PROJECT/cover/cover-job:cpu"
}
variable "r2_endpoint" { type = string }
variable "bucket" {
  type    = string
  default = "melodia-covers"
}
variable "source_bucket" {
  type        = string
  description = "GCS bucket holding the function source archive (cloudbuild.yaml uploads it)"
}
variable "source_object" { type = string }
variable "trusted_certs" {
  type        = string
  default     = ""
  description = "PEM CA certificates whose signatures on covers `cover verify` trusts: the current one, and during a rotation the previous one too (docs/operations.md, \"Signing keys\")."
}

variable "default_runner" {
  type        = string
  default     = "cpu"
  description = "Who renders a request that names no runner: cpu (Cloud Run Job executions) or gpu (GPU runners). GPU-first: gpu."
  validation {
    condition     = contains(["cpu", "gpu"], var.default_runner)
    error_message = "default_runner is cpu or gpu."
  }
}
variable "job_max_retries" {
  type        = number
  default     = 3
  description = "Cloud Run retries of a failed task; the job's last attempt (max_retries + 1) publishes cover.failed."
}
variable "catalog_service_account" {
  type        = string
  description = "The Catalog's service account (email): it calls the API, publishes requests and reads the events subscription this file makes for it."
}
variable "build_service_account" {
  type        = string
  default     = ""
  description = "The identity Cloud Build runs cloudbuild.yaml as (empty: the project's Cloud Build service account); it reads the read-only R2 key"
}
variable "queue_bucket" {
  type        = string
  default     = "melodia-covers-queue"
  description = "The bucket of the API's 'queued' markers (its R2 token may write there and only there)"
}
variable "max_executions" {
  type        = number
  default     = 20
  description = "Job executions running at once (a burst's bound, within the region's quotas); the rest wait in the trigger's subscription."
}
variable "trigger_max_delivery_attempts" {
  type        = number
  default     = 100
  description = "Pushes of a request to the trigger before it is dead-lettered: each push the execution bound turns away (429) spends one, so this is Pub/Sub's maximum; with the 10-600 s backoff a request waits up to about 16 hours at the bound."
  validation {
    condition     = var.trigger_max_delivery_attempts >= 5 && var.trigger_max_delivery_attempts <= 100
    error_message = "Pub/Sub allows 5 to 100 delivery attempts."
  }
}
variable "gpu_max_delivery_attempts" {
  type        = number
  default     = 5
  description = "Deliveries of a request to GPU runners before it is dead-lettered; runners get the same COVER_MAX_ATTEMPTS."
}

# Routing is data (shared/routing.py): each request carries the attribute `runner`; the two
# subscriptions' filters are complementary, and the default runner also takes unmarked requests.
locals {
  runner_filters = {
    cpu = { cpu = "NOT attributes.runner = \"gpu\"", gpu = "attributes.runner = \"gpu\"" }
    gpu = { cpu = "attributes.runner = \"cpu\"", gpu = "NOT attributes.runner = \"cpu\"" }
  }[var.default_runner]
}

provider "google" {
  project = var.project
  region  = var.region
}

# --- the APIs this deployment uses, and the image repository ---------------------------------------
resource "google_project_service" "apis" {
  for_each = toset([
    "artifactregistry.googleapis.com", "cloudbuild.googleapis.com", "cloudfunctions.googleapis.com",
    "iam.googleapis.com", "pubsub.googleapis.com", "run.googleapis.com", "secretmanager.googleapis.com",
    "logging.googleapis.com", "monitoring.googleapis.com", "iamcredentials.googleapis.com", "sts.googleapis.com",
  ])
  service            = each.value
  disable_on_destroy = false
}
resource "google_artifact_registry_repository" "cover" {
  # checkov:skip=CKV_GCP_84: images hold code and public dependencies only; Google-managed encryption
  repository_id = "cover"
  location      = var.region
  format        = "DOCKER"
  depends_on    = [google_project_service.apis]
}

# --- identities (least privilege: the public API only queues requests; only the trigger may run
# the job; only runners write covers) ----------------------------------------------------------------
resource "google_service_account" "dispatcher" { account_id = "cover-dispatcher" } # the public API
resource "google_service_account" "trigger" { account_id = "cover-trigger" }       # push -> job execution
resource "google_service_account" "job" { account_id = "cover-job" }
resource "google_service_account" "pusher" { account_id = "cover-push" } # Pub/Sub push -> trigger
resource "google_service_account" "gpu_runner" { account_id = "cover-gpu-runner" }
resource "google_service_account" "unanswered" { account_id = "cover-unanswered" } # answers what the platform ended

# --- secrets: R2 keys, one pair per permission -----------------------------------------------------
# An R2 API token has one permission on the buckets it names, so each kind of access is a pair of its
# own (docs/operations.md, "Deploy from zero", makes the three tokens and adds the secret versions):
#   writer: Object Read & Write on the covers bucket: the runners and the unanswered function
#   reader: Object Read only on the covers bucket: the public API, which must not write models or voices
#   queue:  Object Read & Write on the queue bucket only: the API's one write, the 'queued' markers
locals {
  r2_keys = {
    writer = { prefix = "cover-r2", readers = ["job", "gpu_runner", "unanswered"] }
    reader = { prefix = "cover-r2-read", readers = ["dispatcher", "build"] } # build: bakes models/ into the image
    queue  = { prefix = "cover-r2-queue", readers = ["dispatcher"] }
  }
  r2_secrets = {
    for pair in setproduct(keys(local.r2_keys), ["access-key-id", "secret-access-key"]) :
    "${pair[0]}-${pair[1]}" => { key = pair[0], part = pair[1] }
  }
  r2_secret_readers = {
    for item in flatten([
      for name, secret in local.r2_secrets : [
        for who in local.r2_keys[secret.key].readers : { id = "${name}-${who}", secret = name, who = who }
      ]
    ]) : item.id => item
  }
}
resource "google_secret_manager_secret" "r2" {
  for_each  = local.r2_secrets
  secret_id = "${local.r2_keys[each.value.key].prefix}-${each.value.part}"
  replication {
    auto {}
  }
}
resource "google_secret_manager_secret_iam_member" "readers" {
  for_each  = local.r2_secret_readers # static keys (known at plan time): who reads which R2 key
  secret_id = google_secret_manager_secret.r2[each.value.secret].id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${local.accounts[each.value.who]}"
}
moved {
  from = google_secret_manager_secret.r2_key_id
  to   = google_secret_manager_secret.r2["writer-access-key-id"]
}
moved {
  from = google_secret_manager_secret.r2_secret
  to   = google_secret_manager_secret.r2["writer-secret-access-key"]
}

# --- secrets: the Content Credentials' signing key and its certificate chain ------------------------
# Only the renderers sign (the job and the GPU runners); the runbook (docs/operations.md, "Signing
# keys") adds the versions, and a rotation adds the new CA to var.trusted_certs before the new key.
locals {
  signing_secrets = { key = "cover-signing-key", certs = "cover-signing-certs" }
  signing_readers = {
    for pair in setproduct(keys(local.signing_secrets), ["job", "gpu_runner"]) :
    "${pair[0]}-${pair[1]}" => { secret = pair[0], who = pair[1] }
  }
}
resource "google_secret_manager_secret" "signing" {
  for_each  = local.signing_secrets
  secret_id = each.value
  replication {
    auto {}
  }
}
resource "google_secret_manager_secret_iam_member" "signers" {
  for_each  = local.signing_readers
  secret_id = google_secret_manager_secret.signing[each.value.secret].id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${local.accounts[each.value.who]}"
}

# --- topics and subscriptions -----------------------------------------------------------------------
# checkov's CKV_GCP_83 (customer-supplied keys on topics) is skipped on each topic: Google-managed encryption: these hold no user data beyond song ids and cover metadata, and a customer key would add a KMS key ring, its rotation and its IAM to a two-person team's deployment.
resource "google_pubsub_topic" "requests" {
  # checkov:skip=CKV_GCP_83: Google-managed encryption (see above)
  name = "cover-requests"
  # a week of requests kept on the topic itself: a replaced subscription (switching the default
  # runner) seeks back to before the switch and loses nothing (docs/operations.md, "Switch the default runner")
  message_retention_duration = "604800s"
}
resource "google_pubsub_topic" "events" {
  # checkov:skip=CKV_GCP_83: Google-managed encryption (see above)
  name = "cover-events"
}
resource "google_pubsub_topic" "dead_letter" {
  # checkov:skip=CKV_GCP_83: Google-managed encryption (see above)
  name = "cover-requests-dead-letter"
}

# CPU path: push each request to the trigger, which starts a Cloud Run Job execution.
resource "google_pubsub_subscription" "trigger" {
  name                 = "cover-requests-trigger"
  topic                = google_pubsub_topic.requests.id
  filter               = local.runner_filters.cpu
  ack_deadline_seconds = 60
  expiration_policy {
    ttl = "" # never: an idle subscription (the on-demand GPU path, the Catalog's) must not be deleted after 31 days
  }
  push_config {
    push_endpoint = google_cloudfunctions2_function.trigger.service_config[0].uri
    oidc_token {
      service_account_email = google_service_account.pusher.email
      audience              = local.push_audience # the trigger accepts only this (COVER_PUSH_AUDIENCE)
    }
  }
  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }
  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = var.trigger_max_delivery_attempts
  }
}

# GPU path: long-running runners pull from their own subscription (outbound connections only),
# receiving exactly the requests the trigger's filter leaves out.
resource "google_pubsub_subscription" "gpu" {
  name                       = "cover-requests-gpu"
  topic                      = google_pubsub_topic.requests.id
  filter                     = local.runner_filters.gpu
  ack_deadline_seconds       = 600
  enable_exactly_once_delivery = false
  expiration_policy {
    ttl = "" # never: an idle subscription (the on-demand GPU path, the Catalog's) must not be deleted after 31 days
  }
  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }
  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = var.gpu_max_delivery_attempts
  }
}

# Each dead letter is answered (answers.tf) and also kept here a week, to inspect and replay
# (docs/operations.md, "Replay dead letters").
resource "google_pubsub_subscription" "dead_letter_inspect" {
  name                       = "cover-requests-dead-letter-inspect"
  topic                      = google_pubsub_topic.dead_letter.id
  message_retention_duration = "604800s"
  expiration_policy {
    ttl = "" # never: an idle subscription (the on-demand GPU path, the Catalog's) must not be deleted after 31 days
  }
}

# The Catalog's subscription to the answers. Made here, not in the Catalog's own infrastructure: a
# topic without a subscription discards what is published to it, so the events must have a
# subscriber from the first deploy on, whoever deploys first (docs/operations.md, "Deploy").
resource "google_pubsub_subscription" "catalog_events" {
  name                 = "cover-events-catalog"
  topic                = google_pubsub_topic.events.id
  filter               = "attributes.type = \"cover.completed\" OR attributes.type = \"cover.failed\""
  ack_deadline_seconds = 60
  message_retention_duration = "604800s" # a week of answers if the Catalog is down
  expiration_policy {
    ttl = "" # never: an idle subscription (the on-demand GPU path, the Catalog's) must not be deleted after 31 days
  }
  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }
}

# What the Catalog may do: call the API (gen2 functions require IAM), publish requests itself, and
# read its subscription. Nothing else: not the bucket, not the job.
resource "google_cloud_run_service_iam_member" "catalog_invokes_api" {
  location = var.region
  service  = google_cloudfunctions2_function.http.name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${var.catalog_service_account}"
}
resource "google_pubsub_topic_iam_member" "catalog_publishes_requests" {
  topic  = google_pubsub_topic.requests.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${var.catalog_service_account}"
}
resource "google_pubsub_subscription_iam_member" "catalog_reads_events" {
  subscription = google_pubsub_subscription.catalog_events.id
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${var.catalog_service_account}"
}

# Pub/Sub's own agent must be able to forward to the dead-letter topic and ack the source.
data "google_project" "this" {}
locals {
  pubsub_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
}
resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  topic  = google_pubsub_topic.dead_letter.id
  role   = "roles/pubsub.publisher"
  member = local.pubsub_agent
}
resource "google_pubsub_subscription_iam_member" "dead_letter_ack" {
  for_each     = { trigger = google_pubsub_subscription.trigger.id, gpu = google_pubsub_subscription.gpu.id }
  subscription = each.value
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}

resource "google_pubsub_topic_iam_member" "request_publishers" {
  topic  = google_pubsub_topic.requests.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${google_service_account.dispatcher.email}"
}
resource "google_pubsub_topic_iam_member" "event_publishers" {
  # runners publish progress and answers; the trigger answers pushes that can never be a request; the
  # unanswered function answers what the platform ended (answers.tf)
  for_each = {
    job        = local.accounts.job
    gpu_runner = local.accounts.gpu_runner
    trigger    = local.accounts.trigger
    unanswered = local.accounts.unanswered
  }
  topic    = google_pubsub_topic.events.id
  role     = "roles/pubsub.publisher"
  member   = "serviceAccount:${each.value}"
}
resource "google_pubsub_subscription_iam_member" "gpu_runner" {
  subscription = google_pubsub_subscription.gpu.id
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${google_service_account.gpu_runner.email}"
}

# --- the job ----------------------------------------------------------------------------------------
locals {
  accounts = {
    dispatcher = google_service_account.dispatcher.email
    trigger    = google_service_account.trigger.email
    job        = google_service_account.job.email
    gpu_runner = google_service_account.gpu_runner.email
    unanswered = google_service_account.unanswered.email
    build      = var.build_service_account != "" ? var.build_service_account : "${data.google_project.this.number}@cloudbuild.gserviceaccount.com"
  }
  common_env = {
    COVER_STORAGE     = "s3"
    COVER_S3_ENDPOINT = var.r2_endpoint
    COVER_BUCKET      = var.bucket
    COVER_PROJECT     = var.project
    COVER_CLOUD_RUN_JOB = "projects/${var.project}/locations/${var.region}/jobs/cover-job"
    COVER_DEFAULT_RUNNER = var.default_runner
    COVER_REQUIRE_RIGHTS = "true"     # a voice without a rights record is refused (voice.no_rights)
    COVER_PROVENANCE     = "required" # every cover signed (C2PA); opus, which cannot carry it, refused
    COVER_TRUSTED_CERTS  = var.trusted_certs
  }
  # what Pub/Sub's push token names and the trigger verifies: a fixed string, not the function's URI
  # (the trigger's own environment cannot depend on the trigger)
  push_audience = "https://${var.region}-${var.project}.cloudfunctions.net/cover-trigger"
}

resource "google_cloud_run_v2_job" "cover" {
  name     = "cover-job"
  location = var.region
  # a revision that reads a secret needs the grant first (and a version: docs/operations.md, "Deploy from zero")
  depends_on = [google_secret_manager_secret_iam_member.readers, google_secret_manager_secret_iam_member.signers]
  template {
    task_count = 1
    template {
      service_account = google_service_account.job.email
      max_retries     = var.job_max_retries # exit status 1 = a retry can help
      timeout         = "3600s"
      containers {
        image = var.image
        resources {
          # measured: peak RSS 2.4 to 2.8 GB for 3.5- to 10-minute songs on 2 vCPUs; with the model files
          # and the work folder (in memory here) 3.7 to 4.1 GB for a 15-minute song, the longest accepted
          # (bench/JOURNAL.md, "Memory by song length"). 6 GiB (6.4 GB) is that peak with 1.5x headroom;
          # 8 GiB is the most 2 vCPUs may have.
          limits = { cpu = "2", memory = "6Gi" }
        }
        dynamic "env" {
          for_each = local.common_env
          content {
            name  = env.key
            value = env.value
          }
        }
        env { # the attempt limit is the platform's: Cloud Run's last attempt publishes cover.failed
          name  = "COVER_MAX_ATTEMPTS"
          value = tostring(var.job_max_retries + 1)
        }
        env {
          name = "COVER_S3_ACCESS_KEY_ID"
          value_source {
            secret_key_ref {
              secret  = google_secret_manager_secret.r2["writer-access-key-id"].secret_id
              version = "latest"
            }
          }
        }
        env {
          name = "COVER_S3_SECRET_ACCESS_KEY"
          value_source {
            secret_key_ref {
              secret  = google_secret_manager_secret.r2["writer-secret-access-key"].secret_id
              version = "latest"
            }
          }
        }
        dynamic "env" { # the Content Credentials' key and chain: from Secret Manager only
          for_each = { COVER_SIGNING_KEY = "key", COVER_SIGNING_CERTS = "certs" }
          content {
            name = env.key
            value_source {
              secret_key_ref {
                secret  = google_secret_manager_secret.signing[env.value].secret_id
                version = "latest"
              }
            }
          }
        }
      }
    }
  }
}

# The trigger runs the job with overrides (run.jobs.runWithOverrides and reading executions) and
# nothing more: it may not change or delete the job.
resource "google_cloud_run_v2_job_iam_member" "trigger_runs_job" {
  name     = google_cloud_run_v2_job.cover.name
  location = var.region
  role     = "roles/run.jobsExecutorWithOverrides"
  member   = "serviceAccount:${google_service_account.trigger.email}"
}
resource "google_service_account_iam_member" "trigger_acts_as_job" {
  service_account_id = google_service_account.job.name
  role               = "roles/iam.serviceAccountUser"
  member             = "serviceAccount:${google_service_account.trigger.email}"
}

# --- the functions ----------------------------------------------------------------------------------
resource "google_cloudfunctions2_function" "http" {
  # checkov:skip=CKV_GCP_124: this is the public API the Catalog calls from outside Google Cloud; the trigger is internal-only
  name       = "cover-api"
  location   = var.region
  depends_on = [google_secret_manager_secret_iam_member.readers] # see the job
  build_config {
    runtime     = "python311"
    entry_point = "http"
    source {
      storage_source {
        bucket = var.source_bucket
        object = var.source_object
      }
    }
  }
  service_config {
    service_account_email = google_service_account.dispatcher.email
    available_memory      = "1Gi"
    max_instance_count    = 20
    # the 202 answers' status URLs: gen2 functions also answer at REGION-PROJECT.cloudfunctions.net/NAME
    environment_variables = merge(local.common_env, {
      COVER_PUBLIC_BASE_URL = "https://${var.region}-${var.project}.cloudfunctions.net/cover-api"
      COVER_QUEUE_BUCKET    = var.queue_bucket
    })
    # read-only keys for the covers bucket; read-write only on the queue bucket (see "secrets" above)
    dynamic "secret_environment_variables" {
      for_each = {
        COVER_S3_ACCESS_KEY_ID           = "reader-access-key-id"
        COVER_S3_SECRET_ACCESS_KEY       = "reader-secret-access-key"
        COVER_QUEUE_S3_ACCESS_KEY_ID     = "queue-access-key-id"
        COVER_QUEUE_S3_SECRET_ACCESS_KEY = "queue-secret-access-key"
      }
      content {
        key        = secret_environment_variables.key
        project_id = var.project
        secret     = google_secret_manager_secret.r2[secret_environment_variables.value].secret_id
        version    = "latest"
      }
    }
  }
}

resource "google_cloudfunctions2_function" "trigger" {
  name     = "cover-trigger"
  location = var.region
  build_config {
    runtime     = "python311"
    entry_point = "trigger"
    source {
      storage_source {
        bucket = var.source_bucket
        object = var.source_object
      }
    }
  }
  service_config {
    service_account_email          = google_service_account.trigger.email
    available_memory               = "512Mi"
    ingress_settings               = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision = true
    environment_variables = merge(local.common_env, {
      COVER_PUSH_AUDIENCE        = local.push_audience
      COVER_PUSH_SERVICE_ACCOUNT = google_service_account.pusher.email
      COVER_SERVES               = "cpu" # idle behind the filter; refuses a GPU request if it is ever changed
      COVER_MAX_EXECUTIONS       = tostring(var.max_executions)
    })
  }
}

resource "google_cloud_run_service_iam_member" "pusher_invokes_trigger" {
  location = var.region
  service  = google_cloudfunctions2_function.trigger.name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.pusher.email}"
}

output "api_url" { value = google_cloudfunctions2_function.http.service_config[0].uri }
output "catalog_events_subscription" {
  description = "The Catalog's subscription to cover.completed and cover.failed"
  value       = google_pubsub_subscription.catalog_events.id
}
output "gpu_runner_env" {
  description = "What a GPU runner (infra/gpu-runner.sh) sets besides its credentials"
  value = {
    COVER_PROJECT               = var.project
    COVER_BUCKET                = var.bucket
    COVER_S3_ENDPOINT           = var.r2_endpoint
    COVER_REQUESTS_SUBSCRIPTION = google_pubsub_subscription.gpu.name
    COVER_MAX_ATTEMPTS          = tostring(var.gpu_max_delivery_attempts)
    COVER_SERVES                = "gpu"
    COVER_DEFAULT_RUNNER        = var.default_runner
    COVER_REQUIRE_RIGHTS        = "true"
    COVER_PROVENANCE            = "required"
    COVER_TRUSTED_CERTS         = var.trusted_certs
    # and, beside the R2 keys in its private env file: COVER_SIGNING_KEY and COVER_SIGNING_CERTS, read
    # from Secret Manager (cover-signing-key, cover-signing-certs) by the runner's account
  }
}

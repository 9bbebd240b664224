# Every request ends in exactly one answer, even when the platform, not our code, ends it
# (dispatcher/unanswered.py): the `unanswered` function answers
#   - a request Pub/Sub dead-letters (cover.failed request.dead_lettered), pushed from the dead-letter topic;
#   - a job execution that failed without answering, e.g. a task killed for memory or by its timeout on
#     its last attempt (cover.failed job.execution_failed): a log sink forwards the job's system log
#     entries of severity ERROR to a topic pushed to it; the function asks the Admin API whether the
#     execution is over, failed, and which request it ran (so an early or repeated entry changes nothing).

resource "google_pubsub_topic" "executions" {
  # checkov:skip=CKV_GCP_83: Google-managed encryption (see the other topics)
  name = "cover-executions-ended"
}

resource "google_logging_project_sink" "executions_ended" {
  name        = "cover-executions-ended"
  destination = "pubsub.googleapis.com/${google_pubsub_topic.executions.id}"
  filter = join(" AND ", [
    "resource.type=\"cloud_run_job\"",
    "resource.labels.job_name=\"${google_cloud_run_v2_job.cover.name}\"",
    "log_id(\"run.googleapis.com/varlog/system\")",
    "severity>=ERROR",
  ])
  unique_writer_identity = true
}
resource "google_pubsub_topic_iam_member" "sink_publishes_executions" {
  topic  = google_pubsub_topic.executions.id
  role   = "roles/pubsub.publisher"
  member = google_logging_project_sink.executions_ended.writer_identity
}

locals {
  unanswered_audience = "https://${var.region}-${var.project}.cloudfunctions.net/cover-unanswered"
  # what reaches the function: dead letters and failed executions, each pushed with Pub/Sub's OIDC token
  unanswered_sources = {
    dead_letter = google_pubsub_topic.dead_letter.id
    executions  = google_pubsub_topic.executions.id
  }
}

resource "google_pubsub_subscription" "unanswered" {
  for_each             = local.unanswered_sources
  name                 = "cover-unanswered-${replace(each.key, "_", "-")}"
  topic                = each.value
  ack_deadline_seconds = 60
  expiration_policy {
    ttl = "" # never
  }
  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }
  push_config {
    push_endpoint = google_cloudfunctions2_function.unanswered.service_config[0].uri
    oidc_token {
      service_account_email = google_service_account.pusher.email
      audience              = local.unanswered_audience
    }
  }
}

resource "google_cloudfunctions2_function" "unanswered" {
  name       = "cover-unanswered"
  location   = var.region
  depends_on = [google_secret_manager_secret_iam_member.readers] # see the job
  build_config {
    runtime     = "python311"
    entry_point = "unanswered"
    source {
      storage_source {
        bucket = var.source_bucket
        object = var.source_object
      }
    }
  }
  service_config {
    service_account_email          = google_service_account.unanswered.email
    available_memory               = "512Mi"
    ingress_settings               = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision = true
    environment_variables = merge(local.common_env, {
      COVER_PUSH_AUDIENCE        = local.unanswered_audience
      COVER_PUSH_SERVICE_ACCOUNT = google_service_account.pusher.email
    })
    # the writer keys: it marks the cover's status failed when no runner holds the cover
    dynamic "secret_environment_variables" {
      for_each = {
        COVER_S3_ACCESS_KEY_ID     = "writer-access-key-id"
        COVER_S3_SECRET_ACCESS_KEY = "writer-secret-access-key"
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

resource "google_cloud_run_service_iam_member" "pusher_invokes_unanswered" {
  location = var.region
  service  = google_cloudfunctions2_function.unanswered.name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.pusher.email}"
}
# reads executions (run.executions.get) and nothing more: it may not run, change or delete the job
resource "google_cloud_run_v2_job_iam_member" "unanswered_reads_executions" {
  name     = google_cloud_run_v2_job.cover.name
  location = var.region
  role     = "roles/run.viewer"
  member   = "serviceAccount:${google_service_account.unanswered.email}"
}

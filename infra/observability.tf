# What an operator watches (docs/operations.md, "Watch"): log-based metrics from the structured log
# lines the code writes, alert policies on the ways a request can wait or be lost, one dashboard, and
# an uptime check on the API's /healthz.

variable "alert_email" {
  type        = string
  default     = ""
  description = "Where alerts go (an email channel); empty: the policies exist and show in the console, nobody is mailed."
}

resource "google_monitoring_notification_channel" "email" {
  count        = var.alert_email == "" ? 0 : 1
  display_name = "melodia-cover on call"
  type         = "email"
  labels       = { email_address = var.alert_email }
}

locals {
  alert_channels = google_monitoring_notification_channel.email[*].id
  # the longest a request may wait unanswered on each subscription before someone should look
  oldest_unacked_limits = {
    (google_pubsub_subscription.trigger.name)        = 900  # pushes are answered in seconds
    (google_pubsub_subscription.gpu.name)            = 3600 # GPU runners may be scaled to zero
    (google_pubsub_subscription.catalog_events.name) = 3600 # the Catalog is not reading its answers
    "cover-unanswered-dead-letter"                   = 900
    "cover-unanswered-executions"                    = 900
  }
}

# --- log-based metrics (the fields are the JSON log lines' own: shared/logs.py) ----------------------
resource "google_logging_metric" "answers" {
  name        = "cover/answers"
  description = "Final answers published (cover.completed, cover.failed), by type"
  filter      = "jsonPayload.logger=\"melodia.bus\" AND jsonPayload.event=(\"cover.completed\" OR \"cover.failed\")"
  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
    labels {
      key = "type"
    }
  }
  label_extractors = { type = "EXTRACT(jsonPayload.event)" }
}
resource "google_logging_metric" "failures" {
  name        = "cover/failures"
  description = "Requests a runner answered cover.failed, by code (quality.gate: refused by the quality gate)"
  filter      = "jsonPayload.logger=\"melodia.worker\" AND jsonPayload.event=\"cover.failed\""
  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
    labels {
      key = "code"
    }
  }
  label_extractors = { code = "EXTRACT(jsonPayload.code)" }
}
resource "google_logging_metric" "platform_answers" {
  name        = "cover/platform_answers"
  description = "Requests the platform ended, answered by the unanswered function, by reason"
  filter      = "jsonPayload.event=\"request.answered\""
  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
    labels {
      key = "reason"
    }
  }
  label_extractors = { reason = "EXTRACT(jsonPayload.reason)" }
}
resource "google_logging_metric" "killed_for_memory" {
  name        = "cover/tasks_killed_for_memory"
  description = "Job tasks Cloud Run stopped at their memory limit"
  filter      = "resource.type=\"cloud_run_job\" AND resource.labels.job_name=\"${google_cloud_run_v2_job.cover.name}\" AND textPayload=~\"(?i)memory limit\""
  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
  }
}

# --- alert policies --------------------------------------------------------------------------------
resource "google_monitoring_alert_policy" "dead_letters" {
  display_name          = "melodia-cover: requests dead-lettered"
  combiner              = "OR"
  notification_channels = local.alert_channels
  documentation {
    content = "Requests Pub/Sub gave up delivering (each was answered cover.failed request.dead_lettered). Runbook: docs/operations.md, \"Replay dead letters\"."
  }
  conditions {
    display_name = "dead-letter backlog above 0"
    condition_threshold {
      filter          = "resource.type=\"pubsub_subscription\" AND resource.labels.subscription_id=\"${google_pubsub_subscription.dead_letter_inspect.name}\" AND metric.type=\"pubsub.googleapis.com/subscription/num_undelivered_messages\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "300s"
      aggregations {
        alignment_period   = "300s"
        per_series_aligner = "ALIGN_MAX"
      }
    }
  }
}

resource "google_monitoring_alert_policy" "oldest_unacked" {
  for_each              = local.oldest_unacked_limits
  display_name          = "melodia-cover: ${each.key} has waited over ${each.value / 60} minutes"
  combiner              = "OR"
  notification_channels = local.alert_channels
  documentation {
    content = "The oldest message on ${each.key} is unanswered. Runbook: docs/operations.md, \"Watch\"."
  }
  conditions {
    display_name = "oldest unacked message age"
    condition_threshold {
      filter          = "resource.type=\"pubsub_subscription\" AND resource.labels.subscription_id=\"${each.key}\" AND metric.type=\"pubsub.googleapis.com/subscription/oldest_unacked_message_age\""
      comparison      = "COMPARISON_GT"
      threshold_value = each.value
      duration        = "300s"
      aggregations {
        alignment_period   = "300s"
        per_series_aligner = "ALIGN_MAX"
      }
    }
  }
}

# alerts on any event at all in ten minutes
locals {
  any_event_alerts = {
    executions_failed = {
      title  = "job executions failed"
      doc    = "Executions of cover-job that failed (their requests were answered job.execution_failed). Look at the execution's logs: memory, time limit, a crash."
      filter = "resource.type=\"cloud_run_job\" AND resource.labels.job_name=\"${google_cloud_run_v2_job.cover.name}\" AND metric.type=\"run.googleapis.com/job/completed_execution_count\" AND metric.labels.result=\"failed\""
    }
    killed_for_memory = {
      title  = "job tasks killed for memory"
      doc    = "A task ran out of its memory limit (infra/main.tf sizes it from the measured peak of the longest song): raise the limit or lower COVER_MAX_DURATION_S."
      filter = "resource.type=\"cloud_run_job\" AND metric.type=\"logging.googleapis.com/user/${google_logging_metric.killed_for_memory.name}\""
    }
  }
}
resource "google_monitoring_alert_policy" "any_event" {
  for_each              = local.any_event_alerts
  display_name          = "melodia-cover: ${each.value.title}"
  combiner              = "OR"
  notification_channels = local.alert_channels
  documentation {
    content = each.value.doc
  }
  conditions {
    display_name = each.value.title
    condition_threshold {
      filter          = each.value.filter
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period   = "600s"
        per_series_aligner = "ALIGN_SUM"
      }
    }
  }
}

resource "google_monitoring_alert_policy" "quality_gate_refusals" {
  display_name          = "melodia-cover: quality gate refuses over a quarter of covers"
  combiner              = "OR"
  notification_channels = local.alert_channels
  documentation {
    content = "Covers refused by the quality gate (cover.failed quality.gate) per cover published, over an hour: a bad voice model, a separator problem, or thresholds to revisit (docs/quality.md)."
  }
  conditions {
    display_name = "quality.gate refusals per published cover"
    condition_threshold {
      filter             = "metric.type=\"logging.googleapis.com/user/${google_logging_metric.failures.name}\" AND metric.labels.code=\"quality.gate\""
      denominator_filter = "metric.type=\"logging.googleapis.com/user/${google_logging_metric.answers.name}\" AND metric.labels.type=\"cover.completed\""
      comparison         = "COMPARISON_GT"
      threshold_value    = 0.25
      duration           = "0s"
      aggregations {
        alignment_period     = "3600s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
      denominator_aggregations {
        alignment_period     = "3600s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
    }
  }
}

# --- the API's uptime, checked with the Monitoring agent's OIDC token (the API requires IAM) ------------
resource "google_monitoring_uptime_check_config" "api" {
  display_name = "melodia-cover API /healthz"
  timeout      = "10s"
  period       = "300s"
  http_check {
    path         = "/healthz"
    port         = 443
    use_ssl      = true
    validate_ssl = true
    service_agent_authentication {
      type = "OIDC_TOKEN"
    }
  }
  monitored_resource {
    type = "uptime_url"
    labels = {
      project_id = var.project
      host       = trimprefix(google_cloudfunctions2_function.http.service_config[0].uri, "https://")
    }
  }
}
resource "google_cloud_run_service_iam_member" "uptime_invokes_api" {
  location = var.region
  service  = google_cloudfunctions2_function.http.name
  role     = "roles/run.invoker"
  member   = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-monitoring-notification.iam.gserviceaccount.com"
}
resource "google_monitoring_alert_policy" "api_down" {
  display_name          = "melodia-cover: the API fails its uptime check"
  combiner              = "OR"
  notification_channels = local.alert_channels
  conditions {
    display_name = "/healthz failing"
    condition_threshold {
      filter          = "resource.type=\"uptime_url\" AND metric.type=\"monitoring.googleapis.com/uptime_check/check_passed\" AND metric.labels.check_id=\"${google_monitoring_uptime_check_config.api.uptime_check_id}\""
      comparison      = "COMPARISON_GT"
      threshold_value = 1
      duration        = "600s"
      aggregations {
        alignment_period     = "600s"
        per_series_aligner   = "ALIGN_NEXT_OLDER"
        cross_series_reducer = "REDUCE_COUNT_FALSE"
        group_by_fields      = ["resource.labels.host"]
      }
    }
  }
}

# --- one dashboard -----------------------------------------------------------------------------------
locals {
  dashboard_charts = {
    "Answers published, by type"             = "metric.type=\"logging.googleapis.com/user/${google_logging_metric.answers.name}\""
    "Runner failures, by code"               = "metric.type=\"logging.googleapis.com/user/${google_logging_metric.failures.name}\""
    "Requests the platform ended, by reason" = "metric.type=\"logging.googleapis.com/user/${google_logging_metric.platform_answers.name}\""
    "Oldest unanswered message, by subscription (s)" = "resource.type=\"pubsub_subscription\" AND metric.type=\"pubsub.googleapis.com/subscription/oldest_unacked_message_age\""
    "Undelivered messages, by subscription"  = "resource.type=\"pubsub_subscription\" AND metric.type=\"pubsub.googleapis.com/subscription/num_undelivered_messages\""
    "Job executions, by result"              = "resource.type=\"cloud_run_job\" AND metric.type=\"run.googleapis.com/job/completed_execution_count\""
    "API request latency (ms)"               = "resource.type=\"cloud_run_revision\" AND resource.labels.service_name=\"cover-api\" AND metric.type=\"run.googleapis.com/request_latencies\""
    "Tasks killed for memory"                = "metric.type=\"logging.googleapis.com/user/${google_logging_metric.killed_for_memory.name}\""
  }
}
resource "google_monitoring_dashboard" "cover" {
  dashboard_json = jsonencode({
    displayName = "melodia-cover"
    gridLayout = {
      columns = 2
      widgets = [
        for title, filter in local.dashboard_charts : {
          title = title
          xyChart = {
            dataSets = [{
              plotType = "LINE"
              timeSeriesQuery = {
                timeSeriesFilter = {
                  filter      = filter
                  aggregation = { alignmentPeriod = "300s", perSeriesAligner = strcontains(title, "latency") ? "ALIGN_PERCENTILE_99" : "ALIGN_MAX" }
                }
              }
            }]
          }
        }
      ]
    }
  })
}

# GPU runners outside Google Cloud sign in with Workload Identity Federation: a short-lived token
# from an OIDC issuer their host already has (a CI system, a GPU cloud's instance identity, a Kubernetes
# service account issuer) is exchanged for cover-gpu-runner's access, so no service-account key is
# downloaded. Set gpu_runner_oidc_issuer and gpu_runner_oidc_subject to turn it on; the output
# gpu_runner_credential_config is the command that writes the runner's credential file
# (docs/operations.md, "GPU runner"). Without an issuer, a key file is the documented fallback.

variable "gpu_runner_oidc_issuer" {
  type        = string
  default     = ""
  description = "The OIDC issuer URL of the GPU runners' host (empty: no federation; runners use a key file)."
}
variable "gpu_runner_oidc_subject" {
  type        = string
  default     = ""
  description = "The token subject (sub) a GPU runner presents; only that subject may act as cover-gpu-runner."
  validation {
    condition     = var.gpu_runner_oidc_subject == "" || can(regex("^[^'\\\\]+$", var.gpu_runner_oidc_subject))
    error_message = "The subject may not contain quotes or backslashes."
  }
}

locals {
  federated = var.gpu_runner_oidc_issuer != ""
}

resource "google_iam_workload_identity_pool" "gpu_runners" {
  count                     = local.federated ? 1 : 0
  workload_identity_pool_id = "cover-gpu-runners"
  display_name              = "melodia-cover GPU runners"
}

resource "google_iam_workload_identity_pool_provider" "gpu_runners" {
  count                              = local.federated ? 1 : 0
  workload_identity_pool_id          = google_iam_workload_identity_pool.gpu_runners[0].workload_identity_pool_id
  workload_identity_pool_provider_id = "runner-oidc"
  attribute_mapping                  = { "google.subject" = "assertion.sub" }
  attribute_condition                = "assertion.sub == '${var.gpu_runner_oidc_subject}'"
  oidc {
    issuer_uri = var.gpu_runner_oidc_issuer
  }
}

resource "google_service_account_iam_member" "gpu_runners_federated" {
  count              = local.federated ? 1 : 0
  service_account_id = google_service_account.gpu_runner.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "principal://iam.googleapis.com/${google_iam_workload_identity_pool.gpu_runners[0].name}/subject/${var.gpu_runner_oidc_subject}"
}

output "gpu_runner_credential_config" {
  description = "Writes a GPU runner's credential file (no key inside): run it where the runner's OIDC token is a file"
  value = local.federated ? join(" ", [
    "gcloud iam workload-identity-pools create-cred-config",
    google_iam_workload_identity_pool_provider.gpu_runners[0].name,
    "--service-account=${google_service_account.gpu_runner.email}",
    "--credential-source-file=OIDC_TOKEN_FILE",
    "--output-file=runner-credentials.json",
  ]) : "federation is off (set gpu_runner_oidc_issuer); use a key file: docs/operations.md, \"GPU runner\""
}

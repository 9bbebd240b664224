"""Settings from the environment, all under the ``COVER_`` prefix (docs/operations.md, "Settings")."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from platformdirs import user_cache_dir, user_data_dir
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.routing import Runner

DEFAULT_CACHE = Path(user_cache_dir("melodia-cover"))
DEFAULT_STATE = Path(user_data_dir("melodia-cover"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COVER_", extra="ignore")

    models_dir: Path = Field(DEFAULT_CACHE / "models", description="The local model store.")
    work_dir: Path = Field(DEFAULT_CACHE / "work", description="Scratch space for renders.")
    stem_cache_dir: Path = Field(
        DEFAULT_CACHE / "stems", description="The command line's stem cache (the service keeps stems in the bucket)."
    )
    max_duration_s: float = Field(900.0, gt=0, description="Longest accepted song, seconds.")
    max_download_bytes: int = Field(500 * 2**20, gt=0, description="Largest accepted download.")
    download_deadline_s: float = Field(300.0, gt=0, description="Longest a whole download may take.")
    allow_http_urls: bool = Field(False, description="Accept plain http URLs for songs and voices (https always).")
    url_allow_networks: list[str] = Field(
        default_factory=list,
        description='Networks besides the public internet URLs may reach, e.g. ["127.0.0.1/32"] (development, tests).',
    )
    models_mirror: str | None = Field(
        None,
        description=(
            "Where `cover models fetch` downloads the base models from instead of their public locations: a base URL "
            "holding them under their store paths (an internal mirror). Their pinned sha256 still apply."
        ),
    )
    device: str = Field("auto", description="'auto', 'cpu' or a torch device such as 'cuda:0'.")
    precision: str = Field(
        "auto",
        pattern="^(auto|fp32|bf16|fp16)$",
        description=(
            "Compute type of Demucs and the RVC decoder (and of HuBERT on the CPU's fast kernels): auto (fp16 on "
            "a GPU, bf16 on CPUs with native bf16, fp32 elsewhere), fp32, bf16, fp16."
        ),
    )
    kernels: str = Field(
        "fast",
        pattern="^(fast|reference)$",
        description="fast (channels-last layouts, tiled decoder) or reference (plain conv1d, untiled).",
    )
    decoder: str = Field(
        "auto",
        pattern="^(auto|torch|int8)$",
        description=(
            "The RVC decoder's runtime: torch (in the precision and kernels above), int8 (its first two upsampling "
            "stages quantised once per voice on ONNX Runtime, calibrated on the voice's reference phrase, the rest in "
            "fp32; CPUs only; about 0.8 of fp32's time, 0.6 dB from the exact path, see docs/engine.md) or auto "
            "(int8 where the decoder would run in fp32 with the fast kernels: CPUs without native bf16; torch "
            "elsewhere)."
        ),
    )
    mdx_runtime: str = Field(
        "auto",
        pattern="^(auto|onnxruntime|torch)$",
        description=(
            "What runs the MDX-Net passes (karaoke, de-reverb): torch (their ONNX graphs on the device, in the "
            "precision above; a model with an operator torch's runner lacks stays on ONNX Runtime), onnxruntime "
            "(its CPU provider in fp32: the reference) or auto (torch with the fast kernels, onnxruntime with the "
            "reference kernels)."
        ),
    )
    provenance: Literal["off", "sign", "required"] = Field(
        "sign",
        description=(
            "Content Credentials (C2PA) in each cover (job/render/credentials.py): sign (every format C2PA binds "
            "into: mp3, m4a, flac, wav; an opus cover is written unsigned, and said so), required (an opus request "
            "is refused: the deployment), off."
        ),
    )
    signing_key: SecretStr | None = Field(
        None,
        description="The PEM signing key (Secret Manager in production; unset: the development key). Never printed.",
    )
    signing_certs: str | None = Field(None, description="Its PEM certificate chain, signer first.")
    trusted_certs: str | None = Field(
        None, description="The PEM CA certificates `cover verify` trusts: the current and the previous one."
    )
    state_dir: Path = Field(DEFAULT_STATE, description="Local state: the development signing key (signing/).")
    require_rights: bool = Field(
        False,
        description=(
            "Refuse a voice whose voice.json has no rights record (voice.no_rights), at the API and in the job; "
            "on in the Terraform deployment, off for the local demo."
        ),
    )
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default.")
    separate_batch: int = Field(
        0, ge=0, le=64, description="Demucs segments per network call; 0: 1 on the CPU, 8 on a GPU."
    )
    convert_batch: int = Field(
        0, ge=0, le=64, description="Conversion chunks per decoder call; 0: 1 on the CPU, 8 on a GPU."
    )
    in_flight: int = Field(
        0,
        ge=0,
        le=32,
        description=(
            "Requests a runner (python -m job serve) holds at once; 0: 1 on the CPU, on a GPU the least of one "
            "per 12 GiB of its memory and 3 per 8 host cores, 1 to 8. The heavy stages (separate, convert) take "
            "turns on the device."
        ),
    )
    heavy_slots: int = Field(
        0,
        ge=0,
        le=8,
        description="Heavy stages (separate, convert) allowed on the device at once, across requests; 0: 1 on "
        "the CPU, 2 on a GPU.",
    )
    mix_workers: int = Field(
        0,
        ge=0,
        le=8,
        description=(
            "Stretches of the song the mix stage works on side by side: its measuring passes' threads (at least "
            "20 s each) and its MP3 encoders (30 to 60 s each, joined gaplessly); 0: one per core the process may "
            "use but one, at most 8 (one on 2 cores); 1: the whole song in one piece."
        ),
    )
    health_interval_s: float = Field(60.0, gt=0, description="A runner logs a health line this often.")
    quality: str = Field(
        "gate",
        pattern="^(gate|measure|off)$",
        description=(
            "The quality stage: gate (measure, and fail a cover below the thresholds with quality.gate unless "
            "the request sets publish_below_gate), measure (report only), off."
        ),
    )
    quality_unmeasurable: str = Field(
        "refuse",
        pattern="^(refuse|publish)$",
        description=(
            "What the gate does with a cover it could not measure (under one sung second in both the singer's and "
            "the cover's pitch): refuse it (quality.gate, the safe default: nothing unchecked is published as if "
            "checked) or publish it, its verdict saying not_measurable. publish_below_gate accepts either."
        ),
    )
    repair_budget: float = Field(
        0.3,
        ge=0,
        le=4,
        description=(
            "The repair loop re-renders segments below the quality thresholds for at most this share of the "
            "conversion stage's time (0: no repair; needs COVER_QUALITY gate or measure)."
        ),
    )
    allow_hub_download: bool = Field(
        False, description="Let Demucs fetch a named model from its public repo if not in the store."
    )

    # storage: a local folder (the embedded default) or an S3 API bucket (Cloudflare R2)
    storage: str = Field("local", pattern="^(local|s3)$", description="'local' or 's3'.")
    storage_dir: Path = Field(DEFAULT_CACHE / "bucket", description="Root of the local storage.")
    bucket: str = Field("melodia-covers", description="Bucket name (s3).")
    s3_endpoint: str | None = Field(None, description="S3 API endpoint, e.g. https://ACCOUNT.r2.cloudflarestorage.com.")
    s3_region: str = Field("auto", description="Region ('auto' for R2).")
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = Field(None, description="Never printed: repr shows '**********'.")
    queue_bucket: str | None = Field(
        None,
        description=(
            "A bucket of its own for the API's 'queued' status markers, the one thing the API writes, so that its "
            "credentials for the covers bucket can be read-only (an R2 token is scoped per bucket). Unset: the "
            "covers bucket."
        ),
    )
    queue_s3_access_key_id: SecretStr | None = Field(
        None, description="The queue bucket's key (unset: s3_access_key_id)."
    )
    queue_s3_secret_access_key: SecretStr | None = Field(
        None, description="The queue bucket's secret (unset: s3_secret_access_key). Never printed."
    )
    song_key_template: str = Field("songs/{song_id}", description="Where the Catalog stores source songs.")
    lifecycle_days: dict[str, int] = Field(
        {"stems/": 30, "analysis/": 30, "claims/": 2, "status/": 30, "reports/": 180},
        description=(
            "Days the bucket keeps each prefix after an object's last write (python -m shared.lifecycle applies "
            "them; 0 keeps for ever). Stems are a cache (150 MB per 3.5-minute song), the vocals' analysis "
            "too (about 35 MB per 3.5 minutes of sung vocals), claims matter for a "
            "minute, a status object only until its cover is stored or has failed. Covers, manifests, songs, "
            "models and voices are never expired."
        ),
    )
    lifecycle_queue_days: int = Field(7, ge=1, description="Days the queue bucket keeps a 'queued' marker.")
    url_expiry_s: int = Field(7 * 24 * 3600, gt=0, description="Lifetime of presigned cover URLs.")

    # events (Pub/Sub; PUBSUB_EMULATOR_HOST points the clients at the emulator)
    project: str = Field("melodia-local", description="Google Cloud project of the topics.")
    requests_topic: str = Field("cover-requests")
    events_topic: str = Field("cover-events")
    requests_subscription: str = Field("cover-requests-gpu", description="The GPU runner's subscription.")
    public_base_url: str = Field("http://127.0.0.1:8080", description="Base of status URLs in 202 answers.")
    push_audience: str | None = Field(
        None, description="When set, the trigger accepts only pushes whose OIDC token has this audience."
    )
    push_service_account: str | None = Field(
        None, description="When set, the push token must name this (verified) service account."
    )
    push_certs_url: str = Field(
        "https://www.googleapis.com/oauth2/v1/certs", description="Google's token certificates."
    )

    default_runner: Runner = Field(
        "cpu", description="The runner the dispatcher routes a request to when it names none (shared/routing.py)."
    )
    serves: Runner | None = Field(
        None,
        description=(
            "The routed requests this consumer (the trigger, a runner) takes; a message routed elsewhere is "
            "acknowledged and logged (request.not_routed_here). Unset: no check, the subscription's filter routes."
        ),
    )
    job_launcher: str = Field(
        "cloud-run",
        pattern="^(cloud-run|local)$",
        description=(
            "How the trigger starts a job execution: cloud-run (the Admin API) or local (a child process with "
            "Cloud Run's task environment, retried up to job_max_retries: the rehearsal stack)."
        ),
    )
    job_max_retries: int = Field(
        3, ge=0, le=10, description="The local launcher's task retries (Cloud Run's max_retries)."
    )
    local_job_slots: int = Field(
        0,
        ge=0,
        description="Executions the local launcher runs at once, the rest waiting; 0: one per 2 GiB of memory.",
    )
    max_executions: int = Field(
        0,
        ge=0,
        description=(
            "The trigger starts no job execution while this many are running (0: no bound); it answers the push "
            "429 instead and the request waits in its subscription, pushed again with Pub/Sub's backoff. Bounds a "
            "burst within the region's quotas."
        ),
    )
    job_task_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="The local launcher kills a task attempt that runs longer than this (Cloud Run's task timeout).",
    )
    executions_topic: str = Field(
        "cover-executions-ended",
        description=(
            "Where a failed job execution is signalled (in Google Cloud a log sink publishes Cloud Run's log "
            "entries there; the local launcher publishes its own): the `unanswered` function answers the request "
            "of an execution that failed without answering."
        ),
    )
    failpoint: str | None = Field(
        None,
        pattern="^((after|raise):[a-z]+|hold:[a-z]+:.+)$",
        description=(
            "Tests only: 'after:STAGE' makes a worker kill itself (SIGKILL) right after reporting STAGE's end; "
            "'raise:STAGE' makes that render fail there with an error a retry might fix; 'hold:STAGE:PATH' "
            "makes it wait there (its claim kept renewed) until the file PATH exists, at most 10 minutes."
        ),
    )
    # the worker
    runner: str = Field("local", description="Name of this runner in events (e.g. 'cloud-run-cpu', 'gpu-1').")
    lease_s: float = Field(
        60.0,
        gt=0,
        description=(
            "A render's claim on its cover lapses this long after its last renewal (renewed every third of it): "
            "after a crash, GET /covers/{id} says stalled and a redelivery takes over within this time."
        ),
    )
    message_lease_extension_s: float = Field(
        30.0,
        ge=10,
        le=600,
        description=(
            "A GPU runner extends the Pub/Sub lease of a message it renders by at most this much at a time "
            "(the client library's max_duration_per_lease_extension): if the runner dies, Pub/Sub redelivers "
            "the message to another runner within about this long."
        ),
    )
    busy_retry_s: float = Field(
        10.0,
        ge=0,
        description=(
            "How often a request for a cover another runner renders is looked at again while it waits (a GPU "
            "runner keeps the message leased meanwhile, a Cloud Run task keeps running): at most this long, "
            "sooner when the holder's lease would lapse."
        ),
    )
    busy_wait_max_s: float = Field(
        3000.0,
        ge=0,
        description=(
            "How long a Cloud Run task waits on a cover another runner holds (until that runner's lease lapses or "
            "its cover is stored) before it exits for a retry."
        ),
    )
    publish_deadline_s: float = Field(
        300.0, gt=0, description="How long a final event (completed, failed) is retried while Pub/Sub is unreachable."
    )
    max_attempts: int = Field(
        5, ge=1, description="Retryable failures give up (cover.failed) after this many attempts."
    )
    cloud_run_job: str = Field(
        "projects/melodia-local/locations/europe-west1/jobs/cover-job",
        description="Full name of the Cloud Run Job the push trigger executes.",
    )

#!/usr/bin/env bash
# Start a GPU runner on any machine with an NVIDIA GPU (a Lightning AI Studio, a rented cloud GPU,
# a workstation): one command, from a checkout of this repository.
#
#   bash infra/gpu-runner.sh
#
# Settings and credentials come from a file only its owner can read, never from the command line
# (which shell history and `ps` keep): COVER_RUNNER_ENV, default ~/.config/melodia-cover/runner.env,
# lines NAME=VALUE, mode 600:
#   COVER_PROJECT=my-project
#   COVER_BUCKET=melodia-covers
#   COVER_S3_ENDPOINT=https://<account>.r2.cloudflarestorage.com
#   COVER_S3_ACCESS_KEY_ID=...            (the writer token: docs/operations.md, "Deploy from zero")
#   COVER_S3_SECRET_ACCESS_KEY=...
#   GOOGLE_APPLICATION_CREDENTIALS=/path/to/runner-credentials.json
# Pub/Sub credentials: a Workload Identity Federation credential file (terraform output
# gpu_runner_credential_config writes it; no key inside), or as a fallback a key file of
# cover-gpu-runner. Variables already in the environment win over the file. Connections are outbound only: a
# streaming pull on COVER_REQUESTS_SUBSCRIPTION (default cover-requests-gpu), the bucket, the
# events topic. The first start makes .venv-gpu with PyPI's torch (the CUDA build on Linux) and the
# job's pinned requirements; the runner syncs the bucket's models/ before its first request, logs a
# runner.health line every minute (requests in flight, GPU memory, covers done), and on SIGTERM or
# Ctrl-C stops pulling and finishes every request it holds before it exits.
set -euo pipefail
cd "$(dirname "$0")/.."

env_file=${COVER_RUNNER_ENV:-$HOME/.config/melodia-cover/runner.env}
if [ -f "$env_file" ]; then
  mode=$(stat -c %a "$env_file")
  if [ "${mode: -2}" != "00" ]; then
    echo "$env_file holds credentials: make it private first (chmod 600 $env_file)" >&2
    exit 2
  fi
  while IFS='=' read -r name value; do
    case "$name" in
      '' | '#'*) continue ;;
      *[!A-Z0-9_]*) echo "$env_file: '$name' is not a variable name" >&2; exit 2 ;;
    esac
    if [ -z "${!name:-}" ]; then export "$name=$value"; fi # the environment wins over the file
  done < "$env_file"
fi

: "${COVER_PROJECT:?set COVER_PROJECT, the Google Cloud project of the cover topics}"
: "${COVER_BUCKET:?set COVER_BUCKET, the bucket of songs, models and covers}"
python=${PYTHON:-python3.11}
if ! command -v "$python" >/dev/null; then
  echo "Python 3.11 is needed (PYTHON=/path/to/python3.11, or: uv python install 3.11)" >&2
  exit 2
fi
if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then
  echo "FFmpeg is needed: apt-get install -y ffmpeg (or conda install -c conda-forge ffmpeg)" >&2
  exit 2
fi
if [ ! -x .venv-gpu/bin/python ]; then
  "$python" -m venv .venv-gpu
  .venv-gpu/bin/pip install --quiet --upgrade pip
  .venv-gpu/bin/pip install --quiet '.[job]'
fi
.venv-gpu/bin/python -c "import sys, torch; sys.exit(None if torch.cuda.is_available() else 'torch sees no CUDA GPU here')"

export COVER_STORAGE=${COVER_STORAGE:-s3}
export COVER_DEVICE=${COVER_DEVICE:-cuda}
export COVER_RUNNER=${COVER_RUNNER:-gpu-$(hostname)}
exec .venv-gpu/bin/python -m job serve

#!/usr/bin/env bash
# Start a GPU runner on any machine with an NVIDIA GPU (a Lightning AI Studio, a rented cloud GPU,
# a workstation): one command, from a checkout of this repository.
#
#   COVER_PROJECT=my-project COVER_BUCKET=covers COVER_S3_ENDPOINT=https://<account>.r2.cloudflarestorage.com \
#   COVER_S3_ACCESS_KEY_ID=... COVER_S3_SECRET_ACCESS_KEY=... \
#   GOOGLE_APPLICATION_CREDENTIALS=/path/to/runner-key.json  bash infra/gpu-runner.sh
#
# Credentials come from the environment only (Pub/Sub: Application Default Credentials, e.g.
# GOOGLE_APPLICATION_CREDENTIALS; the bucket: COVER_S3_*). Connections are outbound only: a
# streaming pull on COVER_REQUESTS_SUBSCRIPTION (default cover-requests-gpu), the bucket, the
# events topic. The first start makes .venv-gpu with PyPI's torch (the CUDA build on Linux) and the
# job's pinned requirements; the runner syncs the bucket's models/ before its first request, logs a
# runner.health line every minute (requests in flight, GPU memory, covers done), and on SIGTERM or
# Ctrl-C stops pulling and finishes every request it holds before it exits.
set -euo pipefail
cd "$(dirname "$0")/.."

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

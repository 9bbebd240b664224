# The job image (and the dispatcher's code), in two variants that differ only in their torch build:
#   docker build --target cpu -t cover-job:cpu .                        # Cloud Run Job executions (CPU)
#   docker build --target gpu --build-arg TORCH=cuda -t cover-job:gpu .   # the GPU runner (subscriber)
# The Python layers install what `make test` installs for the job: the core and `job` requirements
# of pyproject.toml, whose pins are the only place versions live (the HTTP functions install the
# core alone: see cloudbuild.yaml). The dependency layer comes before the source, so a code change
# does not reinstall torch. job/devkit, tests/ and bench/ are left out (.dockerignore).
# torch: TORCH=cpu (the default) takes the CPU-only build from PyTorch's CPU index (torch
# 2.13.0+cpu, the build the tests run: 754 MB installed); TORCH=cuda takes PyPI's Linux wheel, which
# is the CUDA build and pulls NVIDIA's runtime libraries (several GB; docs/operations.md, "GPU runner").
ARG TORCH=cpu
FROM python:3.11.7-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    COVER_MODELS_DIR=/models COVER_WORK_DIR=/tmp/work
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ffmpeg \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['job']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir pip==26.3

# the dependency layer: torch first (its build decides the variant), then pyproject.toml's pinned
# core and `job` requirements (torch==2.13.0 is then already met), before any source
# (webrtcvad, pulled by resemblyzer, has no wheel: a compiler is installed for it and removed after)
FROM base AS deps-cpu
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
 && pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*

FROM base AS deps-cuda
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*

# one of the two stages above, by name (hadolint and checkov take the stage name for an untagged image)
# checkov:skip=CKV_DOCKER_7: deps-${TORCH} is a stage of this file; the one base image is pinned (python:3.11.7-slim-bookworm)
# checkov:skip=CKV_DOCKER_2: neither target serves HTTP: Cloud Run Jobs ignore HEALTHCHECK, and the GPU runner reports its health in runner.health log lines
# hadolint ignore=DL3006
FROM deps-${TORCH} AS app
WORKDIR /app
COPY shared shared
COPY job job
COPY dispatcher dispatcher
COPY schemas schemas
RUN pip install --no-cache-dir --no-deps . \
 && useradd --create-home --uid 10001 cover && mkdir -p /models /tmp/work && chown cover /models /tmp/work
# No weights in the image by default: a runner syncs the bucket's models/ prefix into /models at start.
# Baking a model store in stays possible: --build-arg MODELS=<folder in the build context>.
ARG MODELS=infra/no-models
COPY --chown=cover ${MODELS} /models
USER 10001

FROM app AS cpu
ENV COVER_DEVICE=cpu COVER_RUNNER=cloud-run-cpu
# one request from COVER_REQUEST (set by the trigger's override or `gcloud run jobs execute --update-env-vars`)
CMD ["python", "-m", "job", "run"]

FROM app AS gpu
ENV COVER_DEVICE=cuda COVER_RUNNER=gpu-runner
# COVER_IN_FLIGHT=0: requests in flight chosen from the card's memory (docs/operations.md, "GPU runner")
CMD ["python", "-m", "job", "serve"]

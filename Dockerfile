# The job image (and the dispatcher's code), one Python layer for both variants:
#   docker build --target cpu -t cover-job:cpu .   # Cloud Run Job executions (CPU)
#   docker build --target gpu -t cover-job:gpu .   # the GPU runner (long-running subscriber)
# The Python layers install what `make test` installs for the job: the core and `job` requirements
# of pyproject.toml, whose pins are the only place versions live (the HTTP functions install the
# core alone: see cloudbuild.yaml). The dependency layer comes before the source, so a code change
# does not reinstall torch. job/devkit, tests/ and bench/ are left out (.dockerignore). PyPI's torch
# 2.13.0 wheel for Linux carries the CUDA runtime libraries, so the same layer runs on CPU and, with
# an NVIDIA driver on the host, on GPU.
FROM python:3.11.7-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    COVER_MODELS_DIR=/models COVER_WORK_DIR=/tmp/work
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ffmpeg \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
# the dependency layer: pyproject.toml's pinned core and `job` requirements, before any source
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['job']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir pip==26.3 && pip install --no-cache-dir -r /tmp/requirements.txt
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

FROM base AS cpu
ENV COVER_DEVICE=cpu COVER_RUNNER=cloud-run-cpu
# one request from COVER_REQUEST (set by the trigger's override or `gcloud run jobs execute --update-env-vars`)
CMD ["python", "-m", "job", "run"]

FROM base AS gpu
ENV COVER_DEVICE=cuda COVER_RUNNER=gpu-runner
CMD ["python", "-m", "job", "serve"]

# Two commands on a fresh machine: `make run` renders a demo cover, `make test` runs the suite.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: browser run test test-fast test-full coverage lint bench bench-targets bench-approximations bench-mdx bench-watermark bench-cold-start bench-gpu gpu-runner serve setup system-deps pubsub-emulator clean

system-deps:  ## Debian's ffmpeg (ffmpeg + ffprobe)
	@command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg; }

browser:  ## Debian's chromium: the report page's screenshot test
	@command -v chromium >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

pubsub-emulator:  ## the Pub/Sub emulator of the Google Cloud CLI (needs Google's apt repository and a JRE)
	@gcloud beta emulators pubsub --help >/dev/null 2>&1 || \
		{ $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq google-cloud-cli-pubsub-emulator default-jre-headless \
		  || { echo "install the Google Cloud CLI and its pubsub emulator: https://cloud.google.com/sdk/docs/install"; exit 1; }; }

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=23"
	$(BIN)/pip install --quiet -e '.[job,test]'
	touch $(STAMP)

# torchfcpe's wheel, downloaded and never installed (it imports torchaudio): the suite reads the FCPE
# checkpoint out of it (tests/conftest.py); `cover models fetch fcpe` does the same for users
FCPE_WHEEL := build/wheels/torchfcpe-0.0.4-py3-none-any.whl
$(FCPE_WHEEL): | $(STAMP)
	$(BIN)/pip download --quiet --no-deps "torchfcpe==0.0.4" -d build/wheels

setup: system-deps $(STAMP) $(FCPE_WHEEL)

# checkov lives in a venv of its own: its many pins are not ours to reconcile with the job's
CHECKOV := .venv-checkov/bin/checkov
$(CHECKOV):
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/pip install --quiet "checkov==3.3.30"

run: setup  ## prepare demo models and song, render a cover, print its path and stage timings
	$(BIN)/cover demo -o out/demo-cover.mp3

# one pytest-xdist worker per core and two more: the workers wait on the emulator, process starts and
# I/O a good part of the time (2 cores, a clean clone: 9:30 with 2 workers, 9:03 with 3 at 305 tests;
# 10:55 with 3 at 406; docs/development.md)
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 2 )))

test: setup pubsub-emulator browser  ## the whole suite, one worker per core and two more (starts the emulator and an S3 server itself)
	$(BIN)/python tests/dispatcher_venv.py
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

test-full: setup pubsub-emulator browser  ## the tests marked sweep, whole: every kill point, ten minutes of audio (.ci/run)
	COVER_TEST_FULL=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal -m sweep

coverage: setup pubsub-emulator browser  ## the whole suite under coverage.py: line coverage of job/, shared/, dispatcher/
	rm -rf .cache/coverage
	$(BIN)/coverage run -m pytest -n $(TEST_WORKERS) --dist worksteal
	$(BIN)/coverage combine -q
	$(BIN)/coverage report --sort=cover

test-fast: setup  ## the inner loop: everything but the tests marked slow
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow"

lint: setup $(CHECKOV)  ## ruff (lint and format), mypy, hadolint, yamllint, shellcheck and checkov, as CI runs them
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	$(BIN)/yamllint -s cloudbuild.yaml .hadolint.yaml .yamllint.yaml
	$(BIN)/shellcheck .ci/run infra/gpu-runner.sh
	$(CHECKOV) --quiet --compact --skip-download --framework terraform -d infra
	$(CHECKOV) --quiet --compact --skip-download --framework dockerfile -f Dockerfile

serve: setup pubsub-emulator  ## the local stack: emulator, local storage, dispatcher on :8080, a worker
	$(BIN)/python -m job.devkit.stack

bench: setup
	$(BIN)/python -m bench.convert
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.quality
	$(BIN)/python -m bench.mix
	$(BIN)/python -m bench.mdx
	$(BIN)/python -m bench.provenance
	$(BIN)/python -m bench.watermark
	$(BIN)/python -m bench.craft
	$(BIN)/python -m bench.roofline
	$(BIN)/python -m bench.approximations

bench-targets: setup  ## this machine against the speed and memory targets (issues 34, 36), one run: about 30 to 45 minutes on 2 cores
	$(BIN)/python -m bench.targets

bench-approximations: setup  ## the benchmark cover on this machine's default path against the exact path: the quality stage's scores within the tests' bounds
	$(BIN)/python -m bench.approximations

bench-fcpe-parity: setup  ## FCPE: our inference against torchfcpe 0.0.4's own (its wheel, a process of its own)
	$(BIN)/pip download --quiet --no-deps einops -d build/wheels
	$(BIN)/python bench/fcpe_parity.py

bench-mdx: setup  ## the MDX-Net passes (lead/backing, de-reverb): s per minute, and a cover with both against without
	$(BIN)/python -m bench.mdx

bench-watermark: setup  ## the watermark: read after MP3, AAC, Opus, 48 kHz, -6 dB, a 20 s excerpt; false positives; level; cost
	$(BIN)/python -m bench.watermark

bench-cold-start: setup  ## a job execution's start-to-first-stage time, models baked in or downloaded
	$(BIN)/python -m bench.cold_start

bench-gpu: setup  ## the GPU benchmark (bench/gpu.py): on a machine with a GPU, one command
	$(BIN)/python -m bench.gpu

gpu-runner:  ## start a GPU runner on this machine (infra/gpu-runner.sh: credentials from the environment)
	bash infra/gpu-runner.sh

clean:
	rm -rf $(VENV) .venv-dispatcher .venv-checkov out .pytest_cache

# Two commands on a fresh machine: `make run` renders a demo cover, `make test` runs the suite.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test bench setup system-deps clean

system-deps:  ## Debian's ffmpeg (ffmpeg + ffprobe)
	@command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg; }

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=23"
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: system-deps $(STAMP)

run: setup  ## prepare demo models and song, render a cover, print its path and stage timings
	$(BIN)/cover demo -o out/demo-cover.mp3

test: setup  ## the whole suite
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m bench.convert

clean:
	rm -rf $(VENV) out .pytest_cache

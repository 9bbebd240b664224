"""Shared fixtures: a model store with tiny variants of the real architectures, in the real formats."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from in_process import run_main
from service_stack import emulator, s3, stack  # noqa: F401 - the service fixtures, for every module

from job.devkit import demo
from job.render.media.audio import MIX_SAMPLE_RATE, write_wav

pytest_plugins = ("cpu_durations",)  # --cpu-durations=N: the tests that cost the suite the most CPU time

# ``make test`` runs narrowed sweeps (a few kill points, a shorter long song); ``.ci/run`` runs the
# tests marked ``sweep`` once more with COVER_TEST_FULL=1: every kill point, ten minutes of audio.
FULL_SWEEPS = os.environ.get("COVER_TEST_FULL") == "1"


# Network in tests is loopback only: google-auth never probes the metadata server (NO_GCE_CHECK),
# and should anything ask it anyway, its address is a dead loopback port. Every process the tests
# start inherits this.
NO_METADATA_SERVER = {"NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test``: one worker per core) each worker computes on one thread,
    and so does every process it starts (``cover``, ``python -m job``): the workers share the
    cores instead of each spinning up a thread per core. No test reaches the metadata server.

    The RVC decoder is torch's unless a test asks for another (``COVER_DECODER=torch``, inherited by
    every process a test starts): the default, ``auto``, builds each voice's int8 decoder on CPUs
    without native bf16 (seconds per voice, per fresh model store) and moves every conversion by its
    error (0.6 dB), which would hide the exactness the other tests hold. The int8 decoder and the
    ``auto`` choice have their own tests (``tests/test_int8_decoder.py``)."""
    os.environ.update(NO_METADATA_SERVER)
    os.environ.setdefault("COVER_DECODER", "torch")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests marked ``slow`` first, so that the workers start the long ones early and finish
    together (``--dist worksteal`` hands the short ones to whichever worker is free)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    """Tiny Demucs, tiny-but-768-wide HuBERT, the real-size RMVPE, a tiny v2 48k demo voice."""
    root = tmp_path_factory.mktemp("models")
    demo.write_models(root, size="tiny")
    return root


FCPE_WHEEL = Path(__file__).resolve().parent.parent / "build/wheels/torchfcpe-0.0.4-py3-none-any.whl"


@pytest.fixture(scope="session")
def fcpe_checkpoint(tmp_path_factory) -> Path:
    """The real FCPE checkpoint, out of torchfcpe's wheel (``make setup`` downloads it; never
    installed: the package imports torchaudio), checked against its pinned sha256."""
    import zipfile

    from job.render.rvc.fcpe import FCPE_SHA256
    from shared.hashing import sha256_of

    if not FCPE_WHEEL.is_file():
        pytest.skip("torchfcpe's wheel is not downloaded (make setup downloads it)")
    path = tmp_path_factory.mktemp("fcpe") / "fcpe.pt"
    with zipfile.ZipFile(FCPE_WHEEL) as archive:
        path.write_bytes(archive.read("torchfcpe/assets/fcpe_c_v001.pt"))
    assert sha256_of(path) == FCPE_SHA256
    return path


@pytest.fixture(scope="session")
def converter(store):
    from job.render.rvc.engine import VoiceConverter
    from shared.model_store import ModelStore

    return VoiceConverter(ModelStore(store), device="cpu", decoder="torch")


@pytest.fixture
def env(store, tmp_path) -> dict[str, str]:
    """Environment for running the ``cover`` command against the test store. The random-weight
    voices are always below the quality gate, so these runs measure without gating or repairing
    (the gate and the repair loop have tests of their own)."""
    return {
        **os.environ,
        "COVER_QUALITY": "measure",
        "COVER_REPAIR_BUDGET": "0",
        "COVER_MODELS_DIR": str(store),
        "COVER_WORK_DIR": str(tmp_path / "work"),
        "COVER_STEM_CACHE_DIR": str(tmp_path / "stems"),
    }


def run_cover(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``cover ARGS`` in this process (tests/in_process.py): the process boundary is not what these
    tests test (one test runs the installed ``cover`` as a process); in-process they share the
    loaded models and save an interpreter's start and torch's import per command."""
    from job.cli.main import main

    return run_main(main, args, env)


def run_cover_process(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``cover ARGS`` as the installed console script, in a process of its own."""
    cover = Path(sys.executable).parent / "cover"
    return subprocess.run([str(cover), *args], env=env, capture_output=True, text=True, timeout=timeout)


def sung_tone(seconds: float, f0: float = 220.0, sample_rate: int = 16000, vibrato: float = 0.0) -> np.ndarray:
    """A harmonic 'sung' tone: a few harmonics with a vowel-like tilt."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    freq = f0 * (1 + vibrato * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(freq) / sample_rate
    tone = sum(np.sin(h * phase) / h for h in range(1, 6))
    return (0.3 * tone / np.max(np.abs(tone))).astype(np.float32)


@pytest.fixture
def song(tmp_path) -> Path:
    vocals, inst = demo.demo_song(6.0)
    return write_wav(tmp_path / "song.wav", np.clip(vocals + inst, -1, 1), MIX_SAMPLE_RATE)


class CodeRunningPayload:
    """Unpickling this would run ``touch MARKER``: a safe loader must refuse it, and the marker stays absent."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def encodes(monkeypatch) -> list:
    """Every FFmpeg encode the mix stage starts in this test (the real encoder, counted)."""
    from job.render.media import ffmpeg

    started: list = []

    class Counting(ffmpeg.PipeEncoder):
        def __init__(self, *args, **kwargs):
            started.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ffmpeg, "PipeEncoder", Counting)
    return started


LARGE = 48 * 2**20  # a buffer the size of HTDemucs' activations (33 to 66 MB), over glibc's 32 MB threshold


def glibc():
    """glibc, for the tests of where large buffers come from (skipped elsewhere)."""
    from job.render.compute import _libc

    libc = _libc()
    if libc is None:
        pytest.skip("needs glibc's mallopt and mallinfo2")
    return libc


def served_from_the_heap(libc) -> bool:
    """Whether a large buffer taken now comes from the heap rather than a fresh mapping of its own."""
    import torch

    before = libc.mallinfo2().hblkhd
    buffer = torch.ones(LARGE // 4)
    mapped = libc.mallinfo2().hblkhd - before >= LARGE
    del buffer
    return not mapped


def recorded_mallopt(libc, monkeypatch) -> list[tuple[int, int]]:
    """Every ``mallopt`` call from now on in this test, in order (glibc still applies each)."""
    calls: list[tuple[int, int]] = []
    original = libc.mallopt

    def recording(param: int, value: int) -> int:
        calls.append((param, value))
        return original(param, value)

    monkeypatch.setattr(libc, "mallopt", recording)
    return calls


def heap_settings() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``heap_buffers``' mallopt calls: those it makes on entering, those on leaving."""
    from job.render import compute

    applied = [
        (compute.M_MMAP_THRESHOLD, compute.HEAP_BUFFERS_UP_TO),
        (compute.M_TRIM_THRESHOLD, compute.HEAP_KEEPS_UP_TO),
    ]
    settled = [
        (compute.M_MMAP_THRESHOLD, compute.GLIBC_SETTLED_MMAP),
        (compute.M_TRIM_THRESHOLD, compute.GLIBC_SETTLED_TRIM),
    ]
    return applied, settled

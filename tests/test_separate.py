"""Separation loads Demucs packages from the store's local repo, safely, and writes two stems."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from job import demo
from job.audio import read_wav
from job.fetch import fetch
from job.separate import SeparationOptions, Separator, load_package
from shared.errors import CoverError, ErrorCode
from tests.conftest import CodeRunningPayload


def test_stems_have_the_song_length_and_layout(store, song, tmp_path):
    fetched = fetch(song, tmp_path / "w")
    seen = []
    stems = Separator(store, SeparationOptions(device="cpu")).separate(fetched.wav, tmp_path / "stems", seen.append)
    vocals, rate = read_wav(stems.vocals)
    no_vocals, _ = read_wav(stems.no_vocals)
    mix, _ = read_wav(fetched.wav)
    assert rate == 44100 and vocals.shape == no_vocals.shape == mix.shape
    assert seen[-1] == 1.0 and len(seen) > 2  # progress was reported along the way
    assert np.isfinite(vocals).all() and np.abs(vocals).max() > 0


def test_unknown_separator_says_how_to_get_it(store):
    with pytest.raises(CoverError) as info:
        Separator(store, SeparationOptions(model="mdx_extra"))
    assert info.value.code is ErrorCode.MODEL_MISSING and "COVER_ALLOW_HUB_DOWNLOAD" in info.value.message


def test_checksum_in_the_file_name_is_verified(tmp_path):
    folder = demo.write_demucs(tmp_path / "sep", size="tiny")
    package = next(folder.glob("*.th"))
    data = bytearray(package.read_bytes())
    data[-10] ^= 0xFF
    package.write_bytes(bytes(data))
    with pytest.raises(CoverError) as info:
        load_package(package)
    assert info.value.code is ErrorCode.MODEL_HASH_MISMATCH


def test_package_that_names_a_foreign_class_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.th"
    torch.save({"klass": CodeRunningPayload(marker), "args": (), "kwargs": {}, "state": {}}, path)
    with pytest.raises(CoverError) as info:
        load_package(path)
    assert info.value.code is ErrorCode.MODEL_UNSAFE
    assert not marker.exists()

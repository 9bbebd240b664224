"""Separation loads Demucs packages from the store's local repo, safely, and writes two stems."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from job.devkit import demo
from job.render.fetch import fetch
from job.render.media.audio import read_wav
from job.render.separate.loading import load_package
from job.render.separate.separator import Separator
from shared.errors import CoverError, ErrorCode
from shared.model_store import ModelStore
from shared.options import SeparationOptions
from tests.conftest import (
    FULL_SWEEPS,
    LARGE,
    CodeRunningPayload,
    glibc,
    heap_settings,
    recorded_mallopt,
    served_from_the_heap,
)


def test_stems_have_the_song_length_and_layout(store, song, tmp_path):
    fetched = fetch(song, tmp_path / "w")
    seen = []
    separator = Separator(ModelStore(store), SeparationOptions(), "cpu")
    stems = separator.separate(fetched.wav, tmp_path / "stems", seen.append)
    vocals, rate = read_wav(stems.vocals)
    no_vocals, _ = read_wav(stems.no_vocals)
    mix, _ = read_wav(fetched.wav)
    assert rate == 44100 and vocals.shape == no_vocals.shape == mix.shape
    assert seen[-1] == 1.0 and len(seen) > 2  # progress was reported along the way
    assert np.isfinite(vocals).all() and np.abs(vocals).max() > 0
    # the file, read a window at a time, separates exactly as the song held in memory
    in_memory = separator.separate_array(mix)
    np.testing.assert_array_equal(vocals, in_memory[0])
    np.testing.assert_array_equal(no_vocals, in_memory[1])


@pytest.mark.parametrize(("overlap", "batch"), [(0.25, 1), (0.6, 1), (0.6, 3)])
def test_streamed_separation_equals_demucs_whole_song_split(store, overlap, batch):
    """Our segment loop (bounded memory), one segment per call or several in a batch (the GPU's
    way), gives what Demucs' apply_model gives on the whole song."""
    from demucs.apply import apply_model

    separator = Separator(ModelStore(store), SeparationOptions(overlap=overlap), "cpu", precision="fp32", batch=batch)
    segment = int(separator.model.samplerate * float(separator._models()[0][0].segment))
    mix = np.random.default_rng(0).standard_normal((2, int(2.7 * segment))).astype(np.float32) * 0.1
    blocks = list(separator.blocks(mix))
    vocals, no_vocals = (np.concatenate([b[i] for b in blocks], axis=-1) for i in (0, 1))

    wav = torch.from_numpy(mix)
    ref = wav.mean(0)
    mean, std = ref.mean(), ref.std()
    with torch.inference_mode():
        out = apply_model(separator.model, ((wav - mean) / std)[None], shifts=0, split=True, overlap=overlap)[0]
    out = out * std + mean
    expected_vocals = out[list(separator.model.sources).index("vocals")]
    assert len(blocks) > 3 and vocals.shape == mix.shape
    np.testing.assert_allclose(vocals, expected_vocals.numpy(), atol=1e-5)
    np.testing.assert_allclose(no_vocals, (out.sum(0) - expected_vocals).numpy(), atol=1e-5)


def test_fast_kernels_run_attention_through_the_functional_path_on_the_cpu(tmp_path, monkeypatch):
    """With the fast kernels on the CPU, Demucs' self-attention skips torch's native fast path
    (which multiplies out the whole attention matrix) for scaled_dot_product_attention; the
    reference kernels keep Demucs' own path. Same numbers within 1e-5, and the process-wide switch
    is restored afterwards."""
    demo.write_demucs(tmp_path / "models" / "separation", size="tiny", heads=2)  # the fast path needs even heads
    native = torch._native_multi_head_attention
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return native(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", counted)
    mix = np.random.default_rng(2).standard_normal((2, 44100 * 3)).astype(np.float32) * 0.2
    outputs, native_calls = {}, {}
    for kernels in ("reference", "fast"):
        calls.clear()
        models = ModelStore(tmp_path / "models")
        separator = Separator(models, SeparationOptions(), "cpu", precision="fp32", kernels=kernels)
        outputs[kernels] = separator.separate_array(mix)
        native_calls[kernels] = len(calls)
    assert native_calls["reference"] > 0 and native_calls["fast"] == 0
    for reference, fast in zip(outputs["reference"], outputs["fast"], strict=True):
        np.testing.assert_allclose(fast, reference, atol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled()


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _released_on_freeing_mb() -> float:
    """How much resident memory freeing four large buffers gives back to the system."""
    buffers = [torch.ones(LARGE // 4) for _ in range(4)]
    held = _rss_mb()
    del buffers
    return held - _rss_mb()


def test_fast_separation_takes_its_large_buffers_from_the_heap(store, song, tmp_path, monkeypatch):
    """While the fast kernels separate, a buffer of Demucs' activations' size comes from the heap
    (its pages reused, not faulted in afresh for every segment): glibc's settings are made before
    the first segment and set back at the end; the reference kernels leave glibc's settings alone.
    (A large buffer can also come from a free chunk earlier tests left in the heap, so the settings
    are checked, not only where the buffer lands.)"""
    libc = glibc()
    fetched = fetch(song, tmp_path / "w")
    calls = recorded_mallopt(libc, monkeypatch)
    applied, settled = heap_settings()
    during: list[tuple[list, bool]] = []
    separator = Separator(ModelStore(store), SeparationOptions(), "cpu", kernels="fast")
    separator.separate(
        fetched.wav, tmp_path / "fast", lambda done: during.append((list(calls), served_from_the_heap(libc)))
    )
    assert len(during) > 2 and all(seen == applied and heap for seen, heap in during)
    assert calls == applied + settled

    calls.clear()
    separator = Separator(ModelStore(store), SeparationOptions(), "cpu", kernels="reference")
    separator.separate(fetched.wav, tmp_path / "reference")
    assert calls == []


def test_heap_buffers_hold_until_the_last_user_leaves_which_hands_the_memory_back():
    """Separations side by side share the setting: it holds until the last one leaves, and while it
    holds, freed large buffers stay for reuse; the last one out hands them back to the system."""
    from job.render.compute import heap_buffers

    libc = glibc()
    with heap_buffers():
        with heap_buffers():
            pass
        assert served_from_the_heap(libc)  # one user still inside
        assert _released_on_freeing_mb() < LARGE / 2**20  # 192 MB freed, kept for the next segment
        held = _rss_mb()
    assert _rss_mb() < held - 150


BF16_MIN_SDR_DB = 40.0  # measured 47.6 dB on the real-size htdemucs (README, "Performance")


@pytest.mark.slow
@pytest.mark.sweep
def test_bf16_separation_stays_within_tolerance_of_fp32(tmp_path):
    """The default on CPUs with native bf16 (autocast, channels-last) against fp32 reference
    kernels, on a real-size htdemucs and one segment of noise-like music. Where the CPU emulates
    bf16 (7 times slower than fp32; one real-size segment took 104 s on the AMD EPYC), make test
    checks the same on the tiny htdemucs (same architecture, narrow: the bf16 path runs, its error
    bounded the same); .ci/run (COVER_TEST_FULL=1) and CPUs with native bf16 on the real size."""
    from job.render.compute import native_bf16

    size = "real" if FULL_SWEEPS or native_bf16(torch.device("cpu")) else "tiny"
    demo.write_demucs(tmp_path / "models" / "separation", size=size)
    mix = np.random.default_rng(1).standard_normal((2, 44100 * 7)).astype(np.float32) * 0.2
    options = SeparationOptions()
    outputs = {}
    for precision, kernels in (("fp32", "reference"), ("bf16", "fast")):
        separator = Separator(ModelStore(tmp_path / "models"), options, "cpu", precision=precision, kernels=kernels)
        outputs[precision] = separator.separate_array(mix)
    for fp32, bf16 in zip(outputs["fp32"], outputs["bf16"], strict=True):
        sdr = 10 * np.log10(np.sum(fp32.astype(np.float64) ** 2) / np.sum((fp32 - bf16).astype(np.float64) ** 2))
        print(f"bf16 vs fp32 separation: SDR {sdr:.1f} dB")
        assert BF16_MIN_SDR_DB < sdr < 200  # close, and the bf16 path really ran


def test_the_stem_key_follows_the_model_files_and_the_arithmetic(store, tmp_path):
    own = tmp_path / "models"
    shutil.copytree(store / "separation", own / "separation")
    models = ModelStore(own)

    def key(options: SeparationOptions | None = None, **compute) -> str:
        separator = Separator(models, options, "cpu", **{"precision": "fp32", **compute})
        return separator.stem_key("ab").separation_key

    base = key()
    assert key() == base  # deterministic, and computed without loading Demucs
    different = {
        key(precision="bf16"),
        key(kernels="reference"),
        key(SeparationOptions(overlap=0.5)),
        key(SeparationOptions(shifts=1)),
        key(SeparationOptions(segment=1.5)),
    }
    assert base not in different and len(different) == 5
    assert "device" not in Separator(models, device="cpu").stem_key("ab").model_dump()
    demo.write_demucs(own / "separation", size="tiny", seed=1)  # a model swap: new weights, new checksum
    assert key() != base


def test_unknown_separator_says_how_to_get_it(store):
    with pytest.raises(CoverError) as info:
        Separator(ModelStore(store), SeparationOptions(model="mdx_extra"))
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

"""The vocals' analysis cache (job/render/rvc/analysis.py): a second voice on the same vocals takes
HuBERT's features and the pitch from it instead of computing them, and sings exactly what it would
have sung without it; what changes the numbers changes the entry; a damaged entry or a failing
storage costs the time of computing, never the cover."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from job.devkit import demo
from job.render.rvc import analysis
from job.render.rvc.analysis import CONTENT, PITCH, AnalysisCache, ModelDigests
from job.render.rvc.engine import ConversionOptions, VoiceConverter
from shared.model_store import ModelStore
from shared.storage import LocalStorage
from tests.conftest import CodeRunningPayload, sung_tone

RMVPE = ConversionOptions(f0_method="rmvpe")


@pytest.fixture(scope="module")
def own_store(store, tmp_path_factory):
    """The test store's models and two more tiny v2 voices (alto, tenor)."""
    root = tmp_path_factory.mktemp("analysis-models")
    for part in ("separation", "base"):
        (root / part).symlink_to(store / part)
    for name, seed in (("alto", 1), ("tenor", 2)):
        demo.write_voice(root / "voices" / name, name=name, size="tiny", seed=seed)
    return ModelStore(root)


@pytest.fixture(scope="module")
def vocals():
    """Two phrases with a rest between them: two chunks."""
    return np.concatenate([sung_tone(2.5, 220.0, vibrato=0.02), np.zeros(16000, np.float32), sung_tone(2.0, 330.0)])


def _converter(store: ModelStore, cache: AnalysisCache | None, kernels: str = "fast") -> VoiceConverter:
    return VoiceConverter(store, device="cpu", decoder="torch", kernels=kernels, analysis=cache)


def _entries(root, kind: str) -> list:
    return sorted((root / "analysis" / kind).glob("*.npy"))


@pytest.fixture(scope="module")
def plain(own_store, vocals):
    """Each voice's conversion without any cache: what every cached conversion must equal."""
    converter = _converter(own_store, None)
    return {
        name: converter.convert(vocals, 16000, converter.load_voice(own_store.voice(name)), RMVPE).audio
        for name in ("alto", "tenor")
    }


def test_a_second_voice_takes_features_and_pitch_from_the_cache_and_sings_exactly_the_same(
    own_store, vocals, plain, tmp_path
):
    bucket = LocalStorage(tmp_path / "bucket")
    first = _converter(own_store, AnalysisCache(bucket))
    alto = first.convert(vocals, 16000, first.load_voice(own_store.voice("alto")), RMVPE)
    np.testing.assert_array_equal(alto.audio, plain["alto"])
    assert alto.chunks == 2 and first.analysis is not None
    assert first.analysis.misses == {CONTENT: 2, PITCH: 2} and first.analysis.hits == {CONTENT: 0, PITCH: 0}
    assert len(_entries(bucket.root, CONTENT)) == 2 and len(_entries(bucket.root, PITCH)) == 2

    # another process (a fresh converter and cache over the same storage), another voice
    second = _converter(own_store, AnalysisCache(bucket))
    tenor = second.convert(vocals, 16000, second.load_voice(own_store.voice("tenor")), RMVPE)
    np.testing.assert_array_equal(tenor.audio, plain["tenor"])
    assert second.analysis is not None and second.analysis.hits == {CONTENT: 2, PITCH: 2}
    assert second._rmvpe is None  # the pitch model was never even loaded
    assert len(_entries(bucket.root, CONTENT)) == 2  # nothing new written
    assert tenor.times.pitch < alto.times.pitch


def test_what_changes_the_numbers_changes_the_entry(own_store, vocals, tmp_path, monkeypatch):
    cache = AnalysisCache(LocalStorage(tmp_path / "bucket"))
    converter = _converter(own_store, cache)
    voice = converter.load_voice(own_store.voice("alto"))
    steps = [
        (RMVPE, {CONTENT: 2, PITCH: 2}),  # nothing yet
        (ConversionOptions(f0_method="rmvpe", pitch=5, index_rate=0.0, seed=3), {CONTENT: 0, PITCH: 0}),  # voice-side
        (ConversionOptions(f0_method="rmvpe", filter_radius=5), {CONTENT: 0, PITCH: 2}),  # the pitch's smoothing
        (ConversionOptions(f0_method="pm"), {CONTENT: 0, PITCH: 2}),  # another tracker
        (ConversionOptions(f0_method="rmvpe+pm"), {CONTENT: 0, PITCH: 2}),  # trackers combined
    ]
    for options, computed in steps:
        before = dict(cache.misses)
        converter.convert(vocals, 16000, voice, options)
        assert {k: cache.misses[k] - before[k] for k in cache.misses} == computed, options
    # other vocals (a sample changed), and the exact path's kernels: their own entries
    louder = vocals.copy()
    louder[100] += 1e-4
    before = dict(cache.misses)
    converter.convert(louder, 16000, voice, RMVPE)
    assert cache.misses[CONTENT] - before[CONTENT] == 1 and cache.misses[PITCH] - before[PITCH] == 1  # its chunk
    reference = _converter(own_store, cache, kernels="reference")
    before = dict(cache.misses)
    reference.convert(vocals, 16000, reference.load_voice(own_store.voice("alto")), RMVPE)
    assert cache.misses[CONTENT] - before[CONTENT] == 2 and cache.misses[PITCH] - before[PITCH] == 2
    # our own code's version, raised when a change to it changes the numbers
    monkeypatch.setattr("job.render.rvc.analysis.VERSION", analysis.VERSION + 1)
    before = dict(cache.misses)
    converter.convert(vocals, 16000, voice, RMVPE)
    assert cache.misses[CONTENT] - before[CONTENT] == 2 and cache.misses[PITCH] - before[PITCH] == 2


def test_a_model_file_s_digest_follows_its_content(tmp_path):
    digests = ModelDigests()
    model = tmp_path / "rmvpe.pt"
    model.write_bytes(b"weights one")
    one = digests.of(model)
    assert digests.of(model) == one
    model.write_bytes(b"weights two")  # another size: another entry of the digests' own memory
    assert digests.of(model) != one
    folder = tmp_path / "hubert"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"a")
    before = digests.of(folder)
    (folder / "model.safetensors").write_bytes(b"bb")
    assert digests.of(folder) != before


def test_a_damaged_entry_is_computed_again_and_a_pickle_never_runs(own_store, vocals, plain, tmp_path, caplog):
    bucket = LocalStorage(tmp_path / "bucket")
    first = _converter(own_store, AnalysisCache(bucket))
    first.convert(vocals, 16000, first.load_voice(own_store.voice("alto")), RMVPE)
    marker = tmp_path / "pickle-ran"
    content, pitch = _entries(bucket.root, CONTENT), _entries(bucket.root, PITCH)
    content[0].write_bytes(b"not an array")
    np.save(content[1], np.array([CodeRunningPayload(marker)], dtype=object), allow_pickle=True)
    np.save(pitch[1], np.full(np.load(pitch[1]).shape, np.nan, np.float32))  # the right shape, not numbers
    np.save(pitch[0], np.zeros(7, np.float32))  # the wrong length
    again = _converter(own_store, AnalysisCache(bucket))
    with caplog.at_level(logging.WARNING, logger="melodia.analysis"):
        out = again.convert(vocals, 16000, again.load_voice(own_store.voice("alto")), RMVPE)
    np.testing.assert_array_equal(out.audio, plain["alto"])
    assert not marker.exists()
    assert again.analysis is not None and again.analysis.misses == {CONTENT: 2, PITCH: 2}
    assert sum("computed instead" in r.message for r in caplog.records) == 4
    third = _converter(own_store, AnalysisCache(bucket))  # the entries were written again, whole
    third.convert(vocals, 16000, third.load_voice(own_store.voice("alto")), RMVPE)
    assert third.analysis is not None and third.analysis.hits == {CONTENT: 2, PITCH: 2}


def test_a_failing_storage_costs_time_not_the_conversion(own_store, vocals, plain, tmp_path, caplog):
    storage = LocalStorage(tmp_path / "bucket")
    (storage.root / "analysis").write_text("a file where the cache's folder should be")  # every write fails
    converter = _converter(own_store, AnalysisCache(storage))
    with caplog.at_level(logging.WARNING, logger="melodia.analysis"):
        out = converter.convert(vocals, 16000, converter.load_voice(own_store.voice("alto")), RMVPE)
    np.testing.assert_array_equal(out.audio, plain["alto"])
    assert sum("not kept" in r.message for r in caplog.records) == 4


def test_the_in_process_part_is_bounded_and_least_recently_used_goes_first():
    cache = AnalysisCache(None, memory_mb=1)
    computed: list[int] = []

    def entry(i: int) -> np.ndarray:
        def compute() -> np.ndarray:
            computed.append(i)
            return np.full(100_000, i, np.float32)  # 400 kB: two fit in 1 MB, not three

        return cache.through(PITCH, {"t": 1}, np.full(10, i, np.float32), compute, lambda a: True)

    for i in (0, 1, 0, 2, 0, 1):  # 0 is used again before 2 comes in: 1 goes, then comes back
        assert entry(i)[0] == i
    assert computed == [0, 1, 2, 1]
    got = entry(0)
    got[:] = -1  # callers get copies: the cached numbers stay
    assert entry(0)[0] == 0


def test_hubert_computes_in_bf16_where_the_decoder_does_within_its_bound_and_cached_apart(own_store, vocals, tmp_path):
    """On the CPU's fast kernels with bf16 (``COVER_PRECISION=auto`` on CPUs with native bf16) the
    content encoder runs under bf16 autocast; fp32 and the exact path's kernels keep fp32. Random
    weights, so the arithmetic's error only: the test store's tiny HuBERT's features within 6 %
    relative L2 of fp32's (measured 0.041; the real-size HuBERT 0.015 on the AMD EPYC Zen 4), and
    what a voice sings from them within 0.1 dB log-spectral distance of what it sings from fp32's
    (the decoder in fp32 for both; measured 0.005 dB, the real-size models 0.031, against the bf16
    decoder's own 0.92). The bf16 features are entries of their own: fp32 never takes them."""
    import torch

    from bench.measures import log_spectral_distance_db

    fp32 = VoiceConverter(own_store, device="cpu", precision="fp32", decoder="torch")
    bf16 = VoiceConverter(own_store, device="cpu", precision="bf16", decoder="torch")
    exact = VoiceConverter(own_store, device="cpu", precision="bf16", kernels="reference", decoder="torch")
    assert fp32.content_dtype == exact.content_dtype == torch.float32 and bf16.content_dtype == torch.bfloat16
    seg = vocals[: 16000 * 3]
    plain, lowered = (c.chunk_features(c.content_encoder(), seg, "v2") for c in (fp32, bf16))
    assert plain.dtype == lowered.dtype == torch.float32 and plain.shape == lowered.shape
    error = float((plain - lowered).norm() / plain.norm())
    assert 0 < error < 0.06, error

    voice = fp32.load_voice(own_store.voice("alto"))
    sung = fp32.convert(vocals, 16000, voice, RMVPE).audio
    fp32.content_dtype = torch.bfloat16  # HuBERT's share of the error alone: the decoder stays fp32
    from_bf16 = fp32.convert(vocals, 16000, voice, RMVPE).audio
    fp32.content_dtype = torch.float32
    distance = log_spectral_distance_db(sung, from_bf16)
    print(f"features {error:.4f} relative L2; conversion {distance:.3f} dB")
    assert 0 < distance < 0.1

    cache = AnalysisCache(LocalStorage(tmp_path / "bucket"))
    fp32.analysis = bf16.analysis = cache
    bf16.chunk_features(bf16.content_encoder(), seg, "v2")
    assert cache.misses[CONTENT] == 1
    again = fp32.chunk_features(fp32.content_encoder(), seg, "v2")
    assert cache.misses[CONTENT] == 2  # fp32 computes its own
    torch.testing.assert_close(again, plain)

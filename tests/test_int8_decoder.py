"""The int8 decoder (``COVER_DECODER=int8``): its error against the exact fp32 path, its one-time
build kept in the model store, and the setting's checks.

With random weights the error bounds the arithmetic (quantisation) error only, as for bf16: what a
trained voice's int8 decoder sounds like cannot be heard here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from bench.measures import correlation, log_spectral_distance_db, relative_l2
from job.devkit import demo
from job.render import compute
from job.render.media.audio import to_16k
from job.render.quality.meter import QualityMeter
from job.render.rvc import engine
from job.render.rvc.engine import ConversionOptions, VoiceConverter
from job.render.rvc.int8_decoder import build_key
from shared.errors import CoverError, ErrorCode
from shared.model_store import ModelStore
from shared.settings import Settings
from tests.conftest import FULL_SWEEPS, sung_tone

# measured on the real-size v2 48 kHz voice (README, 'Performance'): relative L2 0.081, log-spectral
# distance 3.1 dB (against bf16's 1.04: quantisation noise fills the quiet bins), correlation 0.997
INT8_MAX_RELATIVE_L2 = 0.15
INT8_TOLERANCE_DB = 4.0
INT8_MIN_CORRELATION = 0.99
INT8_MIN_F0_CORRELATION = 0.98  # the quality stage's measures, the exact output as source and reference
INT8_MAX_F0_RMSE_CENTS = 20.0
INT8_MIN_SPEAKER_SIMILARITY = 0.98


def test_the_int8_decoder_is_refused_off_the_cpu_and_unknown_decoders_are_refused():
    with pytest.raises(CoverError) as err:
        compute.resolve_decoder("int8", torch.device("cuda"))
    assert err.value.code is ErrorCode.OPTIONS_INVALID and "CPU only" in str(err.value)
    with pytest.raises(CoverError) as err:
        compute.resolve_decoder("int4", torch.device("cpu"))
    assert err.value.code is ErrorCode.OPTIONS_INVALID
    with pytest.raises(ValidationError):
        Settings(decoder="int4")
    assert compute.resolve_decoder("int8", torch.device("cpu")) is True
    assert compute.resolve_decoder("torch", torch.device("cpu")) is False


@pytest.mark.sweep
@pytest.mark.skipif(
    not FULL_SWEEPS,
    reason="a real-size voice's int8 build and the exact path take 100 to 210 s on 2 cores: .ci/run's full pass "
    "(make test-full) runs it; make test keeps the int8 tests below",
)
def test_int8_decoder_stays_within_tolerance_of_fp32_and_is_built_once(store, tmp_path, monkeypatch):
    """A real-size v2 48k voice: the exact path (fp32, reference kernels) against the int8 decoder,
    same seed; the int8 build is kept in the store's derived folder and a second process-level
    converter loads it instead of building it again."""
    demo.write_voice(tmp_path / "v", size="real", with_index=False)
    pth = tmp_path / "v" / "model.pth"
    models = ModelStore(store)
    built = models.derived("decoder-int8", build_key(pth))
    assert not built.exists()
    builds = []
    real_build = engine.build_int8
    monkeypatch.setattr(engine, "build_int8", lambda *a: builds.append(a) or real_build(*a))

    audio = sung_tone(6.0, 220.0, vibrato=0.01)  # long enough for the decoder's tiles
    options = ConversionOptions(f0_method="pm", seed=3)
    exact_vc = VoiceConverter(models, device="cpu", precision="fp32", kernels="reference")
    exact = exact_vc.convert(audio, 16000, exact_vc.load_voice_file(pth), options).audio
    int8_vc = VoiceConverter(models, device="cpu", decoder="int8")
    int8 = int8_vc.convert(audio, 16000, int8_vc.load_voice_file(pth), options).audio
    assert len(builds) == 1 and built.is_file()

    rel, lsd, corr = relative_l2(exact, int8), log_spectral_distance_db(exact, int8), correlation(exact, int8)
    print(f"int8 vs fp32: relative L2 {rel:.4f}, log-spectral distance {lsd:.3f} dB, correlation {corr:.5f}")
    assert rel < INT8_MAX_RELATIVE_L2
    assert lsd < INT8_TOLERANCE_DB
    assert corr > INT8_MIN_CORRELATION
    assert rel > 1e-4  # the int8 decoder really ran

    # the quality stage's view: the exact output as the source and as the speaker reference
    meter = QualityMeter()
    reference = meter.embedding(to_16k(exact, 48000))
    assert reference is not None
    scores = meter.conversion(exact, 48000, int8, 48000, 0, reference.tolist()).whole
    print(f"int8 vs fp32, quality stage: {scores.model_dump_json()}")
    # measured: F0 correlation 0.995 and RMSE 1.5 cents over 74 frames voiced in both, speaker 0.995
    assert scores.melody.voiced_frames > 20
    assert scores.melody.f0_correlation is not None and scores.melody.f0_correlation > INT8_MIN_F0_CORRELATION
    assert scores.melody.f0_rmse_cents is not None and scores.melody.f0_rmse_cents < INT8_MAX_F0_RMSE_CENTS
    assert scores.speaker_similarity is not None and scores.speaker_similarity > INT8_MIN_SPEAKER_SIMILARITY

    again_vc = VoiceConverter(models, device="cpu", decoder="int8")
    again = again_vc.convert(audio, 16000, again_vc.load_voice_file(pth), options).audio
    assert len(builds) == 1  # loaded from the store, not rebuilt
    np.testing.assert_allclose(again, int8, atol=1e-5)


def test_a_voice_without_pitch_gets_an_int8_decoder_too(store, tmp_path):
    """Voices without pitch have no NSF excitation: their decoder takes two inputs, not three."""
    demo.write_voice(tmp_path / "nof0", size="tiny", f0=False, with_index=False)
    pth = tmp_path / "nof0" / "model.pth"
    vc = VoiceConverter(ModelStore(store), device="cpu", decoder="int8")
    voice = vc.load_voice_file(pth)
    assert voice.int8 is not None and voice.int8.inputs == ["x", "g"]
    audio = sung_tone(3.0, 220.0)
    out = vc.convert(audio, 16000, voice, ConversionOptions(f0_method="pm")).audio
    exact_vc = VoiceConverter(ModelStore(store), device="cpu", precision="fp32", kernels="reference")
    exact = exact_vc.convert(audio, 16000, exact_vc.load_voice_file(pth), ConversionOptions(f0_method="pm")).audio
    assert len(out) == len(exact) and np.abs(out).max() > 0
    assert correlation(exact, out) > INT8_MIN_CORRELATION

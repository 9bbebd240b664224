"""Voice checkpoints: every variant loads strictly and converts; bad ones are refused clearly."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from job.render.rvc.checkpoint import (
    CONTENT_DIM,
    STANDARD_CONFIGS,
    build_synthesizer,
    read_checkpoint,
    write_checkpoint,
)
from job.render.rvc.engine import ConversionOptions
from job.render.rvc.synthesizer import SynthConfig, Synthesizer
from shared.errors import CoverError, ErrorCode
from tests.conftest import CodeRunningPayload, sung_tone

VARIANTS = [(v, sr, f0) for (v, sr) in STANDARD_CONFIGS for f0 in (True, False)]


def _write(tmp_path, version, sr, f0):
    torch.manual_seed(0)
    model = Synthesizer(SynthConfig.from_list(STANDARD_CONFIGS[(version, sr)]), CONTENT_DIM[version], f0)
    return write_checkpoint(model, version, tmp_path / f"{version}-{sr}-{int(f0)}.pth")


@pytest.mark.parametrize(
    ("version", "sr", "f0"), VARIANTS, ids=[f"{v}-{sr // 1000}k-{'f0' if f else 'nof0'}" for v, sr, f in VARIANTS]
)
@pytest.mark.slow
def test_every_standard_variant_loads_strictly_and_converts(tmp_path, converter, version, sr, f0):
    path = _write(tmp_path, version, sr, f0)
    raw = torch.load(path, weights_only=True)
    assert raw["version"] == version and raw["f0"] == int(f0) and raw["sr"] == f"{sr // 1000}k"
    assert any(k.endswith(".weight_g") for k in raw["weight"])  # the reference's weight-norm layout
    assert not any(k.startswith("enc_q.") for k in raw["weight"])
    voice = converter.load_voice_file(path)
    audio = sung_tone(1.0)
    out = converter.convert(audio, 16000, voice, ConversionOptions(f0_method="pm"))
    assert out.sample_rate == sr
    assert len(out.audio) == sr  # one second in, one second out
    assert np.isfinite(out.audio).all() and np.abs(out.audio).max() > 0


@pytest.fixture
def v2_raw(tmp_path):
    return torch.load(_write(tmp_path, "v2", 40000, True), weights_only=True)


def _refused(tmp_path, raw) -> CoverError:
    path = tmp_path / "bad.pth"
    torch.save(raw, path)
    with pytest.raises(CoverError) as info:
        build_synthesizer(read_checkpoint(path))
    return info.value


def test_missing_key_is_named(tmp_path, v2_raw):
    del v2_raw["weight"]["dec.conv_post.weight"]
    err = _refused(tmp_path, v2_raw)
    assert err.code is ErrorCode.MODEL_MISMATCH and "dec.conv_post.weight" in err.message


def test_extra_key_is_named(tmp_path, v2_raw):
    v2_raw["weight"]["dec.extra.weight"] = torch.zeros(3)
    err = _refused(tmp_path, v2_raw)
    assert err.code is ErrorCode.MODEL_MISMATCH and "dec.extra.weight" in err.message


def test_mis_shaped_tensor_is_named(tmp_path, v2_raw):
    v2_raw["weight"]["enc_p.proj.bias"] = torch.zeros(7)
    err = _refused(tmp_path, v2_raw)
    assert err.code is ErrorCode.MODEL_MISMATCH and "enc_p.proj.bias" in err.message


def test_version_that_contradicts_the_weights(tmp_path, v2_raw):
    v2_raw["version"] = "v1"
    err = _refused(tmp_path, v2_raw)
    assert err.code is ErrorCode.MODEL_MISMATCH and "256" in err.message


def test_config_that_contradicts_the_weights(tmp_path, v2_raw):
    v2_raw["config"][13] = 256  # upsample_initial_channel
    assert _refused(tmp_path, v2_raw).code is ErrorCode.MODEL_MISMATCH


def test_not_a_voice_and_garbage_bytes(tmp_path):
    assert _refused(tmp_path, {"model": {}}).code is ErrorCode.MODEL_CORRUPT
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CoverError) as info:
        read_checkpoint(garbage)
    assert info.value.code is ErrorCode.MODEL_CORRUPT


def test_malicious_pickle_runs_nothing(tmp_path, v2_raw):
    marker = tmp_path / "pwned"
    v2_raw["info"] = CodeRunningPayload(marker)
    path = tmp_path / "evil.pth"
    torch.save(v2_raw, path)
    with pytest.raises(CoverError) as info:
        read_checkpoint(path)
    assert info.value.code is ErrorCode.MODEL_UNSAFE
    assert not marker.exists()

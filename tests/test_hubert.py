"""fairseq's hubert_base.pt converts to transformers without fairseq, omegaconf or pickled code."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from fairseq_hubert import write_fairseq_hubert
from transformers import HubertConfig, HubertModel

from job.render.rvc.content import load_content_encoder


@pytest.fixture
def hf_model():
    torch.manual_seed(0)
    config = HubertConfig(
        hidden_size=48,
        num_hidden_layers=12,
        num_attention_heads=4,
        intermediate_size=32,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4,
    )
    return HubertModel(config).eval()


def test_fairseq_checkpoint_gives_the_same_features(tmp_path, hf_model):
    proj = torch.nn.Linear(48, 256)
    state = {**hf_model.state_dict(), **{f"final_proj.{k}": v for k, v in proj.state_dict().items()}}
    marker = tmp_path / "pwned"
    path = write_fairseq_hubert(tmp_path / "hubert_base.pt", state, heads=4)
    assert "omegaconf" not in sys.modules and "fairseq" not in sys.modules
    encoder = load_content_encoder(path)
    assert "omegaconf" not in sys.modules and "fairseq" not in sys.modules
    assert not marker.exists()

    audio = torch.from_numpy(np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1)[None]
    with torch.inference_mode():
        reference = hf_model(audio, output_hidden_states=True).hidden_states
        v2 = encoder.features(audio, "v2")
        v1 = encoder.features(audio, "v1")
        expected_v1 = proj(reference[9])
    torch.testing.assert_close(v2, reference[12], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v1, expected_v1, atol=1e-4, rtol=1e-4)
    assert v2.shape == (1, 49, 48)  # one frame per 320 samples


def test_transformers_folder_loads(store):
    encoder = load_content_encoder(store / "base" / "hubert")
    audio = torch.zeros(1, 16000 + 80)
    assert encoder.features(audio, "v2").shape == (1, 50, 768)
    assert encoder.features(audio, "v1").shape == (1, 50, 256)

"""fairseq's hubert_base.pt converts to transformers without fairseq, omegaconf or pickled code."""

from __future__ import annotations

import argparse
import sys
import types

import numpy as np
import pytest
import torch
from transformers import HubertConfig, HubertModel

from job.render.rvc.content import load_content_encoder

# transformers name -> fairseq name (the inverse of what the loader maps), to write a fairseq file
TO_FAIRSEQ = [
    ("feature_projection.layer_norm.", "layer_norm."),
    ("feature_projection.projection.", "post_extract_proj."),
    ("masked_spec_embed", "mask_emb"),
    ("encoder.pos_conv_embed.conv.parametrizations.weight.original0", "encoder.pos_conv.0.weight_g"),
    ("encoder.pos_conv_embed.conv.parametrizations.weight.original1", "encoder.pos_conv.0.weight_v"),
    ("encoder.pos_conv_embed.conv.bias", "encoder.pos_conv.0.bias"),
    (".attention.", ".self_attn."),
    (".feed_forward.intermediate_dense.", ".fc1."),
    (".feed_forward.output_dense.", ".fc2."),
    (".conv.weight", ".0.weight"),
    ("conv_layers.0.layer_norm.", "conv_layers.0.2."),
]


def _fairseq_name(key: str) -> str:
    if key.startswith("encoder.layers.") and ".layer_norm." in key:
        key = key.replace(".layer_norm.", ".self_attn_layer_norm.")
    for hf, fs in TO_FAIRSEQ:
        key = key.replace(hf, fs)
    return key


class _ForeignModules:
    """Installs stand-ins for omegaconf's classes only while the test pickles them."""

    def __enter__(self):
        self.saved = {name: sys.modules.get(name) for name in ("omegaconf", "omegaconf.dictconfig", "omegaconf.nodes")}
        root, dc, nodes = (types.ModuleType(n) for n in self.saved)

        class DictConfig:
            def __init__(self, content):
                self.__dict__["_content"] = content

        class AnyNode:
            def __init__(self, value):
                self._val = value

        DictConfig.__module__, AnyNode.__module__ = "omegaconf.dictconfig", "omegaconf.nodes"
        DictConfig.__qualname__, AnyNode.__qualname__ = "DictConfig", "AnyNode"
        dc.DictConfig, nodes.AnyNode = DictConfig, AnyNode
        sys.modules.update({"omegaconf": root, "omegaconf.dictconfig": dc, "omegaconf.nodes": nodes})
        return DictConfig, AnyNode

    def __exit__(self, *exc):
        for name, module in self.saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


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
    state = {_fairseq_name(k): v for k, v in hf_model.state_dict().items()}
    state["label_embs_concat"] = torch.zeros(504, 256)
    proj = torch.nn.Linear(48, 256)
    state.update({f"final_proj.{k}": v for k, v in proj.state_dict().items()})
    marker = tmp_path / "pwned"
    with _ForeignModules() as (DictConfig, AnyNode):
        cfg = DictConfig({"model": DictConfig({"encoder_attention_heads": AnyNode(4), "_name": AnyNode("hubert")})})
        checkpoint = {
            "args": argparse.Namespace(arch="hubert"),
            "cfg": cfg,
            "model": state,
            "optimizer_history": [],
            "extra_state": {},
        }
        path = tmp_path / "hubert_base.pt"
        torch.save(checkpoint, path)
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

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


@pytest.mark.parametrize("variant", ["base", "stable"])
def test_our_network_equals_transformers_hubert_from_a_saved_folder(tmp_path, variant):
    """The transformers folder path: our network against ``HubertModel`` (the reference) on the
    same weights, base HuBERT's layout and the "stable" one (layer norms before each block, every
    front-end convolution layer-normed), every layer's output; old weight-norm names load too."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    stable = {"do_stable_layer_norm": True, "feat_extract_norm": "layer"} if variant == "stable" else {}
    config = HubertConfig(
        hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, conv_dim=(16,) * 7,
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, **stable,
    )  # fmt: skip
    reference = HubertModel(config).eval()
    with torch.no_grad():  # the norms' affine parts away from their identity start, so they count
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / "hubert"
    config.save_pretrained(folder)
    state = {f"hubert.{k}": v.contiguous() for k, v in reference.state_dict().items()}
    old_names = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    for new, old in old_names.items():  # as checkpoints saved by older transformers name them
        key = f"hubert.encoder.pos_conv_embed.conv.{new}"
        state[key.replace(new, old)] = state.pop(key)
    save_file(state, str(folder / "model.safetensors"))
    encoder = load_content_encoder(folder)
    audio = torch.from_numpy(np.random.default_rng(2).standard_normal(12000).astype(np.float32) * 0.1)[None]
    with torch.inference_mode():
        out = reference(audio, output_hidden_states=True)
        # each layer's output, the last as the network gives it (the stable variant's closing norm:
        # what the engine takes for v2; transformers 5 records the last layer's before that norm)
        expected = (*out.hidden_states[:-1], out.last_hidden_state)
        ours = encoder.model(audio, output_hidden_states=True).hidden_states
        assert len(ours) == len(expected) == 5
        for layer, (got, want) in enumerate(zip(ours, expected, strict=True)):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=f"layer {layer}")
        for layer in (1, 3):  # stopping early gives what the whole stack gives at that layer
            early = encoder.model(audio, layers=layer).last_hidden_state
            torch.testing.assert_close(early, expected[layer], atol=2e-5, rtol=1e-4)


def test_the_job_never_imports_transformers():
    """transformers costs about 4 s of a process's start: rendering a conversion's features needs
    none of it."""
    import subprocess

    script = (
        "import sys, torch\n"
        "import job.render.pipeline\n"
        "from job.render.rvc.content import Hubert, HubertSettings, ContentEncoder\n"
        "s = HubertSettings(hidden_size=32, num_hidden_layers=12, num_attention_heads=4, intermediate_size=16,"
        " conv_dim=(8,) * 7, num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)\n"
        "ContentEncoder(Hubert(s).eval(), None).features(torch.zeros(1, 4000), 'v2')\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

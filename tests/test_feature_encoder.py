"""HuBERT's front end a few seconds at a time: the whole's frames, without the whole's memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import HubertConfig, HubertModel

from job.render.rvc.feature_encoder import TiledFeatureEncoder


def _front_end(mode: str, channels: int) -> torch.nn.Module:
    torch.manual_seed(1)
    config = HubertConfig(
        feat_extract_norm=mode,
        conv_dim=(channels,) * 7,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4,
    )
    return HubertModel(config).eval().feature_extractor


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


@pytest.mark.parametrize("mode", ["group", "layer"])
@pytest.mark.parametrize("samples", [400, 319 * 7 + 400 + 1, 16000 * 3 + 123])
def test_tiles_give_the_whole_front_ends_frames(mode, samples):
    whole = _front_end(mode, 16)
    with torch.no_grad():  # the norms' affine parameters are not the identity
        for p in whole.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    tiled = TiledFeatureEncoder(whole, tile=7)
    x = torch.from_numpy(np.random.default_rng(samples).standard_normal((2, samples)).astype(np.float32) * 0.3)
    x[1] *= 0.1  # each row of a batch normalised by its own statistics
    with torch.inference_mode():
        expected, got = whole(x), tiled(x)
    assert got.shape == expected.shape and expected.shape[-1] == (samples - 400) // 320 + 1
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert tiled.state_dict().keys() == whole.state_dict().keys()  # the same weights, the same names


def test_the_front_end_holds_a_tile_not_the_whole_input():
    """Base HuBERT's front end (512 channels) on 30 s: whole, its first convolution alone is 197 MB.
    Measured in a fresh process: in a suite worker's process, the heap other tests left behind moved
    the high-water mark (106 MB once, where a fresh process holds 78)."""
    script = textwrap.dedent("""
        import json, sys
        import numpy as np, torch
        sys.path.insert(0, "tests")
        from test_feature_encoder import TiledFeatureEncoder, _front_end, _status_mb

        whole = _front_end("group", 512)
        tiled = TiledFeatureEncoder(whole)
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 16000 * 30)).astype(np.float32) * 0.1)

        def held_mb(encoder):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the high-water mark starts again from what is resident now
            base = _status_mb("VmRSS")
            with torch.inference_mode():
                encoder(x)
            return _status_mb("VmHWM") - base

        with torch.inference_mode():
            tiled(x[:, : 16000 * 6])  # the kernels built before measuring
        print(json.dumps([held_mb(tiled), held_mb(whole)]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tiled_mb, whole_mb = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"front end on 30 s: whole {whole_mb:.0f} MB, tiled {tiled_mb:.0f} MB")
    assert tiled_mb < 100, (tiled_mb, whole_mb)

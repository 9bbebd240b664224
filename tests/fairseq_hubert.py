"""fairseq's ``hubert_base.pt`` written from a transformers HuBERT's weights, in fairseq's own
layout: its parameter names, an ``omegaconf`` config (pickled from stand-in classes that exist only
while it is written, as fairseq's would be absent where it is read) and an ``argparse`` namespace."""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

# transformers name -> fairseq name (the inverse of what the loader maps)
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


def fairseq_name(key: str) -> str:
    if key.startswith("encoder.layers.") and ".layer_norm." in key:
        key = key.replace(".layer_norm.", ".self_attn_layer_norm.")
    for hf, fs in TO_FAIRSEQ:
        key = key.replace(hf, fs)
    return key


class ForeignModules:
    """Installs stand-ins for omegaconf's classes only while a checkpoint pickles them."""

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


def write_fairseq_hubert(path: Path, state: dict[str, torch.Tensor], heads: int) -> Path:
    """``state``: a transformers HubertModel's state dict, ``final_proj.*`` (the 256-wide
    projection v1 voices take) beside it when wanted."""
    model = {(k if k.startswith("final_proj.") else fairseq_name(k)): v for k, v in state.items()}
    model["label_embs_concat"] = torch.zeros(504, 256)
    with ForeignModules() as (DictConfig, AnyNode):
        cfg = DictConfig({"model": DictConfig({"encoder_attention_heads": AnyNode(heads), "_name": AnyNode("hubert")})})
        checkpoint = {
            "args": argparse.Namespace(arch="hubert"),
            "cfg": cfg,
            "model": model,
            "optimizer_history": [],
            "extra_state": {},
        }
        torch.save(checkpoint, path)
    return path

"""HuBERT, ours: the network ``transformers``' ``HubertModel`` builds, with its parameter names (so
the same state dicts load, strictly), in plain torch modules.

``transformers`` costs about 4 s of every process's start (its modeling code imports
``torch._dynamo`` and ``torch.distributed``); the job imports none of it. The layout is HuBERT's
published one: a convolutional front end (seven strided convolutions, the first group-normed with
one group per channel, or each layer-normed), a feature projection (layer norm, linear), a
convolutional positional embedding (one grouped convolution with weight norm over its kernel
axis, the last frame dropped for an even kernel, GELU) added before the encoder's layer norm, and
post-layer-norm Transformer layers (self-attention, then a GELU feed-forward); the "stable" variant
normalises before each block and once after the last. Equal to ``transformers`` 5.24's
``HubertModel`` within float32 rounding (``tests/test_hubert.py``), which stays the reference.
A request for layer ``n`` runs ``n`` layers, not all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from pydantic import BaseModel, ConfigDict
from torch import nn


class HubertSettings(BaseModel):
    """The part of a ``transformers`` ``config.json`` (``HubertConfig``) the network needs."""

    model_config = ConfigDict(extra="ignore")

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: Literal["group", "layer"] = "group"
    feat_extract_activation: Literal["gelu"] = "gelu"
    hidden_act: Literal["gelu"] = "gelu"
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    layer_norm_eps: float = 1e-5
    do_stable_layer_norm: bool = False
    feat_proj_layer_norm: bool = True
    conv_pos_batch_norm: Literal[False] = False
    mask_time_prob: float = 0.05
    mask_feature_prob: float = 0.0


@dataclass
class HubertOutput:
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class _ConvLayer(nn.Module):
    """One front-end convolution: ``conv``, ``activation`` and, where normed, ``layer_norm``."""

    def __init__(self, s: HubertSettings, i: int, norm: Literal["group", "layer"] | None) -> None:
        super().__init__()
        c_in = s.conv_dim[i - 1] if i else 1
        self.conv = nn.Conv1d(c_in, s.conv_dim[i], s.conv_kernel[i], stride=s.conv_stride[i], bias=s.conv_bias)
        self.activation = nn.GELU()
        self.norm = norm
        if norm == "group":
            self.layer_norm: nn.Module = nn.GroupNorm(s.conv_dim[i], s.conv_dim[i], affine=True)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(s.conv_dim[i], elementwise_affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm == "group":
            x = self.layer_norm(x)
        elif self.norm == "layer":
            x = self.layer_norm(x.transpose(-2, -1)).transpose(-2, -1)
        return self.activation(x)


class _FeatureEncoder(nn.Module):
    def __init__(self, s: HubertSettings) -> None:
        super().__init__()
        n = len(s.conv_dim)
        norms: list[Literal["group", "layer"] | None] = (
            ["group", *[None] * (n - 1)] if s.feat_extract_norm == "group" else ["layer"] * n
        )
        self.conv_layers = nn.ModuleList(_ConvLayer(s, i, norm) for i, norm in enumerate(norms))

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        x = input_values[:, None]
        for layer in self.conv_layers:
            x = layer(x)
        return x


class _FeatureProjection(nn.Module):
    def __init__(self, s: HubertSettings) -> None:
        super().__init__()
        self.feat_proj_layer_norm = s.feat_proj_layer_norm
        if s.feat_proj_layer_norm:
            self.layer_norm = nn.LayerNorm(s.conv_dim[-1], eps=s.layer_norm_eps)
        self.projection = nn.Linear(s.conv_dim[-1], s.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layer_norm(x) if self.feat_proj_layer_norm else x)


class _PositionalConv(nn.Module):
    def __init__(self, s: HubertSettings) -> None:
        super().__init__()
        k = s.num_conv_pos_embeddings
        conv = nn.Conv1d(s.hidden_size, s.hidden_size, k, padding=k // 2, groups=s.num_conv_pos_embedding_groups)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.drop_last = k % 2 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C]
        h = self.conv(x.transpose(1, 2))
        if self.drop_last:
            h = h[..., :-1]
        return F.gelu(h).transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, s: HubertSettings) -> None:
        super().__init__()
        self.heads = s.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(s.hidden_size, s.hidden_size) for _ in range(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape

        def split(h: torch.Tensor) -> torch.Tensor:
            return h.view(b, t, self.heads, c // self.heads).transpose(1, 2)

        h = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(h.transpose(1, 2).reshape(b, t, c))


class _FeedForward(nn.Module):
    def __init__(self, s: HubertSettings) -> None:
        super().__init__()
        self.intermediate_dense = nn.Linear(s.hidden_size, s.intermediate_size)
        self.output_dense = nn.Linear(s.intermediate_size, s.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class _Layer(nn.Module):
    def __init__(self, s: HubertSettings) -> None:
        super().__init__()
        self.stable = s.do_stable_layer_norm
        self.attention = _Attention(s)
        self.layer_norm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.feed_forward = _FeedForward(s)
        self.final_layer_norm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stable:  # normalised before each block
            x = x + self.attention(self.layer_norm(x))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x))


class _Encoder(nn.Module):
    def __init__(self, s: HubertSettings) -> None:
        super().__init__()
        self.stable = s.do_stable_layer_norm
        self.pos_conv_embed = _PositionalConv(s)
        self.layer_norm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(s) for _ in range(s.num_hidden_layers))

    def forward(self, x: torch.Tensor, upto: int, keep: bool) -> HubertOutput:
        x = x + self.pos_conv_embed(x)
        if not self.stable:
            x = self.layer_norm(x)
        states: list[torch.Tensor] = []
        for layer in self.layers[:upto]:
            if keep:
                states.append(x)
            x = layer(x)
        if self.stable and upto == len(self.layers):  # the stable variant's last norm closes the stack
            x = self.layer_norm(x)
        if keep:
            states.append(x)
        return HubertOutput(last_hidden_state=x, hidden_states=tuple(states) if keep else None)


class Hubert(nn.Module):
    """HuBERT's network (``HubertModel``'s parameter names).

    Args:
        config: its settings (a ``config.json``'s, or read from a fairseq checkpoint)
    """

    def __init__(self, config: HubertSettings) -> None:
        super().__init__()
        self.config = config
        self.feature_extractor: nn.Module = _FeatureEncoder(config)
        self.feature_projection = _FeatureProjection(config)
        if config.mask_time_prob > 0 or config.mask_feature_prob > 0:  # training's mask; loaded, never used
            self.masked_spec_embed = nn.Parameter(torch.empty(config.hidden_size))
        self.encoder = _Encoder(config)

    def forward(
        self, input_values: torch.Tensor, output_hidden_states: bool = False, layers: int | None = None
    ) -> HubertOutput:
        """16 kHz audio ``[B, samples]`` -> ``[B, frames, hidden]`` after ``layers`` encoder layers
        (all by default), with the input of each and the last's output where asked."""
        features = self.feature_extractor(input_values).transpose(1, 2)
        upto = self.config.num_hidden_layers if layers is None else layers
        return self.encoder(self.feature_projection(features), upto, output_hidden_states)


WEIGHT_NORM_RENAMES = {  # older transformers' (and fairseq's) weight-norm names -> the parametrization's
    "encoder.pos_conv_embed.conv.weight_g": "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    "encoder.pos_conv_embed.conv.weight_v": "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
}

"""HuBERT's convolutional front end a stretch of frames at a time: memory flat in the input's length.

HuBERT turns 16 kHz audio into one frame per 320 samples with seven strided convolutions. Whole,
the first one's output is 512 channels at 3,200 per second: 131 MB for a 20 s chunk, held two or
three times over (its group norm and GELU each make a new tensor, the next convolution reorders
its input), which made HuBERT the conversion's peak (bench/JOURNAL.md, "Memory by song length").

The convolutions have no padding, so output frames ``[f0, f1)`` depend on input samples
``[f0 * hop, (f1 - 1) * hop + field)`` alone and a tile's frames are the whole's. The one
operation that is not local is base HuBERT's group norm after the first convolution (one group
per channel, over the whole input): its per-channel mean and variance come from a first pass over
the first convolution's output (each tile's in float32, combined in float64), and the second pass
applies them (as ``scale * x + shift``, torch's own formula). Layer-norm front ends (``feat_extract_norm =
"layer"``) are local and need no first pass. Within float32 rounding of the whole computation
(tested).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

TILE_FRAMES = 250  # output frames per tile (5 s): the first convolution's output is 33 MB a tile


def _conv(layer: nn.Module) -> nn.Conv1d:
    conv = getattr(layer, "conv", None)
    if not isinstance(conv, nn.Conv1d) or conv.padding != (0,) or conv.dilation != (1,):
        raise ValueError(f"not a HuBERT convolution layer: {type(layer).__name__}")
    return conv


class TiledFeatureEncoder(nn.Module):
    """Drop-in for ``transformers``' ``HubertFeatureEncoder`` (the same ``conv_layers``, so the same
    weights and state-dict keys): [B, samples] -> [B, channels, frames], ``tile`` frames at a time."""

    conv_layers: Any  # transformers' nn.ModuleList of conv layers (each .conv, .activation, maybe .layer_norm)

    def __init__(self, encoder: nn.Module, tile: int = TILE_FRAMES) -> None:
        super().__init__()
        self.conv_layers = encoder.conv_layers
        convs = [_conv(layer) for layer in self.conv_layers]
        norms = [getattr(layer, "layer_norm", None) for layer in self.conv_layers]
        if any(isinstance(n, nn.GroupNorm) for n in norms[1:]):
            raise ValueError("only the first convolution may be group-normed")
        first = norms[0]
        if isinstance(first, nn.GroupNorm) and first.num_groups != first.num_channels:
            raise ValueError("the first group norm must have one group per channel")
        self.normed_first = isinstance(first, nn.GroupNorm)  # a flag: the module stays conv_layers' own
        self.kernels = [c.kernel_size[0] for c in convs]
        self.strides = [c.stride[0] for c in convs]
        self.hop = math.prod(self.strides)
        field = 1
        for k, s in zip(reversed(self.kernels), reversed(self.strides), strict=True):
            field = (field - 1) * s + k
        self.field = field
        self.tile = tile

    def frames(self, samples: int) -> int:
        n = samples
        for k, s in zip(self.kernels, self.strides, strict=True):
            n = max(0, (n - k) // s + 1)
        return n

    def _first_norm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (batch, channel) scale and shift of the first layer's group norm over all of ``x``."""
        conv, norm = self.conv_layers[0].conv, self.conv_layers[0].layer_norm
        k, s = self.kernels[0], self.strides[0]
        positions = (x.shape[-1] - k) // s + 1
        step = self.tile * (self.hop // s)
        count = 0  # the tiles' means and variances combined exactly (Chan et al.), in float64
        mean = torch.zeros(x.shape[0], conv.out_channels, dtype=torch.float64, device=x.device)
        m2 = torch.zeros_like(mean)  # sum of squared deviations
        for p in range(0, positions, step):
            q = min(positions, p + step)
            var_t, mean_t = torch.var_mean(conv(x[:, None, p * s : (q - 1) * s + k]), dim=-1, correction=0)
            n = q - p
            delta = mean_t.double() - mean
            mean += delta * (n / (count + n))
            m2 += var_t.double() * n + delta.square() * (count * n / (count + n))
            count += n
        var = m2 / count
        scale = torch.rsqrt(var + norm.eps) * norm.weight.double()
        shift = norm.bias.double() - mean * scale
        return scale.to(x.dtype)[..., None], shift.to(x.dtype)[..., None]

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        x = input_values
        frames = self.frames(x.shape[-1])
        out_channels = self.conv_layers[-1].conv.out_channels
        out = torch.empty(x.shape[0], out_channels, frames, dtype=x.dtype, device=x.device)
        norm = self._first_norm(x) if self.normed_first and frames else None
        for f0 in range(0, frames, self.tile):
            f1 = min(frames, f0 + self.tile)
            h = x[:, None, f0 * self.hop : (f1 - 1) * self.hop + self.field]
            for i, layer in enumerate(self.conv_layers):
                if i == 0 and norm is not None:
                    h = layer.conv(h).mul_(norm[0]).add_(norm[1])
                    h = layer.activation(h)
                else:
                    h = layer(h)
            out[..., f0:f1] = h
            del h
        return out

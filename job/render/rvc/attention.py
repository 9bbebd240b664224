"""The text encoder's Transformer: multi-head self-attention with windowed relative positions.

Shapes: activations are channels-first ``[batch, channels, frames]``. Inference runs one
unpadded sequence at a time, so no masks are needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

WINDOW_SIZE = 10  # relative positions -10..10 carry learned embeddings


class LayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``[B, C, T]`` (parameters ``gamma`` and ``beta``)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.transpose(1, -1), (x.shape[1],), self.gamma, self.beta, self.eps)
        return x.transpose(1, -1)


def _band_indices(length: int, window: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (query i, relative slot r): key index i + r - window, and whether it exists."""
    i = torch.arange(length, device=device)[:, None]
    r = torch.arange(2 * window + 1, device=device)[None, :]
    key = i + r - window
    return key.clamp(0, length - 1), (key >= 0) & (key < length)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with windowed relative-position embeddings (the reference's layout).

    Args:
        channels: the input's channels
        out_channels: the output's channels
        n_heads: attention heads
        window_size: the relative-position window, frames either side
    """

    def __init__(self, channels: int, out_channels: int, n_heads: int, window_size: int = WINDOW_SIZE) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.k_channels = channels // n_heads
        self.window_size = window_size
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, out_channels, 1)
        std = self.k_channels**-0.5
        self.emb_rel_k = nn.Parameter(torch.randn(1, 2 * window_size + 1, self.k_channels) * std)
        self.emb_rel_v = nn.Parameter(torch.randn(1, 2 * window_size + 1, self.k_channels) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        h, d, w = self.n_heads, self.k_channels, self.window_size
        q = self.conv_q(x).view(b, h, d, t).transpose(2, 3) / math.sqrt(d)  # [B, H, T, D]
        k = self.conv_k(x).view(b, h, d, t).transpose(2, 3)
        v = self.conv_v(x).view(b, h, d, t).transpose(2, 3)
        key_idx, valid = _band_indices(t, w, x.device)  # [T, 2w+1]

        # relative-key logits: q_i . E_k[j - i + w] for |j - i| <= w, scattered into [T, T]
        rel = q @ self.emb_rel_k[0].T  # [B, H, T, 2w+1]
        rel = rel.masked_fill(~valid, 0.0)
        scores = q @ k.transpose(2, 3)
        scores.scatter_add_(3, key_idx.expand(b, h, t, 2 * w + 1), rel)
        p = torch.softmax(scores, dim=-1)

        # relative values: sum_r p[i, i + r - w] * E_v[r]
        p_band = p.gather(3, key_idx.expand(b, h, t, 2 * w + 1)).masked_fill(~valid, 0.0)
        out = p @ v + p_band @ self.emb_rel_v[0]
        return self.conv_o(out.transpose(2, 3).reshape(b, c, t))


class FFN(nn.Module):
    """The encoder's feed-forward part: two masked convolutions with a ReLU between.

    Args:
        in_channels: the input's channels
        out_channels: the output's channels
        filter_channels: the hidden width
        kernel_size: the two convolutions' kernel
    """

    def __init__(self, in_channels: int, out_channels: int, filter_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv_1 = nn.Conv1d(in_channels, filter_channels, kernel_size)
        self.conv_2 = nn.Conv1d(filter_channels, out_channels, kernel_size)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        return F.pad(x, ((k - 1) // 2, k // 2)) if k > 1 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_2(self._pad(torch.relu(self.conv_1(self._pad(x)))))


class Encoder(nn.Module):
    """Post-norm Transformer encoder (``attn_layers``, ``norm_layers_1``, ``ffn_layers``, ``norm_layers_2``).

    Args:
        hidden_channels: the width
        filter_channels: the feed-forward parts' hidden width
        n_heads: attention heads
        n_layers: layers
        kernel_size: the feed-forward convolutions' kernel
    """

    def __init__(
        self, hidden_channels: int, filter_channels: int, n_heads: int, n_layers: int, kernel_size: int
    ) -> None:
        super().__init__()
        self.attn_layers = nn.ModuleList(
            MultiHeadAttention(hidden_channels, hidden_channels, n_heads) for _ in range(n_layers)
        )
        self.norm_layers_1 = nn.ModuleList(LayerNorm(hidden_channels) for _ in range(n_layers))
        self.ffn_layers = nn.ModuleList(
            FFN(hidden_channels, hidden_channels, filter_channels, kernel_size) for _ in range(n_layers)
        )
        self.norm_layers_2 = nn.ModuleList(LayerNorm(hidden_channels) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, norm1, ffn, norm2 in zip(self.attn_layers, self.norm_layers_1, self.ffn_layers, self.norm_layers_2):
            x = norm1(x + attn(x))
            x = norm2(x + ffn(x))
        return x

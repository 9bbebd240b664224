"""The normalising flow between the text encoder's prior and the decoder's latent (reverse only)."""

from __future__ import annotations

import torch
from torch import nn


class WN(nn.Module):
    """WaveNet-style gated residual stack conditioned on the speaker embedding.

    Args:
        hidden_channels: the width
        kernel_size: the dilated convolutions' kernel
        dilation_rate: the dilation's growth per layer
        n_layers: layers
        gin_channels: the speaker embedding's channels (0: unconditioned)
    """

    def __init__(
        self, hidden_channels: int, kernel_size: int, dilation_rate: int, n_layers: int, gin_channels: int
    ) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.n_layers = n_layers
        self.cond_layer = nn.Conv1d(gin_channels, 2 * hidden_channels * n_layers, 1)
        self.in_layers = nn.ModuleList()
        self.res_skip_layers = nn.ModuleList()
        for i in range(n_layers):
            dilation = dilation_rate**i
            padding = (kernel_size * dilation - dilation) // 2
            self.in_layers.append(
                nn.Conv1d(hidden_channels, 2 * hidden_channels, kernel_size, dilation=dilation, padding=padding)
            )
            res_skip = 2 * hidden_channels if i < n_layers - 1 else hidden_channels
            self.res_skip_layers.append(nn.Conv1d(hidden_channels, res_skip, 1))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        hc = self.hidden_channels
        output = torch.zeros_like(x)
        g = self.cond_layer(g)
        for i, (in_layer, res_skip_layer) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            a = in_layer(x) + g[:, i * 2 * hc : (i + 1) * 2 * hc]
            acts = torch.tanh(a[:, :hc]) * torch.sigmoid(a[:, hc:])
            res_skip = res_skip_layer(acts)
            if i < self.n_layers - 1:
                x = x + res_skip[:, :hc]
                output = output + res_skip[:, hc:]
            else:
                output = output + res_skip
        return output


class ResidualCouplingLayer(nn.Module):
    """One mean-only affine coupling layer of the flow, run in reverse at inference.

    Args:
        channels: the latent's channels (half are transformed, conditioned on the other half)
        hidden_channels: the WaveNet's width
        kernel_size: its convolutions' kernel
        dilation_rate: its dilation's growth per layer
        n_layers: its layers
        gin_channels: the speaker embedding's channels
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        kernel_size: int,
        dilation_rate: int,
        n_layers: int,
        gin_channels: int,
    ) -> None:
        super().__init__()
        self.half_channels = channels // 2
        self.pre = nn.Conv1d(self.half_channels, hidden_channels, 1)
        self.enc = WN(hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels)
        self.post = nn.Conv1d(hidden_channels, self.half_channels, 1)  # mean-only coupling

    def reverse(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        x0, x1 = x[:, : self.half_channels], x[:, self.half_channels :]
        m = self.post(self.enc(self.pre(x0), g))
        return torch.cat([x0, x1 - m], dim=1)


class ResidualCouplingBlock(nn.Module):
    """``flows`` alternates coupling layers (even indices) and channel flips (odd, no weights).

    Args:
        channels: the latent's channels
        hidden_channels: each coupling layer's width
        kernel_size: their convolutions' kernel
        dilation_rate: their dilation's growth per layer
        n_layers: their WaveNet layers
        n_flows: coupling layers
        gin_channels: the speaker embedding's channels
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        kernel_size: int = 5,
        dilation_rate: int = 1,
        n_layers: int = 3,
        n_flows: int = 4,
        gin_channels: int = 0,
    ) -> None:
        super().__init__()
        self.flows = nn.ModuleList()
        for _ in range(n_flows):
            self.flows.append(
                ResidualCouplingLayer(channels, hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels)
            )
            self.flows.append(nn.Identity())  # Flip: a placeholder so indices match the checkpoints

    def reverse(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        for flow in reversed(self.flows):
            x = flow.reverse(x, g) if isinstance(flow, ResidualCouplingLayer) else torch.flip(x, [1])
        return x

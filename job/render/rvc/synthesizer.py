"""The RVC synthesizer (inference half): text encoder, flow, decoder and speaker embedding.

Submodule and parameter names follow the reference checkpoints exactly (``enc_p``, ``flow``,
``dec``, ``emb_g``), so a voice's ``weight`` dict loads with strict key matching. The training-only
posterior encoder ``enc_q`` is absent, as it is from shared voice files.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel
from torch import nn

from job.render.rvc.attention import Encoder
from job.render.rvc.flow import ResidualCouplingBlock
from job.render.rvc.generator import Generator

NOISE_SCALE = 0.66666  # the prior's sampling temperature at inference


class SynthConfig(BaseModel):
    """The checkpoint's ``config`` list, by name (order as in the reference)."""

    spec_channels: int
    segment_size: int
    inter_channels: int
    hidden_channels: int
    filter_channels: int
    n_heads: int
    n_layers: int
    kernel_size: int
    p_dropout: float
    resblock: str
    resblock_kernel_sizes: list[int]
    resblock_dilation_sizes: list[list[int]]
    upsample_rates: list[int]
    upsample_initial_channel: int
    upsample_kernel_sizes: list[int]
    spk_embed_dim: int
    gin_channels: int
    sr: int

    @classmethod
    def from_list(cls, values: list) -> SynthConfig:
        names = list(cls.model_fields)
        if len(values) != len(names):
            raise ValueError(f"config has {len(values)} entries, expected {len(names)}")
        data = dict(zip(names, values))
        data["resblock"] = str(data["resblock"])
        return cls.model_validate(data)

    def to_list(self) -> list:
        return [getattr(self, name) for name in type(self).model_fields]


class TextEncoder(nn.Module):
    """Content features (+ coarse pitch) -> prior mean and log-std ``[B, inter, frames]``.

    Args:
        content_dim: the content features' width (256 for v1, 768 for v2)
        out_channels: the prior's channels
        hidden_channels: the encoder's width
        filter_channels: its feed-forward width
        n_heads: attention heads
        n_layers: encoder layers
        kernel_size: the feed-forward convolutions' kernel
        f0: the voice has pitch (a coarse-pitch embedding is added)
    """

    def __init__(
        self,
        content_dim: int,
        out_channels: int,
        hidden_channels: int,
        filter_channels: int,
        n_heads: int,
        n_layers: int,
        kernel_size: int,
        f0: bool,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.hidden_channels = hidden_channels
        self.emb_phone = nn.Linear(content_dim, hidden_channels)
        self.emb_pitch = nn.Embedding(256, hidden_channels) if f0 else None
        self.encoder = Encoder(hidden_channels, filter_channels, n_heads, n_layers, kernel_size)
        self.proj = nn.Conv1d(hidden_channels, out_channels * 2, 1)

    def forward(self, phone: torch.Tensor, pitch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.emb_phone(phone)
        if self.emb_pitch is not None and pitch is not None:
            x = x + self.emb_pitch(pitch)
        x = torch.nn.functional.leaky_relu(x * math.sqrt(self.hidden_channels), 0.1)
        x = self.encoder(x.transpose(1, 2))
        stats = self.proj(x)
        return stats[:, : self.out_channels], stats[:, self.out_channels :]


class Synthesizer(nn.Module):
    def __init__(self, config: SynthConfig, content_dim: int, f0: bool) -> None:
        super().__init__()
        c = config
        self.config = c
        self.f0 = f0
        self.content_dim = content_dim
        self.enc_p = TextEncoder(
            content_dim,
            c.inter_channels,
            c.hidden_channels,
            c.filter_channels,
            c.n_heads,
            c.n_layers,
            c.kernel_size,
            f0,
        )
        self.dec = Generator(
            c.inter_channels,
            c.resblock,
            c.resblock_kernel_sizes,
            c.resblock_dilation_sizes,
            c.upsample_rates,
            c.upsample_initial_channel,
            c.upsample_kernel_sizes,
            c.gin_channels,
            sample_rate=c.sr if f0 else None,
        )
        self.flow = ResidualCouplingBlock(c.inter_channels, c.hidden_channels, 5, 1, 3, gin_channels=c.gin_channels)
        self.emb_g = nn.Embedding(c.spk_embed_dim, c.gin_channels)

    @property
    def upp(self) -> int:
        return self.dec.upp

    def prior(
        self,
        phone: torch.Tensor,
        pitch: torch.Tensor | None,
        pitchf: torch.Tensor | None,
        speaker: int = 0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Everything before the decoder: the latent ``z`` [B, inter, frames], the speaker
        embedding ``g`` [1, gin, 1] and the NSF excitation [B, 1, frames * upp] (None without
        pitch), drawing the random numbers in the reference's order from ``generator``.

        Args:
            phone: content features, ``[B, frames, content_dim]``
            pitch: coarse pitch 1..255, ``[B, frames]`` (None without pitch)
            pitchf: pitch in Hz, ``[B, frames]`` (None without pitch)
            speaker: the speaker id
            generator: the random source
        """
        g = self.emb_g(torch.tensor([speaker], device=phone.device)).unsqueeze(-1)
        m_p, logs_p = self.enc_p(phone, pitch)
        noise = torch.randn(m_p.shape, generator=generator, device=m_p.device, dtype=m_p.dtype)
        z_p = m_p + torch.exp(logs_p) * noise * NOISE_SCALE
        z = self.flow.reverse(z_p, g)
        return z, g, self.dec.source(pitchf if self.f0 else None, generator)

    def infer(
        self,
        phone: torch.Tensor,
        pitch: torch.Tensor | None,
        pitchf: torch.Tensor | None,
        speaker: int = 0,
        generator: torch.Generator | None = None,
        decoder_dtype: torch.dtype = torch.float32,
        fast: bool = True,
    ) -> torch.Tensor:
        """phone [B, frames, content_dim], pitch (coarse 1..255) and pitchf (Hz) [B, frames]
        -> audio [B, frames * upp]. The decoder (about 95 % of the compute) runs in
        ``decoder_dtype`` and, with ``fast``, in its channels-last layout (see generator.py); the
        encoder and flow stay in float32.

        Args:
            phone: content features, ``[B, frames, content_dim]``
            pitch: coarse pitch 1..255 (None without pitch)
            pitchf: pitch in Hz (None without pitch)
            speaker: the speaker id
            generator: the random source
            decoder_dtype: the decoder's compute type
            fast: the decoder's channels-last layout
        """
        z, g, source = self.prior(phone, pitch, pitchf, speaker, generator)
        return self.dec.decode(z, g, source, decoder_dtype, fast)[:, 0]

"""RMVPE, the robust vocal pitch estimator RVC users pick by default.

Our own code for the network whose state dict the standard ``rmvpe.pt`` holds (a deep U-Net over
a log-mel spectrogram, a bidirectional GRU and 360 pitch bins of 20 cents), loaded strictly.
Input: 16 kHz audio; output: f0 in Hz every 10 ms (0 where unvoiced).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from job.render.safe_load import load_weights_only
from job.render.weights import build_with_weights
from shared.errors import CoverError, ErrorCode

SAMPLE_RATE = 16000
HOP = 160
N_FFT = 1024
N_MELS = 128
FMIN, FMAX = 30.0, 8000.0
N_BINS = 360
CENTS_OFFSET = 1997.3794084376191  # cents of bin 0 (relative to 10 Hz)
THRESHOLD = 0.03


def mel_filterbank(
    sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS, fmin: float = FMIN, fmax: float = FMAX
) -> np.ndarray:
    """HTK-scale triangular filters with area (Slaney) normalisation: [n_mels, n_fft // 2 + 1].

    Args:
        sample_rate: the audio's rate
        n_fft: the FFT's size
        n_mels: filters
        fmin: the lowest filter's edge, Hz
        fmax: the highest filter's edge, Hz
    """

    def to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    hz = to_hz(np.linspace(to_mel(np.array(fmin)), to_mel(np.array(fmax)), n_mels + 2))
    fdiff = np.diff(hz)
    ramps = hz[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz[2:] - hz[:-2]))[:, None]
    return weights.astype(np.float32)


class ConvBlockRes(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, momentum: float = 0.01) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels, momentum=momentum),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels, momentum=momentum),
            nn.ReLU(),
        )
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + (self.shortcut(x) if self.shortcut is not None else x)


class ResEncoderBlock(nn.Module):
    """Residual convolution blocks, then an average pool.

    Args:
        in_channels: input channels
        out_channels: output channels
        kernel_size: the pool's kernel (None: no pool)
        n_blocks: residual blocks
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int] | None, n_blocks: int) -> None:
        super().__init__()
        self.conv = nn.ModuleList(
            [ConvBlockRes(in_channels, out_channels)]
            + [ConvBlockRes(out_channels, out_channels) for _ in range(n_blocks - 1)]
        )
        self.pool = nn.AvgPool2d(kernel_size) if kernel_size is not None else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.conv:
            x = block(x)
        return x, (self.pool(x) if self.pool is not None else x)


class UNetEncoder(nn.Module):
    """The U-Net's encoder.

    Args:
        in_channels: input channels
        n_encoders: encoder blocks (each halves the resolution, doubles the channels)
        kernel_size: the pools' kernel
        n_blocks: residual blocks per encoder block
        out_channels: the first block's channels
    """

    def __init__(
        self, in_channels: int, n_encoders: int, kernel_size: tuple[int, int], n_blocks: int, out_channels: int = 16
    ) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels, momentum=0.01)
        self.layers = nn.ModuleList()
        for _ in range(n_encoders):
            self.layers.append(ResEncoderBlock(in_channels, out_channels, kernel_size, n_blocks))
            in_channels, out_channels = out_channels, out_channels * 2
        self.out_channel = out_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.bn(x)
        skips = []
        for layer in self.layers:
            skip, x = layer(x)
            skips.append(skip)
        return x, skips


class Intermediate(nn.Module):
    """The U-Net's bottom, at one resolution.

    Args:
        in_channels: input channels
        out_channels: output channels
        n_inters: blocks
        n_blocks: residual blocks per block
    """

    def __init__(self, in_channels: int, out_channels: int, n_inters: int, n_blocks: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [ResEncoderBlock(in_channels, out_channels, None, n_blocks)]
            + [ResEncoderBlock(out_channels, out_channels, None, n_blocks) for _ in range(n_inters - 1)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)[0]
        return x


class ResDecoderBlock(nn.Module):
    """Up by ``stride``, then residual blocks over it and the skip connection.

    Args:
        in_channels: input channels
        out_channels: output channels
        stride: the transposed convolution's stride
        n_blocks: residual blocks
    """

    def __init__(self, in_channels: int, out_channels: int, stride: tuple[int, int], n_blocks: int) -> None:
        super().__init__()
        out_padding = (0, 1) if stride == (1, 2) else (1, 1)
        self.conv1 = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, 3, stride, 1, output_padding=out_padding, bias=False),
            nn.BatchNorm2d(out_channels, momentum=0.01),
            nn.ReLU(),
        )
        self.conv2 = nn.ModuleList(
            [ConvBlockRes(out_channels * 2, out_channels)]
            + [ConvBlockRes(out_channels, out_channels) for _ in range(n_blocks - 1)]
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.conv1(x), skip), dim=1)
        for block in self.conv2:
            x = block(x)
        return x


class UNetDecoder(nn.Module):
    """The U-Net's decoder.

    Args:
        in_channels: input channels
        n_decoders: decoder blocks
        stride: their strides
        n_blocks: residual blocks per decoder block
    """

    def __init__(self, in_channels: int, n_decoders: int, stride: tuple[int, int], n_blocks: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(n_decoders):
            self.layers.append(ResDecoderBlock(in_channels, in_channels // 2, stride, n_blocks))
            in_channels //= 2

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for layer, skip in zip(self.layers, reversed(skips)):
            x = layer(x, skip)
        return x


class DeepUnet(nn.Module):
    """RMVPE's U-Net over the log-mel spectrogram.

    Args:
        kernel_size: the pools' kernel and the decoders' stride
        n_blocks: residual blocks per level
        en_de_layers: encoder and decoder levels
        inter_layers: bottom blocks
        in_channels: input channels
        en_out_channels: the first level's channels
    """

    def __init__(
        self,
        kernel_size: tuple[int, int],
        n_blocks: int,
        en_de_layers: int = 5,
        inter_layers: int = 4,
        in_channels: int = 1,
        en_out_channels: int = 16,
    ) -> None:
        super().__init__()
        self.encoder = UNetEncoder(in_channels, en_de_layers, kernel_size, n_blocks, en_out_channels)
        self.intermediate = Intermediate(
            self.encoder.out_channel // 2, self.encoder.out_channel, inter_layers, n_blocks
        )
        self.decoder = UNetDecoder(self.encoder.out_channel, en_de_layers, kernel_size, n_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, skips = self.encoder(x)
        return self.decoder(self.intermediate(x), skips)


class BiGRU(nn.Module):
    def __init__(self, input_features: int, hidden_features: int, num_layers: int) -> None:
        super().__init__()
        self.gru = nn.GRU(input_features, hidden_features, num_layers=num_layers, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[0]


class E2E(nn.Module):
    """The RMVPE network: log-mel [B, 128, frames] -> pitch-bin salience [B, frames, 360].

    Args:
        n_blocks: residual blocks per U-Net level
        n_gru: bidirectional GRU layers
        kernel_size: the U-Net's pools
        en_de_layers: U-Net levels
        inter_layers: U-Net bottom blocks
        en_out_channels: the U-Net's first level's channels
    """

    def __init__(
        self,
        n_blocks: int = 4,
        n_gru: int = 1,
        kernel_size: tuple[int, int] = (2, 2),
        en_de_layers: int = 5,
        inter_layers: int = 4,
        en_out_channels: int = 16,
    ) -> None:
        super().__init__()
        self.unet = DeepUnet(kernel_size, n_blocks, en_de_layers, inter_layers, 1, en_out_channels)
        self.cnn = nn.Conv2d(en_out_channels, 3, 3, padding=1)
        self.fc = nn.Sequential(BiGRU(3 * N_MELS, 256, n_gru), nn.Linear(512, N_BINS), nn.Dropout(0.25), nn.Sigmoid())

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.cnn(self.unet(mel.transpose(-1, -2).unsqueeze(1)))
        return self.fc(x.transpose(1, 2).flatten(-2))


CPU = torch.device("cpu")


class RMVPE:
    """Load ``rmvpe.pt`` once; :meth:`f0` tracks 16 kHz audio.

    ``fast`` (the fast kernels, on a CPU): the U-Net's weights in channels-last memory, so oneDNN
    runs its convolutions in its blocked NHWC kernels (activations follow the weights' layout): 20 s
    of vocals 1.24 to 1.31 s -> 1.05 to 1.12 s on the 2-core AMD EPYC, the pitch within 0.003 Hz of
    the plain layout's (float32 rounding; tested). The reference kernels keep the plain layout.
    """

    def __init__(self, model: E2E, device: torch.device = CPU, fast: bool = False) -> None:
        self.model = model.eval().to(device)
        if fast and device.type == "cpu":
            cast(Any, self.model).to(memory_format=torch.channels_last)  # in place (torch's stubs lack the keyword)
        self.device = device
        self.mel_basis = torch.from_numpy(mel_filterbank()).to(device)
        self.window = torch.hann_window(N_FFT, device=device)
        cents = CENTS_OFFSET + 20.0 * np.arange(N_BINS)
        self.cents = torch.from_numpy(np.pad(cents, 4)).float().to(device)

    @classmethod
    def load(cls, path: Path, device: torch.device = CPU, fast: bool = False) -> RMVPE:
        state = load_weights_only(path)
        if not isinstance(state, dict):
            raise CoverError(ErrorCode.MODEL_CORRUPT, f"{path} is not an RMVPE state dict")
        state = state.get("model", state) if isinstance(state.get("model"), dict) else state
        try:
            model = build_with_weights(E2E, state)
        except RuntimeError as exc:
            raise CoverError(ErrorCode.MODEL_MISMATCH, f"{path} does not fit RMVPE: {str(exc)[:300]}") from None
        return cls(model, device, fast)

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(audio, N_FFT, HOP, N_FFT, window=self.window, center=True, return_complex=True).abs()
        return torch.log(torch.clamp(self.mel_basis @ spec, min=1e-5))

    @torch.inference_mode()
    def f0(self, audio: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
        """[samples] at 16 kHz -> f0 [samples // 160 + 1] in Hz."""
        mel = self.log_mel(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).to(self.device)[None])
        frames = mel.shape[-1]
        padded = 32 * ((frames - 1) // 32 + 1)
        mode = "reflect" if padded - frames < frames else "constant"
        salience = self.model(F.pad(mel, (0, padded - frames), mode=mode))[0, :frames]
        return self.decode(salience, threshold)

    def decode(self, salience: torch.Tensor, threshold: float) -> np.ndarray:
        """Local weighted average of cents around each frame's peak bin (9 bins)."""
        center = salience.argmax(dim=1)
        padded = F.pad(salience, (4, 4))
        idx = center[:, None] + torch.arange(9, device=salience.device)[None]
        weights = padded.gather(1, idx)
        cents = (weights * self.cents[idx]).sum(1) / weights.sum(1).clamp_min(1e-9)
        voiced = salience.max(dim=1).values > threshold
        f0 = 10.0 * 2.0 ** (cents / 1200.0)
        return torch.where(voiced, f0, torch.zeros_like(f0)).cpu().numpy().astype(np.float32)

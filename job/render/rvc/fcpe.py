"""FCPE, the fast context-based pitch estimator (``f0_method=fcpe``): our own inference of the
conv-only CFNaiveMelPE network whose weights torchfcpe 0.0.4 ships (``fcpe_c_v001.pt``, MIT). The
torchfcpe package itself is never imported (it imports torchaudio, which breaks beside our torch).

What it computes, as the reference does (its checkpoint's config: 16 kHz, 128 mels, FFT and window
1024, hop 160, 0 to 8 kHz; 360 cent bins from 32.70 to 1975.5 Hz):

* a log-mel spectrogram: the signal reflect-padded by 432 samples each side, a periodic Hann
  window, no centring, magnitudes ``sqrt(re^2 + im^2 + 1e-9)``, librosa's Slaney mel filters,
  ``log(max(x, 1e-5))``; one frame per 160 samples and one more (the last repeated);
* the network: an input stack (conv 3, group norm, leaky ReLU, conv 3), six residual convolution
  modules (layer norm, pointwise conv to 2x2 widths, GLU, depthwise conv 31, SiLU, pointwise conv
  back), a layer norm and a weight-normed projection to the 360 bins, sigmoid;
* decoding ``local_argmax``: the weighted mean of the cent table over the nine bins around the
  strongest, the frame unvoiced (0 Hz) when that bin's activation is at most the threshold (0.006).

The checkpoint (``base/fcpe.pt`` in the model store, its sha256 pinned below) was saved on CUDA: it
is loaded to the CPU, weights only.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from job.render.safe_load import load_weights_only
from shared.errors import CoverError, ErrorCode

FCPE_SHA256 = "b9aeaeb673436eeda50ceafd632aa681aa63417e52eae4207503d180c9b10015"
SAMPLE_RATE, HOP, N_FFT, N_MELS = 16000, 160, 1024, 128
THRESHOLD = 0.006
LAYERS, WIDTH, BINS, KERNEL = 6, 512, 360, 31


class _ConvModule(nn.Module):
    """One residual block: layer norm, pointwise expansion, GLU, depthwise conv, SiLU, projection."""

    def __init__(self) -> None:
        super().__init__()
        inner = 2 * WIDTH
        self.norm = nn.LayerNorm(WIDTH)
        self.expand = nn.Conv1d(WIDTH, 2 * inner, 1)
        self.depthwise = nn.Conv1d(inner, inner, KERNEL, padding=KERNEL // 2, groups=inner)
        self.project = nn.Conv1d(inner, WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, WIDTH]
        h = F.glu(self.expand(self.norm(x).transpose(1, 2)), dim=1)
        return self.project(F.silu(self.depthwise(h))).transpose(1, 2)


class FCPENetwork(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_in = nn.Conv1d(N_MELS, WIDTH, 3, padding=1)
        self.input_norm = nn.GroupNorm(4, WIDTH)
        self.input_out = nn.Conv1d(WIDTH, WIDTH, 3, padding=1)
        self.layers = nn.ModuleList(_ConvModule() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(WIDTH)
        self.output_proj = nn.utils.parametrizations.weight_norm(nn.Linear(WIDTH, BINS))
        self.cent_table: torch.Tensor
        self.register_buffer("cent_table", torch.zeros(BINS))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """``mel`` [B, T, 128] -> activations [B, T, 360] in (0, 1)."""
        x = self.input_out(F.leaky_relu(self.input_norm(self.input_in(mel.transpose(1, 2))))).transpose(1, 2)
        for layer in self.layers:
            x = x + layer(x)
        return torch.sigmoid(self.output_proj(self.norm(x)))


# the checkpoint's parameter names (torchfcpe's module layout) -> ours
_RENAMES = [
    (r"^input_stack\.0\.", "input_in."),
    (r"^input_stack\.1\.", "input_norm."),
    (r"^input_stack\.3\.", "input_out."),
    (r"^net\.encoder_layers\.(\d+)\.conformer\.net\.0\.", r"layers.\1.norm."),
    (r"^net\.encoder_layers\.(\d+)\.conformer\.net\.2\.", r"layers.\1.expand."),
    (r"^net\.encoder_layers\.(\d+)\.conformer\.net\.4\.conv\.", r"layers.\1.depthwise."),
    (r"^net\.encoder_layers\.(\d+)\.conformer\.net\.6\.", r"layers.\1.project."),
    (r"^output_proj\.weight_g$", "output_proj.parametrizations.weight.original0"),
    (r"^output_proj\.weight_v$", "output_proj.parametrizations.weight.original1"),
]
# in the checkpoint, unused by the conv-only network: each layer's attention norm, a training mask
_UNUSED = re.compile(r"^net\.encoder_layers\.\d+\.norm\.|^gaussian_blurred_cent_mask$")


def _checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = load_weights_only(path)
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{path.name} is not an FCPE checkpoint (no model state)")
    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _UNUSED.search(key):
            continue
        renamed = key
        for pattern, name in _RENAMES:
            renamed = re.sub(pattern, name, renamed)
        ours[renamed] = value.to("cpu")
    return ours


class FCPE:
    """The pitch tracker: load once, call :meth:`f0` per stretch of 16 kHz audio."""

    def __init__(self, network: FCPENetwork, device: torch.device | str = "cpu") -> None:
        self.network = network.to(device).eval()
        self.device = torch.device(device)
        from librosa.filters import mel  # type: ignore[import-untyped]

        basis = mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=0, fmax=SAMPLE_RATE / 2)
        self.mel_basis = torch.from_numpy(basis).float().to(self.device)
        self.window = torch.hann_window(N_FFT, device=self.device)

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> FCPE:
        network = FCPENetwork()
        try:
            network.load_state_dict(_checkpoint_state(Path(path)), strict=True)
        except RuntimeError as exc:
            raise CoverError(ErrorCode.MODEL_MISMATCH, f"{Path(path).name} does not fit FCPE: {exc}") from None
        return cls(network, device)

    def mel(self, audio: torch.Tensor) -> torch.Tensor:
        """[samples] at 16 kHz -> log-mel [1, samples // 160 + 1, 128]."""
        samples = audio.shape[-1]
        left = (N_FFT - HOP) // 2
        right = max((N_FFT - HOP + 1) // 2, N_FFT - samples - left)
        mode = "reflect" if right < samples else "constant"
        padded = F.pad(audio[None, None], (left, right), mode=mode)[0]
        spec = torch.stft(
            padded, N_FFT, hop_length=HOP, win_length=N_FFT, window=self.window, center=False, return_complex=True
        )
        magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
        mel = torch.log(torch.clamp(self.mel_basis @ magnitude, min=1e-5)).transpose(1, 2)
        frames = samples // HOP + 1
        if mel.shape[1] < frames:
            mel = torch.cat([mel, mel[:, -1:].expand(-1, frames - mel.shape[1], -1)], dim=1)
        return mel[:, :frames]

    def decode(self, activations: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
        """``local_argmax``: [1, T, 360] -> f0 Hz [T], 0 where the strongest bin is at most ``threshold``."""
        table = self.network.cent_table
        strongest, peak = activations.max(dim=-1, keepdim=True)
        around = (peak + torch.arange(-4, 5, device=activations.device)).clamp(0, BINS - 1)
        weights = activations.gather(-1, around)
        cents = (table[around] * weights).sum(-1) / weights.sum(-1)
        f0 = 10.0 * 2.0 ** (cents / 1200.0)
        return torch.where(strongest[..., 0] > threshold, f0, torch.zeros_like(f0))[0]

    @torch.inference_mode()
    def f0(self, audio: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
        """F0 in Hz per 10 ms of 16 kHz ``audio`` (``len // 160 + 1`` values), 0 where unvoiced."""
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).to(self.device)
        return self.decode(self.network(self.mel(x)), threshold).cpu().numpy().astype(np.float32)

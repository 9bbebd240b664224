"""The identity score's model: Resemblyzer's speaker encoder, loaded from the weights in its wheel."""

from __future__ import annotations

import numpy as np

from job.render.media.audio import CONTENT_SAMPLE_RATE as RATE
from job.render.quality.wheels import wheel_file


class SpeakerEncoder:
    """Resemblyzer's speaker encoder, rebuilt here from its published layout and loaded from the
    ``pretrained.pt`` in its wheel (importing the package would pull webrtcvad for its VAD, which we
    do not use: CREPE's silence gate and our segments stand in)."""

    MEL_BANDS = 40
    PARTIAL_FRAMES = 160  # 1.6 s at a 10 ms hop

    def __init__(self, lstm, linear, device: str) -> None:
        self.lstm, self.linear, self.device = lstm, linear, device

    @classmethod
    def load(cls, device: str) -> SpeakerEncoder:
        import torch

        lstm = torch.nn.LSTM(cls.MEL_BANDS, 256, num_layers=3, batch_first=True)
        linear = torch.nn.Linear(256, 256)
        checkpoint = torch.load(wheel_file("resemblyzer", "pretrained.pt"), map_location="cpu", weights_only=True)
        state = checkpoint["model_state"]
        lstm.load_state_dict({k.removeprefix("lstm."): v for k, v in state.items() if k.startswith("lstm.")})
        linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items() if k.startswith("linear.")})
        return cls(lstm.eval().to(device), linear.eval().to(device), device)

    def mels(self, audio16: np.ndarray) -> np.ndarray:
        import librosa

        spec = librosa.feature.melspectrogram(
            y=audio16, sr=RATE, n_fft=int(RATE * 0.025), hop_length=int(RATE * 0.010), n_mels=self.MEL_BANDS
        )
        return spec.astype(np.float32).T  # (frames, 40)

    def embed(self, audio16: np.ndarray) -> np.ndarray | None:
        import torch

        peak = float(np.max(np.abs(audio16))) if len(audio16) else 0.0
        if peak < 1e-4:
            return None
        rms = float(np.sqrt(np.mean(audio16.astype(np.float64) ** 2)))
        wav = audio16 * (10 ** (-30 / 20) / max(rms, 1e-10))  # Resemblyzer's -30 dBFS normalisation
        mels = self.mels(wav.astype(np.float32))
        step = self.PARTIAL_FRAMES  # back to back (Resemblyzer overlaps them at 1.3 a second: twice the cost)
        starts = list(range(0, max(1, len(mels) - self.PARTIAL_FRAMES + 1), step))
        if len(mels) < self.PARTIAL_FRAMES:
            mels = np.pad(mels, ((0, self.PARTIAL_FRAMES - len(mels)), (0, 0)))
        batch = torch.from_numpy(np.stack([mels[s : s + self.PARTIAL_FRAMES] for s in starts])).to(self.device)
        with torch.inference_mode():
            _, (hidden, _) = self.lstm(batch)
            partial = torch.relu(self.linear(hidden[-1]))
            partial = partial / partial.norm(dim=1, keepdim=True).clamp_min(1e-10)
            mean = partial.mean(0)
            return (mean / mean.norm().clamp_min(1e-10)).cpu().numpy()

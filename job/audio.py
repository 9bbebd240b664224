"""Audio I/O through FFmpeg, and the pipeline's audio constants.

Arrays are float32, shaped ``[channels, samples]``, values in [-1, 1].
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
from scipy.io import wavfile

from shared.errors import CoverError, ErrorCode

MIX_SAMPLE_RATE = 44100  # Demucs' rate; the instrumental and the final mix use it.
CONTENT_SAMPLE_RATE = 16000  # HuBERT and every pitch tracker work at 16 kHz.
SILENCE_DBFS = -70.0  # a file whose peak stays below this is "pure silence".


def require_ffmpeg() -> None:
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            raise CoverError(ErrorCode.TOOL_MISSING,
                             f"{tool} is not installed; on Debian/Ubuntu run: apt-get install -y ffmpeg")


def decode(path: Path, sample_rate: int, channels: int) -> tuple[np.ndarray, str]:
    """Decode any FFmpeg-readable file to ``[channels, samples]`` float32.

    Returns the samples and FFmpeg's error output (empty when the stream decoded cleanly).
    """
    require_ffmpeg()
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-vn", "-f", "f32le",
           "-acodec", "pcm_f32le", "-ac", str(channels), "-ar", str(sample_rate), "pipe:1"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0 and not proc.stdout:
        raise CoverError(ErrorCode.INPUT_NOT_AUDIO,
                         f"{path.name} could not be decoded as audio: {_first_line(proc.stderr)}")
    audio = np.frombuffer(proc.stdout, dtype=np.float32)
    audio = audio[: len(audio) - len(audio) % channels].reshape(-1, channels).T.copy()
    return audio, proc.stderr.decode(errors="replace").strip()


def _first_line(stderr: bytes) -> str:
    text = stderr.decode(errors="replace").strip().splitlines()
    return text[-1] if text else "unknown error"


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write ``[channels, samples]`` (or ``[samples]``) float32 as a 32-bit float WAV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(audio, dtype=np.float32)
    wavfile.write(path, sample_rate, data.T if data.ndim == 2 else data)
    return path


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Read a WAV written by :func:`write_wav` (or any PCM WAV) as ``[channels, samples]``."""
    sample_rate, data = wavfile.read(path)
    if data.dtype.kind == "i":
        data = data.astype(np.float32) / np.iinfo(data.dtype).max
    data = np.asarray(data, dtype=np.float32)
    return (data[None] if data.ndim == 1 else data.T).copy(), int(sample_rate)


def peak_dbfs(audio: np.ndarray) -> float:
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    return 20.0 * np.log10(peak) if peak > 0 else float("-inf")

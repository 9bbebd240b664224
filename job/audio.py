"""Audio I/O through FFmpeg, and the pipeline's audio constants.

Arrays are float32, shaped ``[channels, samples]``, values in [-1, 1].
"""

from __future__ import annotations

import shutil
import struct
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


class WavWriter:
    """A 32-bit float WAV written block by block (``[channels, samples]`` blocks), so a stem never
    has to be whole in memory; the RIFF sizes are filled in on close."""

    _HEADER = struct.Struct("<4sI4s4sIHHIIHHH4sII4sI")  # RIFF, fmt (18 bytes), fact, data

    def __init__(self, path: Path, sample_rate: int, channels: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.sample_rate, self.channels = path, sample_rate, channels
        self.frames = 0
        self._file = open(path, "wb")
        self._file.write(self._header())

    def _header(self) -> bytes:
        data_bytes = self.frames * self.channels * 4
        if data_bytes + self._HEADER.size > 0xFFFFFFFF:
            raise CoverError(ErrorCode.INTERNAL, f"{self.path.name}: over 4 GiB, too long for a WAV file")
        return self._HEADER.pack(b"RIFF", self._HEADER.size - 8 + data_bytes, b"WAVE",
                                 b"fmt ", 18, 3, self.channels, self.sample_rate,
                                 self.sample_rate * self.channels * 4, self.channels * 4, 32, 0,
                                 b"fact", 4, self.frames, b"data", data_bytes)

    def write(self, block: np.ndarray) -> None:
        block = np.asarray(block, dtype=np.float32).reshape(self.channels, -1)
        self._file.write(np.ascontiguousarray(block.T).tobytes())
        self.frames += block.shape[1]

    def close(self) -> Path:
        if not self._file.closed:
            self._file.seek(0)
            self._file.write(self._header())
            self._file.close()
        return self.path

    def __enter__(self) -> "WavWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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

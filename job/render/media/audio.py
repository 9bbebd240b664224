"""Audio I/O through FFmpeg, and the pipeline's audio constants.

Arrays are float32, shaped ``[channels, samples]``, values in [-1, 1].
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from pydantic import BaseModel
from scipy.io import wavfile
from scipy.signal import resample_poly

from job.render.media.ffmpeg import decode_command, last_line, require_ffmpeg, spawn
from shared.errors import CoverError, ErrorCode

MIX_SAMPLE_RATE = 44100  # Demucs' rate; the instrumental and the final mix use it.
CONTENT_SAMPLE_RATE = 16000  # HuBERT and every pitch tracker work at 16 kHz.
SILENCE_DBFS = -70.0  # a file whose peak stays below this is "pure silence".


def decode(path: Path, sample_rate: int, channels: int) -> tuple[np.ndarray, str]:
    """Decode any FFmpeg-readable file to ``[channels, samples]`` float32.

    Returns the samples and FFmpeg's error output (empty when the stream decoded cleanly).
    """
    require_ffmpeg()
    proc = spawn(decode_command(path, sample_rate, channels), subprocess.PIPE, subprocess.PIPE)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0 and not stdout:
        raise CoverError(ErrorCode.INPUT_NOT_AUDIO, f"{path.name} could not be decoded as audio: {last_line(stderr)}")
    audio = np.frombuffer(stdout, dtype=np.float32)
    audio = audio[: len(audio) - len(audio) % channels].reshape(-1, channels).T.copy()
    return audio, stderr.decode(errors="replace").strip()


class Decoded(BaseModel):
    """What :func:`decode_to_wav` wrote: length, peak before clipping, FFmpeg's error output."""

    frames: int
    peak: float
    errors: str

    @property
    def peak_dbfs(self) -> float:
        return 20.0 * float(np.log10(self.peak)) if self.peak > 0 else float("-inf")


def decode_to_wav(
    path: Path, out: Path, sample_rate: int, channels: int, max_frames: int | None = None, block_frames: int = 1 << 18
) -> Decoded:
    """Decode any FFmpeg-readable file into the float WAV ``out``, clipped to [-1, 1], block by
    block (memory stays that of one block whatever the length). Stops reading after ``max_frames``
    plus one block, so an over-long file is not decoded to its end.

    Args:
        path: the file to decode (any format FFmpeg reads and the allow-list admits)
        out: the float WAV to write
        sample_rate: the output's rate
        channels: the output's channels
        max_frames: stop after this many frames and one block (None: the whole file)
        block_frames: frames read from FFmpeg at a time
    """
    require_ffmpeg()
    cmd = decode_command(path, sample_rate, channels)
    block_bytes = block_frames * channels * 4
    peak = 0.0
    with tempfile.TemporaryFile() as stderr, WavWriter(out, sample_rate, channels) as writer:
        proc = spawn(cmd, subprocess.PIPE, stderr)
        assert proc.stdout is not None
        pending = b""
        while True:
            chunk = proc.stdout.read(block_bytes)
            if not chunk:
                break
            data = pending + chunk
            usable = len(data) - len(data) % (channels * 4)
            pending = data[usable:]
            block = np.frombuffer(data[:usable], dtype=np.float32).reshape(-1, channels).T
            if block.size:
                peak = max(peak, float(np.max(np.abs(block))))
                writer.write(np.clip(block, -1.0, 1.0))
            if max_frames is not None and writer.frames > max_frames:
                proc.kill()
                break
        proc.stdout.close()
        code = proc.wait()
        stderr.seek(0)
        errors = stderr.read()
        if code != 0 and writer.frames == 0:
            raise CoverError(
                ErrorCode.INPUT_NOT_AUDIO, f"{path.name} could not be decoded as audio: {last_line(errors)}"
            )
        return Decoded(frames=writer.frames, peak=peak, errors=errors.decode(errors="replace").strip())


WRITE_BLOCK = 1 << 18  # frames


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write ``[channels, samples]`` (or ``[samples]``) float32 as a 32-bit float WAV."""
    data = audio if audio.ndim == 2 else audio[None]
    with WavWriter(path, sample_rate, data.shape[0]) as writer:
        for start in range(0, data.shape[-1], WRITE_BLOCK):  # a block at a time: no whole-song copy
            writer.write(data[:, start : start + WRITE_BLOCK])
    return path


class WavWriter:
    """A 32-bit float WAV written block by block (``[channels, samples]`` blocks), so a stem never
    has to be whole in memory; the RIFF sizes are filled in on close.

    Kept over libsndfile (``soundfile.SoundFile``): writing 3.7 minutes of stereo float in 64k-frame
    blocks took 0.18-0.24 s here against 0.40-0.53 s through soundfile (5 runs each, docs/architecture.md)."""

    _HEADER = struct.Struct("<4sI4s4sIHHIIHHH4sII4sI")  # RIFF, fmt (18 bytes), fact, data

    def __init__(self, path: Path, sample_rate: int, channels: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.sample_rate, self.channels = path, sample_rate, channels
        self.frames = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close() / the with-block
        self._file.write(self._header())

    def _header(self) -> bytes:
        data_bytes = self.frames * self.channels * 4
        if data_bytes + self._HEADER.size > 0xFFFFFFFF:
            raise CoverError(ErrorCode.INTERNAL, f"{self.path.name}: over 4 GiB, too long for a WAV file")
        return self._HEADER.pack(
            b"RIFF",
            self._HEADER.size - 8 + data_bytes,
            b"WAVE",
            b"fmt ",
            18,
            3,
            self.channels,
            self.sample_rate,
            self.sample_rate * self.channels * 4,
            self.channels * 4,
            32,
            0,
            b"fact",
            4,
            self.frames,
            b"data",
            data_bytes,
        )

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

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WavReader:
    """Blocks of a 32-bit float WAV (what :class:`WavWriter` writes) read with plain file reads, not
    a memory map, so a long stem costs one block of memory: pages of a mapped file stay resident
    (and count in the process's RSS) once touched. Anything else raises ``ValueError``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close() / the with-block
        self._subformat = 0  # WAVE_FORMAT_EXTENSIBLE's sample format, when the file has one
        try:
            self.sample_rate, self.channels, self._data, self.frames = self._parse()
        except Exception:
            self._file.close()
            raise

    def _parse(self) -> tuple[int, int, int, int]:
        riff = self._file.read(12)
        if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
            raise ValueError(f"{self.path.name} is not a WAV file")
        fmt: tuple[int, int, int, int] | None = None
        while True:
            head = self._file.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path.name} has no data chunk")
            chunk, size = struct.unpack("<4sI", head)
            if chunk == b"data":
                if fmt is None:
                    raise ValueError(f"{self.path.name}: data before fmt")
                tag, channels, rate, bits = fmt
                float_tag = tag == 3 or (tag == 0xFFFE and self._subformat == 3)
                if not float_tag or bits != 32 or channels < 1:
                    raise ValueError(f"{self.path.name} is not 32-bit float audio")
                start = self._file.tell()
                end = min(start + size, self._file.seek(0, 2))
                return rate, channels, start, (end - start) // (channels * 4)
            body = self._file.read(size + (size & 1))
            if chunk == b"fmt ":
                if len(body) < 16:
                    raise ValueError(f"{self.path.name}: short fmt chunk")
                tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
                self._subformat = struct.unpack("<H", body[24:26])[0] if len(body) >= 26 else 0
                fmt = (tag, channels, rate, bits)

    def read(self, start: int, end: int) -> np.ndarray:
        """``[channels, end - start]`` float32 (shorter past the end of the file). Positioned reads:
        threads may read one reader side by side."""
        start, end = max(0, start), min(self.frames, end)
        count = max(0, end - start) * self.channels
        offset, want = self._data + start * self.channels * 4, count * 4
        raw = os.pread(self._file.fileno(), want, offset)
        while len(raw) < want and (more := os.pread(self._file.fileno(), want - len(raw), offset + len(raw))):
            raw += more  # a short read (only at the end of a file that shrank)
        data = np.frombuffer(raw, dtype="<f4")
        return np.ascontiguousarray(data.reshape(-1, self.channels).T, dtype=np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.channels, self.frames

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        """``reader[:, a:b]``: :meth:`read` for code written against ``[channels, frames]`` arrays."""
        channels, frames = key
        if channels != slice(None) or frames.step not in (None, 1):
            raise TypeError("a WavReader reads all channels of a contiguous range: reader[:, a:b]")
        start, stop, _ = frames.indices(self.frames)
        return self.read(start, stop)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> WavReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_wav(path: Path, mmap: bool = False) -> tuple[np.ndarray, int]:
    """Read a WAV written by :func:`write_wav` (or any PCM WAV) as ``[channels, samples]``.
    ``mmap`` (float WAVs only): a read-only view of the file, paged in as it is read."""
    sample_rate, data = wavfile.read(path, mmap=mmap)
    if mmap and data.dtype == np.float32:
        return (data[None] if data.ndim == 1 else data.T), int(sample_rate)
    if data.dtype.kind == "i":
        data = data.astype(np.float32) / np.iinfo(data.dtype).max
    data = np.asarray(data, dtype=np.float32)
    return (data[None] if data.ndim == 1 else data.T).copy(), int(sample_rate)


def to_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono float32 at 16 kHz (polyphase resampling): what HuBERT, RMVPE and the quality models take."""
    mono = audio.mean(axis=0) if audio.ndim == 2 else audio
    if sample_rate != CONTENT_SAMPLE_RATE:
        g = np.gcd(CONTENT_SAMPLE_RATE, sample_rate)
        mono = resample_poly(mono, CONTENT_SAMPLE_RATE // g, sample_rate // g)
    return np.ascontiguousarray(mono, dtype=np.float32)


RESAMPLE_BLOCK_S = 10  # seconds of a file read_16k reads and resamples at a time (20: 12 MB more, no faster)
RESAMPLE_CONTEXT = 1024  # input frames of context on each side of a block (the filter needs ~28)


class Audio16k(BaseModel, arbitrary_types_allowed=True):
    """A float WAV as the 16 kHz models take it, with the file's own length and rate."""

    audio: np.ndarray  # mono float32 at 16 kHz
    frames: int  # the file's length, at its own rate
    sample_rate: int  # the file's rate


def read_16k(path: Path) -> Audio16k:
    """:func:`to_16k` of a 32-bit float WAV, read and resampled :data:`RESAMPLE_BLOCK_S` at a
    time with plain file reads: memory is the 16 kHz result and one block, where reading the file
    whole (or memory-mapped, whose pages stay resident once touched) holds it at its own rate and
    channels, 13 times the result's size for a stereo 44.1 kHz stem. Each block is resampled with
    :data:`RESAMPLE_CONTEXT` frames of the file on either side and starts on a multiple of the
    rates' decimation, so the polyphase filter sees what it sees in the whole file: the result
    equals :func:`to_16k` on the whole file (tested)."""
    with WavReader(path) as reader:
        rate, frames = reader.sample_rate, reader.frames
        if rate == CONTENT_SAMPLE_RATE:
            return Audio16k(audio=to_16k(reader.read(0, frames), rate), frames=frames, sample_rate=rate)
        g = int(np.gcd(CONTENT_SAMPLE_RATE, rate))
        up, down = CONTENT_SAMPLE_RATE // g, rate // g
        step = max(1, RESAMPLE_BLOCK_S * rate // down) * down  # input frames per block
        context = -(-RESAMPLE_CONTEXT // down) * down
        out = np.empty(-(-frames * up // down), dtype=np.float32)  # resample_poly's length
        for start in range(0, frames, step):
            first = max(0, start - context)
            block = reader.read(first, start + step + context)
            mono = block.mean(axis=0) if block.shape[0] > 1 else block[0]
            resampled = resample_poly(mono, up, down)
            at, skip = start * up // down, (start - first) * up // down
            count = min(step * up // down, len(out) - at)
            out[at : at + count] = resampled[skip : skip + count]
        return Audio16k(audio=out, frames=frames, sample_rate=rate)


LEVEL_FLOOR_DB = -60.0  # the report page's level scale: -60 dBFS RMS at the bottom, 0 at the top


def levels(energy: np.ndarray, counts: np.ndarray) -> list[float]:
    """RMS level per column from each column's sum of squares and sample count, on the report
    page's scale: 0 at :data:`LEVEL_FLOOR_DB` dBFS or below, 1 at 0 dBFS."""
    rms = np.sqrt(energy / np.maximum(counts, 1))
    db = 20 * np.log10(np.maximum(rms, 1e-9))
    return [round(float(v), 3) for v in np.clip((db - LEVEL_FLOOR_DB) / -LEVEL_FLOOR_DB, 0.0, 1.0)]


def level_envelope(audio: np.ndarray, columns: int = 1000) -> list[float]:
    """:func:`levels` of mono ``audio`` over ``columns`` equal stretches."""
    if not len(audio):
        return []
    starts = np.linspace(0, len(audio), min(columns, len(audio)) + 1).astype(int)[:-1]
    squares = np.square(audio, dtype=np.float64)
    return levels(np.add.reduceat(squares, starts), np.diff(np.append(starts, len(audio))))

"""FFmpeg and ffprobe, the one way the project runs them: plain argument lists through subprocess.

Every command starts from :data:`FFMPEG` or :data:`FFPROBE` (no stdin, no banner, errors only), so
options that must hold for every invocation are added in one place. Inputs are untrusted:

* every input is opened with :func:`input_args`: only the ``file`` and ``pipe`` protocols and only
  the demuxers of :data:`AUDIO_DEMUXERS`, so a "song" that is an HLS playlist, a concat list or any
  other container that opens further files or URLs is refused (``input.not_audio``); the one
  exception is :class:`PipeEncoder`'s inputs: raw float samples we write ourselves, and the
  packets its own encoder sends its meter down a pipe;
* every process runs under an address-space limit (:data:`MEMORY_LIMIT_BYTES`) and a CPU-time limit
  (:data:`CPU_LIMIT_S`), and ffprobe under a wall-clock timeout (:data:`PROBE_TIMEOUT_S`).
"""

from __future__ import annotations

import contextlib
import json
import re
import resource
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol

import numpy as np

from shared.errors import CoverError, ErrorCode

FFMPEG = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error"]
FFPROBE = ["ffprobe", "-v", "error"]
PROTOCOLS = "file,pipe"
# audio containers only (FFmpeg's demuxer names; "mov" covers mp4/m4a, "matroska" covers webm, "ogg" opus)
AUDIO_DEMUXERS = "mp3,wav,w64,flac,ogg,mov,mp4,m4a,3gp,3g2,mj2,aac,matroska,webm,aiff,wv,caf"
MEMORY_LIMIT_BYTES = 2 * 2**30  # address space of one FFmpeg process
CPU_LIMIT_S = 900  # CPU seconds of one FFmpeg process (a 15-minute song decodes in seconds)
PROBE_TIMEOUT_S = 30.0


def input_args(path: Path) -> list[str]:
    """``-i path`` with the protocol and demuxer allow-lists in front of it."""
    return ["-protocol_whitelist", PROTOCOLS, "-format_whitelist", AUDIO_DEMUXERS, "-i", str(path)]


def spawn(
    cmd: list[str],
    stdout: int | BinaryIO | None = None,
    stderr: int | BinaryIO | None = None,
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
) -> subprocess.Popen:
    """Start an FFmpeg tool under the memory and CPU-time limits (set on the child by pid, which is
    safe in threaded programs where ``preexec_fn`` is not).

    Args:
        cmd: the argument list (never a shell)
        stdout: where its standard output goes (a pipe, a file or None)
        stderr: where its standard error goes
        stdin: its standard input (closed by default)
    """
    proc = subprocess.Popen(cmd, stdin=stdin, stdout=stdout, stderr=stderr)  # noqa: S603 - an argument list, never a shell
    try:
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
        resource.prlimit(proc.pid, resource.RLIMIT_CPU, (CPU_LIMIT_S, CPU_LIMIT_S))
    except (ProcessLookupError, OSError):
        pass  # it has already exited
    return proc


def _run(cmd: list[str], timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
    proc = spawn(cmd, subprocess.PIPE, subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise CoverError(ErrorCode.INPUT_NOT_AUDIO, f"{cmd[0]} gave no answer within {timeout:.0f} s") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def require_ffmpeg() -> None:
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            raise CoverError(
                ErrorCode.TOOL_MISSING, f"{tool} is not installed; on Debian/Ubuntu run: apt-get install -y ffmpeg"
            )


def last_line(stderr: bytes) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "unknown error"


def run(args: list[str], verbose: bool = False) -> bytes:
    """Run ``ffmpeg ARGS`` to completion; its error output (with ``verbose``: its info output, which
    filters such as ``ebur128`` write their measurements to). A failure is an internal error: inputs
    were validated before any stage calls this."""
    require_ffmpeg()
    cmd = [*FFMPEG[:-2], "-v", "info", *args] if verbose else [*FFMPEG, *args]
    proc = _run(cmd)
    if proc.returncode != 0:
        raise failure(proc.returncode, proc.stderr)
    return proc.stderr


def _out_of_space(returncode: int, stderr: bytes) -> bool:
    text = stderr.decode(errors="replace")
    return returncode == -signal.SIGXFSZ or "No space left on device" in text or "File too large" in text


def failure(returncode: int, stderr: bytes) -> CoverError:
    """The error an FFmpeg tool's non-zero exit is: ``work.no_space`` for a full disk or a file-size
    limit, an internal error (with the end of its error output) otherwise."""
    text = stderr.decode(errors="replace")
    if _out_of_space(returncode, stderr):
        return CoverError(ErrorCode.WORK_NO_SPACE, f"the work folder is out of space: {last_line(stderr)}")
    return CoverError(ErrorCode.INTERNAL, f"ffmpeg failed: {text[-600:]}")


def meter_command(demuxer: str) -> list[str]:
    """FFmpeg measuring the encoded packets it reads from its standard input (``demuxer``'s format):
    ``ebur128`` with true peak, its summary on standard error (:func:`ebur128_summary`)."""
    decode = [*FFMPEG[:-2], "-v", "info", "-nostats", "-f", demuxer, "-i", "pipe:0"]
    return [*decode, "-af", "ebur128=peak=true", "-f", "null", "-"]


class Encoder(Protocol):
    """What the mix stage encodes through: :class:`PipeEncoder`, or
    :class:`job.render.media.stretch_encoder.StretchEncoder` for MP3 on several cores."""

    def write(self, block: np.ndarray) -> None: ...

    def close(self) -> tuple[float, float] | None: ...

    def abort(self) -> None: ...


class PipeEncoder:
    """FFmpeg encoding float32 audio that we write to its standard input a block at a time, so the
    encoder works beside us and no whole-song copy (in memory or as a WAV) is ever made. The input
    is our own raw samples, so the untrusted-input allow-lists of :func:`input_args` do not apply;
    the process runs under the same limits as every other. A failure raises as :func:`run`'s do.

    With ``measure`` (a streamable muxer and the demuxer that reads it back, e.g. ``("adts", "aac")``)
    the encoded packets also go, through FFmpeg's ``tee`` muxer, down a pipe to a second FFmpeg that
    decodes them and runs ``ebur128`` while the encoding goes on; :meth:`close` then returns what the
    codec made of the mix (integrated LUFS, true peak dBTP) with no second pass over the file. The
    copy lacks only the file's gapless-playback header (some encoder padding more), which moves
    neither measure by more than one 0.1 step of what FFmpeg prints (tested against
    :func:`measure_loudness` on the finished file).

    Args:
        rate: the samples' rate
        channels: the samples' channels
        out_args: the encoder's output arguments (codec, bit rate, tags)
        muxer: the output file's muxer
        out: the encoded file
        measure: (format, codec) of a copy of the encoded packets for a second FFmpeg to measure, or None
    """

    def __init__(
        self,
        rate: int,
        channels: int,
        out_args: list[str],
        muxer: str,
        out: Path,
        measure: tuple[str, str] | None = None,
    ) -> None:
        require_ffmpeg()
        self.channels = channels
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()/abort()
        raw = ["-f", "f32le", "-ar", str(rate), "-ac", str(channels), "-i", "pipe:0"]
        self._meter: subprocess.Popen | None = None
        self._meter_log: BinaryIO | None = None
        if measure is None:
            cmd = [*FFMPEG, *raw, *out_args, "-f", muxer, "-y", str(out)]
            self._proc = spawn(cmd, None, self._stderr, subprocess.PIPE)
            return
        stream_muxer, stream_demuxer = measure
        slaves = f"[f={muxer}]file:{_tee_escape(str(out.absolute()))}|[f={stream_muxer}]pipe:1"
        cmd = [*FFMPEG, *raw, *out_args, "-map", "0:a", "-f", "tee", slaves]
        self._proc = spawn(cmd, subprocess.PIPE, self._stderr, subprocess.PIPE)
        self._meter_log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()/abort()
        meter_log = self._meter_log
        try:
            self._meter = spawn(meter_command(stream_demuxer), subprocess.DEVNULL, meter_log, self._proc.stdout)
        except BaseException:
            self.abort()
            raise
        finally:
            assert self._proc.stdout is not None
            self._proc.stdout.close()  # the meter holds the pipe's reading end now

    def write(self, block: np.ndarray) -> None:
        """``[channels, samples]`` float32, interleaved on the way out."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(np.ascontiguousarray(np.asarray(block, dtype=np.float32).T).tobytes())
        except BrokenPipeError:  # FFmpeg stopped: close() says why
            self.close()
            raise CoverError(ErrorCode.INTERNAL, "ffmpeg stopped reading the mix") from None

    def close(self) -> tuple[float, float] | None:
        """Finish the file; raises if FFmpeg failed. With ``measure``: the encoded stream's
        integrated loudness (LUFS) and true peak (dBTP)."""
        assert self._proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._proc.stdin.close()
        code = self._proc.wait()
        meter_code = self._meter.wait() if self._meter is not None else 0
        self._stderr.seek(0)
        errors = self._stderr.read()
        self._stderr.close()
        if code != 0 or _out_of_space(code, errors):  # the tee muxer can end 0 with its file output failed
            self._close_meter_log()
            raise failure(code, errors)
        if self._meter is None or self._meter_log is None:
            return None
        self._meter_log.seek(0)
        log = self._meter_log.read()
        self._close_meter_log()
        if meter_code != 0:
            raise failure(meter_code, log)
        return ebur128_summary(log)

    def abort(self) -> None:
        """Stop FFmpeg without finishing the file (the caller removes it)."""
        for proc in (self._proc, self._meter):
            if proc is not None:
                proc.kill()
                proc.wait()
        if self._proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
        self._stderr.close()
        self._close_meter_log()

    def _close_meter_log(self) -> None:
        if self._meter_log is not None:
            self._meter_log.close()


def _tee_escape(path: str) -> str:
    """A file name as the ``tee`` muxer's slave list reads it: every character but letters, digits
    and ``/._-`` backslash-escaped (FFmpeg's tokenizer takes ``\\x`` as ``x``), so brackets, bars,
    quotes and edge spaces in a name stay part of it."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "/._-") else "\\" + c for c in path)


def decode_command(path: Path, sample_rate: int, channels: int) -> list[str]:
    """FFmpeg decoding ``path`` to raw interleaved float32 on stdout."""
    output = ["-vn", "-f", "f32le", "-c:a", "pcm_f32le", "-ac", str(channels), "-ar", str(sample_rate), "pipe:1"]
    return [*FFMPEG, *input_args(path), *output]


def probe(path: Path, label: str | None = None) -> dict[str, Any]:
    """ffprobe's JSON for the file's first audio stream (``stream``) and its container (``format``)."""
    label = label or path.name
    require_ffmpeg()
    guard = ["-protocol_whitelist", PROTOCOLS, "-format_whitelist", AUDIO_DEMUXERS]
    proc = _run(
        [*FFPROBE, *guard, "-print_format", "json", "-show_format", "-show_streams", str(path)], PROBE_TIMEOUT_S
    )
    if proc.returncode != 0:
        raise CoverError(ErrorCode.INPUT_NOT_AUDIO, f"{label} is not an audio file FFmpeg can read")
    info = json.loads(proc.stdout or b"{}")
    streams = [s for s in info.get("streams", []) if s.get("codec_type") == "audio"]
    if not streams:
        raise CoverError(ErrorCode.INPUT_NO_AUDIO_STREAM, f"{label} has no audio stream")
    return {"stream": streams[0], "format": info.get("format", {})}


def ebur128_summary(stderr: bytes) -> tuple[float, float]:
    """Integrated loudness (LUFS) and true peak (dBTP) from the summary ``ebur128=peak=true`` prints."""
    text = stderr.decode(errors="replace")
    summary = text[text.rfind("Summary:") :]
    integrated = re.search(r"I:\s+(-?[\d.]+|-inf) LUFS", summary)
    peak = re.search(r"Peak:\s+(-?[\d.]+|-inf) dBFS", summary)
    if "Summary:" not in text or integrated is None or peak is None:
        raise CoverError(ErrorCode.INTERNAL, f"ffmpeg's ebur128 gave no measurement: {text[-400:]}")
    return float(integrated.group(1)), float(peak.group(1))


def measure_loudness(path: Path) -> tuple[float, float]:
    """Integrated loudness (LUFS) and true peak (dBTP) of a file, by FFmpeg's ``ebur128`` meter."""
    return ebur128_summary(run([*input_args(path), "-af", "ebur128=peak=true", "-f", "null", "-"], verbose=True))

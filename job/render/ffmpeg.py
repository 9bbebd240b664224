"""FFmpeg and ffprobe, the one way the project runs them: plain argument lists through subprocess.

Every command starts from :data:`FFMPEG` or :data:`FFPROBE` (no stdin, no banner, errors only), so
options that must hold for every invocation are added in one place.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from shared.errors import CoverError, ErrorCode

FFMPEG = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error"]
FFPROBE = ["ffprobe", "-v", "error"]


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
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise CoverError(ErrorCode.INTERNAL, f"ffmpeg failed: {proc.stderr.decode(errors='replace')[-600:]}")
    return proc.stderr


def decode_command(path: Path, sample_rate: int, channels: int) -> list[str]:
    """FFmpeg decoding ``path`` to raw interleaved float32 on stdout."""
    return [
        *FFMPEG,
        "-i",
        str(path),
        "-vn",
        "-f",
        "f32le",
        "-c:a",
        "pcm_f32le",
        "-ac",
        str(channels),
        "-ar",
        str(sample_rate),
        "pipe:1",
    ]


def probe(path: Path, label: str | None = None) -> dict[str, Any]:
    """ffprobe's JSON for the file's first audio stream (``stream``) and its container (``format``)."""
    label = label or path.name
    require_ffmpeg()
    proc = subprocess.run(
        [*FFPROBE, "-print_format", "json", "-show_format", "-show_streams", str(path)],
        capture_output=True,
        check=False,
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
    return ebur128_summary(run(["-i", str(path), "-af", "ebur128=peak=true", "-f", "null", "-"], verbose=True))

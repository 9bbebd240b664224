"""Stage 4, mix: converted vocals over the instrumental, loudness-normalised and encoded (FFmpeg).

The vocals are resampled to the instrumental's rate, made stereo, padded or trimmed to exactly its
length (no offset), and both stems get their gain. Loudness (EBU R128): the mix is measured, then
encoded with the gain that brings it to the target (default -14 LUFS integrated) through a
look-ahead limiter run at 4x the sample rate, so inter-sample peaks stay under the ceiling (default
-1 dBTP, the limiter sits 0.5 dB lower). The encoded file is measured with FFmpeg's ``ebur128``
meter; if it misses the target by more than 0.3 LU (heavy limiting) or a lossy codec overshot the
ceiling, it is encoded again with corrected gain (at most 6 passes). Where no limiting is needed
the result is the mix times one gain. The file is tagged as an AI-generated cover with the voice
model's name, and appears at its path only when complete.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import ffmpeg
from pydantic import BaseModel, Field

from job.audio import MIX_SAMPLE_RATE, require_ffmpeg
from job.fetch import probe
from shared.errors import CoverError, ErrorCode
from shared.options import OutputFormat


LOUDNESS_TOLERANCE_LU = 0.3  # another pass runs when the result misses the target by more
TRUE_PEAK_MARGIN_DB = 0.5  # the limiter's ceiling sits this far below the true-peak target
MAX_PASSES = 6  # dense, heavily limited material (a 5 s test mix) needed 5


# codec arguments per format; output sample rate per format
_ENCODERS: dict[OutputFormat, tuple[dict, int]] = {
    OutputFormat.MP3: ({"acodec": "libmp3lame", "q:a": 0}, MIX_SAMPLE_RATE),
    OutputFormat.OPUS: ({"acodec": "libopus", "b:a": "160k"}, 48000),
    OutputFormat.M4A: ({"acodec": "aac", "b:a": "256k"}, MIX_SAMPLE_RATE),
    OutputFormat.FLAC: ({"acodec": "flac"}, MIX_SAMPLE_RATE),
    OutputFormat.WAV: ({"acodec": "pcm_s24le"}, MIX_SAMPLE_RATE),
}


class MixOptions(BaseModel):
    vocals_gain_db: float = Field(0.0, ge=-30, le=30)
    instrumental_gain_db: float = Field(0.0, ge=-30, le=30)
    loudness_lufs: float = Field(-14.0, ge=-40, le=-5, description="Integrated loudness target.")
    true_peak_dbtp: float = Field(-1.0, ge=-9, le=0, description="True-peak ceiling.")
    format: OutputFormat = OutputFormat.MP3


class MixResult(BaseModel):
    path: Path
    format: OutputFormat
    duration_s: float
    sample_rate: int
    loudness_lufs: float
    true_peak_dbtp: float
    normalisation: str  # "linear" (gain only) or "limited" (the true-peak limiter engaged)


def _mixed(instrumental: Path, vocals: Path, n_samples: int, options: MixOptions):
    inst = (ffmpeg.input(str(instrumental)).audio
            .filter("aformat", sample_fmts="fltp", channel_layouts="stereo")
            .filter("atrim", end_sample=n_samples)
            .filter("volume", f"{options.instrumental_gain_db}dB"))
    voc = (ffmpeg.input(str(vocals)).audio
           .filter("aresample", MIX_SAMPLE_RATE)
           .filter("aformat", sample_fmts="fltp", channel_layouts="stereo")
           .filter("apad", whole_len=n_samples)
           .filter("atrim", end_sample=n_samples)
           .filter("asetpts", "N/SR/TB")
           .filter("volume", f"{options.vocals_gain_db}dB"))
    return ffmpeg.filter([inst, voc], "amix", inputs=2, duration="first", normalize=0)


def _run(stream) -> bytes:
    try:
        _, err = stream.run(capture_stdout=True, capture_stderr=True, quiet=True)
    except ffmpeg.Error as exc:
        raise CoverError(ErrorCode.INTERNAL, f"ffmpeg failed: {exc.stderr.decode(errors='replace')[-600:]}") from None
    return err


def mix(instrumental: Path, vocals: Path, out: Path, options: MixOptions | None = None,
        voice_name: str = "", title: str = "") -> MixResult:
    """Mix ``vocals`` over ``instrumental`` into ``out`` (written atomically)."""
    options = options or MixOptions()
    require_ffmpeg()
    info = probe(instrumental)["stream"]
    n_samples = int(info.get("duration_ts") or 0)
    if int(info.get("sample_rate", 0)) != MIX_SAMPLE_RATE or n_samples <= 0:
        raise CoverError(ErrorCode.INTERNAL, "the instrumental must be a 44.1 kHz WAV")
    measure = _mixed(instrumental, vocals, n_samples, options).filter("ebur128", peak="true")
    input_i, input_tp = _ebur128_summary(_run(measure.output("-", format="null")))
    if input_i == float("-inf"):
        raise CoverError(ErrorCode.INTERNAL, "the mix is silent; nothing to normalise")

    codec, rate = _ENCODERS[options.format]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    description = f"AI-generated cover; voice model: {voice_name}" if voice_name else "AI-generated cover"
    metadata = {"title": title or "AI cover", "artist": voice_name or "melodia-cover",
                "comment": description, "ai_generated": "true", "voice_model": voice_name,
                "encoded_by": "melodia-cover"}
    out_args: dict = {**codec, "ar": rate,
                      "format": {"m4a": "ipod", "opus": "ogg"}.get(options.format.value, options.format.value)}
    out_args.update({f"metadata:g:{i}": f"{k}={v}" for i, (k, v) in enumerate(metadata.items())})

    gain = options.loudness_lufs - input_i
    ceiling = options.true_peak_dbtp - TRUE_PEAK_MARGIN_DB
    limited = input_tp + gain > ceiling

    def encode(gain_db: float, ceiling_dbtp: float) -> tuple[float, float]:
        chain = _mixed(instrumental, vocals, n_samples, options).filter("volume", f"{gain_db:.3f}dB")
        if limited:  # a look-ahead limiter at 4x the rate, so that inter-sample peaks are caught too
            chain = (chain.filter("aresample", 4 * MIX_SAMPLE_RATE)
                     .filter("alimiter", limit=10 ** (ceiling_dbtp / 20), level="disabled",
                             latency="enabled", attack=1, release=50))
        chain = chain.filter("aresample", rate).filter("aformat", channel_layouts="stereo")
        _run(chain.output(str(tmp), **out_args).overwrite_output())
        return measure_loudness(tmp)

    previous: tuple[float, float] | None = None
    try:
        for _ in range(MAX_PASSES):
            loudness, peak = encode(gain, ceiling)
            miss = options.loudness_lufs - loudness
            over = peak - options.true_peak_dbtp
            if abs(miss) <= LOUDNESS_TOLERANCE_LU and over <= 0:
                break
            # limiting ate loudness, or a lossy codec overshot the ceiling: correct and encode again.
            # Under heavy limiting loudness grows slower than gain: step by the measured slope.
            slope = 1.0
            if previous is not None and gain != previous[0]:
                slope = min(1.0, max(0.05, (loudness - previous[1]) / (gain - previous[0])))
            previous = (gain, loudness)
            gain += min(12.0, miss / slope)
            ceiling -= max(0.0, over)
            limited = limited or over > 0
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    out_info = probe(out)
    duration = float(out_info["stream"].get("duration") or out_info["format"].get("duration") or 0.0)
    return MixResult(path=out, format=options.format, duration_s=duration, sample_rate=rate,
                     loudness_lufs=loudness, true_peak_dbtp=peak, normalisation="limited" if limited else "linear")


def measure_loudness(path: Path) -> tuple[float, float]:
    """Integrated loudness (LUFS) and true peak (dBTP) by FFmpeg's ``ebur128`` meter."""
    proc = subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-i", str(path), "-af",
                           "ebur128=peak=true", "-f", "null", "-"], capture_output=True, check=False)
    return _ebur128_summary(proc.stderr)


def _ebur128_summary(stderr: bytes) -> tuple[float, float]:
    text = stderr.decode(errors="replace")
    summary = text[text.rfind("Summary:"):]
    integrated = re.search(r"I:\s+(-?[\d.]+|-inf) LUFS", summary)
    peak = re.search(r"Peak:\s+(-?[\d.]+|-inf) dBFS", summary)
    if "Summary:" not in text or integrated is None or peak is None:
        raise CoverError(ErrorCode.INTERNAL, f"ffmpeg's ebur128 gave no measurement: {text[-400:]}")
    return float(integrated.group(1)), float(peak.group(1))

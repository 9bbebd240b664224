"""Stage 4, mix: converted vocals over the instrumental, loudness-normalised and encoded (FFmpeg).

The vocals are resampled to the instrumental's rate, made stereo, padded or trimmed to exactly its
length (no offset), both stems get their gain, and the sum is normalised with EBU R128 in two
passes: the first measures, the second applies ``loudnorm`` with the measured values in linear
mode (FFmpeg falls back to its dynamic mode only when a linear gain would break the true-peak
ceiling). The file is tagged as an AI-generated cover with the voice model's name.
"""

from __future__ import annotations

import json
import re
import subprocess
from enum import Enum
from pathlib import Path

import ffmpeg
from pydantic import BaseModel, Field

from job.audio import MIX_SAMPLE_RATE, require_ffmpeg
from job.fetch import probe
from shared.errors import CoverError, ErrorCode


class OutputFormat(str, Enum):
    MP3 = "mp3"
    OPUS = "opus"
    M4A = "m4a"
    FLAC = "flac"
    WAV = "wav"


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
    normalisation: str  # "linear" or "dynamic", as loudnorm chose


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


def _loudnorm_json(stderr: bytes) -> dict:
    text = stderr.decode(errors="replace")
    blocks = re.findall(r"\{[^{}]*\"input_i\"[^{}]*\}", text, flags=re.S)
    if not blocks:
        raise CoverError(ErrorCode.INTERNAL, f"ffmpeg loudnorm gave no measurement: {text[-400:]}")
    return json.loads(blocks[-1])


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
    target = {"i": options.loudness_lufs, "tp": options.true_peak_dbtp}

    measure = _mixed(instrumental, vocals, n_samples, options).filter(
        "loudnorm", i=target["i"], tp=target["tp"], lra=20, print_format="json")
    measured = _loudnorm_json(_run(measure.output("-", format="null")))
    if float(measured["input_i"]) == float("-inf"):
        raise CoverError(ErrorCode.INTERNAL, "the mix is silent; nothing to normalise")

    codec, rate = _ENCODERS[options.format]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    lra = max(1.0, min(50.0, float(measured["input_lra"]) + 1.0))
    applied = (_mixed(instrumental, vocals, n_samples, options)
               .filter("loudnorm", i=target["i"], tp=target["tp"], lra=lra,
                       measured_i=measured["input_i"], measured_tp=measured["input_tp"],
                       measured_lra=measured["input_lra"], measured_thresh=measured["input_thresh"],
                       offset=measured["target_offset"], linear="true", print_format="json")
               .filter("aresample", rate)
               .filter("aformat", channel_layouts="stereo"))
    description = f"AI-generated cover; voice model: {voice_name}" if voice_name else "AI-generated cover"
    metadata = {"title": title or "AI cover", "artist": voice_name or "melodia-cover",
                "comment": description, "ai_generated": "true", "voice_model": voice_name,
                "encoded_by": "melodia-cover"}
    out_args = dict(codec)
    out_args["ar"] = rate
    out_args["format"] = {"m4a": "ipod", "opus": "ogg"}.get(options.format.value, options.format.value)
    out_args.update({f"metadata:g:{i}": f"{k}={v}" for i, (k, v) in enumerate(metadata.items())})
    try:
        stats = _loudnorm_json(_run(applied.output(str(tmp), **out_args,
                                                    map_metadata=-1).overwrite_output()))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    out_info = probe(out)
    duration = float(out_info["stream"].get("duration") or out_info["format"].get("duration") or 0.0)
    return MixResult(path=out, format=options.format, duration_s=duration, sample_rate=rate,
                     loudness_lufs=float(stats["output_i"]), true_peak_dbtp=float(stats["output_tp"]),
                     normalisation=str(stats.get("normalization_type", "linear")))


def measure_loudness(path: Path) -> tuple[float, float]:
    """Integrated loudness (LUFS) and true peak (dBTP) by FFmpeg's ``ebur128`` meter."""
    proc = subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-i", str(path), "-af",
                           "ebur128=peak=true", "-f", "null", "-"], capture_output=True, check=False)
    text = proc.stderr.decode(errors="replace")
    summary = text[text.rfind("Summary:"):]
    integrated = float(re.search(r"I:\s+(-?[\d.]+|-inf) LUFS", summary).group(1))
    peak = float(re.search(r"Peak:\s+(-?[\d.]+|-inf) dBFS", summary).group(1))
    return integrated, peak

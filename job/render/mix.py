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

from pathlib import Path

from pydantic import BaseModel

from job.render import ffmpeg
from job.render.audio import MIX_SAMPLE_RATE
from shared.errors import CoverError, ErrorCode
from shared.options import FORMATS, MixOptions, OutputFormat

LOUDNESS_TOLERANCE_LU = 0.3  # another pass runs when the result misses the target by more
TRUE_PEAK_MARGIN_DB = 0.5  # the limiter's ceiling sits this far below the true-peak target
MAX_PASSES = 6  # dense, heavily limited material (a 5 s test mix) needed 5


class MixResult(BaseModel):
    path: Path
    format: OutputFormat
    duration_s: float
    sample_rate: int
    loudness_lufs: float
    true_peak_dbtp: float
    normalisation: str  # "linear" (gain only) or "limited" (the true-peak limiter engaged)


def _mixed(n_samples: int, options: MixOptions) -> str:
    """The filter graph mixing input 0 (instrumental) and input 1 (vocals) into ``[mix]``."""
    stereo = "aformat=sample_fmts=fltp:channel_layouts=stereo"
    return (
        f"[0:a]{stereo},atrim=end_sample={n_samples},volume={options.instrumental_gain_db}dB[inst];"
        f"[1:a]aresample={MIX_SAMPLE_RATE},{stereo},apad=whole_len={n_samples},atrim=end_sample={n_samples},"
        f"asetpts=N/SR/TB,volume={options.vocals_gain_db}dB[voc];"
        "[inst][voc]amix=inputs=2:duration=first:normalize=0[mix]"
    )


def mix(
    instrumental: Path,
    vocals: Path,
    out: Path,
    options: MixOptions | None = None,
    voice_name: str = "",
    title: str = "",
) -> MixResult:
    """Mix ``vocals`` over ``instrumental`` into ``out`` (written atomically)."""
    options = options or MixOptions()
    info = ffmpeg.probe(instrumental)["stream"]
    n_samples = int(info.get("duration_ts") or 0)
    if int(info.get("sample_rate", 0)) != MIX_SAMPLE_RATE or n_samples <= 0:
        raise CoverError(ErrorCode.INTERNAL, "the instrumental must be a 44.1 kHz WAV")
    inputs = [*ffmpeg.input_args(instrumental), *ffmpeg.input_args(vocals)]
    graph = _mixed(n_samples, options)
    input_i, input_tp = ffmpeg.ebur128_summary(
        ffmpeg.run(
            [*inputs, "-filter_complex", f"{graph};[mix]ebur128=peak=true[out]", "-map", "[out]", "-f", "null", "-"],
            verbose=True,
        )
    )
    if input_i == float("-inf"):
        raise CoverError(ErrorCode.INTERNAL, "the mix is silent; nothing to normalise")

    spec = FORMATS[options.format]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    description = f"AI-generated cover; voice model: {voice_name}" if voice_name else "AI-generated cover"
    metadata = {
        "title": title or "AI cover",
        "artist": voice_name or "melodia-cover",
        "comment": description,
        "ai_generated": "true",
        "voice_model": voice_name,
        "encoded_by": "melodia-cover",
    }
    out_args = [arg for k, v in spec.codec.items() for arg in (f"-{k}", v)]
    out_args += ["-ar", str(spec.sample_rate), "-f", spec.muxer]
    out_args += [arg for k, v in metadata.items() for arg in ("-metadata", f"{k}={v}")]

    gain = options.loudness_lufs - input_i
    ceiling = options.true_peak_dbtp - TRUE_PEAK_MARGIN_DB
    limited = input_tp + gain > ceiling

    def encode(gain_db: float, ceiling_dbtp: float) -> tuple[float, float]:
        chain = f"{graph};[mix]volume={gain_db:.3f}dB"
        if limited:  # a look-ahead limiter at 4x the rate, so that inter-sample peaks are caught too
            chain += (
                f",aresample={4 * MIX_SAMPLE_RATE},alimiter=limit={10 ** (ceiling_dbtp / 20)}"
                ":level=disabled:latency=enabled:attack=1:release=50"
            )
        chain += f",aresample={spec.sample_rate},aformat=channel_layouts=stereo[out]"
        ffmpeg.run([*inputs, "-filter_complex", chain, "-map", "[out]", *out_args, "-y", str(tmp)])
        return ffmpeg.measure_loudness(tmp)

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
    out_info = ffmpeg.probe(out)
    duration = float(out_info["stream"].get("duration") or out_info["format"].get("duration") or 0.0)
    return MixResult(
        path=out,
        format=options.format,
        duration_s=duration,
        sample_rate=spec.sample_rate,
        loudness_lufs=loudness,
        true_peak_dbtp=peak,
        normalisation="limited" if limited else "linear",
    )

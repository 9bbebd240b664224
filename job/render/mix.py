"""Stage 4, mix: converted vocals over the instrumental, loudness-normalised, encoded once.

The vocals are resampled to the instrumental's rate, made stereo, padded or trimmed to exactly its
length (no offset), and both stems get their gain; the sum is the mix. Loudness (EBU R128) and the
true peak are measured in numpy (:mod:`job.render.loudness`); the mix gets the gain that brings it
to the target (default -14 LUFS integrated), and where that would push a true peak over the
ceiling (default -1 dBTP), the look-ahead limiter (:mod:`job.render.limiter`) holds the peaks 0.5
dB under it. Measured after limiting and before encoding: if heavy limiting ate loudness, the
gain is corrected and the limiter run again (cheap, in memory), so the file is normally encoded
once. A lossy or resampled format is measured again after encoding (FFmpeg's ``ebur128``) and
encoded again with a lower ceiling only if the codec overshot it. Where no limiting is needed the
result is the mix times one gain. The file is tagged as an AI-generated cover with the voice
model's name, and appears at its path only when complete.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel
from scipy.signal import resample_poly

from job.render import ffmpeg
from job.render.audio import MIX_SAMPLE_RATE, decode, read_wav, write_wav
from job.render.limiter import limiter_gain
from job.render.loudness import integrated_lufs, peak_envelope
from job.render.quality import mix_scores, waveform_peaks
from shared.errors import CoverError, ErrorCode
from shared.options import FORMATS, MixOptions, OutputFormat
from shared.quality import MixScores

LOUDNESS_TOLERANCE_LU = 0.3  # the gain is corrected when the limited mix misses the target by more
TRUE_PEAK_MARGIN_DB = 0.5  # the limiter's ceiling sits this far below the true-peak target
MAX_PASSES = 6  # dense, heavily limited material (a 5 s test mix) needed 5
LOSSLESS = {OutputFormat.WAV, OutputFormat.FLAC}


class MixResult(BaseModel):
    path: Path
    format: OutputFormat
    duration_s: float
    sample_rate: int
    loudness_lufs: float
    true_peak_dbtp: float
    normalisation: str  # "linear" (gain only) or "limited" (the true-peak limiter engaged)
    scores: MixScores | None = None  # clipping and silence of what was encoded, with loudness and peak
    peaks: list[float] = []  # the encoded mix's waveform, for the report page


def _mono_or_stereo(audio: np.ndarray) -> np.ndarray:
    if audio.shape[0] not in (1, 2):
        raise CoverError(ErrorCode.INTERNAL, f"a stem has {audio.shape[0]} channels; 1 or 2 expected")
    return audio


def _stereo(audio: np.ndarray) -> np.ndarray:
    return np.repeat(audio, 2, axis=0) if _mono_or_stereo(audio).shape[0] == 1 else audio


def _read(path: Path, rate: int | None = None) -> tuple[np.ndarray, int]:
    """``[channels, samples]`` of a stem: WAVs as they are (memory-mapped when float), anything
    else decoded by FFmpeg at ``rate``."""
    try:
        return read_wav(path, mmap=True)
    except ValueError:  # not a WAV scipy reads
        audio, _ = decode(path, rate or MIX_SAMPLE_RATE, 2)
        return audio, rate or MIX_SAMPLE_RATE


def mixed(instrumental: Path, vocals: Path, options: MixOptions) -> np.ndarray:
    """``[2, samples]`` float32 at :data:`MIX_SAMPLE_RATE`: the stems with their gains, summed,
    exactly as long as the instrumental."""
    inst, rate = _read(instrumental)
    if rate != MIX_SAMPLE_RATE or inst.shape[-1] == 0:
        raise CoverError(ErrorCode.INTERNAL, "the instrumental must be 44.1 kHz audio")
    voc, voc_rate = _read(vocals, MIX_SAMPLE_RATE)
    if voc_rate != MIX_SAMPLE_RATE:
        g = math.gcd(MIX_SAMPLE_RATE, voc_rate)
        voc = resample_poly(voc, MIX_SAMPLE_RATE // g, voc_rate // g, axis=-1).astype(np.float32)
    n = inst.shape[-1]
    voc = _mono_or_stereo(voc)
    out = _stereo(inst) * np.float32(10 ** (options.instrumental_gain_db / 20))
    gain = np.float32(10 ** (options.vocals_gain_db / 20))
    m = min(n, voc.shape[-1])
    for start in range(0, m, 1 << 20):  # mono vocals go to both channels by broadcasting, no copy
        end = min(m, start + (1 << 20))
        out[:, start:end] += voc[:, start:end] * gain
    return out


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
    audio = mixed(instrumental, vocals, options)
    input_i = integrated_lufs(audio, MIX_SAMPLE_RATE)
    if input_i == float("-inf"):
        raise CoverError(ErrorCode.INTERNAL, "the mix is silent; nothing to normalise")
    envelope = peak_envelope(audio)  # scales with any gain: measured once

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
    limited = float(envelope.max()) * 10 ** (gain / 20) > 10 ** (ceiling / 20)
    wav = out.with_name(f".{out.name}.mix.wav")

    held = [1.0]  # the gain ``audio`` carries: a linear result is the mix scaled in place (no copy)

    def normalised(gain_db: float, ceiling_dbtp: float) -> tuple[np.ndarray, float, float]:
        """The mix at ``gain_db`` (limited under ``ceiling_dbtp`` if it must be), its loudness and
        true peak."""
        scale = 10 ** (gain_db / 20)
        if not limited:
            peak = float(envelope.max()) * scale
            np.multiply(audio, np.float32(scale / held[0]), out=audio)
            held[0] = scale
            return audio, input_i + gain_db, _db(peak)  # loudness scales with the gain
        gains = limiter_gain(envelope * np.float32(scale), 10 ** (ceiling_dbtp / 20), MIX_SAMPLE_RATE)
        gains *= np.float32(scale)
        peak = _db(float((envelope * gains).max()))
        gains *= np.float32(1 / held[0])
        result = audio * gains
        return result, integrated_lufs(result, MIX_SAMPLE_RATE), peak

    encoded: list[np.ndarray] = []

    def encode(result: np.ndarray) -> None:
        encoded[:] = [result]
        write_wav(wav, result, MIX_SAMPLE_RATE)
        ffmpeg.run([*ffmpeg.input_args(wav), *out_args, "-y", str(tmp)])

    previous: tuple[float, float] | None = None
    try:
        for _ in range(MAX_PASSES):
            result, loudness, peak = normalised(gain, ceiling)
            miss = options.loudness_lufs - loudness
            if abs(miss) > LOUDNESS_TOLERANCE_LU:  # limiting ate loudness: correct in memory, no encode
                # under heavy limiting loudness grows slower than gain: step by the measured slope
                slope = 1.0
                if previous is not None and gain != previous[0]:
                    slope = min(1.0, max(0.05, (loudness - previous[1]) / (gain - previous[0])))
                previous = (gain, loudness)
                gain += min(12.0, miss / slope)
                limited = limited or float(envelope.max()) * 10 ** (gain / 20) > 10 ** (ceiling / 20)
                continue
            encode(result)
            if options.format not in LOSSLESS or spec.sample_rate != MIX_SAMPLE_RATE:
                loudness, peak = ffmpeg.measure_loudness(tmp)  # what the codec made of it
            over = peak - options.true_peak_dbtp
            if over <= 0:
                break
            ceiling -= over  # the codec overshot the ceiling: limit lower and encode again
            limited = True
        else:
            encode(result)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
        wav.unlink(missing_ok=True)
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
        scores=mix_scores(encoded[0], MIX_SAMPLE_RATE, loudness, peak),
        peaks=waveform_peaks(encoded[0]),
    )


def _db(linear: float) -> float:
    return 20 * math.log10(linear) if linear > 0 else float("-inf")

"""Stage 4, mix: converted vocals over the instrumental, loudness-normalised, encoded once, as a
stream: memory is a few blocks' whatever the song's length.

The vocals are resampled to the instrumental's rate, made stereo, padded or trimmed to exactly its
length (no offset), and both stems get their gain; the sum is the mix. The stems are read a block
at a time (:class:`MixSource`), never whole and never memory-mapped, and the mix is made again for
each pass over it rather than kept. A first pass measures it: loudness (EBU R128) and true peak in
numpy (:mod:`job.render.mix.loudness`). The mix gets the gain that brings it to the target (default
-14 LUFS integrated), and where that would push a true peak over the ceiling (default -1 dBTP), the
look-ahead limiter (:mod:`job.render.mix.limiter`) holds the peaks 0.5 dB under it (1 dB for a lossy
format, whose codec adds peaks of its own, unless that extra 0.5 dB would hold the loudness under the
target); limiting eats
loudness, so probe passes measure the limited mix at several gains, encoding nothing, until two
bracket the target (:func:`_limited_gain`), and the gain is interpolated between them (where
loudness stops growing with gain short of the target, the mix aims at that plateau instead). The next
pass feeds FFmpeg's encoder through a pipe while it measures what it feeds (an MP3 on a host with
cores to spare: several encoders, a stretch of the song each, :func:`_encoder`; the measure and
probe passes too take stretches side by side there: :mod:`job.render.mix.side_by_side`), and is
normally the only encode; one that still misses the target is dropped and the gain corrected by the
measured slope. A lossy or resampled format is measured as encoded (FFmpeg's ``ebur128`` on a copy of the
encoded packets, decoded while the encoding goes on: :class:`job.render.media.ffmpeg.PipeEncoder`) and
encoded again with a lower ceiling if the codec overshot it, or with the gain moved by what the
codec moved the loudness if the encoded file misses the target by more than the tolerance (the
target is the file's, not the mix's). The file is tagged as an
AI-generated cover with the voice model's name, and appears at its path only when complete.

Given a watermark id, every pass's mix carries the inaudible watermark
(:mod:`job.render.mix.watermark`), added to each block before the gain and the limiter.
"""

from __future__ import annotations

import itertools
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import BaseModel
from scipy.signal import resample_poly

from job.render.cores import side_by_side as side_by_side_workers
from job.render.media import ffmpeg
from job.render.media.audio import MIX_SAMPLE_RATE, WavReader, decode_to_wav
from job.render.media.stretch_encoder import StretchEncoder, workers_for
from job.render.mix import side_by_side
from job.render.mix.limiter import Limiter
from job.render.mix.loudness import LoudnessMeter, envelope_windows
from job.render.mix.meter import MixMeter
from job.render.mix.side_by_side import ahead
from job.render.mix.watermark import Marker
from shared.errors import CoverError, ErrorCode
from shared.options import FORMATS, FormatSpec, MixOptions, OutputFormat
from shared.quality import MixScores

LOUDNESS_TOLERANCE_LU = 0.3  # the gain is corrected when the limited mix misses the target by more
TRUE_PEAK_MARGIN_DB = 0.5  # the limiter's ceiling sits this far below the true-peak target (lossless formats)
# a lossy codec adds peaks of its own: MP3 V0 and AAC 256 kb/s raised a limited, dense mix's true peak by 0.5
# to 0.9 dB (measured), so a ceiling 0.5 dB under the target meant a second encode for such mixes
LOSSY_TRUE_PEAK_MARGIN_DB = 1.0
MAX_PASSES = 6  # encodes at most (a codec overshooting the ceiling, or a gain estimate missing)
BLOCK = 1 << 18  # frames of the mix per block (about 6 s): memory is a few of these


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
    levels: list[float] = []  # the encoded mix's RMS level per column (-60 to 0 dBFS as 0 to 1), for the page


def _open(path: Path, scratch: Path) -> WavReader:
    """A stem's reader: our float WAVs as they are; anything else decoded first by FFmpeg into a
    float WAV at the mix rate in ``scratch`` (block by block)."""
    try:
        return WavReader(path)
    except ValueError:  # not a float WAV
        scratch.mkdir(parents=True, exist_ok=True)
        decoded = scratch / f"{path.stem}.wav"
        decode_to_wav(path, decoded, MIX_SAMPLE_RATE, 2)
        return WavReader(decoded)


class MixSource:
    """The mix (the stems with their gains, summed, exactly as long as the instrumental) as
    ``[2, samples]`` float32 blocks at :data:`MIX_SAMPLE_RATE`, made afresh on every pass.

    Vocals at another rate are resampled a block at a time with the same polyphase filter as
    ``resample_poly`` on the whole stem: each block starts on a sample where the two rates' grids
    meet and takes ``context`` input samples beyond its ends (beyond the filter's reach), so every
    block's samples are those of the whole-stem resampling.

    Args:
        instrumental: the instrumental stem (its length is the mix's)
        vocals: the converted vocals, at any rate
        options: the stems' gains
        scratch: where a stem that is not a float WAV is decoded to one
        marker: the watermark added to every block (None: none)
    """

    def __init__(
        self, instrumental: Path, vocals: Path, options: MixOptions, scratch: Path, marker: Marker | None = None
    ) -> None:
        self.marker = marker
        self.inst = _open(instrumental, scratch / "instrumental")
        self.vocals = self.inst  # replaced below; closed together in close()
        try:
            if self.inst.sample_rate != MIX_SAMPLE_RATE or self.inst.frames == 0:
                raise CoverError(ErrorCode.INTERNAL, "the instrumental must be 44.1 kHz audio")
            self.vocals = _open(vocals, scratch / "vocals")
            for stem in (self.inst, self.vocals):
                if stem.channels not in (1, 2):
                    raise CoverError(ErrorCode.INTERNAL, f"a stem has {stem.channels} channels; 1 or 2 expected")
        except BaseException:
            self.close()
            raise
        g = math.gcd(MIX_SAMPLE_RATE, self.vocals.sample_rate)
        self.up, self.down = MIX_SAMPLE_RATE // g, self.vocals.sample_rate // g
        self.vocal_frames = -(-self.vocals.frames * self.up // self.down)  # resample_poly's length
        reach = 10 * max(self.up, self.down) / self.up + 2  # resample_poly's half filter, input samples
        self.context = 0 if self.up == self.down else self.down * math.ceil(reach / self.down)
        self.length = self.inst.frames
        self.block = self.up * math.ceil(BLOCK / self.up)  # blocks start where the grids meet
        self.inst_gain = np.float32(10 ** (options.instrumental_gain_db / 20))
        self.vocals_gain = np.float32(10 ** (options.vocals_gain_db / 20))

    def blocks(self) -> Iterator[np.ndarray]:
        for start in range(0, self.length, self.block):
            yield self.read(start, min(self.length, start + self.block))

    def read(self, start: int, end: int) -> np.ndarray:
        """The mix's samples ``start:end``, watermarked where a marker is given; ``start`` on a
        block boundary."""
        if self.marker is None:
            return self._sum(start, end)
        lo = max(0, (start - self.marker.context) // self.up * self.up)  # where the rates' grids meet
        wide = self._sum(lo, min(self.length, end + self.marker.context))
        out = np.ascontiguousarray(wide[:, start - lo : end - lo])
        out += self.marker.mark(wide.mean(axis=0), lo, start, end)  # one mark on both channels
        return out

    def _sum(self, start: int, end: int) -> np.ndarray:
        inst = self.inst.read(start, end) * self.inst_gain
        out = np.repeat(inst, 2, axis=0) if inst.shape[0] == 1 else inst
        vocals = self._vocals(start, min(end, self.vocal_frames))
        out[:, : vocals.shape[-1]] += vocals * self.vocals_gain  # mono reaches both channels
        return out

    def _vocals(self, start: int, end: int) -> np.ndarray:
        if end <= start:
            return np.zeros((1, 0), np.float32)
        if self.up == self.down:
            return self.vocals.read(start, end)
        first = start * self.down // self.up  # exact: start is a multiple of up
        lo = max(0, first - self.context)
        hi = min(self.vocals.frames, -(-end * self.down // self.up) + self.context)
        out = resample_poly(self.vocals.read(lo, hi), self.up, self.down, axis=-1)
        skip = start - lo * self.up // self.down
        return out[:, skip : skip + end - start].astype(np.float32)

    def close(self) -> None:
        self.inst.close()
        self.vocals.close()


class _Pass(BaseModel, arbitrary_types_allowed=True):
    loudness_lufs: float
    true_peak_dbtp: float
    meter: MixMeter


def _measure(source: MixSource, workers: int = 1) -> tuple[float, float]:
    """The mix's integrated loudness (LUFS) and true peak (linear); with several ``workers``, over
    stretches side by side (:mod:`job.render.mix.side_by_side`)."""
    return side_by_side.measure(source, side_by_side.stretches(source, workers))


def _render(
    source: MixSource,
    gain_db: float,
    limiter: Limiter | None,
    encoder: ffmpeg.Encoder,
    measured: tuple[float, float],
) -> _Pass:
    """One pass: the mix at ``gain_db`` (through ``limiter`` where given) into ``encoder``, with its
    loudness, true peak and scores. ``measured``: the mix's own loudness and true peak."""
    scale = np.float32(10 ** (gain_db / 20))
    meter = MixMeter(source.length, MIX_SAMPLE_RATE)
    if limiter is None:  # one gain: loudness and peak scale with it
        for block in ahead(source.blocks()):
            np.multiply(block, scale, out=block)
            encoder.write(block)
            meter.add(block)
        return _Pass(loudness_lufs=measured[0] + gain_db, true_peak_dbtp=_db(measured[1]) + gain_db, meter=meter)
    loudness, peak = LoudnessMeter(MIX_SAMPLE_RATE), 0.0
    for block, envelope, lead in ahead(envelope_windows(source.blocks(), limiter.context)):
        gains = limiter.gains(envelope * scale, lead, block.shape[-1]) * scale
        peak = max(peak, float((envelope[lead : lead + block.shape[-1]] * gains).max(initial=0.0)))
        np.multiply(block, gains, out=block)
        encoder.write(block)
        meter.add(block)
        loudness.add(block)
    return _Pass(loudness_lufs=loudness.integrated(), true_peak_dbtp=_db(peak), meter=meter)


PROBE_STEPS_DB = (0.0, 2.0, 5.0)  # a limited mix is measured at these gains above the linear one
REPROBE_STEPS_DB = (0.0, 3.0)  # then, while they fall short of the target, at these above the estimate
MAX_PROBES = 4  # probe passes at most before encoding (each far cheaper than an encode)
PLATEAU_LU_PER_DB = 0.05  # limited loudness growing slower than this: the target is out of reach
PLATEAU_LU = 0.05  # under a plateau, the least gain whose loudness is this close to the loudest


def _probe(source: MixSource, gains: list[float], ceiling_dbtp: float, workers: int = 1) -> list[float]:
    """The loudness of the limited mix at each of ``gains`` in one pass (one envelope per block,
    one limiter per gain), nothing encoded; with several ``workers``, over stretches side by side."""
    return side_by_side.probe(source, side_by_side.stretches(source, workers), gains, 10 ** (ceiling_dbtp / 20))


def _limited_gain(
    source: MixSource, linear_gain: float, ceiling_dbtp: float, target: float, workers: int = 1
) -> tuple[float, list[tuple[float, float]], float]:
    """The gain that brings the limited mix to ``target`` LUFS, the (gain, loudness) points
    measured for it, and the loudness aimed at (``target``, or the most the ceiling allows where
    that is less), nothing encoded: a probe at :data:`PROBE_STEPS_DB` over the linear gain, then,
    while every point falls short of the target (heavy limiting: loudness may grow by a third of a
    dB per dB of gain), a probe at :data:`REPROBE_STEPS_DB` over the gain extrapolated from the
    last points, until the target lies between two measured points (:data:`MAX_PROBES` passes at
    most). Interpolating between bracketing points lands within the tolerance; extrapolating past
    them cost an encode per miss (four encodes for the test material of ``test_loudness``).

    Where the loudest points grow by less than :data:`PLATEAU_LU_PER_DB` the target is out of
    reach under the ceiling (a mix whose loudness sits in its peaks, or below what K-weighting
    hears: more gain only limits harder): the probing stops there and the mix gets the least
    measured gain within :data:`PLATEAU_LU` of the loudest, and aims at that point's loudness."""
    points: list[tuple[float, float]] = []
    candidates = [linear_gain + step for step in PROBE_STEPS_DB]
    for _ in range(MAX_PROBES):
        points += zip(candidates, _probe(source, candidates, ceiling_dbtp, workers), strict=True)
        gain = _gain_for(points, target)
        if max(loudness for _, loudness in points) >= target:
            break
        (g1, l1), (g2, l2) = sorted(points)[-2:]
        if l2 - l1 < PLATEAU_LU_PER_DB * (g2 - g1):  # out of reach: take the plateau's foot
            loudest = max(loudness for _, loudness in points)
            gain, aim = min((g, lufs) for g, lufs in points if lufs >= loudest - PLATEAU_LU)
            return gain, points, aim
        candidates = [gain + step for step in REPROBE_STEPS_DB]
    return gain, points, target


def _gain_for(points: list[tuple[float, float]], target: float) -> float:
    """The gain that brings the limited mix to ``target`` LUFS, from its measured (gain, loudness)
    points: interpolated between the two that bracket it, else stepped from the nearest by the
    measured slope (under heavy limiting loudness grows slower than gain; 1 with one point)."""
    points = sorted(points)
    for (g1, l1), (g2, l2) in itertools.pairwise(points):
        if l1 <= target <= l2 and l2 > l1:
            return g1 + (target - l1) * (g2 - g1) / (l2 - l1)
    near = points[0] if target < points[0][1] else points[-1]
    pair = points[:2] if near is points[0] else points[-2:]
    slope = 1.0
    if len(pair) == 2 and pair[1][0] != pair[0][0]:
        slope = min(1.0, max(0.05, (pair[1][1] - pair[0][1]) / (pair[1][0] - pair[0][0])))
    return near[0] + max(-12.0, min(12.0, (target - near[1]) / slope))


def mix(  # noqa: PLR0915 - reads best top to bottom
    instrumental: Path,
    vocals: Path,
    out: Path,
    options: MixOptions | None = None,
    voice_name: str = "",
    title: str = "",
    watermark: int | None = None,
    workers: int = 0,
) -> MixResult:
    """Mix ``vocals`` over ``instrumental`` into ``out`` (written atomically).

    Args:
        instrumental: the instrumental stem (``no_vocals``)
        vocals: the converted vocals
        out: the cover's file; its format is ``options.format``
        options: gains, loudness target, true-peak ceiling, format (defaults when None)
        voice_name: written into the file's tags (``AI-generated cover; voice model: NAME``)
        title: the file's title tag
        watermark: the 48-bit id the inaudible watermark carries (None: no watermark)
        workers: stretches of the song side by side: the measuring passes' threads and the MP3
            encoders (:func:`_encoder`); 0: one per core the process may use but one, at most 8 (one
            on 2 cores, where a pass already reads ahead in a second thread)
    """
    options = options or MixOptions()
    spec = FORMATS[options.format]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    scratch = out.with_name(f".{out.name}.stems")  # only for stems that are not float WAVs
    description = f"AI-generated cover; voice model: {voice_name}" if voice_name else "AI-generated cover"
    metadata = {
        "title": title or "AI cover",
        "artist": voice_name or "melodia-cover",
        "comment": description,
        "ai_generated": "true",
        "voice_model": voice_name,
        "encoded_by": "melodia-cover",
    }
    codec_args = [arg for k, v in spec.codec.items() for arg in (f"-{k}", v)] + ["-ar", str(spec.sample_rate)]
    tag_args = [arg for k, v in metadata.items() for arg in ("-metadata", f"{k}={v}")]
    try:
        marker = Marker(watermark) if watermark is not None else None
        source = MixSource(instrumental, vocals, options, scratch, marker)
        try:
            passes = side_by_side_workers(workers, spare=1)  # threads of the passes that encode nothing
            measured = _measure(source, passes)
            if measured[0] == float("-inf"):
                raise CoverError(ErrorCode.INTERNAL, "the mix is silent; nothing to normalise")
            linear = gain = options.loudness_lufs - measured[0]
            margin = LOSSY_TRUE_PEAK_MARGIN_DB if spec.measure else TRUE_PEAK_MARGIN_DB
            ceiling = options.true_peak_dbtp - margin
            limited = _db(measured[1]) + gain > ceiling
            points: list[tuple[float, float]] = []  # the limited mix's measured (gain, loudness)
            aim = options.loudness_lufs  # less where the ceiling leaves the target out of reach
            if limited:  # limiting eats loudness: find the gain before encoding anything
                gain, points, aim = _limited_gain(source, linear, ceiling, options.loudness_lufs, passes)
                if aim < options.loudness_lufs and margin > TRUE_PEAK_MARGIN_DB:
                    # the ceiling holds the loudness under the target, so each dB of it is loudness: the
                    # codec's room goes back to the lossless margin (its overshoot may cost an encode)
                    ceiling = options.true_peak_dbtp - TRUE_PEAK_MARGIN_DB
                    gain, points, aim = _limited_gain(source, linear, ceiling, options.loudness_lufs, passes)
            codec_shift = 0.0  # what the codec moved the loudness by (pre-encode minus encoded), measured
            for attempt in range(MAX_PASSES):
                last = attempt == MAX_PASSES - 1
                encoder = _encoder(spec, codec_args, tag_args, tmp, source.length, workers)
                try:
                    limiter = Limiter(10 ** (ceiling / 20), MIX_SAMPLE_RATE) if limited else None
                    result = _render(source, gain, limiter, encoder, measured)
                except BaseException:
                    encoder.abort()
                    raise
                miss = aim + codec_shift - result.loudness_lufs
                if abs(miss) > LOUDNESS_TOLERANCE_LU and not last:  # the estimate missed: drop this encode
                    encoder.abort()
                    points.append((gain, result.loudness_lufs))
                    gain = _gain_for(points, aim + codec_shift)
                    continue
                encoded = encoder.close()  # with spec.measure: what the codec made of it
                loudness, peak = encoded or (result.loudness_lufs, result.true_peak_dbtp)
                over = peak - options.true_peak_dbtp
                if over <= 0 and abs(aim - loudness) > LOUDNESS_TOLERANCE_LU and not last:
                    # the codec moved the loudness (noisy material, a lossy codec: 0.3 to 0.7 LU seen):
                    # the target is the encoded file's, so aim the next pass's mix past it by that much
                    codec_shift = result.loudness_lufs - loudness
                    points.append((gain, result.loudness_lufs))
                    gain = _gain_for(points, aim + codec_shift) if limited else gain + aim - loudness
                    continue
                if over <= 0 or last:
                    break
                ceiling -= over  # the codec overshot the ceiling: limit lower and encode again
                if aim < options.loudness_lufs:  # a plateau under the target: it sinks with the ceiling
                    aim -= over
                limited, points = True, []
        finally:
            source.close()
        duration = _complete(tmp, source.length / MIX_SAMPLE_RATE)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return MixResult(
        path=out,
        format=options.format,
        duration_s=duration,
        sample_rate=spec.sample_rate,
        loudness_lufs=loudness,
        true_peak_dbtp=peak,
        normalisation="limited" if limited else "linear",
        scores=result.meter.scores(loudness, peak),
        peaks=result.meter.peaks(),
        levels=result.meter.levels(),
    )


def _encoder(
    spec: FormatSpec, codec_args: list[str], tag_args: list[str], out: Path, length: int, workers: int
) -> ffmpeg.Encoder:
    """An MP3 of a song long enough for several stretches, on a process with cores to spare: encoded
    in stretches side by side (:mod:`job.render.media.stretch_encoder`); every other format, and MP3 on
    up to 2 cores, through one encoder.

    Args:
        spec: the output format
        codec_args: the encoder's arguments
        tag_args: the file's tags
        out: the encoded file
        length: the mix's samples per channel
        workers: encoders side by side at most (0: one per core the process may use but one)
    """
    workers = workers_for(length, MIX_SAMPLE_RATE, workers)
    if spec.muxer == "mp3" and spec.sample_rate == MIX_SAMPLE_RATE and workers > 1:
        return StretchEncoder(MIX_SAMPLE_RATE, length, codec_args, tag_args, out, workers)
    return ffmpeg.PipeEncoder(MIX_SAMPLE_RATE, 2, codec_args + tag_args, spec.muxer, out, spec.measure)


COMPLETE_TOLERANCE_S = 0.1  # a codec's last frame and its padding, at most
LOW_SPACE_BYTES = 16 * 2**20  # free space under which a short file is the disk's doing


def _complete(path: Path, expected_s: float) -> float:
    """The encoded file's duration, checked against the mix's: an encoder can end with status 0
    having written part of the file (FFmpeg's ``tee`` muxer, when its file output hits a full disk),
    and a cover cut short must never be stored. Short on a nearly full disk: ``work.no_space``."""
    info = ffmpeg.probe(path, "the encoded cover")
    duration = float(info["stream"].get("duration") or info["format"].get("duration") or 0.0)
    if duration < expected_s - COMPLETE_TOLERANCE_S:
        said = f"the encoder wrote {duration:.2f} s of the {expected_s:.2f} s mix"
        if shutil.disk_usage(path.parent).free < LOW_SPACE_BYTES:
            raise CoverError(ErrorCode.WORK_NO_SPACE, f"the work folder is out of space: {said}")
        raise CoverError(ErrorCode.INTERNAL, f"{said}; the file is incomplete")
    return duration


def _db(linear: float) -> float:
    return 20 * math.log10(linear) if linear > 0 else float("-inf")

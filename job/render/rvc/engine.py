"""The conversion engine: content + pitch + retrieval + synthesis over audio of any length.

Long audio is cut into bounded chunks at its quietest points (memory stays flat), each chunk is
converted with half a second of real context on both sides, and neighbouring chunks crossfade
over 40 ms. Stretches of silence are not synthesised at all. The output has exactly
``round(len(input) * voice_rate / input_rate)`` samples, and goes to its sink (a cover's WAV file)
as each stretch of it is final (:mod:`job.render.rvc.assembly`); the input is high-passed a block at
a time (:mod:`job.render.rvc.highpass`). What the conversion holds that grows with the song is the
16 kHz input alone (3.8 MB a minute).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel

from job.render.compute import (
    batch_size,
    heap_buffers,
    precision_name,
    release_freed_memory,
    resolve_decoder,
    resolve_device,
    resolve_kernels,
    resolve_precision,
)
from job.render.loading import loading
from job.render.media.audio import to_16k
from job.render.music_key import MusicalKey, key_of_melody, snap_to_key
from job.render.onnx_files import parse_self_contained
from job.render.rvc import pitch as pitch_mod
from job.render.rvc.analysis import CONTENT, PITCH, AnalysisCache, ModelDigests
from job.render.rvc.assembly import ArraySink, Assembler, Sink, frame_rms
from job.render.rvc.checkpoint import build_synthesizer, read_checkpoint
from job.render.rvc.content import HOP as CONTENT_HOP
from job.render.rvc.content import ContentEncoder, load_content_encoder
from job.render.rvc.fcpe import FCPE
from job.render.rvc.highpass import highpass
from job.render.rvc.int8_decoder import CALIBRATION_SHIFTS, Int8Decoder, Prior, build_key
from job.render.rvc.int8_decoder import build as build_int8
from job.render.rvc.retrieval import FeatureIndex
from job.render.rvc.rmvpe import RMVPE
from job.render.rvc.synthesizer import Synthesizer
from shared.errors import CoverError, ErrorCode
from shared.model_store import ModelStore, ResolvedVoice
from shared.options import ConversionOptions, F0Method, trackers
from shared.voices import VoiceInfo

log = logging.getLogger("melodia.engine")

SR = 16000
CONTEXT = 25 * CONTENT_HOP  # 0.5 s of context either side of a chunk
CROSSFADE = 2 * CONTENT_HOP  # 40 ms crossfade (20 ms each side of a cut)
SILENCE_RMS_DB = -60.0  # 10 ms frames quieter than this are silence
MIN_GAP_S = 0.5  # shorter silences are synthesised through
REGION_PAD_S = 0.1
INT8_KIND = "decoder-int8"  # the int8 decoders' folder in the model store's derived files
KEPT_FROM = (CONTEXT - CROSSFADE // 2) // 160  # a chunk's first decoder frame kept: 20 ms before its start
PLAN_BLOCK = 4096  # 10 ms frames per block of the chunk plan's loudness (41 s)

ProgressFn = Callable[[float], None]


class PartTimes(BaseModel):
    content: float = 0.0
    pitch: float = 0.0
    retrieval: float = 0.0
    synthesis: float = 0.0


@dataclass
class Voice:
    name: str
    synth: Synthesizer
    version: str
    f0: bool
    sample_rate: int
    index: FeatureIndex | None = None
    info: VoiceInfo | None = None
    int8: Int8Decoder | None = None  # its decoder's front in int8 (COVER_DECODER=auto on AVX2 CPUs, or int8)


def _check_speakers(synth: Synthesizer, info: VoiceInfo) -> None:
    """A voice.json that declares more speakers than the model holds is refused."""
    held = synth.emb_g.num_embeddings
    if info.speakers > held:
        raise CoverError(
            ErrorCode.MODEL_MISMATCH,
            f"voice {info.name}: voice.json declares {info.speakers} speakers, the model holds {held}",
        )


class ConversionStats(BaseModel):
    """What a conversion did, beside its audio."""

    sample_rate: int
    frames: int  # output samples at sample_rate
    pitch_shift: int
    key_change: int = 0  # semitones the instrumental must move with it (key_shift, and auto-fit's non-octave part)
    times: PartTimes
    chunks: int
    synthesised_s: float


class ConversionResult(ConversionStats, arbitrary_types_allowed=True):
    audio: np.ndarray  # [samples] float32 at sample_rate


def prepare_input(x: np.ndarray) -> tuple[np.ndarray, int]:
    """16 kHz mono ``x`` as the conversion takes it: zero-padded to whole content frames and
    high-passed (a new array; :mod:`job.render.rvc.highpass`), with ``len(x)``."""
    padded = np.zeros(len(x) + (-len(x) % CONTENT_HOP), dtype=np.float32)
    padded[: len(x)] = x
    return highpass(padded, SR, out=padded), len(x)


def plan_chunks(x: np.ndarray, max_chunk_s: float) -> list[tuple[int, int]]:
    """[(start, end)] in 16 kHz samples, multiples of 320, covering the non-silent parts."""
    frames = len(x) // 160
    if frames == 0:
        return []
    rms = np.empty(frames, dtype=np.float64)
    for f in range(0, frames, PLAN_BLOCK):  # a block at a time: the whole song in float64 was 2 x 77 MB at 10 min
        n = min(PLAN_BLOCK, frames - f)
        block = x[f * 160 : (f + n) * 160].reshape(n, 160).astype(np.float64)
        rms[f : f + n] = np.sqrt(np.mean(block**2, axis=1) + 1e-20)
    loud = 20 * np.log10(rms) > SILENCE_RMS_DB
    regions: list[list[int]] = []
    gap = int(MIN_GAP_S * 100)
    for i in map(int, np.flatnonzero(loud)):
        if regions and i - regions[-1][1] <= gap:
            regions[-1][1] = i + 1
        else:
            regions.append([i, i + 1])
    pad = int(REGION_PAD_S * 100)
    max_frames = int(max_chunk_s * 100)
    chunks: list[tuple[int, int]] = []
    for first, last in regions:
        start, end = max(0, first - pad), min(frames, last + pad)
        while end - start > max_frames:  # cut at the quietest 10 ms in the last half of the window
            lo = start + max_frames // 2
            cut = lo + int(np.argmin(rms[lo : start + max_frames]))
            chunks.append((start, cut))
            start = cut
        chunks.append((start, end))
    hop2 = CONTENT_HOP // 160  # frames per 320 samples
    aligned: list[tuple[int, int]] = []
    for start, end in chunks:
        a, b = (start // hop2) * hop2 * 160, -(-end // hop2) * hop2 * 160
        if aligned and a < aligned[-1][1]:
            a = aligned[-1][1]
        if b > a:
            aligned.append((int(a), int(b)))
    return aligned


class VoiceConverter:
    """Holds the shared models (content encoder, RMVPE) and loaded voices between conversions.

    Args:
        store: the model store (base models and voices)
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``
        max_chunk_s: the longest chunk converted at once, seconds
        precision: the decoder's compute type: ``auto``, ``fp32``, ``bf16`` or ``fp16``
        kernels: ``fast`` (channels-last, tiled) or ``reference`` (the exact path)
        batch: chunks per decoder call (0: 1 on the CPU, 8 on a GPU)
        decoder: ``auto``, ``torch`` or ``int8`` (its front on ONNX Runtime, CPUs only; ``auto``:
            int8 where the decoder would run in fp32 with the fast kernels)
        analysis: where content features and pitch are kept between conversions of the same vocals
            (:mod:`job.render.rvc.analysis`; None: computed every time)
        one_cover: the process renders one cover and ends: the pitch trackers are let go once a
            conversion's pitch pass is done (loaded again should another conversion need them), so
            the synthesis's peak memory does not carry them
    """

    def __init__(
        self,
        store: ModelStore,
        device: str = "auto",
        max_chunk_s: float = 20.0,
        precision: str = "auto",
        kernels: str = "fast",
        batch: int = 0,
        decoder: str = "auto",
        analysis: AnalysisCache | None = None,
        one_cover: bool = False,
    ) -> None:
        self.store = store
        self.analysis = analysis
        self.one_cover = one_cover
        self._digests = ModelDigests()
        self.device = resolve_device(device)
        self.batch = batch_size(batch, self.device)
        self.synth_dtype = resolve_precision(precision, self.device)
        self.fast_kernels = resolve_kernels(kernels)
        self.int8 = resolve_decoder(decoder, self.device, self.synth_dtype, self.fast_kernels)
        # HuBERT computes in bf16 where the decoder does on the CPU's fast kernels (bf16 CPUs under
        # auto): 1.57x on the AMD EPYC Zen 4, features 0.015 relative L2 from fp32's (docs/engine.md)
        bf16_content = self.synth_dtype == torch.bfloat16 and self.device.type == "cpu" and self.fast_kernels
        self.content_dtype = torch.bfloat16 if bf16_content else torch.float32
        self.int8_chosen = decoder == "int8"  # asked for by name: a failed build fails (auto falls back to torch)
        self.max_chunk_s = max_chunk_s
        self._content: ContentEncoder | None = None
        self._rmvpe: RMVPE | None = None
        self._fcpe: FCPE | None = None
        self._voices: dict[tuple[str, float], Voice] = {}
        self._loading = threading.RLock()  # requests in flight share the loaded models

    # --- shared models -------------------------------------------------------------------------
    def content_encoder(self) -> ContentEncoder:
        with self._loading:
            if self._content is None:
                with loading("the content encoder (HuBERT)"):
                    self._content = load_content_encoder(self.store.content_encoder()).to(self.device)
            return self._content

    def rmvpe(self) -> RMVPE:
        with self._loading:
            if self._rmvpe is None:
                with loading("the pitch model (RMVPE)"):
                    self._rmvpe = RMVPE.load(self.store.pitch_model(), self.device, fast=self.fast_kernels)
            return self._rmvpe

    def fcpe(self) -> FCPE:
        with self._loading:
            if self._fcpe is None:
                with loading("the pitch model (FCPE)"):
                    self._fcpe = FCPE.load(self.store.fcpe_model(), self.device)
            return self._fcpe

    def let_go_of_pitch_trackers(self) -> None:
        """Drop RMVPE and FCPE (the next pitch pass that needs one loads it again)."""
        with self._loading:
            self._rmvpe = self._fcpe = None

    # --- voices --------------------------------------------------------------------------------
    def load_voice_file(self, pth: Path, index: Path | None = None, info: VoiceInfo | None = None) -> Voice:
        """The voice in ``pth``: its network is built once per file (and version of it) and kept;
        ``info`` (its ``voice.json``, read for each request) goes with what is returned, so an edited
        voice.json (a vocal range, a reference embedding) counts from the next request on, in a
        runner that keeps the network loaded for days."""
        key = (str(pth), pth.stat().st_mtime if pth.exists() else 0.0)
        with self._loading:
            voice = self._load_voice(key, pth, index, info)
        if info is None or voice.info == info:
            return voice
        _check_speakers(voice.synth, info)
        return replace(voice, name=info.name, info=info)  # the network shared, the facts this request's

    def _load_voice(self, key: tuple[str, float], pth: Path, index: Path | None, info: VoiceInfo | None) -> Voice:
        if key not in self._voices:
            name = info.name if info else pth.stem
            with loading(f"the voice {name}"):
                ckpt = read_checkpoint(pth)
                synth = build_synthesizer(ckpt, pth.name).to(self.device)
                feature_index = FeatureIndex.load(index) if index is not None and index.is_file() else None
                if feature_index is not None and feature_index.dim != synth.content_dim:
                    raise CoverError(
                        ErrorCode.MODEL_MISMATCH,
                        f"{pth.parent.name}'s index holds {feature_index.dim}-dim features; "
                        f"the voice takes {synth.content_dim}",
                    )
                if info is not None:
                    _check_speakers(synth, info)
                self._voices[key] = Voice(
                    name=name,
                    synth=synth,
                    version=ckpt.version,
                    f0=ckpt.f0,
                    sample_rate=ckpt.config.sr,
                    index=feature_index,
                    info=info,
                )
            if self.int8:
                with loading(f"the int8 decoder of {name}"):
                    try:
                        self._voices[key].int8 = self._int8_decoder(self._voices[key], pth)
                    except Exception as exc:  # an optimisation that could not be built: the exact decoder runs
                        if self.int8_chosen:
                            raise
                        log.warning("int8 decoder for %s not built (%s): the torch decoder runs", name, exc)
        return self._voices[key]

    def _int8_decoder(self, voice: Voice, pth: Path) -> Int8Decoder:
        """The voice's int8 decoder, from the model store, else from the bucket where another runner
        shared it, else built (calibrated on the decoder inputs of the reference phrase at
        :data:`CALIBRATION_SHIFTS`), kept in the store and shared."""
        name = build_key(pth)
        target = self.store.derived(INT8_KIND, name)
        if not target.is_file() and self.store.fetch_derived(INT8_KIND, name) is not None:
            try:  # shared by another runner: checked as any ONNX file from outside
                parse_self_contained(target.read_bytes(), f"{INT8_KIND}/{name} from the bucket")
            except CoverError as exc:
                log.warning("the shared int8 decoder was refused (%s): built here", exc)
                target.unlink()
        if not target.is_file():
            from job.render.phrase import reference_phrase

            started = time.perf_counter()
            priors: list[Prior] = []
            for shift in CALIBRATION_SHIFTS:
                options = ConversionOptions(f0_method=F0Method.PM, pitch=shift)
                self.convert(reference_phrase(), 44100, voice, options, record=priors)
            build_int8(voice.synth.dec, priors, target)
            log.info("int8 decoder for %s built in %.1f s: %s", voice.name, time.perf_counter() - started, target)
            self.store.share_derived(INT8_KIND, name)
        return Int8Decoder(target, voice.synth.dec)

    def load_voice(self, voice: ResolvedVoice) -> Voice:
        return self.load_voice_file(voice.model_path, voice.index_path, voice.info)

    # --- parts ---------------------------------------------------------------------------------
    def _track(self, x: np.ndarray, method: F0Method) -> np.ndarray:
        if method is F0Method.RMVPE:
            return self.rmvpe().f0(x)
        if method in (F0Method.CREPE, F0Method.CREPE_TINY):
            return pitch_mod.track_crepe(x, "full" if method is F0Method.CREPE else "tiny", str(self.device))
        if method is F0Method.HARVEST:
            return pitch_mod.track_harvest(x)
        if method is F0Method.FCPE:
            return self.fcpe().f0(x)
        return pitch_mod.track_pm(x)

    def hear_pitch(self, x: np.ndarray, method: str) -> np.ndarray:
        """What the trackers ``method`` names hear in ``x`` (16 kHz): f0 in Hz per 10 ms, 0 where
        unvoiced, one value per 160 samples and one more; several trackers combined
        (:func:`pitch.combine`); before any smoothing."""
        frames = len(x) // 160 + 1
        return pitch_mod.combine([pitch_mod.fit_length(self._track(x, m), frames) for m in trackers(method)])

    def track_pitch(self, x: np.ndarray, method: str, filter_radius: int) -> np.ndarray:
        return pitch_mod.smooth(self.hear_pitch(x, method), filter_radius)

    # --- what the vocals hold, whoever sings them (kept in the analysis cache) -------------------
    def _path_tag(self) -> dict[str, object]:
        return {"device": self.device.type, "kernels": "fast" if self.fast_kernels else "reference"}

    def _tracker_id(self, method: F0Method) -> str:
        from importlib.metadata import version

        if method is F0Method.RMVPE:
            return self._digests.of(self.store.pitch_model())
        if method is F0Method.FCPE:
            return self._digests.of(self.store.fcpe_model())
        package = {F0Method.HARVEST: "pyworld", F0Method.PM: "praat-parselmouth"}.get(method, "torchcrepe")
        return f"{package} {version(package)}"

    def chunk_pitch(self, seg: np.ndarray, method: str, filter_radius: int) -> np.ndarray:
        """:meth:`track_pitch` of one chunk, through the analysis cache."""
        if self.analysis is None:
            return self.track_pitch(seg, method, filter_radius)
        tag = {
            **self._path_tag(),
            "method": method,
            "filter_radius": filter_radius,
            "trackers": [self._tracker_id(m) for m in trackers(method)],
        }
        frames = len(seg) // 160 + 1
        return self.analysis.through(
            PITCH,
            tag,
            seg,
            lambda: self.track_pitch(seg, method, filter_radius),
            lambda f: f.shape == (frames,) and bool(np.isfinite(f).all()) and bool((f >= 0).all()),
        )

    def chunk_features(self, encoder: ContentEncoder, seg: np.ndarray, version: str) -> torch.Tensor:
        """The content encoder's features of one chunk (``[frames, dim]``), through the analysis cache."""

        lowered = self.content_dtype != torch.float32

        def compute() -> torch.Tensor:
            wav = torch.from_numpy(seg).to(self.device)[None]
            with torch.autocast(self.device.type, dtype=self.content_dtype, enabled=lowered):
                return encoder.features(F.pad(wav, (40, 40)), version)[0].float()  # [len/320, D]

        if self.analysis is None:
            return compute()
        tag = {**self._path_tag(), "encoder": self._digests.of(self.store.content_encoder()), "version": version}
        if lowered:  # fp32's entries keep the tag they had
            tag["precision"] = precision_name(self.content_dtype)
        frames, dim = encoder.frames(len(seg) + 80), encoder.output_dim(version)
        found = self.analysis.through(
            CONTENT,
            tag,
            seg,
            lambda: compute().float().cpu().numpy(),
            lambda f: f.shape == (frames, dim) and bool(np.isfinite(f).all()),
        )
        return torch.from_numpy(found).to(self.device)

    @staticmethod
    def _autotuned(f0s: list[np.ndarray | None], options: ConversionOptions) -> list[np.ndarray | None]:
        """The singer's melody snapped toward the key's notes (``autotune``): the key named in the
        options (the pipeline's, detected in the instrumental), else the melody's own."""
        key: MusicalKey | None
        if options.autotune_key:
            key = MusicalKey.parse(options.autotune_key)
        else:
            central = [f[CONTEXT // 160 : -(CONTEXT // 160)] for f in f0s if f is not None]
            key = key_of_melody(np.concatenate(central)) if central else None
        if key is None:
            return f0s
        return [None if f is None else snap_to_key(f, key, options.autotune) for f in f0s]

    def _decode(self, voice: Voice, priors: list[Prior], kept: int | None = None) -> list[np.ndarray]:
        """The decoder over several chunks' latents in one call: each padded at its end to the
        longest (latent and excitation zero there), the outputs cut back to each chunk's length.
        The decoder sees at most ``Generator.context_frames`` (10 to 13) frames each way and every
        chunk ends in half a second of context that is dropped, so a chunk's kept audio is what it
        would be alone (tested). On the CPU
        only the frames before ``kept`` from :data:`KEPT_FROM` on are decoded (the rest is zero:
        the context's own audio, which the engine drops)."""
        synth = voice.synth
        upp = synth.upp
        lengths = [z.shape[-1] for z, _, _ in priors]
        longest = max(lengths)
        z = torch.cat([F.pad(p[0], (0, longest - n)) for p, n in zip(priors, lengths, strict=True)])
        sources = [p[2] for p in priors if p[2] is not None]
        source = (
            torch.cat([F.pad(s, (0, (longest - n) * upp)) for s, n in zip(sources, lengths, strict=True)])
            if len(sources) == len(priors)
            else None
        )
        g = priors[0][1].expand(len(priors), -1, -1)
        tiled = self.device.type == "cpu"
        keep = (KEPT_FROM, kept) if kept is not None else None
        y = synth.dec.decode(z, g, source, self.synth_dtype, self.fast_kernels, tiled, voice.int8, keep)
        audio = y[:, 0].float().cpu().numpy()
        return [audio[k, : n * upp] for k, n in enumerate(lengths)]

    def _segment(self, x: np.ndarray, a: int, b: int) -> np.ndarray:
        lo, hi = a - CONTEXT, b + CONTEXT
        seg = x[max(0, lo) : min(len(x), hi)]
        return np.pad(seg, (max(0, -lo), max(0, hi - len(x))))

    # --- the whole conversion ------------------------------------------------------------------
    def convert(
        self,
        audio: np.ndarray,
        sample_rate: int,
        voice: Voice,
        options: ConversionOptions | None = None,
        progress: ProgressFn | None = None,
        record: list[Prior] | None = None,
        out_frames: int | None = None,
    ) -> ConversionResult:
        """``audio`` sung by ``voice``. With ``record``, the decoder's inputs are appended to it
        instead of being decoded (the output is then silence): the int8 decoder's calibration.
        ``out_frames``: the output's length at the voice's rate (default: ``audio``'s duration).

        Args:
            audio: the vocals, mono or ``[channels, samples]``
            sample_rate: their rate
            voice: the loaded voice
            options: the conversion options (defaults when None)
            progress: called with the fraction done, 0 to 1
            record: collect the decoder's inputs instead of decoding (calibration)
            out_frames: the output's length at the voice's rate
        """
        out_len = out_frames if out_frames is not None else round(audio.shape[-1] * voice.sample_rate / sample_rate)
        x, n_in = prepare_input(to_16k(audio, sample_rate))
        sink = ArraySink(out_len)
        stats = self.convert_to(sink, x, n_in, voice, out_len, options, progress, record)
        return ConversionResult(audio=sink.audio, **dict(stats))

    def convert_to(  # noqa: PLR0912, PLR0915 - reads best top to bottom
        self,
        sink: Sink,
        x: np.ndarray,
        n_in: int,
        voice: Voice,
        out_len: int,
        options: ConversionOptions | None = None,
        progress: ProgressFn | None = None,
        record: list[Prior] | None = None,
    ) -> ConversionStats:
        """The conversion of ``x`` (from :func:`prepare_input`: 16 kHz, high-passed, its first
        ``n_in`` samples the song's) into ``out_len`` samples at the voice's rate, handed to
        ``sink`` in order as each stretch is final: the output is never whole in memory.

        Args:
            sink: takes the output in order, a stretch at a time
            x: the prepared input (16 kHz, high-passed)
            n_in: how many of ``x``'s samples are the song's
            voice: the loaded voice
            out_len: the output's length at the voice's rate
            options: the conversion options (defaults when None)
            progress: called with the fraction done, 0 to 1
            record: collect the decoder's inputs instead of decoding (calibration)
        """
        options = options or ConversionOptions()
        if options.speaker >= voice.synth.emb_g.num_embeddings:  # an index past the embedding table
            raise CoverError(
                ErrorCode.OPTIONS_INVALID,
                f"speaker {options.speaker} is out of range: voice {voice.name} has {voice.synth.emb_g.num_embeddings}",
            )
        # on the CPU with the fast kernels, large buffers come from the heap and are reused
        # (compute.heap_buffers): a fifth of the page faults, the same numbers (docs/engine.md)
        with heap_buffers() if self.device.type == "cpu" and self.fast_kernels else nullcontext():
            times = PartTimes()
            chunks = plan_chunks(x, self.max_chunk_s)
            ratio = voice.sample_rate / SR
            upp = voice.synth.upp

            pitch_share = 0.15 if voice.f0 else 0.0  # of the progress bar: pitch pass, then synthesis
            t0 = time.perf_counter()
            f0s: list[np.ndarray | None] = []
            for i, (a, b) in enumerate(chunks):
                f0s.append(
                    self.chunk_pitch(self._segment(x, a, b), options.f0_method, options.filter_radius)
                    if voice.f0
                    else None
                )
                release_freed_memory()  # each chunk's pitch tracking leaves the heap more fragmented (bench/JOURNAL.md)
                if progress and voice.f0:
                    progress(pitch_share * (i + 1) / len(chunks))
            times.pitch += time.perf_counter() - t0
            if self.one_cover and record is None:  # RMVPE's 345 MB would stay through the synthesis's peak
                self.let_go_of_pitch_trackers()
            release_freed_memory(0)  # before HuBERT and the decoder start on what the pitch pass freed
            if options.autotune > 0 and voice.f0:
                f0s = self._autotuned(f0s, options)
            voice_range = voice.info.vocal_range_hz if voice.info else None
            central = [f[CONTEXT // 160 : -(CONTEXT // 160)] for f in f0s if f is not None]
            singer = np.concatenate(central) if central else np.zeros(0, dtype=np.float32)
            key_change = options.key_shift  # the whole song moves: the vocals with the instrumental
            if options.pitch == "auto":
                semitones = pitch_mod.auto_shift(pitch_mod.median_voiced(singer), voice_range)
            elif options.pitch == "auto-fit":
                semitones = pitch_mod.fit_shift(singer, voice_range, voice.info.vocal_median_hz if voice.info else None)
                key_change += semitones - 12 * round(semitones / 12)  # what is not whole octaves moves the song
            else:
                semitones = int(options.pitch)
            semitones += options.key_shift

            envelope = (frame_rms(x[:n_in], SR), options.rms_mix_rate) if options.rms_mix_rate < 1 and chunks else None
            out = Assembler(sink, out_len, voice.sample_rate, envelope, limit=int(len(x) * ratio) + upp)
            xf_out = int(CROSSFADE * ratio)
            half = CROSSFADE // 2
            encoder = self.content_encoder() if chunks else None
            if encoder is not None and encoder.hidden_size != 768 and voice.version == "v2":
                raise CoverError(
                    ErrorCode.MODEL_MISMATCH, f"v2 voices need 768-dim HuBERT features, not {encoder.hidden_size}"
                )
            synthesised = 0
            for first in range(0, len(chunks), self.batch):
                assert encoder is not None  # there are chunks
                group = range(first, min(len(chunks), first + self.batch))
                priors = []
                for i in group:
                    (a, b), f0 = chunks[i], f0s[i]
                    t0 = time.perf_counter()
                    feats = self.chunk_features(encoder, self._segment(x, a, b), voice.version)
                    times.content += time.perf_counter() - t0
                    if feats.shape[-1] != voice.synth.content_dim:
                        raise CoverError(
                            ErrorCode.MODEL_MISMATCH,
                            f"content features are {feats.shape[-1]}-dim; the voice takes {voice.synth.content_dim}",
                        )
                    t0 = time.perf_counter()
                    feats0 = feats
                    if voice.index is not None and options.index_rate > 0:
                        blended = voice.index.blend(feats.float().cpu().numpy(), options.index_rate)
                        feats = torch.from_numpy(blended).to(self.device)
                    times.retrieval += time.perf_counter() - t0

                    t0 = time.perf_counter()
                    frames = 2 * feats.shape[0]
                    phone = feats.repeat_interleave(2, dim=0)[None]
                    pitch = pitchf = None
                    if voice.f0 and f0 is not None:
                        f = pitch_mod.shift(f0[:frames], semitones)
                        pitchf = torch.from_numpy(f).to(self.device)[None]
                        pitch = torch.from_numpy(pitch_mod.coarse(f.copy())).to(self.device)[None]
                        if options.protect < 0.5:
                            mask = torch.where(pitchf > 0, 1.0, options.protect)[..., None]
                            phone = phone * mask + feats0.repeat_interleave(2, dim=0)[None] * (1 - mask)
                    generator = torch.Generator(device=self.device).manual_seed(options.seed * 1_000_003 + int(a))
                    with torch.inference_mode():
                        priors.append(voice.synth.prior(phone, pitch, pitchf, options.speaker, generator))
                    times.synthesis += time.perf_counter() - t0

                t0 = time.perf_counter()
                with torch.inference_mode():
                    if record is None:  # each chunk keeps [a - 20 ms, b + 20 ms] of its audio (below)
                        kept = KEPT_FROM + max((chunks[i][1] - chunks[i][0] + CROSSFADE) // 160 for i in group)
                        ys = self._decode(voice, priors, kept)
                    else:
                        record += priors
                        ys = [np.zeros(z.shape[-1] * upp, np.float32) for z, _, _ in priors]
                times.synthesis += time.perf_counter() - t0

                for i, y in zip(group, ys, strict=True):
                    a, b = chunks[i]
                    synthesised += b - a
                    # keep [a - 20 ms, b + 20 ms] and crossfade with the neighbours
                    lo = int((CONTEXT - half) * ratio)  # KEPT_FROM frames
                    piece = y[lo : lo + int((b - a + CROSSFADE) * ratio)].copy()
                    ramp = np.linspace(0.0, 1.0, xf_out, dtype=np.float32)
                    piece[:xf_out] *= ramp[: len(piece[:xf_out])]
                    piece[-xf_out:] *= ramp[::-1][-len(piece[-xf_out:]) :]
                    start = int((a - half) * ratio)
                    if start < 0:
                        piece, start = piece[-start:], 0
                    out.add(start, piece)
                    out.final(int((b - half) * ratio))  # the next chunk starts at or after b
                release_freed_memory()
                if progress:
                    progress(pitch_share + (1 - pitch_share) * group.stop / len(chunks))

            out.close()
            if self.analysis is not None:
                self.analysis.flush()  # the entries this conversion made are stored when it returns
            if progress:
                progress(1.0)
            return ConversionStats(
                sample_rate=voice.sample_rate,
                frames=out_len,
                pitch_shift=semitones,
                key_change=key_change,
                times=times,
                chunks=len(chunks),
                synthesised_s=synthesised / SR,
            )

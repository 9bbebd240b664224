"""The whole cover: fetch -> separate -> convert -> quality (and repair) -> mix. The only place the
stages are sequenced (their names: :mod:`shared.stages`), and the only module that imports more
than one stage's package.

The worker, the command line and the benchmark all call :meth:`Pipeline.render` (or one of its
stages). One :class:`Pipeline` keeps its models loaded, so a long-running runner renders many songs
without reloading anything. With a :class:`~job.render.separate.stems.StemCache`, separation is skipped for
a song whose stems were made before with the same model and settings.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field
from scipy.signal import resample_poly

from job.render import credentials
from job.render.compute import heavy_slots, release_freed_memory
from job.render.convert import ConversionOptions, ConvertedVocals, VoiceConverter, convert_vocals
from job.render.duet import Span, frame_energy, plan, sing
from job.render.fetch import SongAudio, fetch
from job.render.media.audio import CONTENT_SAMPLE_RATE, MIX_SAMPLE_RATE, read_16k, read_wav, to_16k, write_wav
from job.render.media.download import UrlPolicy
from job.render.mix import watermark
from job.render.mix.bed import at_mix_rate, bed
from job.render.mix.effects import EffectChain, apply_effects, chain_for
from job.render.mix.key import shift_key
from job.render.mix.mixer import MixResult, mix
from job.render.music_key import detect_key
from job.render.phrase import reference_phrase
from job.render.quality.meter import QualityMeter, dnsmos_workers
from job.render.quality.repair import CONTEXT_S, RepairLoop
from job.render.quality.repair import Voice as RepairVoice
from job.render.rvc.analysis import AnalysisCache
from job.render.rvc.engine import ConversionResult, PartTimes
from job.render.separate.loading import cached_model
from job.render.separate.separator import Separator
from job.render.separate.stems import StemCache, Stems
from job.render.separate.vocal_split import VocalSplitter, VocalStems
from job.render.timing import StageTimer
from shared.errors import CoverError, ErrorCode
from shared.model_store import ModelStore, ResolvedVoice
from shared.options import BackingMode, MixOptions, SeparationOptions, StemOptions
from shared.provenance import ProvenanceSummary, check_format
from shared.quality import MELODY_MIN_VOICED_S, QualityReport, SingerScore, StemsUsed
from shared.settings import Settings
from shared.stages import Stage

WAIT_NOTED_S = 0.01  # a wait for the device shorter than this is not reported
StageProgress = Callable[[Stage, float], None]


class CoverOptions(BaseModel):
    conversion: ConversionOptions = Field(default_factory=ConversionOptions)
    separation: SeparationOptions = Field(default_factory=SeparationOptions)
    mix: MixOptions = Field(default_factory=MixOptions)
    stems: StemOptions = Field(default_factory=StemOptions)
    allow_no_vocals: bool = Field(
        False, description="render a song whose separated vocals hold no singing (the gate refuses it otherwise)"
    )


class CastPart(BaseModel):
    """A further voice of a duet and the lead's ranges it sings (seconds)."""

    voice: ResolvedVoice
    ranges: list[tuple[float, float]]
    options: ConversionOptions | None = None  # None: the cover's


class Cast(BaseModel):
    """Who sings beside the cover's main voice: further voices on the lead, another on the backing."""

    parts: list[CastPart] = Field(default_factory=list)
    backing_voice: ResolvedVoice | None = None


DUET_SIMILARITY_MIN_S = 1.0  # a stretch shorter than this is not scored for its singer


def made_with(options: CoverOptions, converted: ConvertedVocals, chain: EffectChain) -> list[str]:
    """What shaped the cover, in words, for its report: tracker, shifts, autotune, effects."""
    conversion = options.conversion
    said = [f"pitch tracker {conversion.f0_method}", f"vocals shifted {converted.pitch_shift:+d} semitones"]
    if conversion.pitch in ("auto", "auto-fit"):
        said[-1] += f" ({conversion.pitch})"
    if converted.key_change:
        said.append(f"song moved {converted.key_change:+d} semitones (key change)")
    if conversion.autotune:
        said.append(f"autotune {conversion.autotune:g}")
    said.append(chain.describe() if chain.empty else f"effects {options.mix.effects.value}: {chain.describe()}")
    return said


class CoverResult(BaseModel):
    output: Path
    quality: QualityReport | None = None
    voice: str
    song: SongAudio
    mix: MixResult
    conversion: ConvertedVocals
    vocal_stems: VocalStems | None = None
    provenance: ProvenanceSummary | None = None  # None: not signed (COVER_PROVENANCE=off, or opus)
    watermark: int | None = None  # the inaudible watermark's id (None: COVER_PROVENANCE=off)
    stems_cached: bool
    timings: dict[str, float]


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        store: ModelStore | None = None,
        stem_cache: StemCache | None = None,
        *,
        one_cover: bool = False,
    ) -> None:
        """The stages and the models they load (each once, then kept for the next cover).

        Args:
            settings: the render's settings
            store: the model store (default: the settings' ``models_dir``)
            stem_cache: where stems and the vocals' analysis are kept between covers (None: not kept)
            one_cover: the process renders one cover and ends (a Cloud Run Job execution, ``cover
                make``): the separation's models are let go once the stems are made, and the pitch
                trackers once the conversion's pitch pass is done, so that the later stages' peak
                memory does not carry them (docs/performance.md)
        """
        self.settings = settings
        self.one_cover = one_cover
        self.store = store or ModelStore(settings.models_dir)
        self.stem_cache = stem_cache
        self.converter = VoiceConverter(
            self.store,
            settings.device,
            precision=settings.precision,
            kernels=settings.kernels,
            batch=settings.convert_batch,
            decoder=settings.decoder,
            analysis=AnalysisCache(stem_cache.storage if stem_cache is not None else None),
            one_cover=one_cover,
        )
        self._separators: dict[str, Separator] = {}
        self.splitter = VocalSplitter(
            self.store,
            settings.threads,
            runtime=settings.mdx_runtime,
            device=self.converter.device,
            precision=settings.precision,
            kernels=settings.kernels,
        )
        self._meter: QualityMeter | None = None
        self._references: dict[tuple[str, str], list[float] | None] = {}
        self._referencing = threading.Lock()
        # Several requests may render at once (a runner's ``in_flight``); the heavy stages take
        # turns on the device, ``heavy_slots`` at a time, while the others fetch, mix and upload.
        self.heavy_slots = heavy_slots(settings.heavy_slots, self.converter.device)
        self.heavy = threading.BoundedSemaphore(self.heavy_slots)
        self._loading = threading.Lock()  # one separator per options, whichever request asks first
        self._identity: credentials.Identity | None = None

    def separator(self, options: SeparationOptions) -> Separator:
        key = options.model_dump_json()
        with self._loading:
            return self._separator(key, options)

    @contextmanager
    def device_turn(self, timer: StageTimer | None = None) -> Iterator[None]:
        """Hold one of the device's ``heavy_slots`` for a heavy stage; a wait for another
        request's turn is timed as ``device_wait``."""
        started = time.perf_counter()
        with self.heavy:
            waited = time.perf_counter() - started
            if timer is not None and waited > WAIT_NOTED_S:
                timer.timings["device_wait"] = timer.timings.get("device_wait", 0.0) + waited
            yield

    # --- quality -------------------------------------------------------------------------------
    @property
    def meter(self) -> QualityMeter:
        with self._loading:
            if self._meter is None:
                self._meter = QualityMeter(str(self.converter.device))
            return self._meter

    def reference(self, voice: ResolvedVoice) -> list[float] | None:
        """The voice's reference embedding: from voice.json, else from the reference phrase it
        sings here (computed once per process and voice version, and written into a local-only
        voice's voice.json)."""
        if voice.info.reference_embedding:
            return voice.info.reference_embedding
        key = (voice.name, voice.info.model_version)
        with self._referencing:  # requests in flight for one voice compute it once
            if key not in self._references:
                embedding = self.reference_embedding(voice)
                if embedding is not None:
                    self.store.keep_reference(voice.info, embedding)  # a local voice keeps it for next time
                self._references[key] = embedding
            return self._references[key]

    def reference_embedding(self, voice: ResolvedVoice, clips: list[np.ndarray] | None = None) -> list[float] | None:
        """A voice's reference embedding: of its training clips (16 kHz mono) when given, else of the
        reference phrase (:mod:`job.render.phrase`) converted by the voice with default options."""
        if clips:
            audio16 = np.concatenate(clips)
        else:
            result = self.converter.convert(reference_phrase(), MIX_SAMPLE_RATE, self.converter.load_voice(voice))
            audio16 = to_16k(np.asarray(result.audio), result.sample_rate)
        embedding = self.meter.embedding(audio16)
        return None if embedding is None else [round(float(v), 6) for v in embedding]

    def measure(
        self,
        vocals: Path,
        converted: ConvertedVocals,
        voice: ResolvedVoice,
        source_f0: np.ndarray | None = None,
        progress: Callable[[float], None] | None = None,
        cast: Cast | None = None,
        spans: list[Span] | None = None,
    ) -> QualityReport:
        """Score the converted vocals against the separated ones; a duet's segments each against the
        voice singing most of it, and each of its stretches for likeness to every voice.

        Args:
            vocals: the separated vocals (the lead that was converted)
            converted: the converted vocals
            voice: the voice (its reference embedding)
            source_f0: the separated vocals' melody when :meth:`sung` measured it already
            progress: called with the fraction of the scoring done
            cast: a duet's further voices (None: one voice)
            spans: the duet's stretches (:func:`job.render.duet.plan`)
        """
        # the quality models take 16 kHz mono: read so, a block at a time (memory flat in the song's length)
        source, output = read_16k(vocals).audio, read_16k(converted.path).audio
        references = {voice.name: self.reference(voice)}
        for part in (cast or Cast()).parts:
            references.setdefault(part.voice.name, self.reference(part.voice))
        shift: float | np.ndarray = converted.pitch_shift
        reference_at = None
        if spans:
            frame_s = self.meter.frame_s
            shift = np.full(
                1 + len(output) // max(1, round(frame_s * CONTENT_SAMPLE_RATE)), float(converted.pitch_shift)
            )
            for a, b, semitones in converted.shifts:
                shift[int(a / frame_s) : int(np.ceil(b / frame_s))] = semitones

            def reference_at(a: float, b: float) -> list[float] | None:
                return references[_mostly(spans, a, b)]

        report = self.meter.conversion(
            source,
            CONTENT_SAMPLE_RATE,
            output,
            CONTENT_SAMPLE_RATE,
            shift,
            references[voice.name],
            source_f0=source_f0,
            progress=progress,
            reference_at=reference_at,
        )
        if spans:
            report.singers = self.singer_scores(output, spans, references)
        return report

    def singer_scores(
        self, output16: np.ndarray, spans: list[Span], references: dict[str, list[float] | None]
    ) -> list[SingerScore]:
        """Each duet stretch's likeness (speaker similarity) to every voice of the cover."""
        scores = []
        for span in spans:
            a, b = int(span.start_s * CONTENT_SAMPLE_RATE), int(span.end_s * CONTENT_SAMPLE_RATE)
            embedding = (
                self.meter.embedding(output16[a:b]) if span.end_s - span.start_s >= DUET_SIMILARITY_MIN_S else None
            )
            similarity = {
                name: None if embedding is None or ref is None else round(float(np.dot(embedding, ref)), 4)
                for name, ref in references.items()
            }
            measured = {k: v for k, v in similarity.items() if v is not None}
            own = max(measured, key=lambda k: measured[k]) in span.voices if len(measured) > 1 else None
            scores.append(
                SingerScore(
                    start_s=round(span.start_s, 3),
                    end_s=round(span.end_s, 3),
                    voices=list(span.voices),
                    similarity=similarity,
                    sung_by_its_voice=own,
                )
            )
        return scores

    def sing_lead(
        self,
        lead: Path,
        voice: ResolvedVoice,
        cast: Cast,
        out: Path,
        options: ConversionOptions,
        progress: Callable[[float], None] | None = None,
    ) -> tuple[ConvertedVocals, list[Span]]:
        """The lead sung by ``voice`` alone (:meth:`convert`; no stretches returned), or by ``voice``
        and the cast's further voices, each in its stretches (:mod:`job.render.duet`), into the mono
        WAV ``out`` at ``voice``'s rate.

        Args:
            lead: the lead vocals
            voice: the main voice (everything no part names)
            cast: the further voices and their ranges
            out: the converted lead's WAV
            options: the main voice's conversion options (key_shift and autotune's key hold for all)
            progress: called with the fraction done
        """
        from job.render.duet import runs

        if not cast.parts:
            return self.convert(lead, voice, out, options, progress), []
        if options.pitch == "auto-fit":
            raise CoverError(
                ErrorCode.OPTIONS_INVALID,
                "pitch 'auto-fit' moves the whole song's key, which one voice of a duet cannot choose for all: "
                "give a number of semitones or 'auto', and key_shift for the song",
            )
        source, rate = read_wav(lead, mmap=True)
        duration = source.shape[-1] / rate
        spans = plan(
            duration,
            voice.name,
            [(p.voice.name, p.ranges) for p in cast.parts],
            frame_energy(read_16k(lead).audio, CONTENT_SAMPLE_RATE),
        )
        shared = {"key_shift": options.key_shift, "autotune_key": options.autotune_key}
        singers = {voice.name: (voice, options)}
        for part in cast.parts:
            singers.setdefault(part.voice.name, (part.voice, (part.options or options).model_copy(update=shared)))
        out_rate = self.converter.load_voice(voice).sample_rate
        total = sum(b - a for name in singers for a, b in runs(spans, name, duration)) or 1.0
        done = 0.0
        shifts: list[tuple[float, float, int, str]] = []
        times = PartTimes()
        synthesised = 0.0

        def render(name: str, a: float, b: float) -> np.ndarray:
            nonlocal done, synthesised
            singer, singer_options = singers[name]
            result = self.convert_stretch(source, rate, a, b, singer, singer_options)
            audio = result.audio
            if result.sample_rate != out_rate:
                g = np.gcd(result.sample_rate, out_rate)
                audio = resample_poly(audio, out_rate // g, result.sample_rate // g).astype(np.float32)
            shifts.append((round(a, 3), round(b, 3), result.pitch_shift, name))
            for field in PartTimes.model_fields:
                setattr(times, field, getattr(times, field) + getattr(result.times, field))
            synthesised += result.synthesised_s
            done += b - a
            if progress:
                progress(min(1.0, done / total))
            return audio

        frames = round(duration * out_rate)
        write_wav(out, sing(spans, frames, out_rate, render, duration), out_rate)
        main_shifts = [shift for _, _, shift, name in shifts if name == voice.name]
        converted = ConvertedVocals(
            path=out,
            sample_rate=out_rate,
            duration_s=frames / out_rate,
            pitch_shift=main_shifts[0] if main_shifts else options.key_shift,
            key_change=options.key_shift,
            parts=times,
            synthesised_s=synthesised,
            shifts=[(a, b, shift) for a, b, shift, _ in shifts],
        )
        return converted, spans

    def _backing(
        self,
        vocal: VocalStems,
        voice: ResolvedVoice,
        lead_voice: ResolvedVoice,
        options: ConversionOptions,
        converted: ConvertedVocals,
        work: Path,
    ) -> list[Path]:
        """What the bed gets beside the instrumental: the backing as sung or converted by ``voice``
        (muted: nothing), and the lead's room when kept; each 44.1 kHz stereo. The lead's voice sings
        the backing at the lead's settled shift; another voice keeps a number of semitones, and
        'auto'/'auto-fit' become whole octaves toward its range on top of the song's key change.

        Args:
            vocal: the split vocal stems
            voice: the backing's voice
            lead_voice: the lead's (main) voice
            options: the cover's conversion options
            converted: the converted lead (its settled shift and key change)
            work: the render's work folder
        """
        extras = []
        if vocal.backing is not None and vocal.backing_mode is BackingMode.ORIGINAL:
            extras.append(vocal.backing)
        elif vocal.backing is not None and vocal.backing_mode is BackingMode.CONVERT:
            if voice.name == lead_voice.name:
                settled = options.model_copy(update={"pitch": converted.pitch_shift - options.key_shift})
            elif isinstance(options.pitch, str):
                settled = options.model_copy(update={"pitch": "auto", "key_shift": converted.key_change})
            else:
                settled = options
            sung = self.convert(vocal.backing, voice, work / "backing.converted.wav", settled)
            extras.append(at_mix_rate(sung.path, work / "backing.converted.44k.wav"))
        if vocal.room is not None:
            extras.append(vocal.room)
        return extras

    def sung(self, vocals: Path) -> np.ndarray:
        """The separated vocals' melody (Hz per quality frame, 0 unvoiced); :class:`CoverError`
        ``input.no_vocals`` when under one second of it is sung (an instrumental: nothing to convert)."""
        f0 = self.meter.pitch(read_16k(vocals).audio)
        sung_s = float(np.count_nonzero(f0)) * self.meter.frame_s
        if sung_s < MELODY_MIN_VOICED_S:
            raise CoverError(
                ErrorCode.INPUT_NO_VOCALS,
                f"the song's separated vocals hold {sung_s:.1f} s of singing (under {MELODY_MIN_VOICED_S:.0f} s): "
                "nothing to convert (allow_no_vocals, or --allow-no-vocals, renders it anyway)",
                retryable=False,
            )
        return f0

    def repair(
        self,
        vocals: Path,
        converted: ConvertedVocals,
        voice: ResolvedVoice,
        options: ConversionOptions,
        report: QualityReport,
        convert_s: float,
    ) -> None:
        """Re-render the segments of ``converted`` below the thresholds (job/render/quality/repair.py), in
        ``repair_budget`` times ``convert_s`` at most; the file and ``report`` are updated.

        Args:
            vocals: the separated vocals (the source the segments are converted from again)
            converted: the first conversion, its file changed in place where a candidate is kept
            voice: the voice
            options: the first conversion's options (its pitch shift kept)
            report: the quality report, updated (segments, whole-song scores, verdict, curves, ``repair``)
            convert_s: the conversion stage's time, the budget's unit
        """
        source, rate = read_wav(vocals, mmap=True)
        out, out_rate = read_wav(converted.path)
        loaded = self.converter.load_voice(voice)
        fixed = options.model_copy(update={"pitch": converted.pitch_shift - options.key_shift})  # auto settled

        def render(lo_s: float, hi_s: float, candidate: ConversionOptions) -> np.ndarray:
            return self.convert_stretch(source, rate, lo_s, hi_s, voice, candidate).audio

        loop = RepairLoop(
            self.meter,
            render,
            RepairVoice(f0=loaded.f0, index=loaded.index is not None, fcpe=self._has_fcpe()),
            budget_s=self.settings.repair_budget * convert_s,
            convert_rate=convert_s / max(converted.duration_s, 1.0),
            score_rate=dnsmos_workers() * report.measured_s / max(converted.duration_s, 1.0),
            reference=self.reference(voice),
        )
        repair = loop.run(report, out[0], out_rate, fixed)
        if any(s.kept for s in repair.segments):
            write_wav(converted.path, out[0], out_rate)

    def convert_stretch(
        self, source: np.ndarray, rate: int, lo_s: float, hi_s: float, voice: ResolvedVoice, options: ConversionOptions
    ) -> ConversionResult:
        """The converted audio from ``lo_s`` to ``hi_s`` of ``source`` (at the voice's rate), converted
        alone with ``CONTEXT_S`` of the song either side.

        Args:
            source: the separated vocals, ``[channels, samples]``
            rate: their sample rate
            lo_s: the stretch's start, seconds
            hi_s: its end, seconds
            voice: the voice
            options: the conversion options to try
        """
        a = max(0, int((lo_s - CONTEXT_S) * rate))
        b = min(source.shape[-1], int(np.ceil((hi_s + CONTEXT_S) * rate)))
        result = self.converter.convert(source[..., a:b], rate, self.converter.load_voice(voice), options)
        offset = round((lo_s - a / rate) * result.sample_rate)
        audio = result.audio[offset : offset + round((hi_s - lo_s) * result.sample_rate)]
        return result.model_copy(update={"audio": audio})

    def _separator(self, key: str, options: SeparationOptions) -> Separator:
        if key not in self._separators:
            self._separators[key] = Separator(
                self.store,
                options,
                self.settings.device,
                self.settings.allow_hub_download,
                self.settings.precision,
                self.settings.kernels,
                self.settings.separate_batch,
            )
        return self._separators[key]

    def _separated(self, fetched: SongAudio, song_copy: Path | None) -> None:
        """What a render lets go of once its stems are made: the song's files (the stems are what the
        later stages read; ``song_copy``: the caller's own copy of the song), a one-cover process's
        separation models, and the memory separation freed, before the conversion's models load."""
        fetched.discard_files()
        if song_copy is not None:
            song_copy.unlink(missing_ok=True)
        if self.one_cover:
            self.let_go_of_separation()
        release_freed_memory(0)

    def let_go_of_separation(self) -> None:
        """Drop the separation's models (Demucs, the MDX-Net passes'): a later cover loads them again."""
        with self._loading:
            self._separators.clear()
            cached_model.cache_clear()
            self.splitter.unload()
        gc.collect()  # a model's modules may sit in reference cycles: freed now, not at the next collection

    # --- the stages ----------------------------------------------------------------------------
    def fetch(self, song: str | Path, work: Path) -> SongAudio:
        return fetch(song, work, self.settings.max_duration_s, UrlPolicy.from_settings(self.settings))

    def separate(
        self,
        song: SongAudio,
        out_dir: Path,
        options: SeparationOptions,
        progress: Callable[[float], None] | None = None,
    ) -> tuple[Stems, bool]:
        """The song's stems in ``out_dir`` and whether they came from the stem cache.

        Args:
            song: the fetched song
            out_dir: where ``vocals.wav`` and ``no_vocals.wav`` go
            options: the separation options (model, segment, overlap, shifts)
            progress: called with the fraction done, 0 to 1
        """
        separator = self.separator(options)
        key = separator.stem_key(song.sha256)
        if self.stem_cache is not None:
            cached = self.stem_cache.get(key, out_dir, MIX_SAMPLE_RATE)  # stems are always at the mix rate
            if cached is not None:
                if progress:
                    progress(1.0)
                return cached, True
        stems = separator.separate(song.wav, out_dir, progress)
        if self.stem_cache is not None:
            self.stem_cache.put(key, stems)
        return stems, False

    def convert(
        self,
        vocals: Path,
        voice: ResolvedVoice,
        out: Path,
        options: ConversionOptions,
        progress: Callable[[float], None] | None = None,
    ) -> ConvertedVocals:
        """The vocals re-sung by ``voice`` into ``out`` (:func:`job.render.convert.convert_vocals`).

        Args:
            vocals: the separated vocals
            voice: the voice
            out: the converted vocals' WAV
            options: the conversion options
            progress: called with the fraction done, 0 to 1
        """
        return convert_vocals(self.converter, vocals, voice, out, options, progress)

    def _has_fcpe(self) -> bool:
        try:
            self.store.fcpe_model()
        except CoverError:
            return False
        return True

    @staticmethod
    def _settle_key(options: CoverOptions, instrumental: Path) -> tuple[CoverOptions, str]:
        """The key autotune snaps toward: the one the options name, else the instrumental's (and
        what the report says of it)."""
        if options.conversion.autotune_key:
            return options, f"{options.conversion.autotune_key} (as asked)"
        key = detect_key(read_wav(instrumental, mmap=True)[0], MIX_SAMPLE_RATE)
        if key is None:
            return options, "none heard in the instrumental: the melody's own"
        conversion = options.conversion.model_copy(update={"autotune_key": key.name})
        said = f"{key.name} (heard in the instrumental, margin {key.confidence:.2f})"
        return options.model_copy(update={"conversion": conversion}), said

    def separate_vocals(
        self, song: SongAudio, work: Path, options: CoverOptions, progress: Callable[[float], None]
    ) -> tuple[Stems, bool, VocalStems]:
        """Demucs' stems (and whether they were cached), then the vocal stem split as ``options.stems``
        and the store's MDX-Net models ask (:mod:`job.render.separate.vocal_split`).

        Args:
            song: the fetched song
            work: the render's work folder (the stems go to ``stems/``)
            options: the cover's options (separation and stems)
            progress: called with the fraction of both done
        """
        splitting = options.stems.backing is not None or options.stems.dereverb or self.splitter.available_any()
        share = 0.7 if splitting else 1.0  # of the stage's bar: Demucs, then the MDX-Net splits
        stems, cached = self.separate(song, work / "stems", options.separation, lambda f: progress(share * f))
        vocal = self.splitter.split(
            stems.vocals,
            self.separator(options.separation).stem_key(song.sha256).separation_key,
            song.sha256,
            work / "stems",
            options.stems,
            self.stem_cache,
            lambda f: progress(share + (1 - share) * f),
        )
        return stems, cached, vocal

    @property
    def identity(self) -> credentials.Identity:
        """The signing identity (production's from the settings, else the development key), loaded once."""
        with self._loading:
            if self._identity is None:
                s = self.settings
                key = s.signing_key.get_secret_value() if s.signing_key else None
                self._identity = credentials.identity(key, s.signing_certs, s.trusted_certs, s.state_dir)
            return self._identity

    def sign(
        self, out: Path, result: CoverResult, voice: ResolvedVoice, cast: Cast, song_label: str, separator: str
    ) -> None:
        """The cover's Content Credentials, embedded into ``out`` (``result.provenance`` set); nothing
        for a format C2PA has no binding for, or with ``COVER_PROVENANCE=off``.

        Args:
            out: the cover's file
            result: the render's result (its quality, stems, conversion, song)
            voice: the main voice
            cast: the further voices
            song_label: the song's id or file name
            separator: the Demucs model that separated it
        """
        media_type = credentials.MEDIA_TYPES.get(result.mix.format)
        if self.settings.provenance == "off" or media_type is None:
            return
        voices = [voice, *(p.voice for p in cast.parts)]
        voices += [cast.backing_voice] if cast.backing_voice else []
        facts = credentials.CoverFacts(
            title=out.name,
            song=song_label,
            song_sha256=result.song.sha256,
            voices=[
                credentials.VoiceFact(name=v.name, version=v.info.model_version, rights=v.info.rights)
                for v in {v.name: v for v in voices}.values()
            ],
            actions=[
                f"vocals separated from the song ({separator})",
                *([result.vocal_stems.said()] if result.vocal_stems else []),
                f"vocals re-sung by {', '.join(dict.fromkeys(v.name for v in voices))} (RVC)",
                *(result.quality.made_with if result.quality else []),
                f"mixed at {result.mix.loudness_lufs:.1f} LUFS",
            ],
            verdict=result.quality.verdict.value if result.quality else None,
        )
        result.provenance = credentials.sign(out, media_type, facts, self.identity, result.watermark)

    @staticmethod
    def _mark_id(song: SongAudio, voice: ResolvedVoice, cast: Cast, options: CoverOptions) -> int:
        """The watermark's id: from what makes the cover (its song's audio, every voice with its
        version and part, the options), so the same request renders the same audio."""
        voices = [voice, *(p.voice for p in cast.parts), *([cast.backing_voice] if cast.backing_voice else [])]
        parts = [f"{p.voice.name}:{p.ranges}:{p.options.model_dump_json() if p.options else ''}" for p in cast.parts]
        return watermark.mark_id_for(
            song.sha256, *(f"{v.name}@{v.info.model_version}" for v in voices), *parts, options.model_dump_json()
        )

    def _mix(
        self,
        instrumental: Path,
        extras: list[Path],
        converted: ConvertedVocals,
        options: CoverOptions,
        out: Path,
        work: Path,
        voice_name: str,
        title: str,
        quality: QualityReport | None,
        watermark: int | None = None,
    ) -> MixResult:
        """The cover: the bed (instrumental and ``extras``) in the song's new key, the converted lead
        through the effect chain over it; the report gets the mix's scores and what shaped the cover.

        Args:
            instrumental: the separated instrumental
            extras: what else the bed holds (backing, room), 44.1 kHz stereo
            converted: the converted lead
            options: the cover's options
            out: the cover's file
            work: the render's work folder
            voice_name: the main voice's name (for the tags)
            title: the title tag
            quality: the quality report to complete (None: not measured)
            watermark: the id the mix's watermark carries (None: none)
        """
        accompaniment = bed(instrumental, extras, work / "bed.wav")
        shifted = shift_key(accompaniment, converted.key_change, work / "no_vocals.key.wav")
        chain = chain_for(options.mix)
        vocals = apply_effects(converted.path, chain, work / "converted.fx.wav")
        mixed = mix(
            shifted,
            vocals,
            out,
            options.mix,
            voice_name=voice_name,
            title=title,
            watermark=watermark,
            workers=self.settings.mix_workers,
        )
        if quality is not None:
            quality.made_with = made_with(options, converted, chain)
            quality.mix = mixed.scores
            if quality.curves is not None:
                quality.curves.waveform = mixed.peaks
                quality.curves.mix_levels = mixed.levels
        return mixed

    # --- the whole cover -----------------------------------------------------------------------
    def render(
        self,
        song: str | Path,
        voice: ResolvedVoice,
        out: Path,
        options: CoverOptions | None = None,
        progress: StageProgress | None = None,
        *,
        work: Path,
        title: str | None = None,
        discard_song: bool = False,
        cast: Cast | None = None,
        song_label: str | None = None,
    ) -> CoverResult:
        """Render a cover of ``song`` sung by ``voice`` into ``out``.

        Args:
            song: the song: a local file or an http(s) URL (fetched under the settings' URL policy).
            voice: the voice model, resolved from the store (``ModelStore.voice``).
            out: the cover's file; its format is ``options.mix.format``.
            options: conversion, separation and mix options (defaults when None).
            progress: called with ``(stage, fraction)`` as each stage advances, 1.0 at its end.
            work: the caller's work folder for this render's files (the caller removes it:
                :func:`job.render.workfolder.work_folder`).
            title: the cover's title tag (default: the song's file name and the voice).
            discard_song: the file ``song`` is the caller's own temporary copy (the runner's
                download), removed with the work folder's song files once the song is separated.
            cast: further voices on the lead (a duet) and the backing's voice (None: ``voice`` sings all).
            song_label: what the credentials call the song (the catalog's id; default: its file name).
        """
        options = options or CoverOptions()
        check_format(options.mix.format.value, self.settings.provenance)  # before any work
        report = progress or (lambda stage, fraction: None)
        timer = StageTimer()
        work.mkdir(parents=True, exist_ok=True)
        with timer(Stage.FETCH):
            fetched = self.fetch(song, work)
        report(Stage.FETCH, 1.0)
        cast = cast or Cast()
        with self.device_turn(timer), timer(Stage.SEPARATE):
            stems, cached, vocal = self.separate_vocals(fetched, work, options, lambda f: report(Stage.SEPARATE, f))
        report(Stage.SEPARATE, 1.0)
        self._separated(fetched, Path(song) if discard_song else None)
        source_f0 = None
        if self.settings.quality == "gate" and not options.allow_no_vocals:
            with timer(Stage.QUALITY):  # an instrumental is refused here, before the conversion's cost
                source_f0 = self.sung(vocal.lead)
        song_key = None
        if options.conversion.autotune > 0:
            with timer(Stage.CONVERT):
                options, song_key = self._settle_key(options, stems.no_vocals)
        with self.device_turn(timer), timer(Stage.CONVERT):
            converted, spans = self.sing_lead(
                vocal.lead, voice, cast, work / "converted.wav", options.conversion, lambda f: report(Stage.CONVERT, f)
            )
            extras = self._backing(vocal, cast.backing_voice or voice, voice, options.conversion, converted, work)
        release_freed_memory(0)
        quality = None
        if self.settings.quality != "off":
            with timer(Stage.QUALITY):
                quality = self.measure(
                    vocal.lead, converted, voice, source_f0, lambda f: report(Stage.QUALITY, f), cast, spans
                )
                quality.song_key = song_key
                quality.stems = StemsUsed(said=vocal.said(), backing_mode=vocal.backing_mode)
            report(Stage.QUALITY, 1.0)
            # a duet is not repaired: the loop re-renders a segment with one voice (docs/quality.md)
            if self.settings.repair_budget > 0 and any(s.below for s in quality.segments) and not cast.parts:
                with self.device_turn(timer), timer(Stage.REPAIR):
                    self.repair(vocal.lead, converted, voice, options.conversion, quality, timer.seconds(Stage.CONVERT))
                report(Stage.REPAIR, 1.0)
        release_freed_memory(0)  # and what scoring and repair freed, before the mix
        mark = None if self.settings.provenance == "off" else self._mark_id(fetched, voice, cast, options)
        with timer(Stage.MIX):
            mixed = self._mix(
                stems.no_vocals,
                extras,
                converted,
                options,
                Path(out),
                work,
                voice.name,
                title or f"{Path(str(song)).stem} ({voice.info.display_name} cover)",
                quality,
                mark,
            )
        report(Stage.MIX, 1.0)
        result = CoverResult(
            watermark=mark,
            output=Path(out),
            quality=quality,
            vocal_stems=vocal,
            voice=voice.name,
            song=fetched,
            mix=mixed,
            conversion=converted,
            stems_cached=cached,
            timings=timer.in_order(),
        )
        with timer(Stage.MIX):  # the credentials are the mix's last step
            self.sign(Path(out), result, voice, cast, song_label or Path(str(song)).name, options.separation.model)
        result.timings = timer.in_order()
        return result


def _mostly(spans: list[Span], a: float, b: float) -> str:
    """The voice singing most of ``a`` to ``b`` (each voice of a unison stretch counted in full)."""
    seconds: dict[str, float] = {}
    for span in spans:
        overlap = min(b, span.end_s) - max(a, span.start_s)
        if overlap > 0:
            for name in span.voices:
                seconds[name] = seconds.get(name, 0.0) + overlap
    return max(seconds, key=lambda k: seconds[k]) if seconds else spans[0].voices[0]

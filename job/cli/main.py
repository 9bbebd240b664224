"""The ``cover`` command line.

Exit statuses: 0 success; 2 usage error; 3 bad input (song, voice name, options);
4 a model is missing, corrupt, unsafe or mismatched; 5 internal error; 6 the cover is below the
quality gate (``COVER_QUALITY=gate``, the default; the file is kept, ``--publish-below-gate``
accepts it). ``cover verify`` exits 0 for a cover whose credentials are intact and trusted, 7 when
the audio or the credentials were changed after signing, 8 when they are intact but signed by an
untrusted key, 9 when the file carries none, 10 when it carries none but its audio carries our
watermark (an AI cover of ours, re-encoded or stripped: the watermark names its manifest). With
``--json`` the result (or ``{"error": {...}}``) is printed as one JSON object on standard output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from job.cli.flags import HelpFormatter, add_model_flags, model_from_args
from job.render.workfolder import work_folder
from shared.errors import EXIT_INTERNAL, EXIT_QUALITY_GATE, CoverError, ErrorCode, no_space
from shared.logs import setup_logging
from shared.model_store import ModelStore
from shared.names import printable
from shared.options import (
    BackingMode,
    ConversionOptions,
    MixOptions,
    OutputFormat,
    SeparationOptions,
    StemOptions,
    format_for,
)
from shared.quality import QualityReport, refusal, refuses, summary
from shared.settings import Settings
from shared.stages import Stage
from shared.voices import VOICE_FILE, VoiceInfo, VoiceRights

if TYPE_CHECKING:
    from job.cli.base_models import PublicModel
    from job.render.pipeline import Cast, CoverOptions, CoverResult, Pipeline
    from shared.provenance import WatermarkReading


class StageBars:
    """One progress bar per stage on standard error (silent when ``enabled`` is False). Model loads
    (:mod:`job.render.loading`) are shown beside the open stage's bar, or on a line of their own."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[Stage, Any] = {}
        self.open: Any = None  # the bar of the stage in progress

    def __call__(self, stage: Stage, fraction: float) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(
                total=100,
                desc=f"{stage.value:<9}",
                unit="%",
                file=sys.stderr,
                bar_format="{desc} {bar} {percentage:3.0f}% {elapsed}{postfix}",
            )
        self.open = bar
        bar.n = round(100 * fraction)
        bar.refresh()
        if fraction >= 1.0:
            bar.close()
            self.open = None

    def stage(self, name: Stage) -> Callable[[float], None]:
        return lambda fraction: self(name, fraction)

    def note(self, text: str | None) -> None:
        """A model load begins (``text``: "loading ...") or ends (None)."""
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.open is not None:
            self.open.set_postfix_str(text or "", refresh=True)
        elif text:
            tqdm.write(f"{text} ...", file=sys.stderr)

    @contextmanager
    def watching_loads(self) -> Iterator[None]:
        from job.render.loading import watched_by

        with watched_by(self.note):
            yield


class DownloadBars:
    """One progress bar per downloaded file on standard error, in bytes."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, model: PublicModel, done: int, size: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(model.name)
        if bar is None:
            bar = self.bars[model.name] = tqdm(
                total=size, initial=done, desc=f"{model.name:<9}", unit="B", unit_scale=True, file=sys.stderr
            )
        bar.update(done - bar.n)
        if done >= size:
            bar.close()


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "models_dir", None):
        overrides["models_dir"] = Path(args.models_dir)
    if getattr(args, "device", None):
        overrides["device"] = args.device
    settings = Settings(**overrides)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    return settings


def _pipeline(args: argparse.Namespace, settings: Settings, one_cover: bool = False) -> Pipeline:
    from job.render.pipeline import Pipeline
    from job.render.separate.stems import StemCache
    from shared.storage import LocalStorage

    cache = None if getattr(args, "no_stem_cache", False) else StemCache(LocalStorage(settings.stem_cache_dir))
    return Pipeline(settings, ModelStore(settings.models_dir), cache, one_cover=one_cover)


def _cover_options(args: argparse.Namespace, output: str) -> CoverOptions:
    from job.render.pipeline import CoverOptions

    mix = model_from_args(MixOptions, args, exclude={"format"})
    mix.format = OutputFormat(args.format) if getattr(args, "format", None) else format_for(output)
    return CoverOptions(
        conversion=model_from_args(ConversionOptions, args),
        separation=model_from_args(SeparationOptions, args),
        mix=mix,
        stems=model_from_args(StemOptions, args),
        allow_no_vocals=getattr(args, "allow_no_vocals", False),
    )


def _print_summary(title: str, output: Path, timings: dict[str, float], extra: list[str]) -> None:
    print(f"{title}: {output}")
    for line in extra:
        print(f"  {line}")
    for stage, seconds in timings.items():
        print(f"  {stage:<9} {seconds:7.2f} s")
    print(f"  {'total':<9} {sum(timings.values()):7.2f} s")


def _emit(args: argparse.Namespace, payload: dict[str, Any], human: Callable[[], Any]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, default=str))
    else:
        human()


def _stems_line(cached: bool) -> str:
    return "stems from the cache (separation skipped)" if cached else "stems separated (now in the stem cache)"


# --- commands ----------------------------------------------------------------------------------


def _cast(args: argparse.Namespace, pipeline: Pipeline, options: CoverOptions) -> tuple[str, Cast]:
    """The main voice's name and the further voices of ``--voice a --voice b@FROM-TO ...`` and
    ``--backing-voice``, each resolved (an unknown voice fails here, before any work)."""
    from job.render.pipeline import Cast, CastPart
    from shared.cast import parse_cli_voices

    try:
        main, parts = parse_cli_voices(args.voice)
    except ValueError as exc:
        raise CoverError(ErrorCode.OPTIONS_INVALID, str(exc)) from None
    if parts and options.conversion.pitch == "auto-fit":
        raise CoverError(
            ErrorCode.OPTIONS_INVALID,
            "--pitch auto-fit moves the song's key for one voice: a duet takes semitones or auto",
        )
    if args.backing_voice and options.stems.backing is not BackingMode.CONVERT:
        raise CoverError(ErrorCode.OPTIONS_INVALID, "--backing-voice sings the backing with --backing convert only")
    cast = Cast(
        parts=[
            CastPart(voice=pipeline.store.voice(p.voice_model), ranges=[(r.start_s, r.end_s) for r in p.ranges])
            for p in parts
            if p.voice_model != main
        ],
        backing_voice=pipeline.store.voice(args.backing_voice) if args.backing_voice else None,
    )
    return main, cast


def cmd_make(args: argparse.Namespace) -> int:
    settings = _settings(args)
    pipeline = _pipeline(args, settings, one_cover=True)  # one cover, then the process ends
    options = _cover_options(args, args.output)
    main, cast = _cast(args, pipeline, options)
    voice = pipeline.store.voice(main)  # an unknown voice fails before any work
    if settings.require_rights:
        from shared.covers import check_rights

        check_rights(
            [voice.info, *(p.voice.info for p in cast.parts)]
            + ([cast.backing_voice.info] if cast.backing_voice else [])
        )
    with work_folder(settings.work_dir) as work:
        bars = StageBars(not args.json)
        with bars.watching_loads():
            result = pipeline.render(args.song, voice, Path(args.output), options, bars, work=work, cast=cast)
        if args.report:
            _keep_stems(result, work)
    refused = refuses(result.quality, settings.quality, args.publish_below_gate, settings.quality_unmeasurable)
    _emit(
        args,
        {
            "output": str(result.output),
            "voice": result.voice,
            "timings": result.timings,
            "stems_cached": result.stems_cached,
            "duration_s": result.mix.duration_s,
            "loudness_lufs": result.mix.loudness_lufs,
            "true_peak_dbtp": result.mix.true_peak_dbtp,
            "pitch_shift": result.conversion.pitch_shift,
            "parts": result.conversion.parts.model_dump(),
            "stems": result.vocal_stems.model_dump(mode="json", exclude={"lead", "backing", "room"})
            if result.vocal_stems
            else None,
            "quality": result.quality.model_dump(mode="json") if result.quality else None,
            "provenance": result.provenance.model_dump(mode="json") if result.provenance else None,
            "gate": "refused" if refused else "published",
        },
        lambda: _print_summary(
            "cover",
            result.output,
            result.timings,
            [
                f"voice {result.voice}, pitch shift {result.conversion.pitch_shift:+d} semitones"
                + "".join(f"; {p.voice.name} at {_ranges(p.ranges)}" for p in cast.parts),
                _stems_line(result.stems_cached),
                *([result.vocal_stems.said()] if result.vocal_stems else []),
                _credentials_line(result),
                f"{result.mix.duration_s:.1f} s, {result.mix.loudness_lufs:.1f} LUFS, "
                f"true peak {result.mix.true_peak_dbtp:.1f} dBTP",
                *_quality_lines(result.quality),
            ],
        ),
    )
    if args.report:
        _write_report(result, published=not refused)
    if refused:
        print(
            f"cover: the cover {refusal(result.quality) if result.quality else 'is below the quality gate'}; "
            f"it is kept at {result.output} (--publish-below-gate accepts it) [{ErrorCode.QUALITY_GATE.value}]",
            file=sys.stderr,
        )
        return EXIT_QUALITY_GATE
    return 0


VERIFY_EXIT = {"verified": 0, "tampered": 7, "untrusted": 8, "none": 9, "watermark": 10}


def _credentials_line(result: CoverResult) -> str:
    summary = result.provenance
    if summary is None:
        return "credentials: none (COVER_PROVENANCE=off, or a format C2PA cannot carry: opus)"
    kind = "DEVELOPMENT signature (this machine's key: trusted here only)" if summary.development else "signed"
    return f"credentials: {kind}, {summary.manifest_id}, by {summary.signer}"


def cmd_verify(args: argparse.Namespace) -> int:
    from job.render.credentials import identity
    from shared.provenance import verify

    path = Path(args.file)
    if not path.is_file():
        raise CoverError(ErrorCode.INPUT_NOT_FOUND, f"not found: {path}")
    s = _settings(args)
    key = s.signing_key.get_secret_value() if s.signing_key else None
    found = verify(path, identity(key, s.signing_certs, s.trusted_certs, s.state_dir).trusted_pem)
    reading = _read_watermark(path)
    found = found.with_watermark(reading) if reading is not None else found

    def human() -> None:
        print(f"{path.name}: {found.said}")
        if found.summary is not None:
            print(f"  manifest {found.summary.manifest_id}, signed by {found.summary.signer} ({found.summary.issuer})")
            print("  AI-generated: yes (a voice model re-sang the song's vocals)")
        for voice in found.voices:
            rights = voice.get("rights") or {}
            terms = f"{rights.get('voice_of')}; consent: {rights.get('consented_by')}; terms: {rights.get('terms')}"
            print(f"  voice {voice.get('name')} ({voice.get('version')}): {terms if rights else 'no rights record'}")
        if found.song:
            print(f"  song {found.song.get('id')} (audio sha256 {str(found.song.get('audio_sha256'))[:16]}...)")
        if found.verdict:
            print(f"  quality verdict: {found.verdict}")
        for problem in found.problems:
            print(f"  problem: {problem}")
        mark = found.watermark
        if mark is not None and mark.found:
            agrees = {True: ", the manifest's", False: ", NOT the manifest's", None: ""}[mark.matches_manifest]
            print(f"  watermark: {mark.id}{agrees} (sync z {mark.sync_z:.1f})")
        elif mark is not None:
            short = f" ({mark.seconds:.1f} s of audio: the mark is read from 10 s)" if mark.seconds < 10 else ""
            print(f"  watermark: none heard{short}")

    _emit(args, found.model_dump(mode="json"), human)
    return VERIFY_EXIT[found.status.value]


def _read_watermark(path: Path) -> WatermarkReading | None:
    """The watermark in ``path``'s audio (decoded to 44.1 kHz mono by FFmpeg); None where it does
    not decode (nothing was read)."""
    from job.render.media.audio import decode
    from job.render.mix.watermark import RATE, detect
    from shared.provenance import WatermarkReading

    try:
        audio, _ = decode(path, RATE, 1)
    except CoverError:
        return None
    found = detect(audio[0])
    return WatermarkReading(
        found=found.found, id=found.hex_id, sync_z=round(found.sync_z, 2), seconds=round(found.seconds, 2)
    )


def _keep_stems(result: CoverResult, work: Path) -> None:
    """The stems a cover was made from, as MP3s in ``COVER.stems/`` beside the report page (for its
    players): the lead as separated and as converted, the backing and the removed room."""
    from urllib.parse import quote

    from job.render.media import ffmpeg

    stems, quality = result.vocal_stems, result.quality
    if stems is None or quality is None or quality.stems is None:
        return
    folder = result.output.with_name(result.output.stem + ".stems")
    folder.mkdir(exist_ok=True)
    wanted = {
        "lead (separated)": stems.lead,
        "lead (converted)": result.conversion.path,
        "backing": stems.backing,
        "room (removed reverb)": stems.room,
    }
    for name, path in wanted.items():
        if path is None or not path.is_file():
            continue
        target = folder / (name.split(" ")[0] + ("-converted" if "converted" in name else "") + ".mp3")
        ffmpeg.run([*ffmpeg.input_args(path), "-c:a", "libmp3lame", "-q:a", "5", "-y", str(target)])
        quality.stems.files[name] = f"{quote(folder.name)}/{target.name}"


def _ranges(ranges: list[tuple[float, float]]) -> str:
    return ", ".join(f"{a:g}-{b:g} s" for a, b in ranges)


def _write_report(result: CoverResult, published: bool) -> Path | None:
    """``COVER.report.html`` beside the cover, its player naming the cover's file (keep the two together)."""
    from job.render.quality.report_page import render_page
    from shared.options import FORMATS

    if result.quality is None:
        return None
    path = result.output.with_name(result.output.stem + ".report.html")
    content_type = FORMATS[result.mix.format].content_type
    title = f"{Path(result.song.source).stem} ({result.voice} cover)"
    from urllib.parse import quote

    page = render_page(result.quality, title, quote(result.output.name), content_type, published=published)
    path.write_text(page)
    print(f"report: {path}", file=sys.stderr)
    return path


def _quality_lines(quality: QualityReport | None) -> list[str]:
    if quality is None:
        return ["quality not measured (COVER_QUALITY=off)"]
    lines = [f"quality: {summary(quality)}", f"  measured in {quality.measured_s:.1f} s"]
    if quality.repair is not None:
        lines.append(f"  repair: {quality.repair.summary()}")
    return lines


def cmd_separate(args: argparse.Namespace) -> int:
    from job.render.timing import StageTimer

    settings = _settings(args)
    pipeline = _pipeline(args, settings)
    bars = StageBars(not args.json)
    timer = StageTimer()
    out_dir = Path(args.output)
    with work_folder(settings.work_dir) as work, bars.watching_loads():
        with timer(Stage.FETCH):
            song = pipeline.fetch(args.song, work)
        with timer(Stage.SEPARATE):
            stems, cached = pipeline.separate(
                song, out_dir, model_from_args(SeparationOptions, args), bars.stage(Stage.SEPARATE)
            )
    _emit(
        args,
        {
            "vocals": str(stems.vocals),
            "no_vocals": str(stems.no_vocals),
            "stems_cached": cached,
            "timings": timer.timings,
        },
        lambda: _print_summary(
            "stems",
            out_dir,
            timer.timings,
            [f"vocals    {stems.vocals}", f"no_vocals {stems.no_vocals}", _stems_line(cached)],
        ),
    )
    return 0


def cmd_pitch(args: argparse.Namespace) -> int:
    """The tracker's own output for ``args.file`` decoded to 16 kHz mono: no high-pass, no median
    filter, no range limit of the engine's (what a cover's pitch pass then smooths)."""
    import numpy as np

    from job.render.loading import watched_by
    from job.render.media.audio import CONTENT_SAMPLE_RATE, decode
    from job.render.notes import note_name
    from job.render.rvc.pitch import HOP

    method = model_from_args(ConversionOptions, args).f0_method  # checked, said in the flag's words
    path = Path(args.file)
    if not path.is_file():
        raise CoverError(ErrorCode.INPUT_NOT_FOUND, f"not found: {path}")
    settings = _settings(args)
    audio = decode(path, CONTENT_SAMPLE_RATE, 1)[0][0]
    say = _status(args)
    with watched_by(lambda text: say(f"{text} ...") if text else None):
        f0 = _pipeline(args, settings).converter.hear_pitch(audio, method)
    hop_s = HOP / CONTENT_SAMPLE_RATE
    voiced = f0[f0 > 0]

    def human() -> None:
        print(f"{path.name}: {len(f0)} frames of {hop_s * 1000:.0f} ms ({method}), {voiced.size} voiced")
        if voiced.size:
            low, mid, high = np.percentile(voiced, [5, 50, 95])
            span = f"{note_name(low)} to {note_name(high)}"
            print(f"  median {mid:.1f} Hz ({note_name(mid)}), 5th to 95th percentile {span}")

    _emit(args, {"f0_method": method, "hop_s": hop_s, "f0_hz": [round(float(v), 3) for v in f0]}, human)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from job.render.timing import StageTimer

    settings = _settings(args)
    pipeline = _pipeline(args, settings)
    voice = pipeline.store.voice(args.voice)
    bars = StageBars(not args.json)
    timer = StageTimer()
    with work_folder(settings.work_dir) as work, bars.watching_loads():
        with timer(Stage.FETCH):
            song = pipeline.fetch(args.vocals, work)
        with timer(Stage.CONVERT):
            result = pipeline.convert(
                song.wav, voice, Path(args.output), model_from_args(ConversionOptions, args), bars.stage(Stage.CONVERT)
            )
    _emit(
        args,
        {
            "output": str(result.path),
            "timings": timer.timings,
            "parts": result.parts.model_dump(),
            "pitch_shift": result.pitch_shift,
            "sample_rate": result.sample_rate,
        },
        lambda: _print_summary(
            "converted vocals",
            result.path,
            timer.timings,
            [f"{result.duration_s:.1f} s at {result.sample_rate} Hz, pitch shift {result.pitch_shift:+d}"],
        ),
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from job.devkit import demo
    from job.render.pipeline import CoverOptions

    settings = _settings(args)
    start = time.perf_counter()
    if not args.json:
        print(f"preparing demo models in {settings.models_dir} (random weights, real formats)", file=sys.stderr)
    demo.write_models(settings.models_dir, size=args.size)
    song = demo.write_demo_song(settings.work_dir / "demo-song.wav", seconds=args.seconds)
    prepare = time.perf_counter() - start
    pipeline = _pipeline(args, settings)
    out = Path(args.output)
    # the demo's models have random weights: its separator may find no singing, and its voice cannot
    # pass the gate; the demo renders and writes the cover anyway, and says so
    options = CoverOptions(allow_no_vocals=True)
    options.mix.format = format_for(args.output)
    with work_folder(settings.work_dir) as work:
        voice = pipeline.store.voice(demo.DEMO_VOICE)
        bars = StageBars(not args.json)
        with bars.watching_loads():
            result = pipeline.render(song, voice, out, options, bars, work=work)
    timings = {"prepare": prepare, **result.timings}
    report_page = _write_report(result, published=True)  # the demo accepts covers below the gate
    _emit(
        args,
        {
            "output": str(out),
            "song": str(song),
            "timings": timings,
            "stems_cached": result.stems_cached,
            "quality": result.quality.model_dump(mode="json") if result.quality else None,
            "report": str(report_page) if report_page else None,
        },
        lambda: _print_summary(
            "demo cover",
            out,
            timings,
            [
                f"song {song} ({result.song.duration_s:.0f} s)",
                _stems_line(result.stems_cached),
                _credentials_line(result),
                "the demo voice is untrained (random weights): expect noise, not singing",
                *_quality_lines(result.quality),
                *(
                    [
                        "not passed, as an untrained voice through random-weight models must not: written anyway "
                        "(the demo accepts it)"
                    ]
                    if result.quality is not None and not result.quality.passed
                    else []
                ),
            ],
        ),
    )
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    voices = ModelStore(_settings(args).models_dir).local_voices()
    if args.json:  # a voice's 256-number reference embedding only when asked for
        leave_out = None if args.embeddings else {"reference_embedding"}
        print(json.dumps([v.model_dump(mode="json", exclude=leave_out) for v in voices]))
    elif not voices:
        print("no voices installed; add one with: cover models add FILE_OR_URL")
    else:
        for v in voices:
            flags = (
                ("pitch" if v.f0 else "no-pitch")
                + (", index" if v.has_index else "")
                + (", UNTRAINED DEMO" if v.untrained_demo else "")
            )
            print(f"{v.name:<24} {v.rvc_version} {v.sample_rate // 1000}k  {flags}  {printable(v.display_name)}")
    return 0


def cmd_models_add(args: argparse.Namespace) -> int:
    from job.cli.voices import MAX_VOICE_BYTES, add_voice
    from job.render.media.download import UrlPolicy

    settings = _settings(args)
    if args.kind or args.mdx_params or args.source.lower().split("?")[0].endswith(".onnx"):
        return _add_separation_model(args, settings)
    policy = UrlPolicy.from_settings(settings, MAX_VOICE_BYTES)
    store = ModelStore(settings.models_dir)
    say = _status(args)
    say(f"adding {args.source}: reading and checking the checkpoint ...")
    sung = None
    if args.range:
        from job.render.notes import parse_pitch

        try:
            low, high = sorted(parse_pitch(v) for v in args.range)
        except ValueError as exc:
            raise CoverError(ErrorCode.OPTIONS_INVALID, f"--range: {exc}") from None
        sung = (low, high)
    info = add_voice(
        store, args.source, args.name, args.replace, vocal_range_hz=sung, policy=policy, rights=_rights(args)
    )
    say(
        f"{info.name}: computing its reference embedding (the voice sings a reference phrase: the base models "
        "load and convert it, 20 to 40 s on a laptop's CPU) ..."
    )
    from job.render.loading import watched_by

    with watched_by(lambda text: say(f"  {text} ...") if text else None):
        info, note = _add_reference(args, settings, info)
    _emit(
        args,
        info.model_dump(mode="json"),
        lambda: print(
            f"added voice {info.name} ({info.rvc_version}, {info.sample_rate} Hz, "
            f"{'with' if info.has_index else 'no'} index); {note}"
        ),
    )
    return 0


RIGHTS_FLAGS = ("voice_of", "consented_by", "consented_on", "terms", "evidence", "restriction")


def _rights(args: argparse.Namespace) -> VoiceRights | None:
    """The rights record of ``--rights FILE.json`` or of the ``--voice-of ...`` flags (None: neither)."""
    from pydantic import ValidationError

    flags = {name: getattr(args, name) for name in RIGHTS_FLAGS if getattr(args, name)}
    if args.rights and flags:
        raise CoverError(ErrorCode.OPTIONS_INVALID, "--rights FILE or the --voice-of ... flags, not both")
    try:
        if args.rights:
            return VoiceRights.model_validate_json(Path(args.rights).read_text())
        if flags:
            flags["restrictions"] = flags.pop("restriction", [])
            return VoiceRights.model_validate(flags)
    except OSError as exc:
        raise CoverError(ErrorCode.INPUT_NOT_FOUND, f"--rights: {exc}") from None
    except ValidationError as exc:
        said = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'rights'}: {e['msg']}" for e in exc.errors())
        raise CoverError(ErrorCode.OPTIONS_INVALID, f"rights record: {said}") from None
    return None


def _add_separation_model(args: argparse.Namespace, settings: Settings) -> int:
    from job.cli.separation_models import add_separation_model
    from job.render.media.download import UrlPolicy
    from job.render.separate.mdx_params import MdxKind

    if not args.kind:
        raise CoverError(ErrorCode.OPTIONS_INVALID, "an MDX-Net model (.onnx) needs --kind karaoke or --kind dereverb")
    if args.clips or args.range or args.name:
        raise CoverError(ErrorCode.OPTIONS_INVALID, "--clips, --range and --name are for voices, not --kind models")
    _status(args)(f"adding {args.source}: checking the {args.kind} model ...")
    info = add_separation_model(
        store=ModelStore(settings.models_dir),
        source=args.source,
        kind=MdxKind(args.kind),
        params_text=args.mdx_params,
        replace=args.replace,
        policy=UrlPolicy.from_settings(settings),
    )
    p = info.params
    _emit(
        args,
        info.model_dump(mode="json"),
        lambda: print(
            f"added {info.kind.value} model {info.name} (n_fft {p.n_fft}, dim_f {p.dim_f}, dim_t {p.dim_t}, "
            f"compensate {p.compensate:g}, primary {p.primary}; parameters {info.params_from})"
        ),
    )
    return 0


def _status(args: argparse.Namespace) -> Callable[[str], None]:
    """A line on standard error saying what a long step is doing (not with --json)."""
    if getattr(args, "json", False):
        return lambda line: None
    return lambda line: print(line, file=sys.stderr, flush=True)


def _add_reference(args: argparse.Namespace, settings: Settings, info: VoiceInfo) -> tuple[VoiceInfo, str]:
    """The voice's reference embedding, into its voice.json: of ``--clips`` (its training audio) when
    given, else of the reference phrase it sings; later, when the base models are not installed yet."""
    from job.render.media.audio import CONTENT_SAMPLE_RATE, decode

    pipeline = _pipeline(args, settings)
    try:
        voice = pipeline.store.voice(info.name)
        clips = [decode(Path(clip), CONTENT_SAMPLE_RATE, 1)[0][0] for clip in args.clips or []]
        embedding = pipeline.reference_embedding(voice, clips)
    except CoverError as error:
        if error.code is not ErrorCode.MODEL_MISSING:
            raise
        return info, "reference embedding: at its first cover (the base models are not installed yet)"
    info = info.model_copy(update={"reference_embedding": embedding, **_measured_range(info, clips)})
    (pipeline.store.voice_folder(info.name) / VOICE_FILE).write_text(info.model_dump_json(indent=2))
    source = f"{len(args.clips)} training clips" if args.clips else "the reference phrase"
    return info, f"reference embedding from {source}"


def _measured_range(info: VoiceInfo, clips: list) -> dict[str, object]:
    """The voice's sung range and median from its own clips, unless ``--range`` named one."""
    from job.render.rvc.pitch import sung_range

    measured = sung_range(clips) if clips and info.vocal_range_hz is None else None
    return {} if measured is None else {"vocal_range_hz": measured[:2], "vocal_median_hz": measured[2]}


def cmd_models_verify(args: argparse.Namespace) -> int:
    from job.cli.voices import verify_store

    store = ModelStore(_settings(args).models_dir)
    known = {v.name for v in store.local_voices()}
    unknown = [name for name in args.names or [] if name not in known]
    if unknown:  # an unknown name is the caller's mistake (exit 3), not a broken voice (exit 4)
        raise CoverError(
            ErrorCode.VOICE_UNKNOWN,
            f"no voice {', '.join(unknown)} in the store (known: {', '.join(sorted(known)) or 'none'})",
        )
    reports = verify_store(store, args.names)
    _emit(
        args,
        {"voices": [r.model_dump() for r in reports]},
        lambda: [print(f"{r.name:<24} {'ok' if r.ok else 'FAILED: ' + '; '.join(r.problems)}") for r in reports],
    )
    if any(not r.ok for r in reports):
        return 4
    return 0


def _bucket_store(args: argparse.Namespace) -> ModelStore:
    from shared.storage import make_storage

    settings = _settings(args)
    return ModelStore(settings.models_dir, make_storage(settings))


def cmd_models_push(args: argparse.Namespace) -> int:
    store = _bucket_store(args)
    manifest = store.push()
    voices = [v.name for v in store.local_voices()]
    _emit(
        args,
        {"files": sorted(manifest.files), "voices": voices},
        lambda: print(
            f"pushed {len(manifest.files)} base-model files and {len(voices)} voices "
            f"to {store.storage.bucket if store.storage else '?'}"
        ),
    )
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from job.cli.base_models import fetch_base_models
    from job.render.media.download import UrlPolicy

    settings = _settings(args)
    report = fetch_base_models(
        store=ModelStore(settings.models_dir),
        policy=UrlPolicy.from_settings(settings),
        names=args.names,
        mirror=settings.models_mirror,
        progress=None if args.json else DownloadBars(),
    )
    _emit(
        args,
        report.model_dump(),
        lambda: print(
            f"base models fetched: {', '.join(report.fetched) or 'none'}; "
            f"already in the store: {', '.join(report.unchanged) or 'none'}"
        ),
    )
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    store = _bucket_store(args)
    report = store.sync()
    names = [] if args.base_only else args.voices or [v.name for v in store.voices()]
    for name in names:
        store.voice(name)
    _emit(
        args,
        {**report.model_dump(), "voices": names},
        lambda: print(
            f"base models: {len(report.downloaded)} downloaded, {len(report.unchanged)} unchanged, "
            f"{len(report.removed)} removed; voices in the store: {', '.join(names) or 'none'}"
        ),
    )
    return 0


# --- parser ------------------------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("melodia-cover")
    except PackageNotFoundError:  # a checkout run without installing
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - reads best top to bottom

    formatter = HelpFormatter
    parser = argparse.ArgumentParser(prog="cover", description="AI covers on one machine.", formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--models-dir", help="model store (default: $COVER_MODELS_DIR or the user cache)")
    common.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: $COVER_DEVICE or auto)")
    common.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument(
        "--no-stem-cache",
        action="store_true",
        help="separate and analyse the vocals again even when the stems and the analysis are cached "
        "($COVER_STEM_CACHE_DIR), and keep neither",
    )
    conv = argparse.ArgumentParser(add_help=False)
    add_model_flags(conv, ConversionOptions, "conversion")
    sep = argparse.ArgumentParser(add_help=False)
    add_model_flags(sep, SeparationOptions, "separation", rename={"model": "separator"})

    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make", parents=[common, cache, conv, sep], help="render a cover", formatter_class=formatter)
    p.add_argument("song", help="audio file or http(s) URL")
    p.add_argument(
        "--voice",
        required=True,
        action="append",
        metavar="NAME[@FROM-TO,...]",
        help="voice name (see `cover models list`); repeat for a duet: --voice a --voice b@32.5-61 gives 32.5 to 61 s "
        "of the lead to b and the rest to a (the same range to two voices: unison)",
    )
    p.add_argument(
        "--backing-voice",
        metavar="NAME",
        help="the voice that sings the backing with --backing convert (default: the main voice)",
    )
    add_model_flags(p, StemOptions, "lead and backing (with the store's MDX-Net models)")
    p.add_argument("-o", "--output", required=True, help="the cover's file")
    add_model_flags(p, MixOptions, "mix", exclude={"format"})
    p.add_argument(
        "--format",
        choices=[f.value for f in OutputFormat],
        help="output format (default: from the output's extension, else mp3)",
    )
    p.add_argument("--report", action="store_true", help="also write COVER.report.html, the quality report page")
    p.add_argument(
        "--publish-below-gate",
        action="store_true",
        help="exit 0 even when the cover's quality scores are below the gate (the file is written either way)",
    )
    p.add_argument(
        "--allow-no-vocals",
        action="store_true",
        help="render even when the separated vocals hold no singing (the gate stops such a song before "
        "conversion: input.no_vocals, exit 3)",
    )
    p.set_defaults(func=cmd_make)

    p = sub.add_parser(
        "separate",
        parents=[common, cache, sep],
        help="split a song into vocals and no_vocals",
        formatter_class=formatter,
    )
    p.add_argument("song", help="audio file or http(s) URL")
    p.add_argument("-o", "--output", required=True, help="folder for vocals.wav and no_vocals.wav")
    p.set_defaults(func=cmd_separate)

    p = sub.add_parser(
        "convert", parents=[common, conv], help="convert a vocals file with a voice", formatter_class=formatter
    )
    p.add_argument("vocals", help="audio file of vocals alone")
    p.add_argument("--voice", required=True, help="voice name (see `cover models list`)")
    p.add_argument("-o", "--output", required=True, help="WAV file")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "verify",
        parents=[common],
        help="check a cover's Content Credentials: intact, trusted, and what they say",
        formatter_class=formatter,
    )
    p.add_argument("file", help="the cover (mp3, m4a, flac or wav)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "pitch", parents=[common], help="the pitch track a tracker hears in a file", formatter_class=formatter
    )
    p.add_argument("file", help="audio file (vocals alone hear best)")
    p.add_argument(
        "--f0-method",
        default="rmvpe",
        help="rmvpe, crepe, crepe-tiny, harvest or pm, or several joined by '+' (e.g. rmvpe+crepe-tiny)",
    )
    p.set_defaults(func=cmd_pitch)

    p = sub.add_parser(
        "demo", parents=[common, cache], help="write demo models and song, render a cover", formatter_class=formatter
    )
    p.add_argument("-o", "--output", default="demo-cover.mp3", help="the cover's file")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the generated demo song")
    p.add_argument("--size", choices=["real", "tiny"], default="real", help="model sizes (tiny: for tests)")
    p.set_defaults(func=cmd_demo)

    models = sub.add_parser("models", help="manage the model store").add_subparsers(
        dest="models_command", required=True
    )
    p = models.add_parser("list", parents=[common], help="list the local voices")
    p.add_argument("--embeddings", action="store_true", help="with --json, include each voice's reference embedding")
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser(
        "add",
        parents=[common],
        help="add a voice (.pth, folder or .zip) or an MDX-Net stem model (.onnx with --kind), path or URL",
        formatter_class=formatter,
    )
    p.add_argument("source", help="a .pth, a folder, a .zip or an .onnx, as a path or an http(s) URL")
    p.add_argument("--name", help="the voice's name (default: from the file name)")
    p.add_argument("--replace", action="store_true", help="replace a voice of the same name (or the kind's model)")
    p.add_argument(
        "--kind",
        choices=["karaoke", "dereverb"],
        help="an MDX-Net .onnx: karaoke (splits lead from backing vocals) or dereverb (the lead's room)",
    )
    p.add_argument(
        "--mdx-params",
        metavar="N=V,...",
        help="the .onnx's parameters when it is not a model we know, e.g. "
        "n_fft=5120,dim_f=2048,dim_t=256,compensate=1.065,primary=instrumental (primary: vocals, instrumental, "
        "reverb or no-reverb)",
    )
    p.add_argument(
        "--clips",
        nargs="+",
        metavar="AUDIO",
        help="the voice's training audio, for its reference embedding (default: the phrase it sings)",
    )
    p.add_argument(
        "--range",
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="the voice's sung range, in Hz or notes (e.g. G2 E4), for --pitch auto and auto-fit "
        "(default: measured from --clips)",
    )
    rights = p.add_argument_group("the voice's rights record (COVER_REQUIRE_RIGHTS refuses a voice without one)")
    rights.add_argument("--rights", metavar="FILE.json", help="the whole record as JSON (the fields below)")
    rights.add_argument("--voice-of", help="whose voice this is")
    rights.add_argument("--consented-by", help="who consented to it being modelled and used")
    rights.add_argument("--consented-on", metavar="YYYY-MM-DD", help="when")
    rights.add_argument("--terms", help="under what terms: a licence (SPDX id) or the agreement")
    rights.add_argument("--evidence", help="where the consent is recorded (document id or URL)")
    rights.add_argument(
        "--restriction", action="append", metavar="TEXT", help="what it may not be used for (repeat for several)"
    )
    p.set_defaults(func=cmd_models_add)
    p = models.add_parser("verify", parents=[common], help="check hashes and loadability")
    p.add_argument("names", nargs="*", help="voices to check (default: all)")
    p.set_defaults(func=cmd_models_verify)
    p = models.add_parser(
        "push", parents=[common], help="upload the local store to the bucket (models/ with its manifest, voices/)"
    )
    p.set_defaults(func=cmd_models_push)
    p = models.add_parser(
        "fetch",
        parents=[common],
        help="download the public base models (HuBERT, RMVPE, htdemucs; FCPE when named), each checked against its "
        "pinned sha256",
    )
    p.add_argument(
        "names", nargs="*", metavar="NAME", help="hubert, rmvpe, htdemucs or fcpe (default: all but the optional fcpe)"
    )
    p.set_defaults(func=cmd_models_fetch)
    p = models.add_parser(
        "pull",
        parents=[common],
        help="make the local base models equal to the bucket's, and fetch voices (hash-checked)",
    )
    p.add_argument("voices", nargs="*", help="voices to fetch (default: every voice in the bucket)")
    p.add_argument(
        "--base-only", action="store_true", help="the base models only, no voice (what the job image bakes in)"
    )
    p.set_defaults(func=cmd_models_pull)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging("WARNING")
    args = build_parser().parse_args(argv)
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # here, where a reader gone early can be told apart from an error
        return status
    except BrokenPipeError:  # the reader went away (`cover models list --json | head`): not an error
        _quiet_stdout()
        return 0
    except CoverError as exc:
        _report_error(args, exc)
        return exc.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:  # installed without the job's dependencies (the core set alone)
        from job.cli import missing_extra

        return missing_extra(exc)
    except Exception as exc:
        error = no_space(exc)  # a full disk, whoever's writer met it
        _report_error(args, error or CoverError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        if os.environ.get("COVER_DEBUG"):
            raise
        return error.exit_status if error else EXIT_INTERNAL


def _quiet_stdout() -> None:
    """Point standard output at /dev/null, so that flushing it at exit raises nothing more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (in-process tests)
        pass
    finally:
        os.close(devnull)


def _report_error(args: argparse.Namespace, exc: CoverError) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": exc.code.value, "message": exc.message, "retryable": exc.retryable}}))
    print(f"cover: error: {exc.message} [{exc.code.value}]", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

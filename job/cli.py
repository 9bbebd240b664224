"""The ``cover`` command line.

Exit statuses: 0 success; 2 usage error; 3 bad input (song, voice name, options);
4 a model is missing, corrupt, unsafe or mismatched; 5 internal error. With ``--json`` the
result (or ``{"error": {...}}``) is printed as one JSON object on standard output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from shared.errors import EXIT_INTERNAL, CoverError, ErrorCode
from shared.settings import Settings


class StageBars:
    """One progress bar per stage on standard error (silent when ``enabled`` is False)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, fraction: float) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=100, desc=f"{stage:<9}", unit="%", file=sys.stderr,
                                          bar_format="{desc} {bar} {percentage:3.0f}% {elapsed}")
        bar.n = round(100 * fraction)
        bar.refresh()
        if fraction >= 1.0:
            bar.close()

    def stage(self, name: str):
        return lambda fraction: self(name, fraction)


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "models_dir", None):
        overrides["models_dir"] = Path(args.models_dir)
    if getattr(args, "device", None):
        overrides["device"] = args.device
    settings = Settings(**overrides)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    return settings


def _pitch(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("pitch is a whole number of semitones or 'auto'") from None


def _conversion_options(args: argparse.Namespace):
    from job.rvc.engine import ConversionOptions

    fields = {"pitch": args.pitch, "f0_method": args.f0_method, "index_rate": args.index_rate,
              "filter_radius": args.filter_radius, "rms_mix_rate": args.rms_mix_rate, "protect": args.protect,
              "seed": args.seed}
    return ConversionOptions(**{k: v for k, v in fields.items() if v is not None})


def _separation_options(args: argparse.Namespace):
    from job.separate import SeparationOptions

    fields = {"model": args.separator, "segment": args.segment, "overlap": args.overlap, "shifts": args.shifts}
    return SeparationOptions(**{k: v for k, v in fields.items() if v is not None},
                             device=args.device or "auto")


def _print_summary(title: str, output: Path, timings: dict[str, float], extra: list[str]) -> None:
    print(f"{title}: {output}")
    for line in extra:
        print(f"  {line}")
    for stage, seconds in timings.items():
        print(f"  {stage:<9} {seconds:7.2f} s")
    print(f"  {'total':<9} {sum(timings.values()):7.2f} s")


def _emit(args: argparse.Namespace, payload: dict, human: Any) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, default=str))
    else:
        human()


# --- commands ----------------------------------------------------------------------------------

def cmd_make(args: argparse.Namespace) -> int:
    from job.mix import MixOptions
    from job.pipeline import CoverOptions, Pipeline

    settings = _settings(args)
    options = CoverOptions(conversion=_conversion_options(args), separation=_separation_options(args),
                           mix=MixOptions(format=args.format or _format_from(args.output)))
    out = Path(args.output)
    result = Pipeline(settings).render(args.song, args.voice, out, options, StageBars(not args.json))
    _emit(args, {"output": str(result.output), "voice": result.voice, "timings": result.timings,
                 "duration_s": result.mix.duration_s, "loudness_lufs": result.mix.loudness_lufs,
                 "true_peak_dbtp": result.mix.true_peak_dbtp, "pitch_shift": result.conversion.pitch_shift,
                 "parts": result.conversion.parts.model_dump()},
          lambda: _print_summary("cover", result.output, result.timings, [
              f"voice {result.voice}, pitch shift {result.conversion.pitch_shift:+d} semitones",
              f"{result.mix.duration_s:.1f} s, {result.mix.loudness_lufs:.1f} LUFS, "
              f"true peak {result.mix.true_peak_dbtp:.1f} dBTP"]))
    return 0


def _format_from(output: str) -> str:
    suffix = Path(output).suffix.lower().lstrip(".")
    return suffix if suffix in {"mp3", "opus", "m4a", "flac", "wav"} else "mp3"


def cmd_separate(args: argparse.Namespace) -> int:
    from job.pipeline import Pipeline

    settings = _settings(args)
    pipeline = Pipeline(settings)
    bars = StageBars(not args.json)
    timings = {}
    out_dir = Path(args.output)
    with pipeline.workdir() as work:
        start = time.perf_counter()
        song = pipeline.fetch(args.song, work)
        timings["fetch"] = time.perf_counter() - start
        start = time.perf_counter()
        stems = pipeline.separate(song, out_dir, _separation_options(args), bars.stage("separate"))
        timings["separate"] = time.perf_counter() - start
    _emit(args, {"vocals": str(stems.vocals), "no_vocals": str(stems.no_vocals), "timings": timings},
          lambda: _print_summary("stems", out_dir, timings, [f"vocals    {stems.vocals}",
                                                             f"no_vocals {stems.no_vocals}"]))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from job.convert import convert_vocals
    from job.pipeline import Pipeline

    settings = _settings(args)
    pipeline = Pipeline(settings)
    bars = StageBars(not args.json)
    timings = {}
    with pipeline.workdir() as work:
        start = time.perf_counter()
        song = pipeline.fetch(args.vocals, work)
        timings["fetch"] = time.perf_counter() - start
        start = time.perf_counter()
        result = convert_vocals(pipeline.converter, song.wav, args.voice, Path(args.output),
                                _conversion_options(args), bars.stage("convert"))
        timings["convert"] = time.perf_counter() - start
    _emit(args, {"output": str(result.path), "timings": timings, "parts": result.parts.model_dump(),
                 "pitch_shift": result.pitch_shift, "sample_rate": result.sample_rate},
          lambda: _print_summary("converted vocals", result.path, timings,
                                 [f"{result.duration_s:.1f} s at {result.sample_rate} Hz, "
                                  f"pitch shift {result.pitch_shift:+d}"]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from job import demo

    settings = _settings(args)
    bars = StageBars(not args.json)
    start = time.perf_counter()
    if not args.json:
        print(f"preparing demo models in {settings.models_dir} (random weights, real formats)", file=sys.stderr)
    demo.write_models(settings.models_dir, size=args.size)
    song = demo.write_demo_song(settings.work_dir / "demo-song.wav", seconds=args.seconds)
    prepare = time.perf_counter() - start
    from job.pipeline import CoverOptions, Pipeline

    out = Path(args.output)
    from job.mix import MixOptions

    options = CoverOptions(mix=MixOptions(format=_format_from(args.output)))
    result = Pipeline(settings).render(song, demo.DEMO_VOICE, out, options, bars)
    timings = {"prepare": prepare, **result.timings}
    _emit(args, {"output": str(out), "song": str(song), "timings": timings},
          lambda: _print_summary("demo cover", out, timings, [
              f"song {song} ({result.song.duration_s:.0f} s)",
              "the demo voice is untrained (random weights): expect noise, not singing"]))
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from shared.voices import LocalVoiceStore

    voices = LocalVoiceStore(_settings(args).models_dir).list()
    if args.json:
        print(json.dumps([v.model_dump(mode="json") for v in voices]))
    elif not voices:
        print("no voices installed; add one with: cover models add FILE_OR_URL")
    else:
        for v in voices:
            flags = ("pitch" if v.f0 else "no-pitch") + (", index" if v.has_index else "") + \
                    (", UNTRAINED DEMO" if v.untrained_demo else "")
            print(f"{v.name:<24} {v.rvc_version} {v.sample_rate // 1000}k  {flags}  {v.display_name}")
    return 0


def cmd_models_add(args: argparse.Namespace) -> int:
    from job.model_store import add_voice

    info = add_voice(_settings(args).models_dir, args.source, args.name, args.replace)
    _emit(args, info.model_dump(mode="json"),
          lambda: print(f"added voice {info.name} ({info.rvc_version}, {info.sample_rate} Hz, "
                        f"{'with' if info.has_index else 'no'} index)"))
    return 0


def cmd_models_verify(args: argparse.Namespace) -> int:
    from job.model_store import verify_store

    reports = verify_store(_settings(args).models_dir, args.names)
    _emit(args, {"voices": [r.model_dump() for r in reports]},
          lambda: [print(f"{r.name:<24} {'ok' if r.ok else 'FAILED: ' + '; '.join(r.problems)}") for r in reports])
    if any(not r.ok for r in reports):
        return 4
    return 0


# --- parser ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cover", description="AI covers on one machine.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--models-dir", help="model store (default: $COVER_MODELS_DIR or the user cache)")
    common.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    common.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    conv = argparse.ArgumentParser(add_help=False)
    conv.add_argument("--pitch", type=_pitch, help="semitones, or 'auto' (whole octaves to the voice's range)")
    conv.add_argument("--f0-method", choices=["rmvpe", "crepe", "crepe-tiny", "harvest", "pm"])
    conv.add_argument("--index-rate", type=float)
    conv.add_argument("--filter-radius", type=int)
    conv.add_argument("--rms-mix-rate", type=float)
    conv.add_argument("--protect", type=float)
    conv.add_argument("--seed", type=int)
    sep = argparse.ArgumentParser(add_help=False)
    sep.add_argument("--separator", help="Demucs model name (default htdemucs)")
    sep.add_argument("--segment", type=float)
    sep.add_argument("--overlap", type=float)
    sep.add_argument("--shifts", type=int)

    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make", parents=[common, conv, sep], help="render a cover")
    p.add_argument("song", help="audio file or http(s) URL")
    p.add_argument("--voice", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--format", choices=["mp3", "opus", "m4a", "flac", "wav"])
    p.set_defaults(func=cmd_make)

    p = sub.add_parser("separate", parents=[common, sep], help="split a song into vocals and no_vocals")
    p.add_argument("song")
    p.add_argument("-o", "--output", required=True, help="folder for vocals.wav and no_vocals.wav")
    p.set_defaults(func=cmd_separate)

    p = sub.add_parser("convert", parents=[common, conv], help="convert a vocals file with a voice")
    p.add_argument("vocals")
    p.add_argument("--voice", required=True)
    p.add_argument("-o", "--output", required=True, help="WAV file")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", parents=[common], help="write demo models and song, render a cover")
    p.add_argument("-o", "--output", default="demo-cover.mp3")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--size", choices=["real", "tiny"], default="real", help="model sizes (tiny: for tests)")
    p.set_defaults(func=cmd_demo)

    models = sub.add_parser("models", help="manage the voice store").add_subparsers(dest="models_command", required=True)
    p = models.add_parser("list", parents=[common])
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser("add", parents=[common], help="add a .pth, a folder or a .zip (path or URL)")
    p.add_argument("source")
    p.add_argument("--name")
    p.add_argument("--replace", action="store_true")
    p.set_defaults(func=cmd_models_add)
    p = models.add_parser("verify", parents=[common], help="check hashes and loadability")
    p.add_argument("names", nargs="*")
    p.set_defaults(func=cmd_models_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("COVER_LOG_LEVEL", "WARNING"),
                        format='{"level":"%(levelname)s","logger":"%(name)s","message":"%(message)s"}')
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CoverError as exc:
        _report_error(args, exc)
        return exc.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence prints, never a traceback dump
        _report_error(args, CoverError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        if os.environ.get("COVER_DEBUG"):
            raise
        return EXIT_INTERNAL


def _report_error(args: argparse.Namespace, exc: CoverError) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": exc.code.value, "message": exc.message, "retryable": exc.retryable}}))
    print(f"cover: error: {exc.message} [{exc.code.value}]", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

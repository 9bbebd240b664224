"""Pipeline benchmark: per stage and end to end, with baselines measured in the same run.

    python -m bench.pipeline [--songs 30,210,600] [--skip-baseline]     (make bench runs this)

Each row runs in its own process (clean peak-memory numbers). Inputs are generated under
``bench/.work``: demo songs of the given lengths and real-size models with random weights in the
real formats. Rows:

* separate: our Separator (default options), the same with every optimisation off (fp32,
  reference kernels: Demucs' own arithmetic, the before row) and, as the baseline, the ``demucs``
  command line with its default options on the same file and models;
* convert: 60 s of vocals, the engine with every optimisation off (fp32, reference kernels), as
  shipped, and with the int8 decoder (``COVER_DECODER=int8``; built before the row, once per voice:
  ``bench.convert`` times the build);
* cover: the whole pipeline (fetch, separate, convert, mix) per song length, as shipped (the
  defaults; what they derive from the models, the int8 decoder on CPUs without native bf16, is
  built inside the clock, as in the first Cloud Run execution for a voice: later ones download it
  from the bucket), and
  with the torch decoder (``COVER_DECODER=torch``, the default before 2026-12-06) on the reference
  song;
* cover (and separate) on another class's choices, for comparing them on one machine: ``fp32``
  (what CPUs without native bf16 run: fp32 and the int8 decoder, built inside the clock);
* cover with both MDX-Net passes (``mdx``: backing original and de-reverb, real-size
  MDX-Net-shaped models with random weights, on the default runtime; ``mdx-onnxruntime``: on the
  reference runtime), for the passes' time and each stage's peak memory;
* second voice: a whole cover (``Pipeline.render``) after another voice's cover of the same song
  (not timed), so the stem cache holds its stems and the vocals' analysis (HuBERT's features and the
  pitch): the stems an earlier separation left (``auto``), or the demo song's own vocal and
  instrumental tracks (``sung-stems``); ``stems-only`` puts the separation's stems in the cache and
  nothing else (no earlier voice: the row before the analysis cache). Random-weight Demucs leaves
  no break silent (its "vocals" carry the song throughout), so only ``sung-stems`` shows what
  skipping silence saves with a separator that works.

The songs look like songs (``form="song"`` of ``job.devkit.demo.demo_song``: an intro, verses,
choruses and instrumental breaks, a quarter of the song without vocals), so what silence saves shows
in the numbers; the ``continuous`` variant of the cover row is the old song that sings throughout,
kept as the worst case.

Cover rows also give each stage's peak RSS (a thread samples the process's RSS every 20 ms and
charges it to the stage the pipeline's stage timer is in), so a peak can be traced to its stage,
and each stage's peak of RSS plus the cover's files in the work folder: on Cloud Run the disk is in
memory, so that sum is what the job's memory limit has to hold (the model store aside); and the
cores each stage kept busy on average (its CPU seconds, FFmpeg's included, over its wall seconds):
where a stage leaves a core idle, running work beside it could gain.

Prints one table and writes it, with the date and the machine, to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import date
from pathlib import Path

WORK = Path(__file__).parent / ".work"
RESULTS = Path(__file__).parent / "RESULTS.md"
REFERENCE_SONG_S = 210  # the 3.5-minute song: separation and second-voice rows use it


def song_file(seconds: int, form: str = "song") -> Path:
    """The demo song of ``seconds`` in ``form`` (``song``: verses, choruses and breaks; ``continuous``),
    written under ``bench/.work/songs`` once."""
    from job.devkit.demo import write_demo_song

    path = WORK / "songs" / f"{form}-{seconds}s.wav"
    if not path.is_file():
        write_demo_song(path, seconds=seconds, form=form)
    return path


def bench_settings(
    precision: str = "auto",
    kernels: str = "fast",
    decoder: str = "auto",
    models_dir: Path = WORK / "models",
    work_dir: Path = WORK / "tmp",
):
    """A benchmark cover's settings: measured, not repaired (random-weight voices fail every
    segment, so repair would always spend its whole budget, bounded at COVER_REPAIR_BUDGET of the
    conversion time: README, "Quality", and flatter any ratio of two covers).

    Args:
        precision: ``COVER_PRECISION``
        kernels: ``COVER_KERNELS``
        decoder: ``COVER_DECODER``
        models_dir: the model store
        work_dir: the covers' work folders
    """
    from shared.settings import Settings

    return Settings(
        models_dir=models_dir,
        work_dir=work_dir,
        precision=precision,
        kernels=kernels,
        decoder=decoder,
        quality="measure",
        repair_budget=0,
    )


class StagePeaks:
    """The largest RSS (MB) seen during each stage of :meth:`Pipeline.render` in this process, and
    the largest RSS plus the cover's files under ``work`` (what Cloud Run counts: its disk is in
    memory; files there before the row are not counted)."""

    FILES_EVERY = 10  # samples between two walks of the work folder (200 ms)

    def __init__(self, work: Path) -> None:
        import threading

        from job.render import pipeline as stages
        from job.render.timing import StageTimer
        from shared.stages import Stage

        self.peaks: dict[str, float] = {}
        self.totals: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # CPU seconds by stage, this process's and its waited-for children's
        self.stage = "other"  # loading models, generating inputs, after the render
        self.work = work
        self.before = {p.name for p in work.iterdir()} if work.is_dir() else set()
        self._cpu_at = _cpu_seconds()
        watch = self

        class Recording(StageTimer):
            @contextmanager
            def __call__(self, stage: Stage) -> Iterator[None]:
                outer = watch.stage
                watch.switch(stage.value)
                try:
                    with super().__call__(stage):
                        yield
                finally:
                    watch.switch(outer)

        stages.StageTimer = Recording  # type: ignore[misc]  # the bench's own instrumentation
        threading.Thread(target=self._sample, daemon=True).start()

    def switch(self, stage: str) -> None:
        """Charge the CPU time since the last switch to the stage it was spent in; ``stage`` next."""
        now = _cpu_seconds()
        self.cpu[self.stage] = self.cpu.get(self.stage, 0.0) + now - self._cpu_at
        self._cpu_at, self.stage = now, stage

    def _files_mb(self) -> float:
        total = 0
        if self.work.is_dir():
            for top in self.work.iterdir():
                if top.name in self.before:
                    continue
                for path in [top] if not top.is_dir() else top.rglob("*"):
                    with suppress(OSError):  # removed while walked
                        total += path.stat().st_size if path.is_file() else 0
        return total / 2**20

    def _sample(self) -> None:
        files, n = 0.0, 0
        while True:
            with open("/proc/self/statm") as statm:
                rss = int(statm.read().split()[1]) * 4096 / 2**20
            if n % self.FILES_EVERY == 0:
                files = self._files_mb()
            n += 1
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), rss)
            self.totals[self.stage] = max(self.totals.get(self.stage, 0.0), rss + files)
            time.sleep(0.02)


def _cpu_seconds() -> float:
    """User and system CPU seconds of this process and of its children that have been waited for
    (FFmpeg's encodes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def row(kind: str, seconds: int, variant: str) -> dict:
    """One measurement, in this process."""
    from job.devkit import demo

    watch = StagePeaks(WORK / "tmp") if kind in ("cover", "second-voice") else None
    stages: dict[str, float] = {}  # the cover's own stage timings

    demo.write_models(WORK / "models", size="real")
    song = song_file(seconds, "continuous" if variant == "continuous" else "song")
    if variant.startswith("mdx"):
        _mdx_store()  # made (once) before the clock
    start, cpu0 = time.perf_counter(), time.process_time()
    if kind == "separate" and variant == "demucs-cli":
        return _demucs_cli(song, start)
    from job.render.pipeline import Pipeline
    from job.render.workfolder import work_folder
    from shared.model_store import DERIVED_DIR
    from shared.options import SeparationOptions

    settings, options = _row_settings(variant)
    # only the second-voice row uses a stem cache: every other row separates
    pipeline = Pipeline(
        settings,
        stem_cache=_earlier_voice(seconds, variant) if kind == "second-voice" else None,
        one_cover=kind in ("cover", "second-voice"),  # as a Cloud Run Job execution renders
    )
    voice = pipeline.store.voice(demo.DEMO_VOICE)
    if variant == "int8":  # built (or found) before the clock starts
        pipeline.converter.load_voice(voice)
        start, cpu0 = time.perf_counter(), time.process_time()
    elif kind in ("cover", "second-voice"):
        # what the defaults derive from the models is built inside the clock, as in the first Cloud
        # Run execution for a voice (this store has no bucket to fetch it from)
        shutil.rmtree(pipeline.store.root / DERIVED_DIR, ignore_errors=True)
    if kind == "separate":
        with work_folder(settings.work_dir) as work:
            fetched = pipeline.fetch(song, work)
            start, cpu0 = time.perf_counter(), time.process_time()
            pipeline.separate(fetched, work / "stems", SeparationOptions())
    elif kind == "convert":
        vocals, _ = demo.demo_song(seconds, seed=1, form="song")
        loaded = pipeline.converter.load_voice(voice)
        pipeline.converter.content_encoder(), pipeline.converter.rmvpe()
        start, cpu0 = time.perf_counter(), time.process_time()
        pipeline.converter.convert(vocals, 44100, loaded)
    elif kind == "cover":
        with work_folder(settings.work_dir) as work:
            stages = pipeline.render(song, voice, WORK / "tmp" / f"cover-{seconds}.mp3", options, work=work).timings
    elif kind == "second-voice":  # the stems of an earlier voice's cover are in the cache
        start, cpu0 = time.perf_counter(), time.process_time()
        with work_folder(settings.work_dir) as work:
            result = pipeline.render(song, voice, WORK / "tmp" / f"second-voice-{seconds}.mp3", work=work)
        assert result.stems_cached
        stages = result.timings
    wall = time.perf_counter() - start
    return {
        "wall": wall,
        "cpu": time.process_time() - cpu0,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "stage_peaks_mb": {k: round(v) for k, v in watch.peaks.items()} if watch else {},
        "stage_totals_mb": {k: round(v) for k, v in watch.totals.items()} if watch else {},
        "stages_s": {k: round(v, 1) for k, v in stages.items()},
        "stage_cpu_s": {k: round(v, 1) for k, v in watch.cpu.items()} if watch else {},
    }


def _demucs_cli(song: Path, start: float) -> dict:
    """The peer row: the `demucs` CLI separating ``song`` in a process of its own (timed from ``start``)."""
    out = Path(tempfile.mkdtemp(dir=WORK))
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "demucs",
                "--repo",
                str(WORK / "models" / "separation"),
                "-n",
                "htdemucs",
                "--two-stems",
                "vocals",
                "-o",
                str(out),
                str(song),
            ],
            check=True,
            capture_output=True,
        )
        wall = time.perf_counter() - start
    finally:  # its stems are not looked at: 71 MB a row for a 3.5-minute song, left behind until now
        shutil.rmtree(out, ignore_errors=True)
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": wall, "cpu": child.ru_utime + child.ru_stime, "rss_mb": child.ru_maxrss / 1024}


def _row_settings(variant: str):
    """(the settings, the cover options or None for the defaults) of a row's variant."""
    settings = {
        "reference": bench_settings("fp32", "reference"),
        "int8": bench_settings(decoder="int8"),
        "torch": bench_settings(decoder="torch"),
        "fp32": bench_settings("fp32"),  # what CPUs without native bf16 run: fp32, and the int8 decoder
    }.get(variant, bench_settings())
    if not variant.startswith("mdx"):
        return settings, None
    # both MDX-Net passes (backing original, de-reverb) on the default runtime or the one named
    from job.render.pipeline import CoverOptions
    from shared.options import StemOptions

    runtime = variant.split("-", 1)[1] if "-" in variant else "auto"
    settings = settings.model_copy(update={"models_dir": _mdx_store(), "mdx_runtime": runtime})
    return settings, CoverOptions(stems=StemOptions(dereverb=True))


def _mdx_store() -> Path:
    """The demo models (linked) with real-size MDX-Net-shaped karaoke and de-reverb models (random
    weights, ``bench/mdx.py``'s shapes), made once under ``bench/.work``."""
    from bench.mdx import SHAPES, linked_store
    from job.devkit import mdx as devkit
    from job.render.separate.mdx_params import MdxParams

    root = WORK / "mdx-models"
    # made again when its links no longer resolve (made from a worktree since removed, say)
    if not (root / "separation" / "mdx").is_dir() or not (root / "voices").exists():
        shutil.rmtree(root, ignore_errors=True)
        files = {}
        for kind, shape in SHAPES.items():
            p = MdxParams.model_validate(shape)
            files[kind] = devkit.write_convtdf(WORK / f"mdx-{kind}.onnx", p.dim_f, p.dim_t, size="real")
        linked_store(WORK / "models", root, files)
    return root


def _earlier_voice(seconds: int, variant: str):
    """A stem cache of its own (emptied first) filled by an earlier voice's cover in a process of its
    own, as another Cloud Run execution would (:func:`first_voice`)."""
    from job.render.separate.stems import StemCache
    from shared.storage import LocalStorage

    root = Path(tempfile.mkdtemp(dir=WORK))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # the row's own: 170 MB at 3.5 minutes
    earlier = [sys.executable, "-m", "bench.pipeline", "--first-voice", f"{seconds}:{variant}", "--cache", str(root)]
    done = subprocess.run(earlier, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the earlier voice's cover failed: {done.stderr[-2000:]}")
    return StemCache(LocalStorage(root))


FIRST_VOICE = "bench-first-voice"  # the earlier voice of the second-voice rows (real size, v2 48 kHz, seed 1)


def first_voice(seconds: int, variant: str, cache: Path) -> None:
    """What an earlier voice's cover of the demo song leaves in the stem cache in ``cache``: the stems
    (its separation, or with ``sung-stems`` the song-form demo song's own vocal and instrumental
    tracks, its breaks silent) and, but with ``stems-only``, the vocals' analysis from its conversion."""
    from job.devkit import demo
    from job.render.pipeline import Pipeline
    from job.render.separate.stems import StemCache
    from job.render.workfolder import work_folder
    from shared.storage import LocalStorage

    song = song_file(seconds)
    pipeline = Pipeline(bench_settings(), stem_cache=StemCache(LocalStorage(cache)))
    _cache_stems(pipeline, song, seconds, variant)
    if variant == "stems-only":
        return
    folder = pipeline.store.voice_folder(FIRST_VOICE)
    if not (folder / "voice.json").is_file():
        demo.write_voice(folder, name=FIRST_VOICE, size="real", seed=1)
    with work_folder(pipeline.settings.work_dir) as work:
        first = pipeline.store.voice(FIRST_VOICE)
        assert pipeline.render(song, first, WORK / "tmp" / f"first-voice-{seconds}.mp3", work=work).stems_cached


def _cache_stems(pipeline, song: Path, seconds: int, variant: str) -> None:
    """Put stems of ``song`` in ``pipeline``'s stem cache (see :func:`first_voice`)."""
    from job.devkit.demo import demo_song
    from job.render.media.audio import MIX_SAMPLE_RATE, write_wav
    from job.render.separate.stems import Stems
    from job.render.workfolder import work_folder
    from shared.options import SeparationOptions

    with work_folder(pipeline.settings.work_dir) as work:
        fetched = pipeline.fetch(song, work)
        if variant != "sung-stems":
            pipeline.separate(fetched, work / "stems", SeparationOptions())
            return
        vocals, instrumental = demo_song(seconds, form="song")  # write_demo_song's seed: the tracks of `song`
        stems = Stems(
            vocals=write_wav(work / "vocals.wav", vocals, MIX_SAMPLE_RATE),
            no_vocals=write_wav(work / "no_vocals.wav", instrumental, MIX_SAMPLE_RATE),
            sample_rate=MIX_SAMPLE_RATE,
        )
        pipeline.stem_cache.put(pipeline.separator(SeparationOptions()).stem_key(fetched.sha256), stems)


def machine() -> str:
    from bench.convert import machine as describe

    return describe()


def run_row(kind: str, seconds: int, variant: str) -> dict | None:
    """One row (:func:`row`) in a process of its own, with ``what``, ``variant``, ``audio_s`` and
    ``rtf`` added; None (its error printed) when the row failed."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.pipeline", "--row", f"{kind}:{seconds}:{variant}"],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "COVER_LOG_LEVEL": "ERROR"},
    )
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{kind:<13} {variant:<11} {seconds:>4} s: {result['wall']:.1f} s", file=sys.stderr, flush=True)
    return {"what": kind, "variant": variant, "audio_s": seconds, **result, "rtf": result["wall"] / seconds}


def _cores(r: dict, stage: str, seconds: float) -> str:
    """`` (N cores)``: how many cores a stage kept busy on average (its CPU seconds over its wall
    seconds), where the row measured its CPU time and the stage took a second or more."""
    cpu = r.get("stage_cpu_s", {}).get(stage)
    return f" ({cpu / seconds:.1f} cores)" if cpu is not None and seconds >= 1 else ""


def table_lines(rows: list[dict]) -> list[str]:
    """The rows as a Markdown table (each stage's seconds with the cores it kept busy, and its peak:
    RSS / RSS plus the work folder's files)."""
    lines = [
        "| what | variant | audio s | wall s | RTF | CPU s | peak RSS MB | by stage, s "
        "| peak by stage MB: RSS / RSS + work files |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    return lines + [
        f"| {r['what']} | {r['variant']} | {r['audio_s']} | {r['wall']:.1f} | {r['rtf']:.3f} | "
        f"{r['cpu']:.1f} | {r['rss_mb']:.0f} | "
        + ", ".join(f"{stage} {s}{_cores(r, stage, s)}" for stage, s in r.get("stages_s", {}).items())
        + " | "
        + ", ".join(
            f"{stage} {mb} / {r.get('stage_totals_mb', {}).get(stage, mb)}"
            for stage, mb in r.get("stage_peaks_mb", {}).items()
        )
        + " |"
        for r in rows
    ]


def cell(value: float | None, digits: int = 4) -> str:
    """A results table's cell for a measure that may not have been taken ("n/a")."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def publish(lines: list[str], path: Path) -> None:
    """Print a results file's lines and write them to ``path``."""
    text = "\n".join(lines) + "\n"
    print(text)
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--songs", default="30,210,600", help="song lengths in seconds for the cover rows")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where the table is written (one file per machine)"
    )
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--first-voice", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepare-mdx", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare_mdx:  # the MDX-Net rows' store, made in a process of its own (its export peaks high)
        _mdx_store()
        return
    if args.first_voice:
        seconds, variant = args.first_voice.split(":")
        first_voice(int(seconds), variant, args.cache)
        return
    if args.row:
        kind, seconds, variant = args.row.split(":")
        print(json.dumps(row(kind, int(seconds), variant)))
        return
    lengths = [int(s) for s in args.songs.split(",")]
    song = REFERENCE_SONG_S if REFERENCE_SONG_S in lengths else lengths[-1]  # the per-stage rows' song
    plan = [("separate", song, "reference"), ("separate", song, "ours")]
    if not args.skip_baseline:
        plan.append(("separate", song, "demucs-cli"))
    plan += [("convert", 60, "reference"), ("convert", 60, "auto"), ("convert", 60, "int8")]
    plan += [("cover", s, "auto") for s in lengths] + [("cover", song, "continuous"), ("cover", song, "torch")]
    plan += [("second-voice", song, v) for v in ("stems-only", "auto", "sung-stems")]
    rows = [r for kind, seconds, variant in plan if (r := run_row(kind, seconds, variant)) is not None]
    lines = [
        f"# Benchmark results ({date.today().isoformat()})",
        "",
        f"machine: {machine()}",
        "",
        "command: `python -m bench.pipeline --songs "
        + args.songs
        + (" --skip-baseline" if args.skip_baseline else "")
        + (f" --results {args.results}" if args.results != RESULTS else "")
        + "`",
        "",
        *table_lines(rows),
    ]
    publish(lines, args.results)


if __name__ == "__main__":
    main()

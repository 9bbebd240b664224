"""The whole cover: fetch -> separate -> convert -> mix, with per-stage timings and progress.

One :class:`Pipeline` keeps its models loaded, so a long-running runner renders many songs
without reloading anything.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, Field

from job.convert import ConversionOptions, ConvertedVocals, VoiceConverter, convert_vocals
from job.fetch import SongAudio, fetch
from job.mix import MixOptions, MixResult, mix
from job.separate import SeparationOptions, Separator, Stems
from shared.settings import Settings

STAGES = ("fetch", "separate", "convert", "mix")
StageProgress = Callable[[str, float], None]


class CoverOptions(BaseModel):
    conversion: ConversionOptions = Field(default_factory=ConversionOptions)
    separation: SeparationOptions = Field(default_factory=SeparationOptions)
    mix: MixOptions = Field(default_factory=MixOptions)


class CoverResult(BaseModel):
    output: Path
    voice: str
    song: SongAudio
    mix: MixResult
    conversion: ConvertedVocals
    timings: dict[str, float]

    @property
    def total_s(self) -> float:
        return sum(self.timings.values())


class Pipeline:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.converter = VoiceConverter(settings.models_dir, settings.device, precision=settings.precision,
                                        kernels=settings.kernels)
        self._separators: dict[str, Separator] = {}

    def separator(self, options: SeparationOptions) -> Separator:
        key = options.model_dump_json()
        if key not in self._separators:
            self._separators[key] = Separator(self.settings.models_dir, options, self.settings.allow_hub_download,
                                              self.settings.precision, self.settings.kernels)
        return self._separators[key]

    @contextmanager
    def workdir(self):
        self.settings.work_dir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="cover-", dir=self.settings.work_dir))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def fetch(self, song: str | Path, work: Path) -> SongAudio:
        return fetch(song, work, self.settings.max_duration_s, self.settings.max_download_bytes)

    def separate(self, song: SongAudio, out_dir: Path, options: SeparationOptions,
                 progress: Callable[[float], None] | None = None) -> Stems:
        return self.separator(options).separate(song.wav, out_dir, progress)

    def render(self, song: str | Path, voice: str, out: Path, options: CoverOptions | None = None,
               progress: StageProgress | None = None) -> CoverResult:
        """Render a cover of ``song`` sung by ``voice`` into ``out``."""
        options = options or CoverOptions()
        report = progress or (lambda stage, fraction: None)
        timings: dict[str, float] = {}
        info, _ = self.converter.store.get(voice)  # unknown voices fail before any work
        with self.workdir() as work:
            start = time.perf_counter()
            fetched = self.fetch(song, work)
            report("fetch", 1.0)
            timings["fetch"] = time.perf_counter() - start

            start = time.perf_counter()
            stems = self.separate(fetched, work / "stems", options.separation, lambda f: report("separate", f))
            timings["separate"] = time.perf_counter() - start

            start = time.perf_counter()
            converted = convert_vocals(self.converter, stems.vocals, voice, work / "converted.wav",
                                       options.conversion, lambda f: report("convert", f))
            timings["convert"] = time.perf_counter() - start

            start = time.perf_counter()
            title = f"{Path(str(song)).stem} ({info.display_name} cover)"
            mixed = mix(stems.no_vocals, converted.path, Path(out), options.mix, voice_name=info.name, title=title)
            report("mix", 1.0)
            timings["mix"] = time.perf_counter() - start
        return CoverResult(output=Path(out), voice=voice, song=fetched, mix=mixed, conversion=converted,
                           timings=timings)

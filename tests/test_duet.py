"""Duets: where the cuts fall, how the voices hand over, and a duet of two demo voices on the demo
song's vocals, checked by the quality stage's speaker likeness per stretch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from job.devkit import demo
from job.render.duet import FADE_S, FRAME_S, Span, frame_energy, gain, plan, sing
from job.render.media.audio import MIX_SAMPLE_RATE, read_16k, read_wav, write_wav
from job.render.pipeline import Cast, CastPart, Pipeline
from shared.cast import TimeRange, VoicePart, parse_cli_voices
from shared.events import CoverRequest, cast_identity, cover_id
from shared.options import ConversionOptions, RequestOptions
from shared.settings import Settings
from shared.voices import VOICE_FILE
from tests.test_vocal_split import linked_store

RATE = 16000


def test_a_cut_moves_to_the_quietest_point_within_a_quarter_second():
    audio = np.ones(RATE * 4, dtype=np.float32)
    audio[int(2.17 * RATE) : int(2.19 * RATE)] = 0.0  # a breath 170 ms after the asked cut
    audio[int(2.5 * RATE) : int(2.6 * RATE)] = 0.0  # a longer one, too far
    spans = plan(4.0, "a", [("b", [(2.0, 4.0)])], frame_energy(audio, RATE))
    assert [s.voices for s in spans] == [("a",), ("b",)]
    assert 2.17 <= spans[1].start_s <= 2.19
    loud = np.ones(RATE * 4, dtype=np.float32)  # nowhere quieter: the cut stays where it was asked
    assert plan(4.0, "a", [("b", [(2.0, 4.0)])], frame_energy(loud, RATE))[1].start_s == pytest.approx(2.0, abs=FRAME_S)


def test_unison_and_handovers_keep_the_power():
    spans = [Span(start_s=0, end_s=1, voices=("a",)), Span(start_s=1, end_s=2, voices=("a", "b"))]
    spans.append(Span(start_s=2, end_s=3, voices=("b",)))
    ga, gb = (gain(spans, v, 3 * RATE, RATE) for v in ("a", "b"))
    assert np.allclose(ga**2 + gb**2, 1.0, atol=1e-5)  # at every sample, through both fades
    assert ga[int(1.5 * RATE)] == pytest.approx(1 / np.sqrt(2))
    assert np.max(np.abs(np.diff(ga))) < 2.5 / (FADE_S * RATE)  # no step: a ramp over the fade


def _handover(fade_s: float) -> tuple[np.ndarray, float]:
    """Two voices as two unrelated tones, handed over at 1 s: (the joined signal, its cut)."""
    t = np.arange(2 * RATE) / RATE
    tones = {"a": 0.5 * np.sin(2 * np.pi * 220 * t), "b": 0.5 * np.sin(2 * np.pi * 331 * t + 1.3)}
    spans = [Span(start_s=0, end_s=1.0, voices=("a",)), Span(start_s=1.0, end_s=2.0, voices=("b",))]
    out = sing(spans, 2 * RATE, RATE, lambda v, a, b: tones[v][round(a * RATE) : round(b * RATE)], 2.0, fade_s)
    return out, 1.0


def _jump_at(signal: np.ndarray, cut_s: float, rate: int) -> tuple[float, float]:
    """(largest sample-to-sample step within 20 ms of the cut, sqrt(2) times the largest anywhere
    else: inside an equal-power crossfade both voices sound at 1/sqrt(2) each, and their steps may
    add; a click is a step beyond what the two voices make together)."""
    steps = np.abs(np.diff(signal))
    near = slice(max(0, int((cut_s - 0.02) * rate)), int((cut_s + 0.02) * rate))
    away = np.ones_like(steps, dtype=bool)
    away[near] = False
    return float(steps[near].max()), float(np.sqrt(2) * steps[away].max())


def test_the_joins_are_click_free_where_a_hard_cut_clicks():
    joined, cut = _handover(FADE_S)
    at_cut, elsewhere = _jump_at(joined, cut, RATE)
    assert at_cut <= elsewhere
    hard, _ = _handover(1.0 / RATE)  # no crossfade: the check catches the click
    at_cut, elsewhere = _jump_at(hard, cut, RATE)
    assert at_cut > 2 * elsewhere  # (0.48 against 2 x 0.092)


def test_the_command_line_names_a_duet_as_the_issue_writes_it():
    main, parts = parse_cli_voices(["a", "b@32.5-61", "c@10-20,70-80"])
    assert main == "a"
    assert [(p.voice_model, [(r.start_s, r.end_s) for r in p.ranges]) for p in parts] == [
        ("b", [(32.5, 61.0)]),
        ("c", [(10.0, 20.0), (70.0, 80.0)]),
    ]
    for bad in (["a", "b"], ["a@1-2"], ["a", "b@5-3"], ["a", "b@x-3"], ["a", "b@5"]):
        with pytest.raises(ValueError):
            parse_cli_voices(bad)


def test_the_cover_id_covers_the_whole_assignment_and_a_plain_request_keeps_its_id():
    plain = CoverRequest(song_id="s1", voice_model="a")
    before = cover_id("bucket/s1@etag", "a", "v1", RequestOptions())  # as a request was identified before duets
    assert cover_id("bucket/s1@etag", "a", "v1", plain.options, cast_identity(plain, {"a": "v1"})) == before
    ids = set()
    for ranges in ([(10.0, 20.0)], [(10.0, 21.0)]):
        for voice in ("b", "c"):
            request = CoverRequest(
                song_id="s1",
                voice_model="a",
                voices=[VoicePart(voice_model=voice, ranges=[TimeRange(start_s=a, end_s=b) for a, b in ranges])],
            )
            versions = {"a": "v1", "b": "v2", "c": "v3"}
            ids.add(cover_id("bucket/s1@etag", "a", "v1", request.options, cast_identity(request, versions)))
    assert len(ids) == 4 and before not in ids
    body = json.loads(
        CoverRequest.model_validate_json(
            '{"song_id": "s", "voice_model": "a", "voices": [{"voice_model": "b", "ranges": [{"from": 1, "to": 2}]}]}'
        ).model_dump_json(by_alias=True)
    )
    assert body["voices"][0]["ranges"] == [{"from": 1.0, "to": 2.0}]
    with pytest.raises(ValueError, match="auto-fit"):
        CoverRequest(song_id="s", voice_model="a", options=RequestOptions(pitch="auto-fit"), voices=body["voices"])
    with pytest.raises(ValueError, match="backing 'convert'"):
        CoverRequest(song_id="s", voice_model="a", backing_voice="b")


@pytest.mark.slow
def test_a_duet_of_two_demo_voices_sings_each_range_with_its_voice(store, tmp_path):
    """The demo song's vocals (what a perfect separator gives) sung by demo-voice, with 4 to 8 s
    given to a second demo voice: each stretch is likest its own voice (the quality stage's
    per-stretch speaker similarity; a swapped assignment fails it), the joins do not click, and
    the lead keeps the song's length. Random weights sing noise, each voice its own kind: each
    voice's reference is the embedding of its own solo rendering of the song (as `cover models
    add --clips` takes a voice's own singing), not of the reference phrase, whose noise is of
    another kind than a song's."""
    root = linked_store(store, tmp_path / "models")
    (root / "voices" / demo.DEMO_VOICE).unlink()  # a voice.json of this store's own, to write its reference into
    demo.write_voice(root / "voices" / demo.DEMO_VOICE, size="tiny", seed=0)
    demo.write_voice(root / "voices" / "demo-b", name="demo-b", size="tiny", seed=7)
    vocals, _ = demo.demo_song(12.0)
    lead = write_wav(tmp_path / "lead.wav", vocals, MIX_SAMPLE_RATE)
    options = ConversionOptions(f0_method="pm")
    solo = Pipeline(Settings(models_dir=root, work_dir=tmp_path / "work", device="cpu"))
    for name in (demo.DEMO_VOICE, "demo-b"):
        voice = solo.store.voice(name)
        sung = solo.convert(lead, voice, tmp_path / f"{name}.wav", options)
        embedding = solo.meter.embedding(read_16k(sung.path).audio)
        info = voice.info.model_copy(update={"reference_embedding": [float(x) for x in embedding]})
        (root / "voices" / name / VOICE_FILE).write_text(info.model_dump_json())
    pipeline = Pipeline(Settings(models_dir=root, work_dir=tmp_path / "work", device="cpu"))
    pipeline._meter = solo.meter  # the quality models, loaded once
    a, b = pipeline.store.voice(demo.DEMO_VOICE), pipeline.store.voice("demo-b")
    cast = Cast(parts=[CastPart(voice=b, ranges=[(4.0, 8.0)])])
    converted, spans = pipeline.sing_lead(lead, a, cast, tmp_path / "duet.wav", options)
    assert [s.voices for s in spans] == [(demo.DEMO_VOICE,), ("demo-b",), (demo.DEMO_VOICE,)]
    audio, rate = read_wav(converted.path)
    assert audio.shape[-1] == round(12.0 * rate)
    for cut in (spans[1].start_s, spans[2].start_s):
        at_cut, elsewhere = _jump_at(audio[0], cut, rate)
        assert at_cut <= elsewhere, cut
    report = pipeline.measure(lead, converted, a, None, None, cast, spans)
    assert [s.voices for s in report.singers] == [[demo.DEMO_VOICE], ["demo-b"], [demo.DEMO_VOICE]]
    for stretch in report.singers:
        (own,) = stretch.voices
        other = ({demo.DEMO_VOICE, "demo-b"} - {own}).pop()
        assert stretch.similarity[own] - stretch.similarity[other] > 0.1, stretch  # swapped: negative
        assert stretch.sung_by_its_voice

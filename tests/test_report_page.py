"""The quality report page, opened in headless Chromium (Debian's package): a screenshot must show
both pitch curves and the player; the page fetches nothing from the network and refers to the
cover by URL, so its size does not grow with the song's."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from job.devkit import demo
from job.render.media import ffmpeg
from job.render.media.audio import MIX_SAMPLE_RATE, to_16k, write_wav
from job.render.quality.meter import QualityMeter
from job.render.quality.report_page import CONVERTED_COLOUR, PLAYER_COLOUR, SOURCE_COLOUR, render_page
from shared.quality import Thresholds

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A report whose first half is the identity and second half an octave too high, its player
    playing a 3-second cover beside the page."""
    import librosa

    tmp = tmp_path_factory.mktemp("report")
    vocals = demo.demo_song(20.0)[0]
    mono = vocals.mean(axis=0)
    half = len(mono) // 2
    cover = np.concatenate([mono[:half], librosa.effects.pitch_shift(mono[half:], sr=MIX_SAMPLE_RATE, n_steps=12)])
    meter = QualityMeter(thresholds=Thresholds(dnsmos_ovrl_min=1.0))  # the synthetic demo vocals buzz (1.5 to 1.8)
    reference = meter.embedding(to_16k(vocals, MIX_SAMPLE_RATE)).tolist()
    report = meter.conversion(vocals, MIX_SAMPLE_RATE, cover, MIX_SAMPLE_RATE, 0, reference)
    wav = write_wav(tmp / "cover.wav", cover[None], MIX_SAMPLE_RATE)
    mp3 = tmp / "cover.mp3"
    ffmpeg.run([*ffmpeg.input_args(wav), "-t", "3", "-b:a", "64k", "-y", str(mp3)])
    text = render_page(report, "demo song (demo voice cover)", mp3.name, "audio/mpeg", published=False)
    path = tmp / "report.html"
    path.write_text(text)
    return path, report


def test_the_page_needs_no_network_and_shades_the_failing_segment(page):
    path, report = page
    text = path.read_text()
    assert not re.search(r"""(src|href)=["'](https?:)?//""", text)  # nothing fetched from elsewhere
    assert '<source src="cover.mp3" type="audio/mpeg">' in text  # the cover beside it, by URL
    assert [bool(s.below) for s in report.segments] == [False, True]  # the octave-high half
    assert text.count('fill="#fbe1e3"') == 1 and text.count('fill="#e3f4e6"') == 1
    assert "not published (quality.gate)" in text and 'class="bad"' in text


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
def test_chromium_draws_both_pitch_curves_and_the_player(page, tmp_path):
    from PIL import Image

    path, _ = page
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1100,1500",
            f"--screenshot={shot}",
            path.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)

    def count(colour: str) -> int:
        return int(np.all(np.abs(pixels.astype(int) - _rgb(colour)) <= 12, axis=1).sum())

    assert count(SOURCE_COLOUR) > 500, "the source melody is not drawn"
    image = np.asarray(Image.open(shot).convert("RGB"))
    left = image[:, : image.shape[1] // 2].reshape(-1, 3).astype(int)  # the half where the cover is the identity
    hidden = int(np.all(np.abs(left - _rgb(SOURCE_COLOUR)) <= 12, axis=1).sum())
    assert hidden > 300, "the singer's melody is hidden under the cover's where they coincide"
    assert count(CONVERTED_COLOUR) > 500, "the cover's melody is not drawn"
    assert count(PLAYER_COLOUR) > 1000, "the player's frame is not drawn"


def test_the_page_says_what_repair_tried_and_kept(page):
    from shared.quality import Candidate, Repair, RepairedSegment

    _, report = page
    repaired = report.model_copy(deep=True)
    assert "nothing was re-rendered" in render_page(repaired, "song", None)
    tried = [
        Candidate(change="octave", setting="pitch -12", below=["dnsmos_ovrl"], kept=True, seconds=1.2),
        Candidate(change="protect", setting="protect 0.18", below=["dnsmos_ovrl"], kept=False, seconds=1.1),
    ]
    segment = RepairedSegment(
        start_s=10, end_s=20, why=["octave_error_share", "dnsmos_ovrl"], tried=tried, kept="pitch -12"
    )
    repaired.repair = Repair(budget_s=9.0, spent_s=2.4, segments=[segment], untried=1)
    text = render_page(repaired, "song", None)
    table = text[text.index('<table id="repair">') :]
    assert (
        "re-rendered 1 of 2 weak segments in 2.4 s of a 9.0 s budget; 1 left as they were: the budget ran out" in text
    )
    repaired.repair = Repair(budget_s=9.0, spent_s=2.4, segments=[segment], untried=1, next_estimate_s=7.5)
    assert "the next re-render was estimated at 7.5 s, more than the 6.6 s left" in render_page(repaired, "s", None)
    assert table.index("pitch -12") < table.index("protect 0.18")  # in the order tried
    assert ">kept<" in table and ">dropped<" in table and "octave errors, naturalness (DNSMOS)" in table


def test_what_was_not_measured_is_grey_and_said_so(page):
    """A segment with too little singing is grey on the chart and "not measured" in the table,
    never green or "ok"; a song with too little singing says not measurable, never passed."""
    from job.render.quality.report_page import PASS_SHADE, UNMEASURED_SHADE
    from shared.quality import Melody, Scores, Segment, Verdict, judge, settle

    _, report = page
    quiet = judge(Scores(melody=Melody(voiced_frames=3, voiced_s=0.24)))
    first = report.segments[0]
    segments = [Segment(start_s=first.start_s, end_s=first.end_s, **quiet.model_dump()), *report.segments[1:]]
    unmeasured = settle(report.model_copy(update={"whole": quiet, "segments": segments}))
    assert unmeasured.verdict is Verdict.NOT_MEASURABLE and not unmeasured.passed
    text = render_page(unmeasured, "song", None, published=False)
    assert f'fill="{UNMEASURED_SHADE}"' in text and text.count(f'fill="{PASS_SHADE}"') == 0
    assert 'class="verdict na"' in text and "not measurable: 0.24 s sung" in text
    assert "meets every threshold" not in text and ">n/a<" not in text
    whole_row = text[text.index("<th>whole song</th>") : text.index("</tr>", text.index("<th>whole song</th>"))]
    assert whole_row.count('<td class="na">not measured</td>') == 6


def test_the_waveform_shows_the_songs_shape_and_the_vocals_over_it(page):
    """Levels, not peaks: a quiet verse and a loud chorus look different (a loudness-normalised
    mix's peaks were a solid slab), and the cover's vocals are drawn over the mix."""
    from job.render.media.audio import level_envelope
    from job.render.quality.report_page import MIX_COLOUR

    quiet_then_loud = np.concatenate([np.full(8000, 0.01), np.full(8000, 0.5)]).astype(np.float32)
    levels = level_envelope(quiet_then_loud, columns=4)
    assert levels[:2] == [pytest.approx(1 / 3, abs=0.01)] * 2 and levels[2:] == [pytest.approx(0.9, abs=0.01)] * 2
    _, report = page
    assert report.curves.vocals_levels and max(report.curves.vocals_levels) - min(report.curves.vocals_levels) > 0.2
    curves = report.curves.model_copy(update={"mix_levels": levels * 250})
    text = render_page(report.model_copy(update={"curves": curves}), "song", None)
    wave = text[text.index('<svg id="wave"') : text.index("</svg>", text.index('<svg id="wave"'))]
    assert f'fill="{MIX_COLOUR}"' in wave and f'stroke="{CONVERTED_COLOUR}"' in wave


def test_a_long_covers_page_stays_small(page):
    """The page refers to the cover instead of embedding it: a 3.5-minute cover's page (its melody
    curves, 21 segments, the waveform) stays under 1 MB (embedded, the cover alone was 3 to 9 MB)."""
    _, report = page
    curves = report.curves
    frames = round(210 / curves.frame_s)
    reps = -(-frames // len(curves.source_hz))
    long = report.model_copy(
        update={
            "curves": curves.model_copy(
                update={
                    "source_hz": (curves.source_hz * reps)[:frames],
                    "converted_hz": (curves.converted_hz * reps)[:frames],
                    "duration_s": 210.0,
                }
            ),
            "segments": [
                s.model_copy(update={"start_s": 10.0 * i, "end_s": 10.0 * (i + 1)})
                for i, s in enumerate(report.segments * 11)
            ][:21],
        }
    )
    text = render_page(long, "a long song (demo voice cover)", "audio", "audio/mpeg")
    assert text.count("<tr><th>") >= 21 and '<source src="audio"' in text
    assert len(text.encode()) < 1_000_000


def test_the_melody_chart_covers_both_curves_and_a_spike_does_not_squash_it(page):
    """The range comes from the data: the octave-high half of the cover is inside it with the
    singer's melody; three frames of a tracker's spike at a phrase's end (2 kHz) are drawn at the
    edge instead of stretching the chart four octaves up."""
    from job.render.quality.report_page import _midi, pitch_range

    _, report = page
    curves = report.curves
    source = [_midi(f) for f in curves.source_hz if f > 0]
    cover = [_midi(f) for f in curves.converted_hz if f > 0]
    low, high = pitch_range(curves.source_hz, curves.converted_hz)
    for curve in (source, cover):
        assert np.mean([low <= n <= high for n in curve]) >= 0.98  # both curves, all but stray frames
    half = len(curves.converted_hz) // 2
    octave_up = [_midi(f) for f in curves.converted_hz[half:] if f > 0]
    assert low < np.median(source) and np.percentile(octave_up, 95) < high  # the octave error is on the chart
    spiked = list(curves.converted_hz)
    ends = [i for i in range(1, len(spiked)) if spiked[i] > 0 and spiked[i - 1] <= 0][:3]  # phrase starts
    for i in ends:
        spiked[i] = 2000.0
    assert pitch_range(curves.source_hz, spiked)[1] == pytest.approx(high, abs=0.5)
    assert pitch_range([220.0] * 20) == pytest.approx((_midi(220.0) - 6, _midi(220.0) + 6))  # an octave tall

"""The quality report page, opened in headless Chromium (Debian's package): a screenshot must show
both pitch curves and the player; the page fetches nothing from the network and refers to the
cover by URL, so its size does not grow with the song's."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

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


def _screenshot(page: Path, tmp_path: Path) -> np.ndarray:
    """The page as headless Chromium draws it, [rows, columns, RGB]."""
    from PIL import Image

    shot = tmp_path / f"{page.stem}.png"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1100,1500",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)


def _count(image: np.ndarray, colour: str, tolerance: int = 12) -> int:
    return int(np.all(np.abs(image.reshape(-1, 3) - _rgb(colour)) <= tolerance, axis=1).sum())


NEEDS_CHROMIUM = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)"
)


@NEEDS_CHROMIUM
def test_chromium_draws_both_pitch_curves_and_the_player(page, tmp_path):
    """The page of a cover with real pitch (the demo's clean vocals, the identity then an octave up)."""
    path, _ = page
    image = _screenshot(path, tmp_path)
    assert _count(image, SOURCE_COLOUR) > 500, "the source melody is not drawn"
    left = image[:, : image.shape[1] // 2]  # the half where the cover is the identity
    assert _count(left, SOURCE_COLOUR) > 300, "the singer's melody is hidden under the cover's where they coincide"
    assert _count(image, CONVERTED_COLOUR) > 500, "the cover's melody is not drawn"
    assert _count(image, PLAYER_COLOUR) > 1000, "the player's frame is not drawn"


@NEEDS_CHROMIUM
def test_chromium_draws_the_demo_s_unmeasured_page_grey_with_its_melody_inside(page, tmp_path):
    """The demo's page (random weights: almost nothing sung in the separated vocals, the cover's
    "melody" a steady high tone): every segment grey, nothing green, the cover's line inside the
    chart rather than on its edge."""
    from job.render.quality.report_page import PASS_SHADE, PITCH_HEIGHT, UNMEASURED_SHADE
    from shared.quality import Melody, Scores, Segment, judge, settle

    _, report = page
    quiet = judge(Scores(melody=Melody(voiced_frames=10, voiced_s=0.8)))
    frames = len(report.curves.source_hz)
    singer = [0.0] * frames
    singer[10] = singer[40] = 55.0
    curves = report.curves.model_copy(update={"source_hz": singer, "converted_hz": [1050.0] * frames})
    segments = [Segment(start_s=s.start_s, end_s=s.end_s, **quiet.model_dump()) for s in report.segments]
    demo_report = settle(report.model_copy(update={"whole": quiet, "segments": segments, "curves": curves}))
    path = tmp_path / "demo.report.html"
    path.write_text(render_page(demo_report, "demo-song (demo-voice cover)", "cover.mp3", "audio/mpeg"))
    image = _screenshot(path, tmp_path)
    assert _count(image, UNMEASURED_SHADE, 3) > 100_000 and _count(image, PASS_SHADE, 3) == 0  # pale, close
    grey = np.all(np.abs(image - _rgb(UNMEASURED_SHADE)) <= 3, axis=2).sum(axis=1) > 600  # rows mostly grey
    rows = np.nonzero(grey)[0]
    breaks = np.nonzero(np.diff(rows) > 6)[0]  # the lines crossing it leave a few rows less grey
    end = rows[breaks[0]] if len(breaks) else rows[-1]
    chart = image[rows[0] : end + 1]  # the melody chart: the first band of grey rows (the table's come later)
    assert abs(len(chart) - PITCH_HEIGHT) <= 5
    line = np.nonzero(np.all(np.abs(chart - _rgb(CONVERTED_COLOUR)) <= 12, axis=2).any(axis=1))[0]
    assert len(line) and line.min() > 20 and line.max() < len(chart) - 20, "the cover's line is on the chart's edge"


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
    assert "Repair is off: nothing was re-rendered" in text  # its second segment is below
    quiet_segments = [Segment(start_s=s.start_s, end_s=s.end_s, **quiet.model_dump()) for s in report.segments]
    all_quiet = render_page(unmeasured.model_copy(update={"segments": quiet_segments}), "song", None)
    assert "a segment with too little singing to judge is not re-rendered" in all_quiet
    assert "met the thresholds" not in all_quiet
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
    from job.render.notes import hz_to_midi as _midi
    from job.render.quality.report_page import pitch_range

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


def test_frames_the_chart_does_not_draw_do_not_stretch_it(page):
    """A lone voiced frame of the separated vocals (noise through the demo's random separator) is
    not drawn as a line, and does not pull the chart's range down to it."""
    from job.render.notes import hz_to_midi as _midi
    from job.render.quality.report_page import pitch_range

    cover = [1000.0] * 50
    singer = [0.0] * 50
    singer[10] = singer[30] = 55.0  # A1, alone
    low, high = pitch_range(singer, cover)
    assert high - low == pytest.approx(12) and low < _midi(1000.0) < high
    _, report = page
    curves = report.curves.model_copy(update={"source_hz": singer, "converted_hz": cover, "duration_s": 4.0})
    text = render_page(report.model_copy(update={"curves": curves}), "song", None)
    assert "the singer (separated vocals, with the pitch shift; no sung notes found in them)" in text

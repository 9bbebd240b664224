"""A cover's quality report as one HTML page: everything inline but the cover, which its player
refers to by URL (so the page's size does not grow with the song).

The page shows the verdict and the whole song's scores, the mix's waveform, the source melody (the
separated vocals moved by the request's pitch shift) and the converted melody drawn over each other
with each segment shaded by whether it meets the thresholds, a table of every segment's scores (a
cell turns red below its threshold), what repair changed, and an audio player whose position is
drawn on both plots (click a plot to seek). The styles and the small script are inline; the player's
source is a URL: ``cover make --report`` writes the page beside the cover and names the cover's
file; the service stores it as ``reports/{cover_id}.html``, serves it at
``GET /covers/{cover_id}/report`` and names ``audio``, that is ``GET /covers/{cover_id}/audio``,
which redirects to a freshly signed URL of the cover (a page kept for days still plays).
"""

from __future__ import annotations

import html
import math
import statistics

from job.render.notes import hz_to_midi, midi_note
from shared.quality import (
    MELODY_MIN_VOICED_S,
    Curves,
    QualityReport,
    Repair,
    Scores,
    Segment,
    Thresholds,
    Verdict,
)

WIDTH = 1000
WAVE_HEIGHT = 110
PITCH_HEIGHT = 280
SOURCE_COLOUR = "#f28c28"  # the source melody
CONVERTED_COLOUR = "#1a73e8"  # the cover's melody
PASS_SHADE = "#e3f4e6"  # noqa: S105 - a colour
FAIL_SHADE = "#fbe1e3"
UNMEASURED_SHADE = "#e6e8ea"  # grey: too little singing to judge
SHADES = {Verdict.PASSED: PASS_SHADE, Verdict.BELOW: FAIL_SHADE, Verdict.NOT_MEASURABLE: UNMEASURED_SHADE}
# the measures in words, for people (the report's field names are for programs)
MEASURE_NAMES = {
    "f0_correlation": "melody correlation",
    "f0_rmse_cents": "pitch error (cents)",
    "octave_error_share": "octave errors",
    "unvoiced_share": "sung notes lost",
    "speaker_similarity": "likeness to the voice",
    "dnsmos_ovrl": "naturalness (DNSMOS)",
}


def _names(measures: list[str]) -> str:
    return ", ".join(html.escape(MEASURE_NAMES.get(m, m)) for m in measures)


PLAYER_COLOUR = "#6a1b9a"
MIX_COLOUR = "#b0bec5"  # the mix's level


def _x(seconds: float, duration: float) -> float:
    return WIDTH * seconds / max(duration, 1e-9)


def pitch_range(*tracks: list[float]) -> tuple[float, float]:
    """The melody chart's range in MIDI notes, from the voiced frames of every track (Hz, 0 where
    unvoiced) that are drawn (in runs of two or more): each frame taken as the median of the voiced
    frames within two of it (a tracker's one- or two-frame spike at a phrase's end drops out), then
    their 1st to 99th percentile with a whole tone of margin, at least an octave tall. What lies
    outside is drawn at the chart's edge rather than squashing every note into a sliver; a cover an
    octave off for a stretch is inside."""
    notes: list[float] = []
    for hz in tracks:
        midi = [hz_to_midi(f) if f > 0 else None for f in hz]
        for i, note in enumerate(midi):
            drawn = any(midi[j] is not None for j in (i - 1, i + 1) if 0 <= j < len(midi))  # a run of 2 or more
            if note is not None and drawn:
                notes.append(statistics.median(n for n in midi[max(0, i - 2) : i + 3] if n is not None))
    if not notes:
        return 48.0, 72.0
    ordered = sorted(notes)
    left_out = len(ordered) // 100  # at each end
    low, high = ordered[left_out] - 2, ordered[-1 - left_out] + 2
    if high - low < 12:
        middle = (low + high) / 2
        low, high = middle - 6, middle + 6
    return low, high


def _polylines(times: list[float], hz: list[float], duration: float, low: float, high: float) -> list[str]:
    """The voiced runs of a pitch track as SVG point lists (a gap wherever it is unvoiced)."""
    runs: list[str] = []
    current: list[str] = []
    for t, f in zip(times, hz, strict=True):
        if f <= 0:
            if len(current) > 1:
                runs.append(" ".join(current))
            current = []
            continue
        y = PITCH_HEIGHT * (high - hz_to_midi(f)) / (high - low)
        current.append(f"{_x(t, duration):.1f},{min(max(y, 0.0), PITCH_HEIGHT):.1f}")
    if len(current) > 1:
        runs.append(" ".join(current))
    return runs


def _waveform(curves: Curves) -> str:
    """The song's shape: the mix's RMS level per column as a grey area (-60 dBFS at the bottom,
    0 at the top: a loudness-normalised mix's peaks are a solid slab), the converted vocals' level
    as a line over it; the mix's peaks where no levels were kept."""
    mix = curves.mix_levels or curves.waveform
    area = ""
    if mix:
        step = WIDTH / len(mix)
        points = " ".join(f"{i * step:.1f},{WAVE_HEIGHT * (1 - v):.1f}" for i, v in enumerate(mix))
        area = f'<polygon points="0,{WAVE_HEIGHT} {points} {WIDTH},{WAVE_HEIGHT}" fill="{MIX_COLOUR}"/>'
    if not curves.vocals_levels:
        return area
    vstep = WIDTH / len(curves.vocals_levels)
    vocals = " ".join(f"{i * vstep:.1f},{WAVE_HEIGHT * (1 - v):.1f}" for i, v in enumerate(curves.vocals_levels))
    return area + f'<polyline points="{vocals}" fill="none" stroke="{CONVERTED_COLOUR}" stroke-width="1.5"/>'


def _cell(value: float | None, fmt: str, failed: bool) -> str:
    if value is None:
        return '<td class="na">not measured</td>'
    return f'<td class="{"bad" if failed else "ok"}">{format(value, fmt)}</td>'


def _row(label: str, scores: Scores) -> str:
    m, below = scores.melody, set(scores.below)
    return (
        f"<tr><th>{html.escape(label)}</th>"
        + _cell(m.f0_correlation, ".3f", "f0_correlation" in below)
        + _cell(m.f0_rmse_cents, ".0f", "f0_rmse_cents" in below)
        + _cell(m.octave_error_share, ".1%", "octave_error_share" in below)
        + _cell(m.unvoiced_share, ".1%", "unvoiced_share" in below)
        + _cell(scores.speaker_similarity, ".3f", "speaker_similarity" in below)
        + _cell(scores.dnsmos.ovrl if scores.dnsmos else None, ".2f", "dnsmos_ovrl" in below)
        + "</tr>"
    )


def _thresholds(t: Thresholds) -> str:
    return (
        f"<tr><th>threshold</th><td>&ge; {t.f0_correlation_min:.2f}</td><td>&le; {t.f0_rmse_cents_max:.0f}</td>"
        f"<td>&le; {t.octave_error_share_max:.0%}</td><td>&le; {t.unvoiced_share_max:.0%}</td>"
        f"<td>&ge; {t.speaker_similarity_min:.2f}</td><td>&ge; {t.dnsmos_ovrl_min:.1f}</td></tr>"
    )


def _repair(repair: Repair | None, segments: list[Segment]) -> str:
    """What the repair loop tried on each weak segment, in order, and what it kept."""
    if repair is None:
        verdicts = {s.verdict for s in segments}
        if Verdict.BELOW in verdicts:
            return "<p>Repair is off: nothing was re-rendered.</p>"
        if Verdict.NOT_MEASURABLE in verdicts:
            return (
                "<p>Nothing was re-rendered: no segment was measured below a threshold, and a segment with too "
                "little singing to judge is not re-rendered.</p>"
            )
        return "<p>Every segment met the thresholds: nothing was re-rendered.</p>"
    rows = "".join(
        f"<tr><th>{s.start_s:.0f}–{s.end_s:.0f} s</th><td>{_names(s.why)}</td>"  # noqa: RUF001
        f"<td>{html.escape(c.setting)}</td><td>{_names(c.below) or 'none'}</td>"
        f'<td class="{"ok" if c.kept else ""}">{"kept" if c.kept else "dropped"}</td><td>{c.seconds:.1f} s</td></tr>'
        for s in repair.segments
        for c in s.tried
    )
    table = (
        '<table id="repair"><tr><th>segment</th><th>below before</th><th>tried</th><th>still below</th>'
        f"<th></th><th>cost</th></tr>{rows}</table>"
        if rows
        else ""
    )
    return f"<p>{html.escape(repair.summary())}.</p>{table}"


VOICE_COLOURS = ("#1565c0", "#ef6c00", "#6a1b9a", "#2e7d32", "#ad1457", "#00838f", "#4e342e", "#37474f", "#9e9d24")
CAST_HEIGHT = 34


def _stems(report: QualityReport) -> str:
    """How the vocal stem was used, with a player for each stem written beside the page."""
    if report.stems is None:
        return ""
    players = "".join(
        f'<p class="stem">{html.escape(name)}: <audio controls preload="none" src="{html.escape(file)}"></audio></p>'
        for name, file in report.stems.files.items()
    )
    return f"<h2>Stems</h2><p>{html.escape(report.stems.said)}.</p>{players}"


def _cast(report: QualityReport, duration: float) -> str:
    """A duet's timeline: which voice sings where, and how like its voice each stretch sounds."""
    if not report.singers:
        return ""
    names = list(dict.fromkeys(v for s in report.singers for v in s.voices))
    colour = {name: VOICE_COLOURS[i % len(VOICE_COLOURS)] for i, name in enumerate(names)}
    rects, labels = [], []
    for stretch in report.singers:
        x, width = _x(stretch.start_s, duration), _x(stretch.end_s - stretch.start_s, duration)
        height = CAST_HEIGHT / len(stretch.voices)
        for i, voice in enumerate(stretch.voices):
            rects.append(
                f'<rect x="{x:.1f}" y="{i * height:.1f}" width="{width:.1f}" height="{height:.1f}" '
                f'fill="{colour[voice]}" stroke="#fff"><title>{html.escape(voice)}</title></rect>'
            )
        own = [stretch.similarity.get(v) for v in stretch.voices]
        likeness = ", ".join(f"{v:.2f}" for v in own if v is not None) or "not measured"
        mark = {True: "its voice", False: "likest another voice", None: "too short to tell"}[stretch.sung_by_its_voice]
        voices = html.escape(" + ".join(stretch.voices))
        span = f"{stretch.start_s:.1f} to {stretch.end_s:.1f} s"
        labels.append(f"<tr><td>{span}</td><td>{voices}</td><td>{likeness}</td><td>{mark}</td></tr>")
    legend = "".join(f'<span style="background:{colour[n]}"></span>{html.escape(n)}' for n in names)
    return f"""<h2>Who sings where</h2>
<p class="legend">{legend}</p>
<svg id="cast" width="{WIDTH}" height="{CAST_HEIGHT}" viewBox="0 0 {WIDTH} {CAST_HEIGHT}">{"".join(rects)}</svg>
<table><tr><th>stretch</th><th>voices</th><th>likeness to its voice</th><th>sounds like</th></tr>
{"".join(labels)}</table>"""


def render_page(
    report: QualityReport,
    title: str,
    audio_url: str | None = None,
    content_type: str = "audio/mpeg",
    published: bool = True,
) -> str:
    """The page's HTML.

    Args:
        report: the cover's quality report
        title: the page's title
        audio_url: the cover's URL for the player, relative to the page or absolute (no player when
            None: a refused cover is never visible)
        content_type: the cover's media type
        published: whether the cover was published (a refused cover's page says so)
    """
    curves = report.curves or Curves(frame_s=0.08, source_hz=[], converted_hz=[], waveform=[], duration_s=0.0)
    duration = curves.duration_s or (report.segments[-1].end_s if report.segments else 1.0)
    times = [i * curves.frame_s for i in range(len(curves.source_hz))]
    low, high = pitch_range(curves.source_hz, curves.converted_hz)
    bands = "".join(
        f'<rect x="{_x(s.start_s, duration):.1f}" y="0" width="{_x(s.end_s - s.start_s, duration):.1f}" '
        f'height="{PITCH_HEIGHT}" fill="{SHADES[s.verdict]}"/>'
        for s in report.segments
    )
    grid = "".join(
        f'<line x1="0" x2="{WIDTH}" y1="{PITCH_HEIGHT * (high - m) / (high - low):.1f}" '
        f'y2="{PITCH_HEIGHT * (high - m) / (high - low):.1f}" stroke="#cfd8dc" stroke-width="0.5"/>'
        f'<text x="4" y="{PITCH_HEIGHT * (high - m) / (high - low) - 2:.1f}" class="note">{midi_note(m)}</text>'
        for m in range(math.ceil(low), math.floor(high) + 1)
        if m % 12 in (0, 9)  # every C and A
    )
    source = "".join(
        # the singer's line wide beneath the cover's: where the cover follows it exactly, both still show
        f'<polyline points="{p}" fill="none" stroke="{SOURCE_COLOUR}" stroke-width="7" stroke-linejoin="round"/>'
        for p in _polylines(times, curves.source_hz, duration, low, high)
    )
    converted = "".join(
        f'<polyline points="{p}" fill="none" stroke="{CONVERTED_COLOUR}" stroke-width="2.5"/>'
        for p in _polylines(times, curves.converted_hz, duration, low, high)
    )
    w = report.whole
    verdict = {
        Verdict.PASSED: "meets every threshold",
        Verdict.BELOW: "below the gate on " + _names(w.below),
        Verdict.NOT_MEASURABLE: (
            f"not measurable: {w.melody.voiced_s:.2f} s sung in both the singer's and the cover's melody, "
            f"{MELODY_MIN_VOICED_S:.0f} s needed to judge"
        ),
    }[report.verdict]
    verdict_class = {Verdict.PASSED: "pass", Verdict.BELOW: "fail", Verdict.NOT_MEASURABLE: "na"}[report.verdict]
    status = "published" if published else "not published (quality.gate)"
    mix = report.mix
    mix_line = (
        f"{mix.loudness_lufs:.1f} LUFS, true peak {mix.true_peak_dbtp:.1f} dBTP, "
        f"{mix.clipped_share:.3%} of samples clipped, {mix.silent_share:.0%} silent"
        if mix
        else "not measured"
    )
    if audio_url is not None:
        audio_source = f'<source src="{html.escape(audio_url)}" type="{html.escape(content_type)}">'
        player = f'<audio id="player" controls preload="metadata">{audio_source}</audio>'
    else:
        player = '<p id="player-missing">the cover is not published, so this page has no player</p>'
    rows = "".join(_row(f"{s.start_s:.0f}–{s.end_s:.0f} s", s) for s in report.segments)  # noqa: RUF001
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}: quality report</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: {WIDTH + 40}px; color: #263238; }}
h1 {{ font-size: 22px; margin: 0 0 4px; }} .verdict {{ font-size: 17px; margin: 4px 0 16px; }}
.pass {{ color: #1b5e20; }} .fail {{ color: #b71c1c; }} .na {{ color: #607d8b; }}
.player {{ border: 4px solid {PLAYER_COLOUR}; border-radius: 8px; padding: 10px; margin: 12px 0; }}
.player audio {{ width: 100%; }} svg {{ display: block; background: #fafafa; border: 1px solid #eceff1; }}
.note {{ font-size: 10px; fill: #78909c; }} table {{ border-collapse: collapse; margin: 12px 0; width: 100%; }}
th, td {{ padding: 4px 8px; border-bottom: 1px solid #eceff1; text-align: right; }} th {{ text-align: left; }}
td.bad {{ background: #ffcdd2; color: #b71c1c; font-weight: 600; }} td.ok {{ color: #1b5e20; }}
td.na {{ background: {UNMEASURED_SHADE}; color: #607d8b; }}
.legend span {{ display: inline-block; width: 14px; height: 4px; margin: 0 6px 3px 12px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="verdict {verdict_class}">Quality: {verdict}; {status}.</p>
<div class="player">{player}</div>
{_cast(report, duration)}
<h2>Waveform</h2>
<p class="legend"><span style="background:{MIX_COLOUR}"></span>the mix's level
<span style="background:{CONVERTED_COLOUR}"></span>the cover's vocals (RMS, -60 to 0 dBFS)</p>
<svg id="wave" width="{WIDTH}" height="{WAVE_HEIGHT}" viewBox="0 0 {WIDTH} {WAVE_HEIGHT}">{_waveform(curves)}
<line class="playhead" x1="0" x2="0" y1="0" y2="{WAVE_HEIGHT}" stroke="{PLAYER_COLOUR}" stroke-width="2"/></svg>
<h2>Melody</h2>
<p class="legend"><span style="background:{SOURCE_COLOUR}"></span>the singer (separated vocals, with the pitch shift{
        "" if source else "; no sung notes found in them"
    })
<span style="background:{CONVERTED_COLOUR}"></span>the cover{
        "" if converted else " (no sung notes found)"
    }; segments shaded green where they meet every
threshold, red where they do not, grey where too little was sung to judge</p>
<svg id="pitch" width="{WIDTH}" height="{PITCH_HEIGHT}" viewBox="0 0 {WIDTH} {PITCH_HEIGHT}">
{bands}{grid}{source}{converted}
<line class="playhead" x1="0" x2="0" y1="0" y2="{PITCH_HEIGHT}" stroke="{PLAYER_COLOUR}" stroke-width="2"/></svg>
<h2>Scores</h2>
<table><tr><th></th>{"".join(f"<th>{html.escape(n)}</th>" for n in MEASURE_NAMES.values())}</tr>
{_row("whole song", w)}{rows}{_thresholds(report.thresholds)}</table>
<p class="note">Melody correlation: how closely the cover's melody follows the singer's (1 is exact). Pitch
error: the typical distance between them, in cents (100 to a semitone). Octave errors: the share of
notes an octave off. Sung notes lost: the share of the singer's voiced moments the cover leaves
unvoiced. Likeness: cosine similarity of speaker embeddings to the voice's reference (Resemblyzer).
Naturalness: DNSMOS P.835's overall score, 1 to 5. Each needs {MELODY_MIN_VOICED_S:.0f} s of singing in
both melodies; with less, "not measured".</p>
<p>Mix: {mix_line}. Measured in {report.measured_s:.1f} s.</p>{
        f"<p>Made with: {html.escape('; '.join(report.made_with))}.</p>" if report.made_with else ""
    }{f"<p>Autotune toward {html.escape(report.song_key)}.</p>" if report.song_key else ""}
{_stems(report)}
<h2>Repair</h2>{_repair(report.repair, report.segments)}
<script>
const player = document.getElementById("player"), duration = {duration:.3f};
function seek(event) {{
  if (!player) return;
  const box = event.currentTarget.getBoundingClientRect();
  player.currentTime = duration * (event.clientX - box.left) / box.width; player.play();
}}
for (const id of ["wave", "pitch"]) document.getElementById(id).addEventListener("click", seek);
if (player) player.addEventListener("timeupdate", () => {{
  const x = {WIDTH} * player.currentTime / duration;
  for (const line of document.querySelectorAll(".playhead")) {{
    line.setAttribute("x1", x); line.setAttribute("x2", x);
  }}
}});
</script></body></html>
"""

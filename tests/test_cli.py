"""The ``cover`` command line as a user meets it: a whole cover, single stages, the voice store,
and a readable message with a reliable exit status for every bad input."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from job.devkit import demo
from job.render.media.audio import decode
from job.render.media.ffmpeg import measure_loudness
from tests.conftest import run_cover, run_cover_process


def test_make_renders_a_cover_and_reports_timings(env, song, tmp_path):
    out = tmp_path / "cover.mp3"
    proc = run_cover(
        ["make", str(song), "--voice", demo.DEMO_VOICE, "-o", str(out), "--f0-method", "pm", "--json", "--report"],
        env,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    page = (tmp_path / "cover.report.html").read_text()
    assert '<source src="cover.mp3"' in page and "<svg" in page  # the cover beside it, by URL
    assert set(report["timings"]) == {"fetch", "separate", "convert", "quality", "mix"}
    quality = report["quality"]  # random weights: the numbers mean nothing, their presence does
    assert len(quality["segments"]) == 1 and quality["mix"]["clipped_share"] == 0.0
    assert quality["whole"]["melody"]["unvoiced_share"] is not None and report["gate"] == "published"
    audio, _ = decode(out, 44100, 2)
    assert abs(audio.shape[1] - 6 * 44100) <= 1152  # within one mp3 frame of the song
    assert measure_loudness(out)[0] == pytest.approx(-14.0, abs=0.5)


@pytest.mark.slow
def test_a_second_voice_on_the_same_song_takes_its_stems_from_the_cache(env, store, song, tmp_path):
    own = tmp_path / "models"
    own.mkdir()
    for part in ("separation", "base"):
        os.symlink(store / part, own / part)
    for name, seed in (("alto", 1), ("tenor", 2)):
        demo.write_voice(own / "voices" / name, name=name, size="tiny", seed=seed)
    env = {**env, "COVER_MODELS_DIR": str(own)}
    runs, analysed = {}, {}
    for voice in ("alto", "tenor"):
        proc = run_cover(
            ["make", str(song), "--voice", voice, "-o", str(tmp_path / f"{voice}.mp3"), "--f0-method", "pm"], env
        )
        assert proc.returncode == 0, proc.stderr
        runs[voice] = proc.stdout
        analysed[voice] = sorted((Path(env["COVER_STEM_CACHE_DIR"]) / "analysis").rglob("*.npy"))
    assert "stems separated" in runs["alto"] and "stems from the cache (separation skipped)" in runs["tenor"]
    # the vocals' features and pitch too: kept by the first voice's cover, nothing new for the second's
    assert analysed["alto"] and analysed["tenor"] == analysed["alto"]
    assert "separate" in runs["tenor"]  # the stage still reports its (short) time
    # another separation setting is another cache entry (the key: test_separate): `--overlap` reaches it
    from job.cli.main import _cover_options, build_parser
    from job.render.separate.separator import Separator
    from shared.model_store import ModelStore

    args = build_parser().parse_args(["make", str(song), "--voice", "tenor", "-o", "t2.mp3", "--overlap", "0.5"])
    separation = _cover_options(args, "t2.mp3").separation
    default = _cover_options(
        build_parser().parse_args(["make", str(song), "--voice", "tenor", "-o", "t.mp3"]), "t.mp3"
    ).separation
    assert separation.overlap == 0.5 and default.overlap != 0.5
    keys = {
        Separator(ModelStore(own), options, "cpu").stem_key("ab").separation_key for options in (separation, default)
    }
    assert len(keys) == 2


def test_text_output_shows_progress_and_a_summary(env, song, tmp_path):
    proc = run_cover(
        ["make", str(song), "--voice", demo.DEMO_VOICE, "-o", str(tmp_path / "c.wav"), "--f0-method", "pm"], env
    )
    assert proc.returncode == 0, proc.stderr
    assert "cover:" in proc.stdout and "total" in proc.stdout and "separate" in proc.stdout
    assert "convert" in proc.stderr and "100%" in proc.stderr  # per-stage progress bars
    for model in ("the separator (htdemucs)", "the content encoder (HuBERT)", f"the voice {demo.DEMO_VOICE}"):
        assert f"loading {model}" in proc.stderr  # what a bar standing at 0 % is waiting for


@pytest.mark.slow
def test_single_stages(env, song, tmp_path):
    proc = run_cover(["separate", str(song), "-o", str(tmp_path / "stems"), "--json"], env)
    assert proc.returncode == 0, proc.stderr
    vocals = json.loads(proc.stdout)["vocals"]
    proc = run_cover(
        [
            "convert",
            vocals,
            "--voice",
            demo.DEMO_VOICE,
            "-o",
            str(tmp_path / "v.wav"),
            "--f0-method",
            "harvest",
            "--pitch",
            "auto",
            "--json",
        ],
        env,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["sample_rate"] == 48000 and report["pitch_shift"] % 12 == 0


@pytest.mark.parametrize(
    ("make_input", "code", "status"),
    [
        (lambda p: p / "missing.mp3", "input.not_found", 3),
        (lambda p: (p / "t.mp3").write_text("not audio at all\n" * 10) and p / "t.mp3", "input.not_audio", 3),
        (lambda p: (p / "e.wav").touch() or p / "e.wav", "input.empty", 3),
    ],
)
def test_bad_songs_get_a_readable_error_and_status(env, tmp_path, make_input, code, status):
    proc = run_cover(
        ["make", str(make_input(tmp_path)), "--voice", demo.DEMO_VOICE, "-o", str(tmp_path / "o.mp3")], env
    )
    assert proc.returncode == status
    assert f"[{code}]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.mp3").exists()


def test_unknown_voice(env, song, tmp_path):
    proc = run_cover(["make", str(song), "--voice", "nobody", "-o", str(tmp_path / "o.mp3"), "--json"], env)
    assert proc.returncode == 3
    assert json.loads(proc.stdout)["error"]["code"] == "voice.unknown"
    assert "demo-voice" in proc.stderr  # it says which voices exist


def test_models_list_from_the_installed_command(env):
    proc = run_cover_process(["models", "list", "--json"], env)  # the console script, as a user runs it
    voices = json.loads(proc.stdout)
    assert [v["name"] for v in voices] == [demo.DEMO_VOICE] and voices[0]["untrained_demo"] is True


@pytest.fixture
def own_store(tmp_path, store):
    """A store of our own for tests that add voices (shares the session's base models by link)."""
    root = tmp_path / "store"
    root.mkdir()
    for part in ("separation", "base"):
        os.symlink(store / part, root / part)
    return root


def test_add_voice_from_a_community_zip_and_verify(env, own_store, tmp_path):
    info = demo.write_voice(tmp_path / "src", name="x", version="v1", sample_rate=40000, size="tiny")
    archive = tmp_path / "Singer_RVC.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(tmp_path / "src" / "model.pth", "Singer/singer_e300.pth")
        zf.write(tmp_path / "src" / "model.index", "Singer/added_IVF12_Flat_nprobe_1_singer_v1.index")
        zf.writestr("Singer/G_2333.pth", b"training checkpoint, ignored")
    env = {**env, "COVER_MODELS_DIR": str(own_store)}
    proc = run_cover(["models", "add", str(archive), "--range", "E4", "G2", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --json: one object on standard output, no status lines
    added = json.loads(proc.stdout)
    assert added["name"] == "singer_rvc" and added["rvc_version"] == "v1" and added["has_index"]
    assert added["vocal_range_hz"] == [pytest.approx(98.0, abs=0.1), pytest.approx(329.6, abs=0.1)]
    assert added["files"]["model.pth"]["sha256"] == info.files["model.pth"].sha256
    assert run_cover(["models", "verify"], env).returncode == 0
    (own_store / "voices" / "singer_rvc" / "model.index").write_bytes(b"tampered")
    proc = run_cover(["models", "verify"], env)
    assert proc.returncode == 4 and "sha256" in proc.stdout


def test_add_corrupt_pth_fails_cleanly_and_leaves_the_store_alone(env, own_store, tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    env = {**env, "COVER_MODELS_DIR": str(own_store)}
    proc = run_cover(["models", "add", str(bad)], env)
    assert proc.returncode == 4 and "[model.corrupt]" in proc.stderr
    assert "reading and checking the checkpoint" in proc.stderr  # it said what it was doing
    assert not (own_store / "voices" / "broken").exists()
    assert [p.name for p in (own_store / "voices").iterdir()] == []


def test_add_malicious_pth_runs_nothing(env, own_store, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    # written by a separate interpreter so this test's own process never defines the payload
    code = (
        f"import os, torch\nclass P:\n    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        f"torch.save({{'weight': {{}}, 'config': [], 'x': P()}}, {str(evil)!r})\n"
    )
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code], check=True)
    assert not marker.exists()
    proc = run_cover(["models", "add", str(evil)], {**env, "COVER_MODELS_DIR": str(own_store)})
    assert proc.returncode == 4 and "[model.unsafe]" in proc.stderr
    assert not marker.exists()
    assert [p.name for p in (own_store / "voices").iterdir()] == []  # nothing added, nothing staged
    # the payload is live: an unsafe load (in a throwaway interpreter) does run it
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(evil)!r}, weights_only=False)"],
        capture_output=True,
        check=False,
    )
    assert marker.exists()


def test_the_demo_says_plainly_that_its_untrained_voice_does_not_pass_and_writes_it(env, tmp_path):
    """`make run` is `cover demo`: under the default gate its random-weight voice does not pass, and
    the demo writes the cover anyway, saying so; what could not be measured says so, never n/a."""
    env = {k: v for k, v in env.items() if k not in ("COVER_QUALITY", "COVER_REPAIR_BUDGET")}  # the defaults
    out = tmp_path / "demo.mp3"
    proc = run_cover(["demo", "--size", "tiny", "--seconds", "8", "-o", str(out)], env)
    assert proc.returncode == 0, proc.stderr
    assert "quality: " in proc.stdout and "not passed" in proc.stdout and "n/a" not in proc.stdout
    assert "not measured cents" not in proc.stdout
    assert "repair: re-rendered" in proc.stdout  # every segment of an untrained voice is weak
    assert out.stat().st_size > 10_000
    assert (tmp_path / "demo.report.html").is_file()  # and its report


def test_the_command_line_s_small_courtesies(env, song, tmp_path):
    """--version; defaults of 0 shown in --help; a bad option value in the flag's own words; an
    unknown voice to verify is the caller's mistake (exit 3); listings without embeddings unless
    asked for."""
    version = run_cover(["--version"], env)
    assert version.returncode == 0 and re.fullmatch(r"cover \d+\.\d+\S*\n", version.stdout)
    helped = run_cover(["make", "--help"], env)
    pitch_help = helped.stdout[helped.stdout.index("\n  --pitch") :].split("\n  --f0-method")[0]
    assert "(default: 0)" in pitch_help
    bad = run_cover(
        ["make", str(song), "--voice", demo.DEMO_VOICE, "-o", str(tmp_path / "o.mp3"), "--pitch", "99"], env
    )
    assert bad.returncode == 3 and "--pitch 99: input should be less than or equal to 24" in bad.stderr
    assert "literal" not in bad.stderr and "--pitch.int" not in bad.stderr and not (tmp_path / "o.mp3").exists()
    unknown = run_cover(["models", "verify", "nosuch"], env)
    assert unknown.returncode == 3 and "[voice.unknown]" in unknown.stderr
    listed = json.loads(run_cover(["models", "list", "--json"], env).stdout)
    assert listed and all("reference_embedding" not in v for v in listed)
    with_embeddings = json.loads(run_cover(["models", "list", "--json", "--embeddings"], env).stdout)
    assert all("reference_embedding" in v for v in with_embeddings)


def test_a_closed_pipe_ends_the_listing_quietly(env):
    """`cover models list --json | true`: the reader is gone before the listing is written (as
    `| head` leaves early); no traceback, exit 0."""
    cover = Path(sys.executable).parent / "cover"
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"'{cover}' models list --json | true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_python_warnings_are_json_log_lines():
    code = (
        "from shared.logs import setup_logging; setup_logging(); import warnings; warnings.warn('old api');"
        "warnings.warn('pkg_resources is deprecated as an API')"  # librosa's: no user can act on it
    )
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=60)
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    entry = json.loads(line)
    assert entry["logger"] == "py.warnings" and "old api" in entry["message"] and entry["severity"] == "WARNING"


def test_cover_pitch_prints_what_a_tracker_hears(env, tmp_path):
    """``cover pitch``: the tracker's own track at its own hop (10 ms on 16 kHz), unsmoothed; a
    hybrid of two; and a readable summary."""
    from job.render.media.audio import write_wav
    from tests.conftest import sung_tone

    tone = write_wav(tmp_path / "a3.wav", sung_tone(2.0, f0=220.0)[None], 16000)
    heard = run_cover(["pitch", str(tone), "--f0-method", "pm+harvest", "--json"], env)
    assert heard.returncode == 0, heard.stderr
    track = json.loads(heard.stdout)
    assert track["hop_s"] == 0.01 and track["f0_method"] == "pm+harvest"
    assert len(track["f0_hz"]) == 32000 // 160 + 1
    voiced = [f for f in track["f0_hz"] if f > 0]
    assert abs(1200 * math.log2(statistics.median(voiced) / 220.0)) < 20
    text = run_cover(["pitch", str(tone), "--f0-method", "pm"], env)
    assert text.returncode == 0 and "median 2" in text.stdout and "(A3)" in text.stdout
    wrong = run_cover(["pitch", str(tone), "--f0-method", "yin"], env)
    assert wrong.returncode == 3 and "--f0-method yin: expected one of rmvpe, crepe" in wrong.stderr

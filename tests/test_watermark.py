"""The inaudible watermark (job/render/mix/watermark.py): the mixer's cover carries its id through
the issue's attacks (MP3, AAC, Opus, 48 kHz, -6 dB, a 20 s excerpt), unmarked songs read as
unmarked, the mark sits under the music and in its band, blocks join exactly, and ``cover verify``
reads it where the manifest is gone. The songs are the devkit's generator (no real songs here):
``make bench-watermark`` measures the same on 20 marked and 100 unmarked ones (docs/quality.md)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest

from job.devkit import demo
from job.render import credentials
from job.render.media.audio import MIX_SAMPLE_RATE, decode, write_wav
from job.render.mix import watermark
from job.render.mix.mixer import MixSource, mix
from shared.options import MixOptions, OutputFormat
from shared.provenance import manifest_label, mark_id_of
from tests.conftest import run_cover

SECONDS = 26.0
MARK = 0x5EED_C0FFEE_42
FACTS = credentials.CoverFacts(
    title="song-7 (demo cover)", song="song-7", song_sha256="cd" * 32, voices=[], actions=["mixed"], verdict=None
)


@pytest.fixture(scope="module")
def stems(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("stems")
    vocals, inst = demo.demo_song(SECONDS, seed=11)
    return write_wav(folder / "vocals.wav", vocals, MIX_SAMPLE_RATE), write_wav(
        folder / "no_vocals.wav", inst, MIX_SAMPLE_RATE
    )


@pytest.fixture(scope="module")
def cover(stems, tmp_path_factory) -> Path:
    """The mixer's MP3 cover, marked with :data:`MARK` (limited, loudness-normalised, encoded)."""
    vocals, inst = stems
    out = tmp_path_factory.mktemp("cover") / "cover.mp3"
    return mix(inst, vocals, out, MixOptions(format=OutputFormat.MP3), watermark=MARK).path


def _attacked(source: Path, tmp_path: Path, options: list[str], ext: str) -> np.ndarray:
    out = tmp_path / f"attacked.{ext}"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(source), *options, str(out)], check=True)
    return decode(out, MIX_SAMPLE_RATE, 1)[0][0]


ATTACKS = {
    "aac-128k": (["-c:a", "aac", "-b:a", "128k"], "m4a"),
    "opus-96k": (["-c:a", "libopus", "-b:a", "96k"], "ogg"),
    "resampled-48k": (["-ar", "48000"], "wav"),
    "minus-6-db": (["-af", "volume=-6dB"], "wav"),
}


def test_the_mixers_mp3_cover_carries_its_id(cover):
    found = watermark.detect(decode(cover, MIX_SAMPLE_RATE, 1)[0][0])
    assert found.found and found.mark_id == MARK, found
    assert found.sync_z > watermark.SYNC_THRESHOLD


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_id_survives_each_attack(cover, tmp_path, attack):
    options, ext = ATTACKS[attack]
    found = watermark.detect(_attacked(cover, tmp_path, options, ext))
    assert found.mark_id == MARK, found


def test_a_20_s_excerpt_from_anywhere_carries_the_id(cover):
    audio = decode(cover, MIX_SAMPLE_RATE, 1)[0][0]
    for start_s in (0.0, 2.37, 5.9):  # neither on a packet nor on a frame
        start = int(start_s * MIX_SAMPLE_RATE)
        assert watermark.detect(audio[start : start + 20 * MIX_SAMPLE_RATE]).mark_id == MARK


def test_unmarked_songs_silence_and_noise_read_as_unmarked():
    rng = np.random.default_rng(3)
    signals = [np.zeros(20 * MIX_SAMPLE_RATE, np.float32), 0.1 * rng.standard_normal(20 * MIX_SAMPLE_RATE)]
    for seed in range(100, 103):
        vocals, inst = demo.demo_song(15.0, seed=seed)
        signals.append((vocals + inst).mean(axis=0))
    for signal in signals:
        found = watermark.detect(signal)
        assert not found.found and found.mark_id is None
        assert found.sync_z < watermark.SYNC_THRESHOLD - 1.0  # with a margin (the bench: 100 songs)


def test_the_mark_follows_the_music_in_its_band_and_stays_under_it():
    """The mark is the music scaled by +-STRENGTH in 1.5 to 6 kHz: silent where the music is, 95 %
    of its energy in the band, and ~25 dB under the mix (a tone's mix: the band holds all of it)."""
    rng = np.random.default_rng(9)
    music = np.zeros(10 * MIX_SAMPLE_RATE, np.float32)
    music[: 5 * MIX_SAMPLE_RATE] = 0.1 * rng.standard_normal(5 * MIX_SAMPLE_RATE)  # then 5 s of silence
    mark = watermark.Marker(MARK).mark(music, 0, 0, music.size)
    silent = slice(5 * MIX_SAMPLE_RATE + watermark.N_FFT, None)
    assert np.max(np.abs(mark[silent])) == 0.0
    spectrum = np.abs(np.fft.rfft(mark[: 5 * MIX_SAMPLE_RATE])) ** 2
    hz = np.fft.rfftfreq(5 * MIX_SAMPLE_RATE, 1 / MIX_SAMPLE_RATE)
    assert spectrum[(hz > 1400) & (hz < 6100)].sum() > 0.95 * spectrum.sum()
    freqs = np.fft.rfftfreq(music.size, 1 / MIX_SAMPLE_RATE)
    band = np.fft.irfft(np.fft.rfft(music) * ((freqs > 1507) & (freqs < 5965)), n=music.size)
    in_band_db = 10 * np.log10(np.sum(band**2) / np.sum(mark**2))
    assert in_band_db == pytest.approx(-20 * np.log10(watermark.STRENGTH), abs=2.0)


def test_blocks_join_exactly(stems, tmp_path, monkeypatch):
    """The mixer marks a block at a time on the song's frame grid: the streamed mix minus the
    unmarked one is the mark made over the whole song at once."""
    from job.render.mix import mixer as mixing

    vocals, inst = stems
    monkeypatch.setattr(mixing, "BLOCK", 30_011)  # blocks that fall anywhere in a frame
    streams = []
    for marker in (None, watermark.Marker(MARK)):
        source = MixSource(inst, vocals, MixOptions(), tmp_path / "scratch", marker)
        try:
            streams.append(np.concatenate(list(source.blocks()), axis=1))
        finally:
            source.close()
    plain, marked = streams
    whole = watermark.Marker(MARK).mark(plain.mean(axis=0), 0, 0, plain.shape[1])
    assert np.max(np.abs(marked - plain - whole)) < 1e-6
    assert np.max(np.abs(marked[0] - plain[0] - (marked[1] - plain[1]))) < 1e-6  # one mark on both channels


def test_the_payload_its_crc_and_the_manifest_label():
    bits = watermark.encode(MARK)
    assert watermark.decode(bits) == MARK
    for i in (0, 31, 63):  # any one bit wrong: the CRC says so
        flipped = bits.copy()
        flipped[i] *= -1
        assert watermark.decode(flipped) is None
    soft = bits * 5.0
    soft[[3, 40]] *= -0.1  # two unsure bits read wrong: the weakest are tried flipped
    assert watermark._chase(soft) == MARK
    label = manifest_label(MARK, tail=(1 << 74) - 1)
    parsed = uuid.UUID(label.removeprefix("urn:c2pa:"))
    assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert mark_id_of(label) == MARK
    assert label.startswith(f"urn:c2pa:{MARK:012x}"[:17])


def test_cover_verify_reads_the_watermark_where_the_manifest_is_gone(cover, tmp_path):
    env = {**os.environ, "COVER_STATE_DIR": str(tmp_path / "state")}
    me = credentials.identity(None, None, None, tmp_path / "state")
    signed = tmp_path / "signed.mp3"
    signed.write_bytes(cover.read_bytes())
    summary = credentials.sign(signed, "audio/mpeg", FACTS, me, MARK)
    assert summary.watermark == f"{MARK:012x}"
    assert mark_id_of(summary.manifest_id) == MARK
    intact = json.loads(run_cover(["verify", str(signed), "--json"], env).stdout)
    assert intact["status"] == "verified" and intact["watermark"]["matches_manifest"] is True
    stripped = tmp_path / "stripped.m4a"  # re-encoded: the manifest does not follow
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-i", str(signed), "-c:a", "aac", "-b:a", "128k", str(stripped)], check=True
    )
    done = run_cover(["verify", str(stripped)], env)
    assert done.returncode == 10, done.stdout + done.stderr
    assert f"watermark: {MARK:012x}" in done.stdout and summary.manifest_id[:23] in done.stdout
    plain = tmp_path / "plain.mp3"
    vocals, inst = demo.demo_song(20.0, seed=4)
    write_wav(tmp_path / "plain.wav", vocals + inst, MIX_SAMPLE_RATE)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(tmp_path / "plain.wav"), str(plain)], check=True)
    unmarked = run_cover(["verify", str(plain)], env)
    assert unmarked.returncode == 9 and "watermark: none heard" in unmarked.stdout

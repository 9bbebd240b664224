"""MP3 encoded in stretches side by side (job/render/media/stretch_encoder.py): the joined file
against one encoder of the whole song, on the demo song and on material chosen to make the joins
hard, through the encoder alone and through the mix stage; the frames and the header frame it
writes (job/render/media/mp3_frames.py)."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from job.devkit import demo
from job.render import credentials
from job.render.fetch import probe
from job.render.media import mp3_frames, stretch_encoder
from job.render.media.audio import MIX_SAMPLE_RATE, decode, write_wav
from job.render.media.ffmpeg import PipeEncoder
from job.render.media.mp3_frames import SAMPLES_PER_FRAME, FrameError, crc16, info_frame, split_frames
from job.render.media.stretch_encoder import StretchEncoder, stretch_plan, workers_for
from job.render.mix.mixer import mix
from shared.errors import CoverError, ErrorCode
from shared.options import MixOptions, OutputFormat
from shared.provenance import VerifyStatus, verify
from tests.test_credentials import FACTS

RATE = MIX_SAMPLE_RATE
CODEC = ["-c:a", "libmp3lame", "-q:a", "0", "-ar", str(RATE)]
ONE_ENCODER = [*CODEC, "-reservoir", "0"]  # the setting the stretches are encoded with
TAGS = ["-metadata", "title=a stretched song", "-metadata", "artist=melodia-cover"]
BLOCK = 1 << 16


@pytest.fixture
def short_stretches(monkeypatch):
    """Stretches of 3 s, so a song of seconds has several joins."""
    monkeypatch.setattr(stretch_encoder, "STRETCH_S", (3.0, 3.0))


def _encode(encoder, song: np.ndarray) -> tuple[float, float] | None:
    for start in range(0, song.shape[-1], BLOCK):
        encoder.write(song[:, start : start + BLOCK])
    return encoder.close()


def _one_encoder(song: np.ndarray, out):
    return _encode(PipeEncoder(RATE, 2, ONE_ENCODER + TAGS, "mp3", out, ("mp3", "mp3")), song), out


def _stretched(song: np.ndarray, out, workers: int = 3):
    encoder = StretchEncoder(RATE, song.shape[-1], CODEC, TAGS, out, workers)
    return _encode(encoder, song), out, encoder.plan


def _audio_frames(path) -> list[bytes]:
    """The file's frames after its ID3v2 tag and its header frame."""
    data = path.read_bytes()
    assert data[:3] == b"ID3"
    size = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]
    frames = split_frames(data[10 + size :])
    assert b"Xing" in frames[0][:64]
    return frames[1:]


def _borrows(frame: bytes) -> int:
    """How many bytes of the frames before this one its audio data begins in (``main_data_begin``,
    the side information's first 9 bits): 0 for every frame of a joinable stream."""
    return int.from_bytes(frame[4:6], "big") >> 7


def _hard_song(seconds: float = 24.0) -> np.ndarray:
    """Bursts of noise at levels from -60 to 0 dB, tones fading in, clicks, and a stretch at -80 dB:
    the near-silences after which LAME's adaptive thresholds take longest to settle."""
    rng = np.random.default_rng(5)
    n = int(seconds * RATE)
    song = np.zeros((2, n), np.float32)
    t = np.arange(RATE) / RATE
    for second in range(0, int(seconds) - 2, 4):
        a, b = second * RATE, int((second + 1.5) * RATE)
        song[:, a:b] += (rng.standard_normal((2, b - a)) * 0.3 * rng.uniform(0.001, 1)).astype(np.float32)
        song[0, b : b + RATE] += (0.5 * np.sin(2 * np.pi * (220 + 50 * second) * t) * np.linspace(0, 1, RATE)).astype(
            np.float32
        )
        song[:, b + RATE : b + RATE + 100] += 0.9
    song[:, int(12 * RATE) : int(16 * RATE)] *= 1e-4
    return np.clip(song, -1, 1)


def test_a_song_encoded_in_stretches_is_the_one_encoders_file_frame_for_frame(tmp_path, short_stretches):
    """On the demo song every joined frame is the frame one encoder of the whole song writes: the
    file decodes to the same samples (exactly the song's length: the header frame's delay and
    padding are right), carries the tags, and measures as the one encoder's stream does."""
    vocals, instrumental = demo.demo_song(20.0, seed=4)
    song = (0.5 * (vocals + instrumental)).astype(np.float32)
    one_measure, one = _one_encoder(song, tmp_path / "one.mp3")
    measure, joined, plan = _stretched(song, tmp_path / "joined.mp3")
    assert len(plan) == 7
    assert all(first % SAMPLES_PER_FRAME == 0 for first, _ in plan)
    assert _audio_frames(joined) == _audio_frames(one)
    ours, _ = decode(joined, RATE, 2)
    theirs, _ = decode(one, RATE, 2)
    assert ours.shape == song.shape
    assert np.array_equal(ours, theirs)
    assert measure == one_measure
    tags = {k.lower(): v for k, v in probe(joined)["format"].get("tags", {}).items()}
    assert tags["title"] == "a stretched song"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["joined.mp3", "one.mp3"]  # the frames file is gone


def test_joins_after_near_silence_decode_as_close_to_the_song_as_one_encoder(tmp_path, short_stretches):
    """Where LAME's state has not settled by a join (after a long stretch at -80 dB), the frames
    after it may be quantised otherwise than one encoder would: around every join the decoded file
    is no further from the song, and jumps no more from sample to sample, than one encoder's file."""
    song = _hard_song()
    _, one = _one_encoder(song, tmp_path / "one.mp3")
    _, joined, plan = _stretched(song, tmp_path / "joined.mp3")
    ours, _ = decode(joined, RATE, 2)
    theirs, _ = decode(one, RATE, 2)
    assert ours.shape == theirs.shape == song.shape
    differs = 0
    for first, _ in plan[1:]:
        near = slice(first - 2 * SAMPLES_PER_FRAME, first + 2 * SAMPLES_PER_FRAME)
        if np.array_equal(ours[:, near], theirs[:, near]):
            continue
        differs += 1
        ours_error = np.sqrt(np.mean((ours[:, near] - song[:, near]) ** 2))
        their_error = np.sqrt(np.mean((theirs[:, near] - song[:, near]) ** 2))
        assert ours_error <= 1.5 * their_error + 1e-6
        own_jump = max(np.abs(np.diff(theirs[:, near])).max(), np.abs(np.diff(song[:, near])).max())
        assert np.abs(np.diff(ours[:, near])).max() <= 1.5 * own_jump + 1e-4
    assert differs >= 1  # the material does what it is here for
    whole = [np.sqrt(np.mean((x - song) ** 2)) for x in (ours, theirs)]
    assert whole[0] == pytest.approx(whole[1], rel=0.01)


def test_the_mix_stage_encodes_in_stretches_where_told_and_the_cover_is_the_same_song(tmp_path, short_stretches):
    """A limited, watermarked MP3 mix (a quiet instrumental with clicks, noise at 48 kHz for vocals)
    through three encoders side by side: as long as the one encoder's cover to the sample, at the
    loudness target, and the same audio within the codec's noise (one encoder keeps LAME's bit
    reservoir, the stretches cannot)."""
    _, instrumental = demo.demo_song(14.0, seed=6)
    instrumental *= 0.1
    instrumental[:, :: RATE // 3] = 0.9  # peaks the gain to the target would push over the ceiling
    inst = write_wav(tmp_path / "no_vocals.wav", instrumental, RATE)
    noise = 0.03 * np.random.default_rng(0).standard_normal(14 * 48000)
    voc = write_wav(tmp_path / "vocals.wav", noise.astype(np.float32), 48000)
    options = MixOptions(format=OutputFormat.MP3)
    one = mix(inst, voc, tmp_path / "one.mp3", options, voice_name="alto", watermark=7, workers=1)
    several = mix(inst, voc, tmp_path / "several.mp3", options, voice_name="alto", watermark=7, workers=3)
    assert several.normalisation == one.normalisation == "limited"
    assert several.loudness_lufs == pytest.approx(-14.0, abs=0.3)
    assert several.true_peak_dbtp <= -1.0
    ours, _ = decode(several.path, RATE, 2)
    theirs, _ = decode(one.path, RATE, 2)
    assert ours.shape == theirs.shape == instrumental.shape
    snr = 10 * np.log10(np.sum(theirs**2) / np.sum((ours - theirs) ** 2))
    assert snr > 30.0  # 37.8 dB when written
    assert all(_borrows(frame) == 0 for frame in _audio_frames(several.path))
    assert any(_borrows(frame) > 0 for frame in _audio_frames(one.path))


def test_a_failing_encoder_fails_the_encode_and_leaves_nothing(tmp_path, short_stretches):
    song = demo.demo_song(10.0, seed=1)[1]
    encoder = StretchEncoder(RATE, song.shape[-1], [*CODEC, "-b:a", "nonsense"], TAGS, tmp_path / "x.mp3", 2)
    with pytest.raises(CoverError) as failed:
        _encode(encoder, song)
    encoder.abort()  # what the mix stage does after a failed pass: harmless after a failure
    assert failed.value.code == ErrorCode.INTERNAL and "ffmpeg failed" in failed.value.message
    assert list(tmp_path.iterdir()) == []


def test_an_encode_stopped_midway_leaves_no_encoder_and_no_file(tmp_path, short_stretches):
    """The mix stage drops a pass whose loudness missed: every encoder stops, nothing is left."""
    song = demo.demo_song(20.0, seed=2)[1]
    encoder = StretchEncoder(RATE, song.shape[-1], CODEC, TAGS, tmp_path / "x.mp3", 3)
    for start in range(0, song.shape[-1] // 2, BLOCK):
        encoder.write(song[:, start : start + BLOCK])
    encoder.abort()
    assert not encoder._running and encoder._meter.poll() is not None
    assert list(tmp_path.iterdir()) == []


def test_a_mix_shorter_than_it_said_is_an_error_not_a_short_file(tmp_path, short_stretches):
    song = demo.demo_song(10.0, seed=2)[1]
    encoder = StretchEncoder(RATE, song.shape[-1] + RATE, CODEC, TAGS, tmp_path / "x.mp3", 2)
    with pytest.raises(CoverError, match="ended at"):
        _encode(encoder, song)
    assert list(tmp_path.iterdir()) == []


def test_stretches_start_on_frames_and_a_short_song_or_one_core_is_one_encode():
    minute = 60 * RATE
    plan = stretch_plan(3 * minute + 17, RATE, 2)  # 90 s each would be: 60 at most, on frame boundaries
    assert [end - first for first, end in plan] == [2297 * SAMPLES_PER_FRAME] * 2 + [3 * minute + 17 - 2 * 2297 * 1152]
    assert plan[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(plan))
    assert stretch_plan(3 * minute, RATE, 1) == [(0, 3 * minute)]
    assert stretch_plan(30 * RATE, RATE, 8) == [(0, 30 * RATE)]  # one 30 s stretch: nothing to join


@pytest.mark.parametrize(("cores", "workers"), [(1, 1), (2, 1), (4, 3), (16, 8)])
def test_encoders_side_by_side_leave_a_core_for_the_mix(monkeypatch, cores, workers):
    """On 2 cores two encoders took as long as one (the render and the meter need a core)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert workers_for(10 * 60 * RATE, RATE) == workers
    assert workers_for(10 * 60 * RATE, RATE, encoders=2) == 2
    assert workers_for(20 * RATE, RATE, encoders=4) == 1  # too short for two stretches


def test_frames_and_the_header_frame():
    assert crc16(b"123456789") == 0xBB3D  # CRC-16/ARC's check value
    with pytest.raises(FrameError):
        split_frames(b"\x00" * 64)
    header = bytes.fromhex("fffb9064") + bytes(413)  # 128 kbps, 44.1 kHz, joint stereo: 417 bytes
    assert split_frames(header * 3) == [header] * 3
    with pytest.raises(FrameError, match="cut short"):
        split_frames(header + header[:100])
    frame = info_frame(header, [417] * 10, 10 * 1152 - 576 - 100)
    assert frame[36:40] == b"Xing" and int.from_bytes(frame[44:48], "big") == 10
    assert int.from_bytes(frame[177:180], "big") == (576 << 12) | 100  # delay, padding
    assert int.from_bytes(frame[190:192], "big") == crc16(frame[:190])
    with pytest.raises(FrameError, match="cannot hold"):
        info_frame(header, [417] * 10, 10 * 1152)
    assert mp3_frames.frame_length(int.from_bytes(frame[:4], "big")) == len(frame)


def test_a_joined_mp3_takes_content_credentials_that_verify(tmp_path, short_stretches):
    """The mix stage's file goes on to be signed (job/render/credentials.py): the joined file, with
    our header frame rewritten by FFmpeg, is an MP3 C2PA binds into and reads back."""
    song = demo.demo_song(10.0, seed=8)[1]
    _, joined, _ = _stretched(song, tmp_path / "joined.mp3")
    me = credentials.identity(None, None, None, tmp_path / "state")
    credentials.sign(joined, "audio/mpeg", FACTS, me)
    assert verify(joined, me.trusted_pem).status is VerifyStatus.VERIFIED
    signed, _ = decode(joined, RATE, 2)
    assert signed.shape == song.shape

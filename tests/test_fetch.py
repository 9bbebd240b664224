"""Every bad song gets its own error code, before any model runs."""

from __future__ import annotations

import http.server
import subprocess
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from job.render.fetch import fetch
from job.render.media.audio import write_wav
from job.render.media.download import UrlPolicy
from shared.errors import CoverError, ErrorCode


def _code(source, work: Path, **kwargs) -> ErrorCode:
    with pytest.raises(CoverError) as info:
        fetch(source, work, **kwargs)
    return info.value.code


def test_a_good_song_is_decoded_to_44k_stereo(song, tmp_path):
    got = fetch(song, tmp_path / "w")
    assert got.duration_s == pytest.approx(6.0, abs=1e-3)
    assert got.wav.is_file() and len(got.sha256) == 64


def test_discarding_a_fetch_removes_its_own_files_never_the_users(song, tmp_path):
    got = fetch(song, tmp_path / "w")
    assert got.original.samefile(song)  # on the same disk: a hard link, no second copy of the bytes
    got.discard_files()
    assert not got.wav.exists() and not got.original.exists() and song.is_file()
    # a song that already sits where fetch would copy it is the user's file: kept
    work = tmp_path / "w2"
    work.mkdir()
    mine = work / "source.wav"
    mine.write_bytes(song.read_bytes())
    got = fetch(mine, work)
    got.discard_files()
    assert got.original == mine and mine.is_file() and not got.wav.exists()


def test_missing_file(tmp_path):
    assert _code(tmp_path / "nope.mp3", tmp_path / "w") is ErrorCode.INPUT_NOT_FOUND


def test_text_file_named_mp3(tmp_path):
    fake = tmp_path / "song.mp3"
    fake.write_text("this is not audio, just some text pretending to be an mp3\n" * 20)
    assert _code(fake, tmp_path / "w") is ErrorCode.INPUT_NOT_AUDIO


def test_zero_length_file(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.touch()
    assert _code(empty, tmp_path / "w") is ErrorCode.INPUT_EMPTY


def test_truncated_file(tmp_path, song):
    data = song.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 3])  # the header still announces 6 s
    assert _code(cut, tmp_path / "w") is ErrorCode.INPUT_TRUNCATED


def test_pure_silence(tmp_path):
    silent = write_wav(tmp_path / "silence.wav", np.zeros((2, 44100 * 2), np.float32), 44100)
    assert _code(silent, tmp_path / "w") is ErrorCode.INPUT_SILENT


def test_over_long_file(tmp_path, song):
    assert _code(song, tmp_path / "w", max_duration_s=5.0) is ErrorCode.INPUT_TOO_LONG


def test_file_without_an_audio_stream(tmp_path):
    video = tmp_path / "clip.mp4"  # an allowed container holding only a picture
    subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "color=c=red:s=16x16:d=1", "-c:v", "mpeg4", str(video)],
        check=True,
    )
    assert _code(video, tmp_path / "w") is ErrorCode.INPUT_NO_AUDIO_STREAM
    image = tmp_path / "cover.png"  # not an audio container at all
    subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "color=c=red:s=16x16", "-frames:v", "1", str(image)], check=True
    )
    assert _code(image, tmp_path / "w2") is ErrorCode.INPUT_NOT_AUDIO


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_download_and_404(http_root, song, tmp_path):
    root, base = http_root
    (root / "song.wav").write_bytes(song.read_bytes())
    policy = UrlPolicy.model_validate({"allow_http": True, "allow_networks": ["127.0.0.1/32"]})
    got = fetch(f"{base}/song.wav", tmp_path / "w", policy=policy)
    assert got.duration_s == pytest.approx(6.0, abs=1e-3)
    assert _code(f"{base}/missing.wav", tmp_path / "w2", policy=policy) is ErrorCode.INPUT_DOWNLOAD_FAILED
    assert not list((tmp_path / "w2").glob("*.part"))

"""Stage 1, fetch: bring a song into the work folder and check that it is usable audio.

Limits (all raise :class:`CoverError` with the code in brackets):

* the source must exist [input.not_found] and be non-empty [input.empty];
* ffprobe must recognise it [input.not_audio] and find an audio stream [input.no_audio_stream];
* it must decode to the length its header announces (within 2 %) [input.truncated];
* its peak must rise above -70 dBFS [input.silent];
* it must be at most ``max_duration_s`` long, 15 minutes by default [input.too_long], and at
  least :data:`MIN_DURATION_S` [input.too_short];
* a URL must pass the download guard [input.url_refused], answer 2xx in time
  [input.download_failed] and stay under ``max_download_bytes`` [input.too_long]
  (:mod:`job.render.media.download`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel

from job.render.media.audio import MIX_SAMPLE_RATE, SILENCE_DBFS, decode_to_wav
from job.render.media.download import UrlPolicy, download, is_url, redact
from job.render.media.ffmpeg import probe
from shared.errors import CoverError, ErrorCode
from shared.hashing import sha256_of
from shared.names import safe_file_name

MIN_DURATION_S = 1.0  # shorter "songs" pass a probe but leave nothing to separate or mix


class SongAudio(BaseModel):
    """A fetched, validated song: the original file and its decoded 44.1 kHz stereo WAV."""

    source: str
    original: Path
    wav: Path
    duration_s: float
    sample_rate: int
    channels: int
    codec: str
    sha256: str

    def discard_files(self) -> None:
        """Remove the decoded WAV and the work folder's copy (or hard link) of the original: nothing
        reads them after separation, and on an in-memory disk (Cloud Run's) they are memory until
        the cover ends (a 15-minute song's WAV is 318 MB). A source that is itself the copy is kept."""
        source = None if is_url(self.source) else Path(self.source).expanduser().resolve()
        for path in (self.wav, self.original):
            if path.resolve() != source:
                path.unlink(missing_ok=True)


def _duration(info: dict) -> float | None:
    for value in (info["stream"].get("duration"), info["format"].get("duration")):
        try:
            if value is not None:
                return float(value)
        except ValueError:
            continue
    return None


def fetch(  # noqa: PLR0912 - reads best top to bottom
    source: str | Path, work_dir: Path, max_duration_s: float = 900.0, policy: UrlPolicy | None = None
) -> SongAudio:
    """Copy or download ``source`` into ``work_dir``, validate it, and decode it once.

    Args:
        source: a local file or an http(s) URL
        work_dir: the request's work folder
        max_duration_s: the longest song accepted (``input.too_long`` past it)
        policy: what a URL may reach and how much it may download (default: https, public addresses)
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    source_str = str(source)
    if is_url(source_str):
        suffix = Path(safe_file_name(urlsplit(source_str).path, "song")).suffix or ".audio"
        original = download(source_str, work_dir / f"source{suffix}", policy or UrlPolicy())
    else:
        path = Path(source_str).expanduser()
        if not path.is_file():
            raise CoverError(ErrorCode.INPUT_NOT_FOUND, f"song not found: {path}")
        original = work_dir / f"source{path.suffix}"
        if path.resolve() != original.resolve():
            try:  # a second name for the same bytes (the runner's download sits on the same disk)
                original.hardlink_to(path)
            except OSError:  # another file system, or one without hard links
                shutil.copyfile(path, original)
    if original.stat().st_size == 0:
        raise CoverError(ErrorCode.INPUT_EMPTY, f"{Path(source_str).name} is empty (0 bytes)")

    label = redact(source_str) if is_url(source_str) else Path(source_str).name
    info = probe(original, label)
    announced = _duration(info)
    if announced is not None and announced > max_duration_s:
        raise CoverError(
            ErrorCode.INPUT_TOO_LONG, f"the song lasts {announced:.0f} s; the limit is {max_duration_s:.0f} s"
        )
    wav = work_dir / "song.wav"
    max_frames = int(max_duration_s * MIX_SAMPLE_RATE)
    decoded_audio = decode_to_wav(original, wav, MIX_SAMPLE_RATE, 2, max_frames=max_frames)
    decoded, errors = decoded_audio.frames / MIX_SAMPLE_RATE, decoded_audio.errors
    if decoded_audio.frames == 0:
        raise CoverError(ErrorCode.INPUT_EMPTY, f"{label} decodes to no audio samples")
    if decoded_audio.frames > max_frames:
        raise CoverError(ErrorCode.INPUT_TOO_LONG, f"the song lasts over {max_duration_s:.0f} s, the limit")
    if decoded < MIN_DURATION_S:
        raise CoverError(
            ErrorCode.INPUT_TOO_SHORT, f"the song lasts {decoded:.2f} s; the minimum is {MIN_DURATION_S:.0f} s"
        )
    if announced is not None and decoded < 0.98 * announced - 0.05:
        raise CoverError(
            ErrorCode.INPUT_TRUNCATED,
            f"the file announces {announced:.2f} s but only {decoded:.2f} s decode; it looks truncated",
        )
    if decoded_audio.peak_dbfs < SILENCE_DBFS:
        raise CoverError(ErrorCode.INPUT_SILENT, "the song is silent (peak below -70 dBFS)")
    if errors and "Invalid data" in errors and announced is None:
        raise CoverError(ErrorCode.INPUT_TRUNCATED, f"{label} is damaged: {errors.splitlines()[0]}")
    stream = info["stream"]
    return SongAudio(
        source=source_str,
        original=original,
        wav=wav,
        duration_s=decoded,
        sample_rate=int(stream.get("sample_rate", 0) or 0),
        channels=int(stream.get("channels", 0) or 0),
        codec=str(stream.get("codec_name", "")),
        sha256=sha256_of(original),
    )

"""MP3 encoded in stretches side by side, joined into one gapless stream.

LAME encodes on one core: on a host with idle cores it is the longest part of the mix stage (4 to 5
s of a 3.5-minute cover on a GPU host's CPU). :class:`StretchEncoder` takes the mix a block at a
time as :class:`job.render.media.ffmpeg.PipeEncoder` does, but gives each stretch of the song (30
to 60 s, :func:`stretch_plan`) to an FFmpeg process of its own, as many at once as the process has
cores but one (:func:`workers_for`), and joins what they make frame by frame.

Why the joins are gapless: every stretch starts on a frame boundary of the whole song (a multiple
of 1152 samples), and its encoder also gets :data:`PRE_ROLL_FRAMES` frames of the song before it
and :data:`POST_ROLL_FRAMES` after it, whose frames are dropped. With LAME's bit reservoir off (no
frame borrows bytes from the one before; the file is about 4 % larger at V0), a frame
depends only on the samples around it and the encoder's state, which the pre-roll brings to where
one encoder of the whole song would have it: on the demo songs every frame is byte for byte the one
a single encoder writes; on material with long near-silences LAME's slowly adapting thresholds can
choose another quantisation for some frames after a join, which decodes no further from the song
than the single encoder's own choice (both tested). The joined frames get a gapless-playback header
(:func:`job.render.media.mp3_frames.info_frame`: the frame count, LAME's delay and the padding), and
FFmpeg copies them into the file with the tags, so the file decodes to exactly the song's samples.

The encoded packets are measured as they are joined, in order (FFmpeg's ``ebur128``, as the pipe
encoder's copy is), while later stretches are still encoding. Memory: the stretches being encoded
and the one being filled, about ``workers + 2`` stretches of float samples (10 x 30 s, 107 MB,
with 8 encoders; 5 x 60 s, 107 MB, with 3).
"""

from __future__ import annotations

import queue
import subprocess
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np

from job.render.cores import side_by_side
from job.render.media import ffmpeg
from job.render.media.mp3_frames import SAMPLES_PER_FRAME, FrameError, info_frame, info_frame_length, split_frames
from shared.errors import CoverError, ErrorCode

PRE_ROLL_FRAMES = 8  # of the song before a stretch, encoded and dropped (2 were enough on the demo songs)
POST_ROLL_FRAMES = 4  # after it (LAME looks ahead about one frame, then its delay)
STRETCH_S = (30.0, 60.0)  # a stretch's length: the song over the workers, within these


def stretch_plan(length: int, rate: int, workers: int) -> list[tuple[int, int]]:
    """The samples ``(first, end)`` each stretch keeps, in order: ``length / workers`` seconds each,
    within :data:`STRETCH_S` (an FFmpeg start costs about 0.06 s of CPU against 0.5 s of LAME per 30
    s), every stretch starting on a frame boundary, the last one taking what is left (half a stretch
    to one and a half). One stretch (the whole song, nothing to join) with one worker or a song
    shorter than one and a half stretches."""
    seconds = min(max(length / rate / max(workers, 1), STRETCH_S[0]), STRETCH_S[1])
    step = max(1, round(seconds * rate / SAMPLES_PER_FRAME)) * SAMPLES_PER_FRAME
    count = round(length / step)
    if workers < 2 or count < 2:
        return [(0, length)]
    return [(k * step, (k + 1) * step if k < count - 1 else length) for k in range(count)]


class StretchEncoder:
    """MP3 from float32 stereo at ``rate``, written a block at a time, encoded in stretches side by
    side (:func:`stretch_plan`) and joined; :meth:`close` returns the encoded stream's integrated
    loudness (LUFS) and true peak (dBTP), as :class:`job.render.media.ffmpeg.PipeEncoder` does with
    ``measure``. A failure raises as FFmpeg's do (:func:`job.render.media.ffmpeg.failure`).

    Args:
        rate: the samples' rate (the file's: no resampling)
        length: samples per channel the mix has (every one must be written before :meth:`close`)
        codec_args: the encoder's arguments (``-c:a libmp3lame ...``; the bit reservoir is turned
            off here: frames that borrow bytes from the one before could not be joined)
        tag_args: the file's tags (``-metadata k=v`` ...)
        out: the encoded file
        workers: encoders at once (``stretch_plan(length, rate, workers)`` must give several stretches)
    """

    def __init__(
        self, rate: int, length: int, codec_args: list[str], tag_args: list[str], out: Path, workers: int
    ) -> None:
        ffmpeg.require_ffmpeg()
        self.rate, self.length, self.out, self.tag_args = rate, length, out, tag_args
        self.plan = stretch_plan(length, rate, workers)
        if len(self.plan) < 2:
            raise ValueError("one stretch: encode with PipeEncoder")
        margin = (PRE_ROLL_FRAMES * SAMPLES_PER_FRAME, POST_ROLL_FRAMES * SAMPLES_PER_FRAME)
        self.inputs = [(max(0, first - margin[0]), min(length, end + margin[1])) for first, end in self.plan]
        raw = ["-f", "f32le", "-ar", str(rate), "-ac", "2", "-i", "pipe:0"]
        joinable = [*codec_args, "-reservoir", "0", "-write_xing", "0", "-id3v2_version", "0"]
        self._command = [*ffmpeg.FFMPEG, *raw, *joinable, "-f", "mp3", "pipe:1"]
        self._position = 0  # samples written so far
        self._next = 0  # the first stretch not yet handed to an encoder
        self._filling: dict[int, bytearray] = {}
        self._slots = threading.Semaphore(workers)  # the writer waits while every encoder is busy
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="mp3-stretch")
        self._done: queue.SimpleQueue[Future[list[bytes]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self._stopped = False
        self._error: BaseException | None = None
        self._sizes: list[int] = []
        self._first_frame = b""
        self._frames_path = out.with_name(f"{out.name}.frames")
        self._meter_log: BinaryIO = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()/abort()
        self._meter = ffmpeg.spawn(ffmpeg.meter_command("mp3"), subprocess.DEVNULL, self._meter_log, subprocess.PIPE)
        self._joiner = threading.Thread(target=self._join, name="mp3-join", daemon=True)
        self._joiner.start()

    def write(self, block: np.ndarray) -> None:
        """``[2, samples]`` float32, the next samples of the mix."""
        if self._error is not None:
            raise self._error
        frames = np.ascontiguousarray(np.asarray(block, dtype=np.float32).T)  # interleaved
        lo, hi = self._position, self._position + frames.shape[0]
        if hi > self.length:
            raise CoverError(ErrorCode.INTERNAL, f"the mix ran past its {self.length} samples")
        for k in range(self._next, len(self.inputs)):
            first, end = self.inputs[k]
            if first >= hi:
                break
            part = frames[max(first, lo) - lo : min(end, hi) - lo]
            self._filling.setdefault(k, bytearray()).extend(part.tobytes())
        self._position = hi
        while self._next < len(self.inputs) and self.inputs[self._next][1] <= hi:
            self._submit(self._next)
            self._next += 1

    def _submit(self, k: int) -> None:
        self._slots.acquire()
        if self._error is not None:
            self._slots.release()
            raise self._error
        self._done.put(self._pool.submit(self._encode, k, self._filling.pop(k)))

    def _encode(self, k: int, samples: bytearray) -> list[bytes]:
        """Stretch ``k``'s frames: its input encoded, the pre-roll's and post-roll's frames dropped."""
        try:
            with self._lock:
                if self._stopped:
                    raise CoverError(ErrorCode.INTERNAL, "the encode was stopped")
                proc = ffmpeg.spawn(self._command, subprocess.PIPE, subprocess.PIPE, subprocess.PIPE)
                self._running.add(proc)
            try:
                encoded, errors = proc.communicate(samples)
            finally:
                with self._lock:
                    self._running.discard(proc)
            del samples
            if proc.returncode != 0:
                raise ffmpeg.failure(proc.returncode, errors)
            frames = split_frames(encoded)
            (first, end), start = self.plan[k], self.inputs[k][0]
            skip = (first - start) // SAMPLES_PER_FRAME
            if k == len(self.plan) - 1:
                return frames[skip:]
            count = (end - first) // SAMPLES_PER_FRAME
            if len(frames) < skip + count:
                raise FrameError(f"stretch {k} gave {len(frames)} frames; {skip + count} expected")
            return frames[skip : skip + count]
        except FrameError as exc:
            raise CoverError(ErrorCode.INTERNAL, f"the MP3 encoder's stretch {k} cannot be joined: {exc}") from None
        finally:
            self._slots.release()

    def _join(self) -> None:
        """In order, each stretch's frames into the frames file and the meter (behind a space for
        the header frame); the first failure is kept for the writer and :meth:`close`."""
        meter = self._meter.stdin
        assert meter is not None
        try:
            with self._frames_path.open("wb") as file:
                while (future := self._done.get()) is not None:
                    frames = future.result()
                    if not self._first_frame and frames:
                        self._first_frame = frames[0]
                        file.write(bytes(info_frame_length(frames[0])))
                    data = b"".join(frames)
                    file.write(data)
                    meter.write(data)
                    self._sizes += [len(f) for f in frames]
        except BrokenPipeError:
            self._fail(CoverError(ErrorCode.INTERNAL, "ffmpeg's meter stopped reading the encoded stretches"))
        except OSError as exc:
            self._fail(_os_error(exc))
        except BaseException as exc:  # noqa: BLE001 - kept, raised to the writer
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._stop()
        while self._done.get() is not None:  # let the writer's waits end
            pass

    def _stop(self) -> None:
        with self._lock:
            self._stopped = True
            running = list(self._running)
        for proc in running:
            proc.kill()

    def close(self) -> tuple[float, float]:
        """Finish the file; raises if an encoder or the meter failed. The encoded stream's integrated
        loudness (LUFS) and true peak (dBTP)."""
        if self._error is None and self._position != self.length:
            self._error = CoverError(ErrorCode.INTERNAL, f"the mix ended at {self._position} of {self.length} samples")
        self._done.put(None)
        self._joiner.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._error is not None:
            self._kill_meter()
            self._frames_path.unlink(missing_ok=True)
            raise self._error
        assert self._meter.stdin is not None
        self._meter.stdin.close()
        code = self._meter.wait()
        self._meter_log.seek(0)
        log = self._meter_log.read()
        self._meter_log.close()
        try:
            if code != 0:
                raise ffmpeg.failure(code, log)
            header = info_frame(self._first_frame, self._sizes, self.length)
            with self._frames_path.open("r+b") as file:
                file.write(header)
            args = [*ffmpeg.input_args(self._frames_path), "-map", "0:a", "-c:a", "copy", *self.tag_args]
            ffmpeg.run([*args, "-f", "mp3", "-y", str(self.out)])
        except FrameError as exc:
            raise CoverError(ErrorCode.INTERNAL, f"the MP3 stretches cannot be joined: {exc}") from None
        except OSError as exc:
            raise _os_error(exc) from None
        finally:
            self._frames_path.unlink(missing_ok=True)
        return ffmpeg.ebur128_summary(log)

    def abort(self) -> None:
        """Stop every encoder without finishing the file (the caller removes it)."""
        self._stop()
        if self._error is None:
            self._error = CoverError(ErrorCode.INTERNAL, "the encode was stopped")
        self._done.put(None)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._joiner.join()
        self._kill_meter()
        self._frames_path.unlink(missing_ok=True)

    def _kill_meter(self) -> None:
        self._meter.kill()
        self._meter.wait()
        if self._meter.stdin is not None:
            self._meter.stdin.close()
        self._meter_log.close()


def _os_error(exc: OSError) -> CoverError:
    """A write of the joined frames that failed: the work folder's space, as FFmpeg's are."""
    code = ErrorCode.WORK_NO_SPACE if exc.errno in (28, 27) else ErrorCode.INTERNAL  # ENOSPC, EFBIG
    return CoverError(code, f"the joined MP3 frames could not be written: {exc}")


def workers_for(length: int, rate: int, encoders: int = 0) -> int:
    """Encoders side by side for a song of ``length`` samples: ``encoders``, or with 0 one per core
    the process may use but one (the mix's render and the meter of the joined stream need it: on 2
    cores two encoders took as long as one), at most 8 (:func:`job.render.cores.side_by_side`); never
    more than there are stretches, and 1 (one encoder for the whole song) where that leaves one."""
    workers = side_by_side(encoders, spare=1)
    return min(workers, len(stretch_plan(length, rate, workers)))

"""The watermark's robustness, false positives and level: ``python -m bench.watermark [--songs 20]
[--unmarked 100] [--seconds 30]``.

Songs are the devkit's generator (``job.devkit.demo.demo_song``: a sung-like voice over drums,
bass and chords; each seed its own melody and noise), mixed and marked by the mixer's own
:class:`job.render.mix.watermark.Marker` with a random id each, then put through each attack with
Debian's FFmpeg and read back (:func:`job.render.mix.watermark.detect` on the file decoded to
44.1 kHz mono): MP3 128 kbit/s, AAC 128 kbit/s, Opus 96 kbit/s, resampled to 48 kHz, -6 dB, and a
20 s excerpt of the MP3 from a random point. A detection counts only with the right id. The
unmarked songs (other seeds) are read as MP3s and as WAVs: any id found is a false positive; the
largest sync z-score among them shows the threshold's margin. The level: the mark's SNR against
the mix, and its level in each tile against the music there (by design ``20 log10(STRENGTH)``).
Prints Markdown rows (docs/quality.md holds them, with the targets).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

ATTACKS: dict[str, tuple[list[str], str]] = {  # name: FFmpeg output options, extension
    "WAV (as mixed)": ([], "wav"),
    "MP3 128 kbit/s": (["-c:a", "libmp3lame", "-b:a", "128k"], "mp3"),
    "AAC 128 kbit/s": (["-c:a", "aac", "-b:a", "128k"], "m4a"),
    "Opus 96 kbit/s": (["-c:a", "libopus", "-b:a", "96k"], "ogg"),
    "resampled to 48 kHz": (["-ar", "48000"], "wav"),
    "-6 dB": (["-af", "volume=-6dB"], "wav"),
}
EXCERPT = "20 s excerpt of the MP3"


def main() -> int:  # noqa: PLR0915 - one measurement, top to bottom
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--songs", type=int, default=20, help="marked songs")
    parser.add_argument("--unmarked", type=int, default=100, help="unmarked songs read for false positives")
    parser.add_argument("--seconds", type=float, default=30.0, help="each song's length")
    parser.add_argument("--mix-seconds", type=float, default=210.0, help="the song the mix's cost is measured on")
    args = parser.parse_args()
    import numpy as np

    from job.devkit.demo import demo_song
    from job.render.media.audio import MIX_SAMPLE_RATE, decode, write_wav
    from job.render.mix import watermark
    from job.render.mix.mixer import mix as mix_stage
    from shared.options import MixOptions

    rng = np.random.default_rng(7)

    def song(seed: int) -> np.ndarray:
        vocals, instrumental = demo_song(args.seconds, seed=seed)
        return (0.8 * np.clip(vocals + instrumental, -1, 1)).astype(np.float32)

    def attacked(wav: Path, options: list[str], extension: str, work: Path) -> np.ndarray:
        out = work / f"attacked.{extension}"
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(wav), *options, str(out)], check=True)
        return decode(out, MIX_SAMPLE_RATE, 1)[0][0]

    hits = dict.fromkeys([*ATTACKS, EXCERPT], 0)
    weakest = {name: float("inf") for name in hits}
    snrs, embed_s, read_s = [], 0.0, []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in range(args.songs):
            mix = song(seed)
            mark_id = int(rng.integers(0, 1 << watermark.ID_BITS))
            started = time.perf_counter()
            mark = watermark.Marker(mark_id).mark(mix.mean(axis=0), 0, 0, mix.shape[1])
            embed_s += time.perf_counter() - started
            snrs.append(10 * np.log10(float((mix**2).mean()) / float((mark**2).mean())))
            wav = write_wav(work / "marked.wav", mix + mark, MIX_SAMPLE_RATE)
            for name, (options, extension) in ATTACKS.items():
                audio = attacked(wav, options, extension, work)
                started = time.perf_counter()
                found = watermark.detect(audio)
                read_s.append((time.perf_counter() - started) / (audio.size / MIX_SAMPLE_RATE))
                hits[name] += found.mark_id == mark_id
                weakest[name] = min(weakest[name], found.sync_z)
                if name.startswith("MP3"):
                    start = int(rng.uniform(0, args.seconds - 20) * MIX_SAMPLE_RATE)
                    found = watermark.detect(audio[start : start + 20 * MIX_SAMPLE_RATE])
                    hits[EXCERPT] += found.mark_id == mark_id
                    weakest[EXCERPT] = min(weakest[EXCERPT], found.sync_z)
        false_positives, null_z = 0, []
        for seed in range(1000, 1000 + args.unmarked):
            wav = write_wav(work / "unmarked.wav", song(seed), MIX_SAMPLE_RATE)
            for options, extension in (ATTACKS["WAV (as mixed)"], ATTACKS["MP3 128 kbit/s"]):
                found = watermark.detect(attacked(wav, options, extension, work))
                false_positives += found.found
                null_z.append(found.sync_z)
        vocals, instrumental = demo_song(args.mix_seconds, seed=5)
        stems = [write_wav(work / f"{n}.wav", a, MIX_SAMPLE_RATE) for n, a in (("v", vocals), ("i", instrumental))]
        mix_s: dict[int | None, float] = {}
        for marked in (None, 1):
            started = time.perf_counter()
            mix_stage(stems[1], stems[0], work / "cover.mp3", MixOptions(), watermark=marked)
            mix_s[marked] = time.perf_counter() - started
    n = args.songs
    print(f"| attack ({n} marked songs of {args.seconds:.0f} s) | read with the right id | weakest sync z |")
    print("| --- | --- | --- |")
    for name, count in hits.items():
        print(f"| {name} | {count}/{n} | {weakest[name]:.1f} |")
    print()
    print("| measure | value |")
    print("| --- | --- |")
    print(f"| false positives, {args.unmarked} unmarked songs as WAV and MP3 | {false_positives}/{2 * args.unmarked} |")
    print(f"| largest sync z on unmarked songs (threshold {watermark.SYNC_THRESHOLD}) | {max(null_z):.1f} |")
    print(f"| the mark's SNR against the mix (lowest, median) | {min(snrs):.1f} dB, {np.median(snrs):.1f} dB |")
    print(f"| the mark in each tile against the music there | {20 * np.log10(watermark.STRENGTH):.1f} dB |")
    print(f"| embedding, per second of song | {1000 * embed_s / (n * args.seconds):.2f} ms |")
    print(f"| reading, per second of audio | {1000 * float(np.median(read_s)):.2f} ms |")
    print(
        f"| the mix stage, {args.mix_seconds:.0f} s song, mp3: without / with the mark | "
        f"{mix_s[None]:.1f} s / {mix_s[1]:.1f} s |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

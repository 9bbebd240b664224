"""The mix stage's time and memory by song length: ``python -m bench.mix [--songs 210,600]``.

Each length runs in its own process: the demo song's instrumental at a third of its level with a 0.9
click every third of a second (since 2026-12-06, eighth session: peaks that make the mix one to
limit, as a cover by a random-weight voice is, so the probe passes run) and, for vocals, 48 kHz
noise are written to WAVs, then :func:`job.render.mix.mix` makes an MP3 while a thread samples the
process's RSS every 5 ms. Prints the mix's wall time and its RSS growth over the process's before
it, for each ``--workers`` setting (``COVER_MIX_WORKERS``: 1, the whole song in one piece; 0, this
machine's default; N, stretches side by side in the measuring passes and N MP3 encoders), each row
its own process, with the passes' stretches and the encoders that setting gives."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def one(seconds: float, workers: int = 0) -> dict[str, float]:
    from job.devkit import demo
    from job.render.compute import release_freed_memory
    from job.render.cores import side_by_side as side_by_side_workers
    from job.render.media.audio import MIX_SAMPLE_RATE, write_wav
    from job.render.media.stretch_encoder import workers_for
    from job.render.mix import side_by_side
    from job.render.mix.mixer import MixSource, mix
    from shared.options import MixOptions

    work = Path(tempfile.mkdtemp(prefix="bench-mix-"))
    _, instrumental = demo.demo_song(seconds)
    instrumental *= 0.3
    instrumental[:, :: MIX_SAMPLE_RATE // 3] = 0.9  # peaks that make the mix one to limit, as covers are
    write_wav(work / "instrumental.wav", instrumental, MIX_SAMPLE_RATE)
    noise = (0.05 * np.random.default_rng(0).standard_normal(int(seconds * 48000))).astype(np.float32)
    write_wav(work / "vocals.wav", noise, 48000)
    del instrumental, noise
    release_freed_memory(0)
    before, peak = rss_mb(), [0.0]

    def watch() -> None:
        while True:
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    started = time.perf_counter()
    result = mix(work / "instrumental.wav", work / "vocals.wav", work / "cover.mp3", workers=workers)
    wall = time.perf_counter() - started
    source = MixSource(work / "instrumental.wav", work / "vocals.wav", MixOptions(), work)
    passes = len(side_by_side.stretches(source, side_by_side_workers(workers, spare=1)))
    source.close()
    return {
        "seconds": seconds,
        "wall_s": round(wall, 2),
        "rss_growth_mb": round(peak[0] - before),
        "limited": result.normalisation == "limited",
        "encoders": workers_for(int(seconds * MIX_SAMPLE_RATE), MIX_SAMPLE_RATE, workers),
        "passes": passes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--songs", default="210,600", help="song lengths in seconds, comma-separated")
    parser.add_argument(
        "--workers",
        default="1,0",
        help="COVER_MIX_WORKERS settings, comma-separated (1: the song in one piece; 0: this machine's default)",
    )
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--one-workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.one_workers)))
        return
    print("| song s | workers | pass stretches | MP3 encoders | mix wall s | RSS growth MB | limited |")
    print("|---|---|---|---|---|---|---|")
    for seconds in (float(s) for s in args.songs.split(",")):
        for workers in args.workers.split(","):
            command = [sys.executable, "-m", "bench.mix", "--one", str(seconds), "--one-workers", workers]
            proc = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            cells = [f"{seconds:.0f}", workers, row["passes"], row["encoders"], row["wall_s"], row["rss_growth_mb"]]
            cells.append(row["limited"])
            print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()

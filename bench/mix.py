"""The mix stage's time and memory by song length: ``python -m bench.mix [--songs 210,600]``.

Each length runs in its own process: the demo song's instrumental and, for vocals, loud 48 kHz noise
(what a random-weight voice sings; the limiter and the lossy check then do their full work) are
written to WAVs, then :func:`job.render.mix.mix` makes an MP3 while a thread samples the process's
RSS every 5 ms. Prints the mix's wall time and its RSS growth over the process's before it."""

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


def one(seconds: float) -> dict[str, float]:
    from job.devkit import demo
    from job.render.compute import release_freed_memory
    from job.render.media.audio import MIX_SAMPLE_RATE, write_wav
    from job.render.mix.mixer import mix

    work = Path(tempfile.mkdtemp(prefix="bench-mix-"))
    _, instrumental = demo.demo_song(seconds)
    write_wav(work / "instrumental.wav", instrumental, MIX_SAMPLE_RATE)
    noise = (0.3 * np.random.default_rng(0).standard_normal(int(seconds * 48000))).astype(np.float32)
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
    result = mix(work / "instrumental.wav", work / "vocals.wav", work / "cover.mp3")
    wall = time.perf_counter() - started
    return {
        "seconds": seconds,
        "wall_s": round(wall, 2),
        "rss_growth_mb": round(peak[0] - before),
        "limited": result.normalisation == "limited",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--songs", default="210,600", help="song lengths in seconds, comma-separated")
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    print("| song s | mix wall s | RSS growth MB | limited |\n|---|---|---|---|")
    for seconds in (float(s) for s in args.songs.split(",")):
        proc = subprocess.run(
            [sys.executable, "-m", "bench.mix", "--one", str(seconds)], capture_output=True, text=True, check=True
        )
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {seconds:.0f} | {row['wall_s']} | {row['rss_growth_mb']} | {row['limited']} |")


if __name__ == "__main__":
    main()

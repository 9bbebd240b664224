"""The quality stage's cost per minute of audio: ``python -m bench.quality [--seconds 120]``.

Scores the demo song's vocals against themselves (the melody, identity and naturalness passes all
run in full) twice, after loading the models, and prints seconds per minute of audio for the whole
stage and for each model."""

from __future__ import annotations

import argparse
import time

import torch

from job.devkit import demo
from job.render.media.audio import MIX_SAMPLE_RATE, to_16k
from job.render.quality.meter import DNSMOS_SAMPLES, QualityMeter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocals, _ = demo.demo_song(args.seconds)
    meter = QualityMeter()
    meter.crepe(), meter.speaker(), meter.dnsmos()
    minutes = args.seconds / 60
    reference = meter.embedding(to_16k(vocals[:, : 10 * MIX_SAMPLE_RATE], MIX_SAMPLE_RATE))
    assert reference is not None
    for run in range(2):
        started = time.perf_counter()
        meter.conversion(vocals, MIX_SAMPLE_RATE, vocals, MIX_SAMPLE_RATE, 0, reference.tolist())
        print(f"whole stage, run {run + 1}: {(time.perf_counter() - started) / minutes:.2f} s per minute of audio")
    audio = to_16k(vocals, MIX_SAMPLE_RATE)
    started = time.perf_counter()
    meter.pitch(audio)
    print(f"CREPE tiny, one signal: {(time.perf_counter() - started) / minutes:.2f} s per minute")
    started = time.perf_counter()
    meter.embedding(audio)
    print(f"speaker encoder: {(time.perf_counter() - started) / minutes:.2f} s per minute")
    started = time.perf_counter()
    meter.naturalness_of([audio[s : s + 10 * 16000] for s in range(0, len(audio) - DNSMOS_SAMPLES + 1, 10 * 16000)])
    print(f"DNSMOS (one window per 10 s, two at a time): {(time.perf_counter() - started) / minutes:.2f} s per minute")


if __name__ == "__main__":
    main()

"""RVC conversion benchmark: a real-size v2 48 kHz voice on 60 s of vocals, per part.

    python -m bench.convert [--seconds 60] [--f0-method rmvpe] [--threads 2]

Models are written once (real sizes, random weights, real formats) under ``bench/.work``.
Prints the time of each part (content, pitch, retrieval, synthesis), the wall time and the
real-time factor (wall / audio duration), on CPU and on CUDA when a GPU is present: the baseline
(fp32, reference kernels), fp32 with the fast kernels, and the default (fast kernels, bf16 decoder on
CPUs with native bf16).
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from datetime import date
from pathlib import Path

import torch

from job.devkit import demo
from job.render.rvc.engine import ConversionOptions, VoiceConverter
from shared.model_store import ModelStore

WORK = Path(__file__).parent / ".work"
RESULTS = Path(__file__).parent / "RESULTS-convert.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}{gpu}"


def run(device: str, seconds: float, method: str, precision: str, kernels: str) -> dict:
    models = WORK / "models"
    demo.write_models(models, size="real")
    vocals, _ = demo.demo_song(seconds, seed=1)
    store = ModelStore(models)
    converter = VoiceConverter(store, device=device, precision=precision, kernels=kernels)
    voice = converter.load_voice(store.voice(demo.DEMO_VOICE))
    options = ConversionOptions(f0_method=method)
    converter.convert(vocals[:, : 44100 * 2], 44100, voice, options)  # load and warm up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    cpu0 = time.process_time()
    result = converter.convert(vocals, 44100, voice, options)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {
        "device": f"{device} {str(converter.synth_dtype).removeprefix('torch.')} {kernels}",
        "wall": wall,
        "cpu": time.process_time() - cpu0,
        "rtf": wall / seconds,
        **result.times.model_dump(),
        "synthesised": result.synthesised_s,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--f0-method", default="rmvpe")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    # the baseline first (fp32, reference kernels: every optimisation off), in the same run as the
    # fast kernels in fp32 and the default (fast kernels, auto precision)
    variants = [("fp32", "reference"), ("fp32", "fast"), ("auto", "fast")]
    rows = [run(d, args.seconds, args.f0_method, p, k) for d in devices for p, k in variants]
    head = ["device", "content s", "pitch s", "retrieval s", "synthesis s", "wall s", "CPU s", "RTF", "peak RSS MB"]
    lines = [
        f"# Conversion benchmark ({date.today().isoformat()})",
        "",
        f"RVC conversion, v2 48 kHz real-size voice, {args.seconds:.0f} s of vocals, f0 {args.f0_method}; "
        "peak RSS is the process's maximum so far (rows run in one process)",
        "",
        f"machine: {machine()}",
        "",
        f"command: `python -m bench.convert --seconds {args.seconds:g}`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += [
        f"| {r['device']} | {r['content']:.2f} | {r['pitch']:.2f} | {r['retrieval']:.2f} | {r['synthesis']:.2f} "
        f"| {r['wall']:.2f} | {r['cpu']:.2f} | {r['rtf']:.3f} | {r['rss_mb']:.0f} |"
        for r in rows
    ]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    RESULTS.write_text(table)


if __name__ == "__main__":
    main()

"""RVC conversion benchmark: a real-size v2 48 kHz voice on 60 s of vocals, per part.

    python -m bench.convert [--seconds 60] [--f0-method rmvpe] [--threads 2]

Models are written once (real sizes, random weights, real formats) under ``bench/.work``.
Prints the time of each part (content, pitch, retrieval, synthesis), the wall time and the
real-time factor (wall / audio duration), on CPU and on CUDA when a GPU is present: the baseline
(fp32, reference kernels), fp32 with the fast kernels and the torch decoder, the default (fast
kernels; the bf16 decoder on CPUs with native bf16, the int8 decoder elsewhere) and, on a CPU whose
default is not the int8 decoder, that too (``COVER_DECODER=int8``; its one-time build per voice is
timed apart). Each row's output is compared with the baseline's: relative L2,
log-spectral distance, waveform correlation (``bench/measures.py``) and the quality stage's
F0 correlation, F0 RMSE, speaker similarity (the baseline's output as source and reference) and
DNSMOS: each row's overall score and the largest change of its three scores from the baseline's.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from datetime import date
from pathlib import Path

import torch

from bench.measures import compare, quality_against_exact, score_exact
from bench.pipeline import cell
from job.devkit import demo
from job.render.compute import resolve_decoder, resolve_precision
from job.render.quality.meter import QualityMeter
from job.render.rvc.engine import ConversionOptions, VoiceConverter
from job.render.rvc.int8_decoder import build_key
from shared.model_store import ModelStore

WORK = Path(__file__).parent / ".work"
RESULTS = Path(__file__).parent / "RESULTS-convert.md"


# the CPU features that decide what ``auto`` runs and how fast (docs/engine.md, by machine class)
CLASS_FLAGS = (
    ("amx_tile", "AMX"),
    ("avx512_bf16", "AVX512-BF16"),
    ("avx512_vnni", "AVX512-VNNI"),
    ("avx_vnni", "AVX-VNNI"),
    ("avx512f", "AVX-512"),
    ("avx2", "AVX2"),
)


# what caps the instruction sets torch's kernels use, to measure another class's path on this CPU:
# ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` runs an AVX-512 bf16 machine as the AVX2 class
# (oneDNN then reports no native bf16, so ``auto`` takes that class's choices; ONNX Runtime's own
# kernels are not capped: docs/performance.md)
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def machine() -> str:
    """The CPU's name and the features that tell its class apart (one name can be several
    generations: "AMD EPYC" is Zen 3 with AVX2 or Zen 4 with AVX-512 and bf16), threads, torch."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    cpu, flags = (
        info.get("model name") or platform.processor() or platform.machine(),
        set(info.get("flags", "").split()),
    )
    features = " ".join(name for flag, name in CLASS_FLAGS if flag in flags)
    cpu += f" ({features})" if features else ""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    capped = [f"{name}={os.environ[name]}" for name in ISA_CAPS if os.environ.get(name)]
    as_if = f"; instruction sets capped ({', '.join(capped)}): torch's kernels as on that class" if capped else ""
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}{gpu}{as_if}"


def run(device: str, seconds: float, method: str, precision: str, kernels: str, decoder: str = "torch") -> dict:
    models = WORK / "models"
    demo.write_models(models, size="real")
    vocals, _ = demo.demo_song(seconds, seed=1)
    store = ModelStore(models)
    converter = VoiceConverter(store, device=device, precision=precision, kernels=kernels, decoder=decoder)
    resolved = store.voice(demo.DEMO_VOICE)
    if converter.int8:  # the one-time build is timed apart: start from none
        store.derived("decoder-int8", build_key(resolved.model_path)).unlink(missing_ok=True)
    started = time.perf_counter()
    voice = converter.load_voice(resolved)
    built = time.perf_counter() - started if converter.int8 else 0.0
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
    dtype = "int8+fp32" if converter.int8 else str(converter.synth_dtype).removeprefix("torch.")
    return {
        "device": f"{device} {dtype} {kernels}",
        "audio": result.audio,
        "rate": result.sample_rate,
        "built": built,
        "wall": wall,
        "cpu": time.process_time() - cpu0,
        "rtf": wall / seconds,
        **result.times.model_dump(),
        "synthesised": result.synthesised_s,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def errors(rows: list[dict]) -> list[dict]:
    """Each row's output against the first row's (the exact path), in place."""
    meter = QualityMeter()
    exact = rows[0]["audio"]
    scored = score_exact(meter, exact, rows[0]["rate"])  # once for every row (outputs are equally long)
    for r in rows:
        n = min(len(exact), len(r["audio"]))
        r.update(compare(exact[:n], r["audio"][:n]))
        view = quality_against_exact(meter, exact[:n], r["audio"][:n], r["rate"], scored if n == len(exact) else None)
        r.update(view.model_dump(exclude={"scores"}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--f0-method", default="rmvpe")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where the table is written (one file per machine)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    # the baseline first (fp32, reference kernels: every optimisation off), in the same run as the
    # fast kernels in fp32 and the default (fast kernels, auto precision)
    variants = [("fp32", "reference", "torch"), ("fp32", "fast", "torch"), ("auto", "fast", "auto")]
    rows = []
    for d in devices:
        device = torch.device(d)
        default_is_int8 = resolve_decoder("auto", device, resolve_precision("auto", device), fast=True)
        runs = variants + ([("fp32", "fast", "int8")] if d == "cpu" and not default_is_int8 else [])
        rows += errors([run(d, args.seconds, args.f0_method, p, k, dec) for p, k, dec in runs])
    head = ["device", "content s", "pitch s", "retrieval s", "synthesis s", "wall s", "CPU s", "RTF", "peak RSS MB"]
    head += ["rel L2", "LSD dB", "corr", "F0 corr", "F0 RMSE cents", "speaker sim", "DNSMOS", "DNSMOS shift"]
    lines = [
        f"# Conversion benchmark ({date.today().isoformat()})",
        "",
        f"RVC conversion, v2 48 kHz real-size voice, {args.seconds:.0f} s of vocals, f0 {args.f0_method}; "
        "peak RSS is the process's maximum so far (rows run in one process); errors against the first row "
        "(fp32 reference) on the same device",
        "",
        f"machine: {machine()}",
        "",
        f"command: `python -m bench.convert --seconds {args.seconds:g}"
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --results {args.results}" if args.results != RESULTS else "")
        + "`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += [
        f"| {r['device']} | {r['content']:.2f} | {r['pitch']:.2f} | {r['retrieval']:.2f} | {r['synthesis']:.2f} "
        f"| {r['wall']:.2f} | {r['cpu']:.2f} | {r['rtf']:.3f} | {r['rss_mb']:.0f} "
        f"| {r['rel_l2']} | {r['lsd_db']} | {r['corr']} | {r['f0_corr']} | {r['f0_rmse']} | {r['speaker']} "
        f"| {cell(r['dnsmos'], 2)} | {cell(r['dnsmos_shift'], 3)} |"
        for r in rows
    ]
    lines += [f"\n{r['device']}: one-time build {r['built']:.1f} s" for r in rows if r["built"]]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    args.results.write_text(table)


if __name__ == "__main__":
    main()

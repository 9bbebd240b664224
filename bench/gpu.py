"""GPU runner benchmark: one prepared command for a machine with a GPU (it runs on a CPU too).

    python -m bench.gpu [--song-s 210] [--in-flight 1,4x1,4,6] [--budget-s 480]

Needs nothing but the repository and the job's dependencies: it writes the demo models (real
sizes, random weights, the real file formats) and the demo song under ``bench/.work``, then
measures, in this order, each step skipped once ``--budget-s`` is spent:

* the error of the GPU's precisions against the exact fp32 path on the same card: separation
  (SDR of the vocals) and conversion (relative L2, log-spectral distance, correlation), and of
  batching against one segment / chunk per call;
* cold start: a fresh process from start to its first finished cover;
* a warm cover (models loaded, the second cover of a process) with its per-stage times, then the
  same with the mix in one piece (``COVER_MIX_WORKERS=1``) against the default's stretches side by side;
* covers per minute with 1, 4 and 6 requests in flight on one :class:`Pipeline`, as the runner
  holds them (``COVER_IN_FLIGHT``: threads, the heavy stages taking turns on the device,
  ``COVER_HEAVY_SLOTS`` at a time: 2 on a GPU), and 4 with one heavy slot (``--in-flight 8x1``: 8
  in flight, 1 slot);
* peak GPU memory of each;
* last, the MDX-Net passes (karaoke and de-reverb shapes, real size) on ONNX Runtime's CPU provider
  and on torch on the card, fp32 and fp16 (``--mdx-s`` seconds of vocals each), with each one's
  distance from ONNX Runtime's.

Writes the rows, with the card's name, to ``bench/RESULTS-gpu.md`` (``--results``) and prints
that table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

from bench.pipeline import song_file

WORK = Path(__file__).parent / ".work"
RESULTS = Path(__file__).parent / "RESULTS-gpu.md"
EXCERPT_S = 20  # seconds of a song the precision rows compare (``--excerpt-s``)


def _models(size: str) -> Path:
    """Where the demo models of ``size`` live: real sizes for the numbers, tiny to check the script."""
    return WORK / ("models" if size == "real" else f"models-{size}")


def _settings(size: str, **overrides):
    from shared.settings import Settings

    # measured, not repaired: random-weight voices fail every segment, so repair would always spend
    # its whole budget (bounded at COVER_REPAIR_BUDGET of the conversion time; README, "Quality")
    overrides = {"quality": "measure", "repair_budget": 0, **overrides}
    return Settings(models_dir=_models(size), work_dir=WORK / "tmp", **overrides)


def _peak_mib(reset: bool = False) -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(peak, 0)


def card() -> str:
    import torch

    from bench.convert import machine

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}; host: {machine()}"
    return f"no GPU: {machine()}"


def precision_rows(device: str, size: str, seconds: int = EXCERPT_S) -> list[dict]:
    """Each approximation against the exact path on this device (same models, same input)."""
    import torch

    # the fp32 rows turn TF32 off for the process (compute.resolve_precision); the rows after
    # these must run as a runner would, with the defaults
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        return _precision_rows(device, size, seconds)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _precision_rows(device: str, size: str, seconds: int) -> list[dict]:
    import numpy as np

    from bench.measures import compare
    from job.devkit import demo
    from job.render.rvc.engine import VoiceConverter
    from job.render.separate.separator import Separator
    from shared.model_store import ModelStore
    from shared.options import ConversionOptions, SeparationOptions

    store = ModelStore(_models(size))
    vocals, inst = demo.demo_song(seconds, seed=3)
    mix = np.clip(vocals + inst, -1, 1).astype(np.float32)
    rows = []
    exact = Separator(store, SeparationOptions(), device, precision="fp32", kernels="reference", batch=1)
    ref = exact.separate_array(mix)[0]
    halves = ["bf16", "fp16"] if device == "cuda" else ["bf16"]  # fp16 on a CPU is emulated: slow, and not offered
    for precision, kernels, batch in [("fp32", "fast", 0)] + [(h, "fast", 0) for h in halves]:
        sep = Separator(store, SeparationOptions(), device, precision=precision, kernels=kernels, batch=batch)
        rows.append(
            {
                "what": "separate",
                "variant": f"{precision} {kernels} batch {sep.batch}",
                **compare(ref, sep.separate_array(mix)[0]),
            }
        )
    options = ConversionOptions(seed=5)
    outs = {}
    for precision, kernels, batch in [("fp32", "reference", 1), ("fp32", "fast", 0)] + [(h, "fast", 0) for h in halves]:
        converter = VoiceConverter(store, device, max_chunk_s=5.0, precision=precision, kernels=kernels, batch=batch)
        voice = converter.load_voice(store.voice(demo.DEMO_VOICE))
        label = f"{precision} {kernels} batch {converter.batch}"
        outs[label] = converter.convert(vocals, 44100, voice, options).audio
    (ref_label, ref_audio), *rest = outs.items()
    for label, audio in rest:
        rows.append({"what": "convert", "variant": f"{label} (exact: {ref_label})", **compare(ref_audio, audio)})
    return rows


def mdx_rows(seconds: float) -> list[dict]:
    """The MDX-Net passes (real-size shapes, random weights) on ONNX Runtime's CPU provider and on
    torch on the device (``bench/mdx.py``): the stem's seconds, seconds per second of it, and the
    primary stem's relative L2 from ONNX Runtime's."""
    from bench.mdx import pass_rows

    work = WORK / "mdx"
    work.mkdir(parents=True, exist_ok=True)
    rows, _ = pass_rows(work, seconds, denoise=False)
    return [
        {
            "what": r["what"],
            "variant": r["variant"],
            "wall_s": round(r["s_per_min"] * seconds / 60, 1),
            "rtf": round(r["s_per_min"] / 60, 3),
            "rel_l2": r["rel_l2"],
        }
        for r in rows
    ]


def cold_start(song: Path, size: str) -> dict:
    """A fresh interpreter: imports, model loads, the first cover."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--models", size, "--cold-child", str(song)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COVER_LOG_LEVEL": "ERROR"},
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"what": "cold start", "variant": "process start to first cover", "wall_s": round(wall, 2), **child}


def _cold_child(song: Path, size: str) -> None:
    from job.devkit import demo
    from job.render.pipeline import Pipeline

    pipeline = Pipeline(_settings(size))
    result = _render(pipeline, song, pipeline.store.voice(demo.DEMO_VOICE), WORK / "tmp" / "cold.mp3")
    print(json.dumps({"stages": {k: round(v, 2) for k, v in result.timings.items()}, "peak_mib": _peak_mib()}))


def _render(pipeline, song: Path, voice, out: Path):
    """One cover in a work folder of its own (removed after)."""
    from job.render.workfolder import work_folder

    with work_folder(pipeline.settings.work_dir) as work:
        return pipeline.render(song, voice, out, work=work)


def warm_cover(pipeline, song: Path, song_s: int, label: str = "") -> dict:
    from job.devkit import demo

    voice = pipeline.store.voice(demo.DEMO_VOICE)
    _render(pipeline, song, voice, WORK / "tmp" / "warmup.mp3")  # loads and warms every model
    _peak_mib(reset=True)
    started = time.perf_counter()
    result = _render(pipeline, song, voice, WORK / "tmp" / "warm.mp3")
    wall = time.perf_counter() - started
    return {
        "what": "warm cover",
        "variant": f"{song_s} s song{label}",
        "wall_s": round(wall, 2),
        "rtf": round(wall / song_s, 4),
        "stages": {k: round(v, 2) for k, v in result.timings.items()},
        "peak_mib": _peak_mib(),
    }


def in_flight(pipeline, song: Path, n: int, covers: int) -> dict:
    from job.devkit import demo

    voice = pipeline.store.voice(demo.DEMO_VOICE)
    _peak_mib(reset=True)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(
            pool.map(lambda i: _render(pipeline, song, voice, WORK / "tmp" / f"flight-{n}-{i}.mp3"), range(covers))
        )
    wall = time.perf_counter() - started
    waits = [r.timings.get("device_wait", 0.0) for r in results]
    return {
        "what": "in flight",
        "variant": f"{n} in flight, {pipeline.heavy_slots} heavy slot(s), {covers} covers",
        "wall_s": round(wall, 2),
        "covers_per_min": round(covers * 60 / wall, 2),
        "mean_device_wait_s": round(sum(waits) / len(waits), 2),
        "peak_mib": _peak_mib(),
    }


def flights(spec: str) -> list[tuple[int, int]]:
    """``--in-flight``'s entries, in order: ``N`` (requests in flight, with the runner's default heavy
    slots: 2 on a GPU) or ``NxS`` (``S`` heavy slots); 0 slots stands for the default."""
    out = []
    for entry in filter(None, (v.strip() for v in spec.split(","))):
        n, _, slots = entry.partition("x")
        out.append((int(n), int(slots or 0)))
    return out


def table(rows: list[dict], command: str) -> str:
    lines = [
        f"# GPU benchmark ({date.today().isoformat()})",
        "",
        f"card: {card()}",
        "",
        f"command: `{command}`",
        "",
        "| what | variant | wall s | RTF / covers per min | stages s | peak GPU MiB | error vs exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = r.get("covers_per_min", r.get("rtf", ""))
        stages = ", ".join(f"{k} {v}" for k, v in r.get("stages", {}).items())
        error = ", ".join(f"{k} {r[k]}" for k in ("sdr_db", "rel_l2", "lsd_db", "corr") if k in r)
        extra = f" (mean device wait {r['mean_device_wait_s']} s)" if "mean_device_wait_s" in r else ""
        lines.append(
            f"| {r['what']} | {r['variant']}{extra} | {r.get('wall_s', '')} | {rate} | {stages} | "
            f"{r.get('peak_mib', '')} | {error} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:  # noqa: PLR0915 - reads best top to bottom
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--song-s", type=int, default=210, help="length of the demo song (3.5 minutes)")
    parser.add_argument(
        "--in-flight",
        default="1,4x1,4,6",
        help="the throughput rows: requests in flight, each N (the default heavy slots) or NxS (S heavy slots)",
    )
    parser.add_argument("--excerpt-s", type=int, default=EXCERPT_S, help="seconds the precision rows compare")
    parser.add_argument("--covers-per-slot", type=int, default=2, help="covers per request in flight")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip the steps that would start later")
    parser.add_argument("--skip", default="", help="steps to skip: precision,mdx,cold,warm,flight")
    parser.add_argument("--mdx-s", type=float, default=30.0, help="seconds of vocals each MDX-Net row splits")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--models", choices=["real", "tiny"], default="real", help="tiny: check the script quickly")
    parser.add_argument("--cold-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cold_child:
        _cold_child(args.cold_child, args.models)
        return
    started = time.perf_counter()
    import torch

    from job.devkit import demo
    from job.render.pipeline import Pipeline
    from shared.logs import setup_logging

    setup_logging("ERROR")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    demo.write_models(_models(args.models), size=args.models)
    song = song_file(args.song_s)
    print(f"setup {time.perf_counter() - started:.1f} s on {card()}", file=sys.stderr, flush=True)
    command = " ".join(["python -m bench.gpu", *sys.argv[1:]])
    rows: list[dict] = []
    skip = set(args.skip.split(","))

    def step(name: str, fn) -> None:
        if name.split(":", maxsplit=1)[0] in skip:
            return
        if time.perf_counter() - started > args.budget_s:
            print(f"{name}: skipped, budget spent", file=sys.stderr, flush=True)
            return
        t0 = time.perf_counter()
        try:
            got = fn()
        except Exception as exc:  # one broken step must not lose the others' numbers
            import traceback

            traceback.print_exc()
            got = [{"what": name, "variant": f"FAILED: {type(exc).__name__}: {str(exc)[:200]}"}]
        got = got if isinstance(got, list) else [got]
        rows.extend(got)
        print(f"{name}: {time.perf_counter() - t0:.1f} s {json.dumps(got)}", file=sys.stderr, flush=True)
        args.results.write_text(table(rows, command))  # after every step: a cut-off run keeps its rows

    step("precision", lambda: precision_rows(device, args.models, args.excerpt_s))
    step("cold", lambda: cold_start(song, args.models))
    pipeline = Pipeline(_settings(args.models))
    step("warm", lambda: warm_cover(pipeline, song, args.song_s))
    # the same warm cover with the mix in one piece (by default its passes and MP3 encoders take stretches)
    one_encoder = Pipeline(_settings(args.models, mix_workers=1))
    one_encoder._separators, one_encoder.converter = pipeline._separators, pipeline.converter
    step("warm:one-encoder", lambda: warm_cover(one_encoder, song, args.song_s, ", the mix in one piece"))
    pipelines = {0: pipeline, pipeline.heavy_slots: pipeline}
    for n, slots in flights(args.in_flight):
        if slots not in pipelines:  # the same loaded models, another number of heavy slots
            pipelines[slots] = Pipeline(_settings(args.models, heavy_slots=slots))
            pipelines[slots]._separators, pipelines[slots].converter = pipeline._separators, pipeline.converter
        step(
            f"flight:{n}x{slots}",
            lambda n=n, p=pipelines[slots]: in_flight(p, song, n, n * args.covers_per_slot),
        )
    step("mdx", lambda: mdx_rows(args.mdx_s))  # last: the rows above are the ones the budget keeps
    out = table(rows, command)
    args.results.write_text(out)
    print(out)


if __name__ == "__main__":
    main()

"""The MDX-Net passes' costs (issue 34): ``python -m bench.mdx [--seconds 60] [--cover-seconds 60]``.

Two real-size MDX-Net-shaped models with random weights (job/devkit/mdx.py: UVR's layout, 13.2 M
parameters at dim_f 2048; random weights run as fast as trained ones) in the two shapes people
use: UVR_MDXNET_KARA_2's (n_fft 5120, dim_f 2048, dim_t 256) and Reverb_HQ_By_FoxJoy's (n_fft
6144, dim_f 3072, dim_t 512). Each splits the demo song's vocals (44.1 kHz stereo); rows are
seconds per minute of stem on each runtime that applies here (ONNX Runtime's CPU provider, the
reference, with and without denoise; torch in fp32 with the fast layout; torch in bf16 on CPUs with
native bf16, in fp16 on a GPU) and each one's distance from the reference (vocals that sing
throughout: every chunk runs). Then a whole cover of the song-form demo song (verses, choruses,
instrumental breaks) on the real-size demo models, without the passes and with both (backing
original, de-reverb), in the same run, measured and not repaired (as ``bench.pipeline``'s rows):
their ratio is the issue's 1.3x budget. Prints Markdown rows.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPES = {  # UVR_MDXNET_KARA_2's and Reverb_HQ_By_FoxJoy's (job/render/separate/mdx_models.json)
    "karaoke": {"n_fft": 5120, "dim_f": 2048, "dim_t": 256, "compensate": 1.065, "primary": "instrumental"},
    "dereverb": {"n_fft": 6144, "dim_f": 3072, "dim_t": 512, "compensate": 1.035, "primary": "reverb"},
}


def runtimes() -> list[tuple[str, dict[str, Any]]]:
    """What can run the passes on this machine (label, :class:`MdxModel` arguments): ONNX Runtime's
    CPU provider (the reference), torch in fp32 with the fast layout, and torch in the precision
    ``auto`` picks where it is lowered (fp16 on a GPU, bf16 on CPUs with native bf16)."""
    import torch

    from job.render.compute import precision_name, resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_args = {"on_torch": True, "device": device, "channels_last": True}
    out = [
        ("ONNX Runtime, fp32 (CPU provider)", {}),
        (f"torch, fp32, {device.type}", {**torch_args, "dtype": torch.float32}),
    ]
    auto = resolve_precision("auto", device)
    if auto != torch.float32:
        out.append((f"torch, {precision_name(auto)}, {device.type}", {**torch_args, "dtype": auto}))
    return out


def pass_rows(work: Path, seconds: float, denoise: bool = True) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Each pass on each runtime (:func:`runtimes`): seconds per minute of stem (with denoise on
    the reference's row too), and the primary stem's relative L2 from the reference's; the models
    written (by kind).

    Args:
        work: a scratch folder
        seconds: how much of the demo vocals each row splits
        denoise: time the reference's denoise too
    """
    import numpy as np

    from job.devkit import demo
    from job.devkit import mdx as devkit
    from job.render.media.audio import MIX_SAMPLE_RATE, read_wav, write_wav
    from job.render.separate.mdx import MdxModel
    from job.render.separate.mdx_params import MdxParams

    vocals = demo.demo_song(seconds)[0]
    stem = write_wav(work / "vocals.wav", vocals, MIX_SAMPLE_RATE)
    files, rows = {}, []
    for kind, shape in SHAPES.items():
        p = MdxParams.model_validate(shape)
        files[kind] = devkit.write_convtdf(work / f"{kind}.onnx", p.dim_f, p.dim_t, size="real")
        reference = None
        for label, kwargs in runtimes():
            model = MdxModel(files[kind], p, **kwargs)
            row: dict[str, Any] = {"what": f"MDX-Net {kind} (n_fft {p.n_fft}, dim_f {p.dim_f}, dim_t {p.dim_t})"}
            row["variant"] = f"{label}: ran on {model.arithmetic}"
            for noise in (False, True) if denoise and reference is None else (False,):
                started = time.perf_counter()
                model.split(stem, work / "a.wav", work / "b.wav", noise)
                row["s_per_min_denoise" if noise else "s_per_min"] = round(
                    (time.perf_counter() - started) * 60.0 / seconds, 1
                )
                if not noise:
                    primary = read_wav(work / "a.wav")[0]
            if reference is None:
                reference = primary
            difference = float(np.linalg.norm(primary - reference))
            row["rel_l2"] = float(f"{difference / max(float(np.linalg.norm(reference)), 1e-30):.2g}")
            # against the stem it split: random weights can leave a primary near silence (the karaoke
            # shape's is at -100 dB), where a relative L2 measures the rounding of next to nothing
            level = float(np.linalg.norm(vocals[:, : primary.shape[-1]]))
            row["error_db"] = _db(difference, level)
            row["primary_db"] = _db(float(np.linalg.norm(reference)), level)
            rows.append(row)
    return rows, files


def _db(part: float, whole: float) -> float:
    """``part`` against ``whole`` in dB (-240 for nothing)."""
    return round(20 * math.log10(max(part / max(whole, 1e-30), 1e-12)), 1)


def passes(work: Path, seconds: float) -> dict[str, Path]:
    """Print each pass's rows (:func:`pass_rows`); the models written (by kind)."""
    rows, files = pass_rows(work, seconds)
    print(
        "| pass (real-size shape) | runtime | s per minute of stem | with denoise | relative L2 from the reference "
        "| difference from the reference, dB of the stem | primary stem, dB of the stem |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [r["what"], r["variant"], r["s_per_min"], r.get("s_per_min_denoise", ""), r["rel_l2"]]
        cells += [r["error_db"], r["primary_db"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    return files


def linked_store(store: Path, root: Path, files: dict[str, Path] | None = None) -> Path:
    """``root``: a store of ``store``'s models (linked, its MDX-Net models left out) with the two
    real-size MDX-Net-shaped models of ``files`` (by kind) added, or none when ``files`` is None.

    Args:
        store: a store holding the demo models
        root: the new store's folder (made here)
        files: the karaoke and de-reverb ONNX files, by kind (:data:`SHAPES`' keys)
    """
    from job.cli.separation_models import add_separation_model
    from job.render.media.download import UrlPolicy
    from job.render.separate.mdx_params import MdxKind
    from shared.model_store import ModelStore

    store = store.resolve()  # links to the real folders, not through a link to them
    (root / "separation").mkdir(parents=True)
    for item in (store / "separation").iterdir():
        if item.name != "mdx":
            (root / "separation" / item.name).symlink_to(item)
    for name in ("base", "voices"):
        (root / name).symlink_to(store / name)
    for kind, path in (files or {}).items():
        text = ",".join(f"{k}={v}" for k, v in SHAPES[kind].items())
        add_separation_model(ModelStore(root), str(path), MdxKind(kind), text, False, UrlPolicy())
    return root


def _stores(work: Path, files: dict[str, Path]) -> tuple[Path, Path]:
    """Two stores of the real-size demo models (linked): without and with the two MDX-Net models."""
    from job.devkit import demo
    from shared.settings import Settings

    store = Settings().models_dir
    demo.write_models(store)
    return linked_store(store, work / "plain-store"), linked_store(store, work / "mdx-store", files)


def covers(work: Path, files: dict[str, Path], seconds: float) -> None:
    """Print a cover's time without the passes and with both, in this run."""
    from bench.pipeline import bench_settings
    from job.devkit import demo
    from job.render.pipeline import CoverOptions, Pipeline
    from shared.options import StemOptions

    plain, with_mdx = _stores(work, files)
    song = demo.write_demo_song(work / "song.wav", seconds=seconds, form="song")  # with instrumental breaks
    print(f"\n| cover of a {seconds:.0f} s song-form song (real-size demo models) | s | x song | stages |")
    print("| --- | --- | --- | --- |")
    took: list[float] = []
    for label, root, stems in (
        ("today's (no MDX-Net models)", plain, StemOptions()),
        ("with both passes (backing original, dereverb)", with_mdx, StemOptions(dereverb=True)),
    ):
        pipeline = Pipeline(bench_settings(models_dir=root, work_dir=work / "w"))  # measured, not repaired
        options = CoverOptions(stems=stems, allow_no_vocals=True)
        voice = pipeline.store.voice(demo.DEMO_VOICE)
        pipeline.render(song, voice, work / "warm.mp3", options, work=work / "warm")  # loads every model
        started = time.perf_counter()
        result = pipeline.render(song, voice, work / "cover.mp3", options, work=work / f"w{len(took)}")
        took.append(time.perf_counter() - started)
        stages = ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items())
        print(f"| {label} | {took[-1]:.1f} | {took[-1] / seconds:.2f} | {stages} |")
    print(f"\nwith both passes / without: **{took[1] / took[0]:.2f}x** (the issue's budget: 1.3x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="stem length for the per-pass rows")
    parser.add_argument("--cover-seconds", type=float, default=60.0, help="song length for the cover rows (0: none)")
    args = parser.parse_args()
    import torch

    print(f"torch threads {torch.get_num_threads()}; {args.seconds:.0f} s of stem per row\n")
    with tempfile.TemporaryDirectory() as tmp:
        files = passes(Path(tmp), args.seconds)
        if args.cover_seconds > 0:
            covers(Path(tmp), files, args.cover_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

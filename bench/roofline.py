"""How far the exact path is from this machine's arithmetic: the floor under a cover's time.

    python -m bench.roofline [--threads 2] [--precision fp32|bf16]

Counts the floating-point work of the two networks that take most of a cover (the RVC decoder of
the real-size v2 48 kHz voice, per second of vocals, stage by stage; HTDemucs, per segment) with
torch's ``FlopCounterMode``, times the same work on the shipped fp32 paths (the decoder's fast
layout in 2 s tiles, Demucs with the functional attention), and sets both against the rate this
machine gives a large fp32 matrix product (the best torch reaches here: a proxy for the peak).
Prints, per part: GFLOP per second of audio, the rate achieved, its share of the matrix product's,
and the floor (FLOPs / matrix-product rate) for a 3.5-minute song. No approximation is in any of
it: the floor is what the exact computation costs at the machine's best rate.

With ``--precision bf16`` (CPUs with native bf16) the same work is timed on the paths ``auto`` ships
in bf16 there (the decoder's fast layout in bf16 in its bf16 tiles, Demucs under bf16 autocast)
and set against a 2048-square bf16 matrix product; the MDX-Net shapes get their floor at that rate
(their shipped time in bf16 is ``python -m bench.mdx``'s).
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.convert import machine
from bench.pipeline import REFERENCE_SONG_S
from job.devkit import demo
from job.render.compute import heap_buffers
from job.render.media.audio import MIX_SAMPLE_RATE
from job.render.rvc.checkpoint import build_synthesizer, read_checkpoint
from job.render.rvc.generator import Generator, tile_frames, to_fast_layout
from job.render.separate.loading import load_separator_model
from job.render.separate.separator import functional_attention
from shared.model_store import ModelStore
from shared.options import SeparationOptions

WORK = Path(__file__).parent / ".work"
SONG_S = float(REFERENCE_SONG_S)  # the benchmark song's length (3.5 minutes)
SEGMENT_STRIDE = 1 - SeparationOptions().overlap  # Demucs' segments advance by this share of their length


def best_of(fn: Callable[[], object], rounds: int = 3) -> float:
    """The shortest of ``rounds`` timed calls (after one untimed warm-up)."""
    fn()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def _cpu_attention_flops(
    query: tuple[int, ...], key: tuple[int, ...], value: tuple[int, ...], *args: object, **kwargs: object
) -> int:
    """``scaled_dot_product_attention``'s CPU kernel (torch counts only its GPU ones): the scores
    and the weighted sum, two matrix products."""
    *batch, queries, dim = query
    keys, value_dim = key[-2], value[-1]
    return 2 * math.prod(batch) * queries * keys * (dim + value_dim)


def flops(fn: Callable[[], object]) -> int:
    """The floating-point operations ``fn`` runs (a multiply-add counts two)."""
    attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=attention) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_rate(size: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of a ``size``-square matrix product in ``dtype``."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / best_of(lambda: a @ b, rounds=5) / 1e9


def decoder_parts(dec: Generator, frames: int, dtype: torch.dtype = torch.float32) -> list[tuple[str, int, float]]:
    """(part, FLOPs, seconds) of one fast-layout tile of ``frames`` output frames (plus the tile
    margins the shipped path decodes too) in ``dtype``, the decoder's own layers part by part."""
    span = frames + 2 * dec.margin
    x = torch.randn(1, dec.conv_pre.in_channels, span)
    g = torch.randn(1, dec.cond.in_channels, 1) if dec.cond is not None else None
    f0 = torch.full((1, span), 220.0)
    with torch.inference_mode():
        source = dec.source(f0)
        fast = [to_fast_layout(t, dtype) if t is not None else None for t in (x, g, source)]
        xf, gf, sf = fast
        entry = lambda: dec.conv_pre(xf) + (dec.cond(gf) if dec.cond is not None else 0)  # noqa: E731
        inputs = [entry()]
        for i in range(len(dec.ups)):
            inputs.append(dec._stage(i, inputs[-1], sf))
    parts: list[tuple[str, Callable[[], object]]] = [("input conv", entry)]
    for i in range(len(dec.ups)):
        channels = dec.ups[i].out_channels
        parts.append((f"stage {i + 1} ({channels} ch)", functools.partial(dec._stage, i, inputs[i], sf)))
    parts.append(("output conv, tanh", lambda: torch.tanh(dec.conv_post(torch.nn.functional.leaky_relu(inputs[-1])))))
    out = []
    for name, fn in parts:
        with torch.inference_mode():
            out.append((name, flops(fn), best_of(fn)))
    return out


def demucs_segment(store: ModelStore, dtype: torch.dtype = torch.float32) -> tuple[int, float, float]:
    """(FLOPs, seconds, segment seconds) of one HTDemucs segment on the fast path in ``dtype``
    (autocast where it is lowered, as separation runs it)."""
    bag = load_separator_model("htdemucs", store)
    model = getattr(bag, "models", [bag])[0]  # the demo's bag holds one model
    model.to(memory_format=torch.channels_last)
    seconds = float(model.segment)
    batch = torch.randn(1, 2, int(seconds * model.samplerate))
    lowered = dtype != torch.float32
    with torch.inference_mode(), functional_attention(), torch.autocast("cpu", dtype=dtype, enabled=lowered):
        run = lambda: model(batch)  # noqa: E731
        return flops(run), best_of(run, rounds=2), seconds


def mdx_chunk(shape: dict[str, object], timed: bool = True) -> tuple[int, float, float]:
    """(FLOPs, seconds in fp32 on the devkit's torch module (NaN unless ``timed``), seconds of stem
    kept) of one chunk of an MDX-Net pass at a real-size shape (job/devkit/mdx.py's layout; the
    shipped pass runs the ONNX file on torch's graph runner, whose time ``python -m bench.mdx``
    gives)."""
    from job.devkit.mdx import SIZES, ConvTdfNet
    from job.render.separate.mdx_params import MdxParams

    p = MdxParams.model_validate(shape)
    net = ConvTdfNet(p.dim_f, **SIZES["real"]).eval()
    x = torch.randn(1, 4, p.dim_f, p.dim_t)
    with torch.inference_mode():
        run = lambda: net(x)  # noqa: E731
        return flops(run), best_of(run, rounds=2) if timed else math.nan, p.step / MIX_SAMPLE_RATE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    models = WORK / "models"
    demo.write_models(models, size="real")
    store = ModelStore(models)
    with heap_buffers():  # as the shipped stages run
        report(store, dtype, args.precision)


def report(store: ModelStore, dtype: torch.dtype, name: str) -> None:
    """Print the decoder's parts, HTDemucs' segment and the MDX-Net shapes' floors in ``dtype``."""
    rate = matmul_rate(dtype=dtype)
    print(f"machine: {machine()}")
    print(f"{name} matrix product (2048 square): {rate:.1f} GFLOP/s\n")
    synth = build_synthesizer(read_checkpoint(store.root / "voices" / demo.DEMO_VOICE / "model.pth"))
    dec = synth.dec
    frames = tile_frames(dtype)
    tile_s = frames / 100  # the decoder makes 100 frames a second
    rows = decoder_parts(dec, frames, dtype)
    total_flops = sum(f for _, f, _ in rows)
    total_s = sum(s for _, _, s in rows)
    print(
        f"| decoder part ({name} fast layout, a {tile_s:.0f} s tile with its margins) | GFLOP per s of vocals"
        " | GFLOP/s | share of the matrix product's rate | share of the decoder's time |"
    )
    print("| --- | --- | --- | --- | --- |")
    for part, f, s in rows:
        print(f"| {part} | {f / tile_s / 1e9:.1f} | {f / s / 1e9:.1f} | {f / s / 1e9 / rate:.2f} | {s / total_s:.2f} |")
    per_s = total_flops / tile_s
    achieved = total_flops / total_s / 1e9
    print(f"| **whole decoder** | **{per_s / 1e9:.1f}** | {achieved:.1f} | {achieved / rate:.2f} | 1.00 |")
    print(
        f"\ndecoder: {total_s / tile_s:.2f} s per second of vocals as shipped in {name}; floor at the matrix"
        f" product's rate {per_s / rate / 1e9:.2f} s per second, {SONG_S * per_s / rate / 1e9:.0f} s for"
        f" {SONG_S:.0f} s of vocals"
    )
    seg_flops, seg_s, seconds = demucs_segment(store, dtype)
    segments = SONG_S / (seconds * SEGMENT_STRIDE)
    print(
        f"HTDemucs: {seg_flops / 1e9:.0f} GFLOP per {seconds:.1f} s segment, {seg_s:.2f} s on the {name} path"
        f" ({seg_flops / seg_s / 1e9:.1f} GFLOP/s, {seg_flops / seg_s / 1e9 / rate:.2f} of the matrix product's);"
        f" {segments:.0f} segments for {SONG_S:.0f} s: {segments * seg_s:.0f} s as shipped, floor"
        f" {segments * seg_flops / rate / 1e9:.0f} s"
    )
    from bench.mdx import SHAPES

    fp32 = dtype == torch.float32  # the devkit's module times fp32 only; bench.mdx times the shipped passes
    for kind, shape in SHAPES.items():
        chunk_flops, chunk_s, kept = mdx_chunk(shape, timed=fp32)
        per_minute = 60 / kept
        speed = (
            f"torch fp32 {chunk_s * per_minute:.1f} s per minute of stem ({chunk_flops / chunk_s / 1e9:.1f} GFLOP/s)"
            if fp32
            else f"shipped in {name}: `python -m bench.mdx`"
        )
        print(
            f"MDX-Net {kind} shape: {chunk_flops / 1e9:.0f} GFLOP per chunk ({kept:.1f} s kept), {speed},"
            f" floor {per_minute * chunk_flops / rate / 1e9:.1f} s per minute"
        )


if __name__ == "__main__":
    main()

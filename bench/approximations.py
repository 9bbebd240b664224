"""The benchmark cover on this machine's default path against the same cover on the exact path:

    python -m bench.approximations [--seconds 60] [--results FILE]     (make bench-approximations)

Every approximation ``auto`` takes on this machine (bf16 or the int8 decoder, the fast kernels,
HuBERT in bf16, ...) is tested on its own against its exact path (docs/engine.md, "Quality checks
for the approximations"); here they act together, on a whole cover of the song-form demo song: the
exact path (``COVER_PRECISION=fp32 COVER_KERNELS=reference COVER_DECODER=torch``: Demucs' own
arithmetic, the reference decoder) and the default (``auto``), each rendered once in a process of
its own with the quality stage on and repair off, the same seed. The default cover's converted
vocals are scored by the quality stage against the exact cover's (``bench.measures
.quality_against_exact``: F0 correlation and RMSE, the drop in speaker similarity, the largest
DNSMOS change) and held to the bounds the tests hold each approximation to
(``bench.measures.QualityView.outside``); the separated vocals are compared by their SDR, and each
cover's own quality report (its vocals against its own separated vocals) is given beside it.

With random weights the scores bound what the arithmetic does, not how a trained voice sounds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from bench.measures import (
    MAX_DNSMOS_SHIFT,
    MAX_F0_RMSE_CENTS,
    MAX_SPEAKER_DROP,
    MIN_F0_CORRELATION,
    MIN_MELODY_SPREAD_CENTS,
    compare,
    quality_against_exact,
    sdr_db,
)
from bench.pipeline import WORK, bench_settings, cell, machine, publish, song_file

RESULTS = Path(__file__).parent / "RESULTS-approximations.md"
PATHS = {"exact": ("fp32", "reference", "torch"), "default": ("auto", "fast", "auto")}


def render(path: str, seconds: int) -> dict:
    """One cover on ``path`` (a key of :data:`PATHS`), in this process: its separated and converted
    vocals kept under ``bench/.work/approximations/PATH``, its timings and quality scores returned."""
    import shutil

    from job.devkit import demo
    from job.render.pipeline import Pipeline
    from job.render.workfolder import work_folder

    precision, kernels, decoder = PATHS[path]
    demo.write_models(WORK / "models", size="real")
    song = song_file(seconds)
    keep = WORK / "approximations" / path
    keep.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline(bench_settings(precision, kernels, decoder), one_cover=True)
    voice = pipeline.store.voice(demo.DEMO_VOICE)
    start = time.perf_counter()
    with work_folder(pipeline.settings.work_dir) as work:
        result = pipeline.render(song, voice, keep / "cover.mp3", work=work)
        shutil.copyfile(result.conversion.path, keep / "converted.wav")
        lead = result.vocal_stems.lead if result.vocal_stems else None
        if lead is None or not lead.is_file():
            raise RuntimeError("the cover kept no separated vocals to compare")
        shutil.copyfile(lead, keep / "vocals.wav")
    whole = result.quality.whole if result.quality else None
    return {
        "path": path,
        "settings": f"COVER_PRECISION={precision} COVER_KERNELS={kernels} COVER_DECODER={decoder}",
        "wall": round(time.perf_counter() - start, 1),
        "stages_s": {k: round(v, 1) for k, v in result.timings.items()},
        "own": None if whole is None else json.loads(whole.model_dump_json()),
    }


def in_own_process(path: str, seconds: int) -> dict:
    """:func:`render` in a fresh interpreter (each path's models and memory its own)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.approximations", "--render", path, "--seconds", str(seconds)],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def mono(path: Path) -> tuple[np.ndarray, int]:
    from job.render.media.audio import read_wav

    audio, rate = read_wav(path)
    return (audio.mean(axis=0) if audio.ndim == 2 else audio).astype(np.float32), rate


def compared(seconds: int) -> tuple[list[dict], dict]:
    """Both covers' rows and the default's view against the exact one's."""
    from job.render.quality.meter import QualityMeter

    rows = [in_own_process(path, seconds) for path in PATHS]
    kept = WORK / "approximations"
    exact_vocals, _ = mono(kept / "exact" / "vocals.wav")
    default_vocals, _ = mono(kept / "default" / "vocals.wav")
    n = min(len(exact_vocals), len(default_vocals))
    exact, rate = mono(kept / "exact" / "converted.wav")
    default, _ = mono(kept / "default" / "converted.wav")
    m = min(len(exact), len(default))
    view = quality_against_exact(QualityMeter(), exact[:m], default[:m], rate)
    found = {**view.model_dump(exclude={"scores"}), **compare(exact[:m], default[:m])}
    found["separation_sdr_db"] = round(sdr_db(exact_vocals[:n], default_vocals[:n]), 2)
    found["outside"] = view.outside()
    return rows, found


def lines(seconds: int, rows: list[dict], view: dict) -> list[str]:
    out = [
        f"# The default path's cover against the exact path's ({date.today().isoformat()})",
        "",
        f"machine: {machine()}",
        "",
        f"command: `python -m bench.approximations --seconds {seconds}`",
        "",
        f"The song-form demo song's first {seconds} s, the demo voice (real size, random weights), quality "
        "stage on, repair off; each path in a process of its own.",
        "",
        "| path | settings | wall s | by stage, s | its own quality report: F0 corr, F0 RMSE cents, speaker sim, "
        "DNSMOS overall |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        own = r["own"] or {}
        melody, dnsmos = own.get("melody") or {}, own.get("dnsmos") or {}
        scores = ", ".join(
            cell(v, d)
            for v, d in (
                (melody.get("f0_correlation"), 4),
                (melody.get("f0_rmse_cents"), 1),
                (own.get("speaker_similarity"), 4),
                (dnsmos.get("ovrl"), 2),
            )
        )
        stages = ", ".join(f"{k} {v}" for k, v in r["stages_s"].items())
        out.append(f"| {r['path']} | `{r['settings']}` | {r['wall']} | {stages} | {scores} |")
    bounds = [
        (
            "F0 correlation",
            cell(view["f0_corr"]),
            f"> {MIN_F0_CORRELATION} where the exact melody spreads {MIN_MELODY_SPREAD_CENTS:g} cents or more "
            f"(here {cell(view['f0_spread'], 1)})",
        ),
        ("F0 RMSE, cents", cell(view["f0_rmse"], 1), f"< {MAX_F0_RMSE_CENTS}"),
        ("speaker similarity's drop from the exact cover's own", cell(view["speaker_drop"]), f"< {MAX_SPEAKER_DROP}"),
        ("DNSMOS, the largest change of its three scores", cell(view["dnsmos_shift"], 3), f"< {MAX_DNSMOS_SHIFT}"),
    ]
    out += [
        "",
        "The default cover's converted vocals scored by the quality stage against the exact cover's "
        "(`bench.measures.quality_against_exact`), held to the bounds each approximation's test holds it to:",
        "",
        "| measure | default against exact | bound |",
        "|---|---|---|",
        *(f"| {name} | {value} | {bound} |" for name, value, bound in bounds),
        "",
        f"Within every bound: **{'yes' if not view['outside'] else 'no (' + ', '.join(view['outside']) + ')'}**. "
        f"Also: the converted vocals' relative L2 {view['rel_l2']}, log-spectral distance {view['lsd_db']} dB, "
        f"correlation {view['corr']}; the separated vocals' SDR {view['separation_sdr_db']} dB "
        f"(DNSMOS overall: exact {cell(view['dnsmos_exact'], 2)}, default {cell(view['dnsmos'], 2)}).",
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60, help="the song-form demo song's length")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--render", choices=sorted(PATHS), help=argparse.SUPPRESS)  # one path, in this process
    args = parser.parse_args()
    if args.render:
        print(json.dumps(render(args.render, args.seconds)))
        return
    rows, view = compared(args.seconds)
    publish(lines(args.seconds, rows, view), args.results)


if __name__ == "__main__":
    main()

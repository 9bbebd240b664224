"""Where this machine stands against the speed and memory targets, in one run:

    python -m bench.targets [--results FILE]     (make bench-targets)

The rows issue 36's and issue 34's targets are measured on (:mod:`bench.pipeline`'s, each in a
process of its own, in this order): the ``demucs`` CLI separating the 3.5-minute song-form demo
song (the peer), a voice's first cover of it, a second voice on the stems and analysis that cover
left, a 60 s cover without and with both MDX-Net passes, and a 10-minute cover; then
:mod:`bench.approximations`' 60 s cover on the exact and the default path (the default path's
error, as issue 36 asks it be shown). Then each target that applies to this machine's class, its
measured value and whether it is met; a target whose rows failed reads "not measured", never met.
About 30 minutes on 2 cores with native bf16 (28 on the Zen 4 class, the
approximations' covers included), about 45 without (from the AVX2 class's rows).

The class is what ``auto`` tells apart (:func:`job.render.compute.native_bf16`): a CPU with native
bf16 (AVX512-BF16 or AMX) takes issue 36's bf16 targets (0.30x, 0.15x), one without (AVX2; an
AVX-512 CPU without bf16 runs the same path) the AVX2 ones (1.0x, 0.5x). "Flat in length" is read
as the 10-minute cover's peak within 15 % of the 3.5-minute one's. The GPU's targets are
:mod:`bench.gpu`'s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import date
from pathlib import Path

from pydantic import BaseModel

from bench.approximations import compared
from bench.pipeline import machine, publish, run_row, table_lines

RESULTS = Path(__file__).parent / "RESULTS-targets.md"
CLI, FIRST, SECOND = "separate:210:demucs-cli", "cover:210:auto", "second-voice:210:auto"
PLAIN, PASSES, LONG = "cover:60:auto", "cover:60:mdx", "cover:600:auto"
PLAN = [CLI, FIRST, SECOND, PLAIN, PASSES, LONG]
PEAK_LIMIT_MB = 2560.0  # 2.5 GiB
FLAT = 1.15  # the 10-minute cover's peak against the 3.5-minute one's
APPROXIMATIONS_S = 60  # the song bench.approximations renders on both paths


class Verdict(BaseModel):
    """One target and what this run measured against it (None: a row it needs failed)."""

    target: str
    limit: float
    unit: str  # how both numbers read: "" (a ratio), "x" (of the song's length), " MB"
    measured: float | None

    @property
    def met(self) -> bool | None:
        return None if self.measured is None else self.measured <= self.limit

    def cells(self) -> list[str]:
        digits = 0 if self.unit in (" MB", " outside") else 2
        measured = "not measured" if self.measured is None else f"{self.measured:.{digits}f}{self.unit}"
        status = {True: "met", False: "not met", None: "not measured"}[self.met]
        return [self.target, measured, f"<= {self.limit:g}{self.unit}", status]


def stage_peak(row: dict) -> float:
    """The largest of a cover row's stage peaks (RSS, MB): the render's own, not what the process
    did before the clock (generating a demo song)."""
    peaks = [mb for stage, mb in row.get("stage_peaks_mb", {}).items() if stage != "other"]
    return float(max(peaks)) if peaks else float(row["rss_mb"])


def verdicts(rows: dict[str, dict], bf16: bool, outside: list[str] | None = None) -> list[Verdict]:
    """Each target of the class (``bf16``: the CPU has native bf16) against ``rows``, keyed
    ``KIND:SECONDS:VARIANT`` as in :data:`PLAN`; a missing row leaves its targets unmeasured.
    ``outside``: the quality stage's measures of the default path's benchmark cover outside the
    approximations' bounds against the exact path's (:mod:`bench.approximations`; None: not
    measured)."""

    def ratio(a: str, b: str) -> float | None:
        return rows[a]["wall"] / rows[b]["wall"] if a in rows and b in rows else None

    def of_song(key: str) -> float | None:
        return rows[key]["wall"] / rows[key]["audio_s"] if key in rows else None

    cls = "with native bf16" if bf16 else "without native bf16 (AVX2)"
    flat = stage_peak(rows[LONG]) / stage_peak(rows[FIRST]) if LONG in rows and FIRST in rows else None
    return [
        Verdict(
            target="a 3.5-minute cover / the `demucs` CLI on it, same run (36)",
            limit=0.8,
            unit="",
            measured=ratio(FIRST, CLI),
        ),
        Verdict(
            target=f"a 3.5-minute cover / the song, {cls} (36)",
            limit=0.30 if bf16 else 1.0,
            unit="x",
            measured=of_song(FIRST),
        ),
        Verdict(
            target=f"a second voice, stems and analysis cached / the song, {cls} (36)",
            limit=0.15 if bf16 else 0.5,
            unit="x",
            measured=of_song(SECOND),
        ),
        Verdict(
            target="peak RSS of a 10-minute cover, its stages (36)",
            limit=PEAK_LIMIT_MB,
            unit=" MB",
            measured=stage_peak(rows[LONG]) if LONG in rows else None,
        ),
        Verdict(
            target="the 10-minute cover's peak / the 3.5-minute one's: flat in length (36)",
            limit=FLAT,
            unit="",
            measured=flat,
        ),
        Verdict(
            target="a 60 s cover with both MDX-Net passes / one without (34)",
            limit=1.3,
            unit="",
            measured=ratio(PASSES, PLAIN),
        ),
        Verdict(
            target=f"a {APPROXIMATIONS_S} s cover on the default path against the exact path's: the quality stage's "
            "measures outside the approximations' bounds (F0, speaker, DNSMOS; 36)"
            + (f": {', '.join(outside)}" if outside else ""),
            limit=0,
            unit=" outside",
            measured=None if outside is None else len(outside),
        ),
    ]


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the tables are written")
    args = parser.parse_args()
    import torch

    from job.render.compute import native_bf16

    bf16 = native_bf16(torch.device("cpu"))
    # the MDX-Net store first, apart: its one-time export (gigabytes for a while) would otherwise run
    # in the first MDX-Net row's process and leave that row's reads of the models cold
    subprocess.run([sys.executable, "-m", "bench.pipeline", "--prepare-mdx"], check=True, capture_output=True)
    rows: dict[str, dict] = {}
    for key in PLAN:
        kind, seconds, variant = key.split(":")
        if (result := run_row(kind, int(seconds), variant)) is not None:
            rows[key] = result
    outside: list[str] | None = None
    try:  # the default path's cover against the exact path's (each in a process of its own)
        outside = compared(APPROXIMATIONS_S)[1]["outside"]
    except (subprocess.CalledProcessError, RuntimeError) as exc:
        print(f"bench.approximations failed: {exc}", file=sys.stderr)
    lines = [
        f"# Where this machine stands against the targets ({date.today().isoformat()})",
        "",
        f"machine: {machine()}; class: {'native bf16' if bf16 else 'no native bf16 (AVX2)'}; commit {_commit()}",
        "",
        "command: `python -m bench.targets" + (f" --results {args.results}" if args.results != RESULTS else "") + "`",
        "",
        *table_lines(list(rows.values())),
        "",
        "| target (issue) | measured | target | |",
        "|---|---|---|---|",
        *("| " + " | ".join(v.cells()) + " |" for v in verdicts(rows, bf16, outside)),
    ]
    publish(lines, args.results)


if __name__ == "__main__":
    main()

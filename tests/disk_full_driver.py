"""Fills a small disk as a chosen stage of ``cover make`` begins; run by tests/test_disk_full.py
inside ``unshare -rm`` (root of a user and mount namespace of its own, so that it may mount a tmpfs
nobody else sees). For each stage named on the command line: a fresh 64 MB tmpfs holds the work
folder, the stem cache and the cover; when the stage starts, a filler file takes every byte left;
the render goes on and what it ended in is printed as one JSON line.

Usage: python disk_full_driver.py SONG MODELS_DIR MOUNT_POINT STAGE...
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from job.cli import main as cli
from shared.stages import Stage

# when each stage begins, as the progress reports show it: before the first report of the stage,
# except the mix, which reports only at its end (the quality stage's last report comes just before)
TRIGGERS = {
    "fetch": lambda stage, fraction: True,
    "separate": lambda stage, fraction: stage is Stage.SEPARATE,
    "convert": lambda stage, fraction: stage is Stage.CONVERT,
    "mix": lambda stage, fraction: stage is Stage.QUALITY and fraction >= 1.0,
}


def fill(folder: Path) -> None:
    """Take every byte the file system has left."""
    with open(folder / ".filler", "wb", buffering=0) as filler:
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    filler.write(b"\0" * size)


def render(song: str, root: Path, stage: str) -> dict:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)], check=True)
    try:
        os.environ.update(COVER_WORK_DIR=str(root / "work"), COVER_STEM_CACHE_DIR=str(root / "stems"))
        trigger, original, filled = TRIGGERS[stage], cli.StageBars.__call__, []

        def watched(bars: cli.StageBars, at: Stage, fraction: float) -> None:
            if not filled and trigger(at, fraction):
                fill(root)
                filled.append(at.value)
            original(bars, at, fraction)

        cli.StageBars.__call__ = watched  # type: ignore[method-assign]
        if stage == "fetch":
            fill(root)
            filled.append("fetch")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(["make", song, "--voice", "demo-voice", "-o", str(root / "cover.mp3"), "--json"])
        cli.StageBars.__call__ = original  # type: ignore[method-assign]
        cover = root / "cover.mp3"
        duration = None
        if cover.is_file():
            probe = ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(cover)]
            duration = float(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)
        answer = json.loads(out.getvalue().strip().splitlines()[-1]) if out.getvalue().strip() else {}
        return {
            "stage": stage,
            "filled_at": filled,
            "status": status,
            "code": answer.get("error", {}).get("code"),
            "cover_s": duration,
            "left": sorted(p.name for p in root.iterdir() if p.name not in (".filler", "work", "stems")),
            "stderr": err.getvalue()[-600:],
        }
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def main() -> None:
    song, models, mount, *stages = sys.argv[1:]
    os.environ.update(COVER_MODELS_DIR=models, COVER_QUALITY="measure", COVER_REPAIR_BUDGET="0")
    for stage in stages:
        print(json.dumps(render(song, Path(mount), stage)), flush=True)


if __name__ == "__main__":
    main()

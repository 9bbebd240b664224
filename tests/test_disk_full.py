"""A disk that fills at each stage of a render, on a small file system of the test's own (a tmpfs
mounted in a user and mount namespace: ``unshare -rm``, nothing outside it sees the mount): the
command ends in ``work.no_space`` with no cover left behind, or in a complete cover, never in a
truncated one and never in ``internal``. (FFmpeg's ``tee`` muxer ends with status 0 when its file
output hits a full disk: the mix stage once reported a cover cut at 5.4 s of 8 s as a success.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from job.render.media import ffmpeg
from tests.conftest import FULL_SWEEPS

ROOT = Path(__file__).resolve().parent.parent
# make test fills the disk as the first and the last writing stage begin; .ci/run (COVER_TEST_FULL=1) at all four
STAGES = ["fetch", "separate", "convert", "mix"] if FULL_SWEEPS else ["fetch", "mix"]


def _namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False).returncode == 0


@pytest.mark.sweep
@pytest.mark.skipif(not _namespaces(), reason="user namespaces are not available here")
def test_a_disk_that_fills_at_any_stage_ends_in_no_space_or_a_whole_cover(store, song, tmp_path):
    mp3 = tmp_path / "song.mp3"
    ffmpeg.run([*ffmpeg.input_args(song), "-b:a", "128k", "-y", str(mp3)])
    mount = tmp_path / "small-disk"
    mount.mkdir()
    driver = [sys.executable, str(ROOT / "tests" / "disk_full_driver.py"), str(mp3), str(store), str(mount)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        ["unshare", "-rm", *driver, *STAGES], capture_output=True, text=True, timeout=600, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["stage"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert sorted(results) == sorted(STAGES)
    for stage, result in results.items():
        assert result["filled_at"], f"{stage}: the disk was never filled"
        if result["status"] == 0:  # the stage wrote nothing more: a whole cover
            assert result["cover_s"] == pytest.approx(6.0, abs=0.1), f"{stage}: a truncated cover: {result}"
        else:
            assert result["code"] == "work.no_space", f"{stage}: {result}"
            assert result["left"] == [], f"{stage}: a partial cover left behind: {result}"
    assert results["mix"]["code"] == "work.no_space"  # the encoder's file output failed

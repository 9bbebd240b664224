"""Work folders: removed when their render ends, and swept at the next start when the render was
killed (SIGKILL leaves no chance to clean up)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from job.render import workfolder
from job.render.workfolder import OWNER_FILE, sweep_abandoned, work_folder


def _folder(root, name, owner=None, age_s=0.0):
    folder = root / f"cover-{name}"
    folder.mkdir(parents=True)
    (folder / "stem.wav").write_bytes(b"x" * 100)
    if owner is not None:
        (folder / OWNER_FILE).write_text(owner)
    then = time.time() - age_s
    os.utime(folder, (then, then))
    return folder


def test_the_sweep_removes_only_what_no_live_render_owns(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = _folder(tmp_path, "dead", f"{gone.pid} 12345")
    reused = _folder(tmp_path, "reused", f"{os.getpid()} 1")  # our pid, another process's start time
    live = _folder(tmp_path, "live", workfolder._owner())
    fresh = _folder(tmp_path, "fresh")  # its maker is about to name itself
    old = _folder(tmp_path, "old", age_s=3600)
    other = tmp_path / "stems"
    other.mkdir()
    assert sorted(sweep_abandoned(tmp_path)) == sorted([dead, reused, old])
    assert live.is_dir() and fresh.is_dir() and other.is_dir()


def test_a_render_killed_mid_way_leaves_a_folder_the_next_start_removes(tmp_path):
    """A process holding a work folder is SIGKILLed; the next process's first work folder sweeps it."""
    root = tmp_path / "work"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from job.render.workfolder import work_folder\n"
            f"with work_folder(Path({str(root)!r})) as w:\n    print(w, flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    held = holder.stdout.readline().strip()
    assert held and os.path.isdir(held)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert os.path.isdir(held)  # nobody removed it
    workfolder._swept.discard(root.resolve())  # a new process, as far as the sweep knows
    with work_folder(root) as mine:
        assert not os.path.exists(held) and mine.is_dir()
    assert list(root.iterdir()) == []

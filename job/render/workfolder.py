"""One request's work folder: made fresh under the settings' ``work_dir``, removed with everything
in it when the request ends, whichever way it ends. The caller of ``Pipeline.render`` owns it.

A process killed mid-render (SIGKILL, the machine's OOM killer, a lost runner) cannot remove its
folder, so each folder names its owner (``.owner``: the pid and the process's start time, which
tells a live owner from a new process that reuses the pid), and the first work folder a process
makes sweeps the folders whose owner is gone. ``work_dir`` is per machine (a pid means nothing on
another); a folder with no owner yet is left alone for its first minute (its maker may be about to
write it).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.logs import fields

log = logging.getLogger("melodia.work")
PREFIX = "cover-"
OWNER_FILE = ".owner"
UNOWNED_GRACE_S = 60.0
_swept: set[Path] = set()  # the roots this process has swept


def _started(pid: int) -> str | None:
    """The process's start time (``/proc/PID/stat``'s 22nd field), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name, which may hold spaces


def _owner() -> str:
    return f"{os.getpid()} {_started(os.getpid())}"


def _abandoned(folder: Path, now: float) -> bool:
    try:
        pid, started = (folder / OWNER_FILE).read_text().split()
    except (OSError, ValueError):
        try:
            return now - folder.stat().st_mtime > UNOWNED_GRACE_S
        except OSError:
            return False
    return not pid.isdigit() or _started(int(pid)) != started


def sweep_abandoned(root: Path) -> list[Path]:
    """Remove the work folders under ``root`` whose owner process is gone; the ones removed."""
    now = time.time()
    removed = [f for f in sorted(root.glob(f"{PREFIX}*")) if f.is_dir() and _abandoned(f, now)]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    if removed:
        log.info(
            "abandoned work folders removed",
            extra=fields(event="work.swept", folders=[f.name for f in removed]),
        )
    return removed


@contextmanager
def work_folder(root: Path) -> Iterator[Path]:
    """A new folder under ``root`` (created if missing), removed at the end of the ``with`` block."""
    root.mkdir(parents=True, exist_ok=True)
    if root.resolve() not in _swept:
        _swept.add(root.resolve())
        sweep_abandoned(root)
    path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
    try:
        (path / OWNER_FILE).write_text(_owner())
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)

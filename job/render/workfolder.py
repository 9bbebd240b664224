"""One request's work folder: made fresh under the settings' ``work_dir``, removed with everything
in it when the request ends, whichever way it ends. The caller of ``Pipeline.render`` owns it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def work_folder(root: Path) -> Iterator[Path]:
    """A new folder under ``root`` (created if missing), removed at the end of the ``with`` block."""
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="cover-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)

"""Entry points run in the test's own process, answered as a finished process would be.

Where the process boundary is not what a test tests, calling an entry point's ``main`` saves an
interpreter's start and torch's import (about 5 s each) and shares the loaded models."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
from collections.abc import Callable


def run_main(main: Callable[[list[str]], int], argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``main(argv)`` with ``env`` as the whole environment and its standard output and error
    captured: the exit status (argparse's usage exits included), stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(argv)
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
        logging.getLogger().handlers[:] = []  # the entry point's log handler wrote to the captured stream
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())

"""The ``cover`` command line: covers and single stages on one machine, voice admin, model-store push and pull."""

from __future__ import annotations

import sys


def run() -> None:
    """The ``cover`` console script: the command line, or, installed without the job's dependencies
    (``pip install melodia-cover``: the HTTP functions' set), one line saying what to install."""
    try:
        from job.cli.main import main
    except ModuleNotFoundError as exc:
        print(
            f"cover: the command line needs the job's dependencies ({exc.name} is not installed): "
            "pip install 'melodia-cover[job]'",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.exit(main())

"""The ``cover`` command line: covers and single stages on one machine, voice admin, model-store push and pull."""

from __future__ import annotations

import sys

EXIT_MISSING_EXTRA = 2


def missing_extra(exc: ModuleNotFoundError) -> int:
    """Say which extra to install when ``cover`` runs with the core dependencies only (the HTTP
    functions' set, ``pip install melodia-cover``); the exit status."""
    print(
        f"cover: this command needs the job's dependencies ({exc.name} is not installed): "
        "pip install 'melodia-cover[job]'",
        file=sys.stderr,
    )
    return EXIT_MISSING_EXTRA


def run() -> None:
    """The ``cover`` console script (``job.cli.main`` itself imports nothing heavy at start; a command
    that needs the job's dependencies says so in :func:`missing_extra`)."""
    try:
        from job.cli.main import main
    except ModuleNotFoundError as exc:
        sys.exit(missing_extra(exc))
    sys.exit(main())

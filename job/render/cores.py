"""How many cores this process may use: the one count the stages size their side-by-side work by."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container's CPU set limits),
    at least 1."""
    return max(1, len(os.sched_getaffinity(0)))

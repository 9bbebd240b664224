"""How many cores this process may use: the one count the stages size their side-by-side work by."""

from __future__ import annotations

import os

MAX_SIDE_BY_SIDE = 8  # threads or processes one stage runs at once (a GPU host's cores serve several covers)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container's CPU set limits),
    at least 1."""
    return max(1, len(os.sched_getaffinity(0)))


def side_by_side(setting: int = 0, spare: int = 0) -> int:
    """How many pieces of one stage's work run at once: ``setting`` when it is set, else one per
    usable core but ``spare`` (left for the work that feeds or follows them), at most
    :data:`MAX_SIDE_BY_SIDE`; at least 1."""
    return max(1, setting or min(usable_cores() - spare, MAX_SIDE_BY_SIDE))

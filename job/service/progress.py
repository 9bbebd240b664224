"""A render's progress, as the Catalog sees it: ``cover.progress`` events and the cover's status object."""

from __future__ import annotations

import time
from collections.abc import Callable

from shared.events import CoverProgress
from shared.stages import Stage, overall_progress

REPORT_INTERVAL_S = 2.0  # within a stage, one report every this many seconds at most


class ProgressReporter:
    """Reports a render's progress: each stage's end once, and within a stage every
    :data:`REPORT_INTERVAL_S` at most. ``publish`` takes the event; ``status`` writes the cover's
    status object. Calling the reporter answers whether it reported.

    Args:
        template: the event's fields that do not change (cover, request, song, voice, runner)
        publish: publishes a ``cover.progress`` event
        status: writes the cover's status object
        clock: seconds, for the reporting interval
    """

    def __init__(
        self,
        template: CoverProgress,
        publish: Callable[[CoverProgress], None],
        status: Callable[[CoverProgress], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.template = template
        self.publish = publish
        self.status = status
        self.clock = clock
        self._last = float("-inf")
        self._ended: set[Stage] = set()

    def __call__(self, stage: Stage, fraction: float) -> bool:
        now = self.clock()
        if stage in self._ended or (0.0 < fraction < 1.0 and now - self._last < REPORT_INTERVAL_S):
            return False
        if fraction >= 1.0:
            self._ended.add(stage)
        self._last = now
        event = self.template.model_copy(
            update={"stage": stage, "progress": round(fraction, 3), "overall": overall_progress(stage, fraction)}
        )
        self.publish(event)
        self.status(event)
        return True

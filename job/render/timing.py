"""Stage timings: one small helper instead of ``start = time.perf_counter()`` at every stage."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from shared.stages import Stage


class StageTimer:
    """``with timer(Stage.SEPARATE): ...`` adds the block's wall time to ``timer.timings["separate"]``
    (keyed by the stage's name, so the timings are plain JSON)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: Stage) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage.value] = self.seconds(stage) + time.perf_counter() - start

    def seconds(self, stage: Stage) -> float:
        """The time spent in ``stage`` so far (0 for a stage not run)."""
        return self.timings.get(stage.value, 0.0)

    def in_order(self) -> dict[str, float]:
        """The timings in the stages' order (the quality stage's check of the separated vocals runs
        before the conversion, and still comes after it here), anything else after them."""
        order = {stage.value: i for i, stage in enumerate(Stage)}
        return dict(sorted(self.timings.items(), key=lambda item: order.get(item[0], len(order))))

    def rounded(self, digits: int = 3) -> dict[str, float]:
        return {stage: round(seconds, digits) for stage, seconds in self.timings.items()}

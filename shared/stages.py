"""The stages of a cover, spelled once: progress events, status objects, stage timings, the command
line's progress bars, the report and the docs all use these names, in this order.

``Pipeline.render`` (job/render/pipeline.py) runs :data:`RENDER_STAGES`; a runner adds
``accepted``, ``download`` before them and ``upload`` after. ``quality`` and ``repair`` run only
when the quality stage is on (``repair`` only when a segment falls below the gate).
"""

from __future__ import annotations

from enum import Enum


class Stage(str, Enum):  # noqa: UP042 - str() of a member is its value, in messages
    ACCEPTED = "accepted"
    DOWNLOAD = "download"
    FETCH = "fetch"
    SEPARATE = "separate"
    CONVERT = "convert"
    QUALITY = "quality"
    REPAIR = "repair"
    MIX = "mix"
    UPLOAD = "upload"

    # hashed as its name's string (Enum hashes the member's attribute name), so that a stage and
    # its plain spelling are one key in a dict: ``{"separate": 1}[Stage.SEPARATE]``
    __hash__ = str.__hash__


RENDER_STAGES: tuple[Stage, ...] = (
    Stage.FETCH,
    Stage.SEPARATE,
    Stage.CONVERT,
    Stage.QUALITY,
    Stage.REPAIR,
    Stage.MIX,
)

# Each stage's share of a whole render (roughly a CPU runner's time): ``overall`` progress is the
# finished stages' shares plus the current one's part.
SHARES: dict[Stage, float] = {
    Stage.ACCEPTED: 0.0,
    Stage.DOWNLOAD: 0.02,
    Stage.FETCH: 0.03,
    Stage.SEPARATE: 0.35,
    Stage.CONVERT: 0.40,
    Stage.QUALITY: 0.04,
    Stage.REPAIR: 0.01,
    Stage.MIX: 0.10,
    Stage.UPLOAD: 0.05,
}


def overall_progress(stage: Stage, fraction: float) -> float:
    """The whole render's progress when ``stage`` is ``fraction`` done (see :data:`SHARES`)."""
    order = list(Stage)
    done = sum(SHARES[name] for name in order[: order.index(stage)])
    return round(min(1.0, done + SHARES[stage] * fraction), 3)
